"""Rank layout against golden lists written out by hand from NxD's
arange(world).reshape(pp, dp, cp, tp)."""
import pytest

from nxd_cp.topology.layout import ParallelLayout, ring_pairs


def test_tp2_cp2_on_4_ranks():
    lay = ParallelLayout(4, tensor_model_parallel_size=2, context_parallel_size=2)
    assert lay.tensor_parallel_groups() == [[0, 1], [2, 3]]
    assert lay.context_parallel_groups() == [[0, 2], [1, 3]]
    assert lay.data_parallel_groups() == [[0], [1], [2], [3]]
    assert lay.data_context_parallel_groups() == [[0, 2], [1, 3]]
    assert lay.pipeline_parallel_groups() == [[0], [1], [2], [3]]
    assert ring_pairs(lay.context_parallel_groups()) == [[0, 2], [2, 0], [1, 3], [3, 1]]


def test_tp2_cp2_dp2_on_8_ranks():
    lay = ParallelLayout(8, 2, 2)
    assert lay.dp == 2
    assert lay.tensor_parallel_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.context_parallel_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lay.data_parallel_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.data_context_parallel_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert lay.coordinates(7) == (0, 1, 1, 1)


def test_tp8_cp4_on_32_ranks():
    lay = ParallelLayout(32, 8, 4)
    cp = lay.context_parallel_groups()
    assert cp[:3] == [[0, 8, 16, 24], [1, 9, 17, 25], [2, 10, 18, 26]]
    assert cp[-1] == [7, 15, 23, 31] and len(cp) == 8
    assert lay.tensor_parallel_groups()[1] == [8, 9, 10, 11, 12, 13, 14, 15]
    assert lay.data_parallel_groups() == [[r] for r in range(32)]
    assert ring_pairs(cp)[:4] == [[0, 8], [8, 16], [16, 24], [24, 0]]
    assert ring_pairs(cp, -1)[:4] == [[0, 24], [8, 0], [16, 8], [24, 16]]


def test_tp8_cp4_pp2_on_128_ranks():
    lay = ParallelLayout(128, 8, 4, 2)
    assert (lay.dp, lay.pp) == (2, 2)
    assert lay.data_parallel_groups()[:2] == [[0, 32], [1, 33]]
    assert lay.data_parallel_groups()[32] == [64, 96]
    assert lay.pipeline_parallel_groups()[:2] == [[0, 64], [1, 65]]
    assert lay.context_parallel_groups()[8] == [32, 40, 48, 56]
    assert lay.data_context_parallel_groups()[0] == [0, 8, 16, 24, 32, 40, 48, 56]
    assert lay.coordinates(127) == (1, 1, 3, 7)
    # Every kind of group partitions the world.
    for groups in (lay.tensor_parallel_groups(), lay.context_parallel_groups(),
                   lay.data_parallel_groups(), lay.pipeline_parallel_groups(),
                   lay.data_context_parallel_groups()):
        assert sorted(r for g in groups for r in g) == list(range(128))


@pytest.mark.parametrize("kwargs,match", [
    (dict(world_size=6, tensor_model_parallel_size=4), r"world_size=6 is not divisible by .*= 4"),
    (dict(world_size=8, context_parallel_size=3), r"context_parallel_size\(3\)"),
    (dict(world_size=8, context_parallel_size=0),
     r"context_parallel_size=0 must be an integer >= 1"),
    (dict(world_size=0), r"world_size=0 must be"),
    (dict(world_size=8, tensor_model_parallel_size=2.0), r"tensor_model_parallel_size=2.0"),
])
def test_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelLayout(**kwargs)


def test_ring_pairs_direction_checked():
    with pytest.raises(ValueError, match="direction=2"):
        ring_pairs([[0, 1]], 2)


def test_trn1_tp4_layout_and_refusals():
    """NxD's trn1 TP=4 layout: TP groups strided inside a node (golden lists from NxD's
    parallel_state.py comment for 2 nodes of 32 cores); refused with CP > 1, as NxD does."""
    lay = ParallelLayout(64, 4, platform="trn1", local_world_size=32)
    assert lay.tensor_parallel_groups()[:2] == [[0, 8, 16, 24], [1, 9, 17, 25]]
    assert lay.tensor_parallel_groups()[8] == [32, 40, 48, 56]
    assert lay.data_parallel_groups()[0] == [0, 1, 2, 3, 4, 5, 6, 7, 32, 33, 34, 35, 36, 37,
                                             38, 39]
    assert ParallelLayout(64, 4).tensor_parallel_groups()[0] == [0, 1, 2, 3]  # off Neuron
    with pytest.raises(ValueError, match="tensor_model_parallel_size=4 with "
                       "context_parallel_size=8 is refused by NxD on trn1"):
        ParallelLayout(32, 4, 8, platform="trn1", local_world_size=32)
    with pytest.raises(ValueError, match="larger than world_size=4"):
        ParallelLayout(4, 8)


def test_trn2_tp64_layout():
    """NxD's trn2 LOGIC2 for TP=64 on 64 ranks: rows 0 and 3, then rows 1 and 2."""
    lay = ParallelLayout(64, 64, platform="trn2")
    assert lay.tensor_parallel_groups() == [list(range(16)) + list(range(48, 64)) +
                                            list(range(16, 48))]
    assert lay.context_parallel_groups()[16] == [48]
