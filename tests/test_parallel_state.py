"""Parallel state on real gloo ranks: groups, ranks, sizes, and that each group communicates."""
import time

import pytest
import torch
import torch.distributed as dist

from nxd_cp.testing import run_ranks
from nxd_cp import parallel_state as ps
from nxd_cp.topology.layout import ParallelLayout

KINDS = {
    "tensor": (ps.get_tensor_model_parallel_group, ps.get_tensor_model_parallel_rank,
               ps.get_tensor_model_parallel_size),
    "context": (ps.get_context_model_parallel_group, ps.get_context_model_parallel_rank,
                ps.get_context_model_parallel_size),
    "data": (ps.get_data_parallel_group, ps.get_data_parallel_rank, ps.get_data_parallel_size),
    "data_context": (ps.get_data_context_parallel_group, ps.get_data_context_parallel_rank,
                     ps.get_data_context_parallel_size),
    "pipeline": (ps.get_pipeline_model_parallel_group, ps.get_pipeline_model_parallel_rank,
                 ps.get_pipeline_model_parallel_size),
}


def _describe_groups(rank, world, tp, cp):
    """Each kind's (members, rank, size, all-reduce of the global rank inside the group)."""
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    out = {"initialized": ps.model_parallel_is_initialized()}
    for kind, (group, get_rank, get_size) in KINDS.items():
        pg = group()
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=pg)
        out[kind] = (dist.get_process_group_ranks(pg), get_rank(), get_size(), t.item(),
                     group(as_list=True))
    out["cp_replica_groups"] = ps.get_context_model_parallel_replica_groups()
    out["cp_pairs"] = ps.get_context_model_parallel_src_tgt_pairs()
    out["all_rings"] = ps.get_context_model_parallel_ring_pairs()
    out["tp_replica_groups"] = ps.get_tensor_model_parallel_replica_groups()
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        out["double_init"] = "no error"
    except RuntimeError as e:
        out["double_init"] = str(e)
    ps.destroy_model_parallel()
    try:
        ps.get_context_model_parallel_rank()
        out["after_destroy"] = "no error"
    except RuntimeError as e:
        out["after_destroy"] = str(e)
    # CP size 1 is a valid (no-op) configuration.
    ps.initialize_model_parallel(tensor_model_parallel_size=world, context_parallel_size=1)
    out["cp1"] = (ps.get_context_model_parallel_size(), ps.get_context_model_parallel_rank(),
                  ps.get_context_model_parallel_src_tgt_pairs())
    return out


def _expected(world, tp, cp, rank):
    lay = ParallelLayout(world, tp, cp)
    groups = {"tensor": lay.tensor_parallel_groups(), "context": lay.context_parallel_groups(),
              "data": lay.data_parallel_groups(),
              "data_context": lay.data_context_parallel_groups(),
              "pipeline": lay.pipeline_parallel_groups()}
    exp = {}
    for kind, gs in groups.items():
        g = lay.group_of(gs, rank)
        exp[kind] = (g, g.index(rank), len(g), float(sum(g)), gs)
    return exp


@pytest.mark.parametrize("world,tp,cp", [(4, 2, 2), (8, 2, 2)])
def test_groups_on_real_ranks(world, tp, cp):
    results = run_ranks(_describe_groups, world, tp, cp)
    for rank, got in enumerate(results):
        assert got["initialized"]
        exp = _expected(world, tp, cp, rank)
        for kind in KINDS:
            assert got[kind] == exp[kind], (rank, kind)
        assert "already initialized" in got["double_init"]
        assert "not initialized" in got["after_destroy"]
        assert got["cp1"][:2] == (1, 0)
        assert got["cp1"][2] == [(rank, rank)]  # NxD's meaning: this rank's ring
    cp_groups = [[0, 2], [1, 3]] if world == 4 else [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert results[0]["cp_replica_groups"] == cp_groups
    assert results[0]["cp_pairs"] == [(0, 2), (2, 0)]  # NxD's: this rank's ring, sorted
    assert results[3]["cp_pairs"] == [(1, 3), (3, 1)]
    assert results[0]["all_rings"][:4] == [[0, 2], [2, 0], [1, 3], [3, 1]]
    if world == 8:
        assert results[5]["data"][0] == [1, 5]
        assert results[5]["data_context"][0] == [1, 3, 5, 7]


def test_errors_without_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        ps.initialize_model_parallel(context_parallel_size=2)
    with pytest.raises(RuntimeError, match="not initialized: call .*initialize_model_parallel"):
        ps.get_context_model_parallel_group()
    with pytest.raises(RuntimeError, match="not initialized"):
        ps.get_tensor_model_parallel_size()
    with pytest.raises(ValueError, match="kind='expert'"):
        ps.get_group_spec("expert")
    assert not ps.model_parallel_is_initialized()


def _bad_sizes(rank, world):
    msgs = []
    for kwargs in (dict(tensor_model_parallel_size=3), dict(context_parallel_size=0),
                   dict(tensor_model_parallel_size=2, context_parallel_size=2,
                        pipeline_model_parallel_size=2)):
        try:
            ps.initialize_model_parallel(**kwargs)
            msgs.append("no error")
        except ValueError as e:
            msgs.append(str(e))
    return msgs


def _hang(rank, world):
    if rank == 1:
        time.sleep(3600)
    return rank


def test_bad_sizes_and_hang_reporting():
    msgs = run_ranks(_bad_sizes, 2)[0]
    assert "tensor_model_parallel_size=3 is larger than world_size=2" in msgs[0]
    assert "context_parallel_size=0 must be an integer >= 1" in msgs[1]
    assert "= 8" in msgs[2]
    with pytest.raises(TimeoutError, match=r"(?s)did not finish within 10s.*rank 1 stack.*_hang"):
        run_ranks(_hang, 2, timeout=10)


STALL_TIMEOUT = 10  # seconds: the world group's timeout in the stall test


def _stall(rank, world):
    """TP1 x CP4: rank 1 stalls before a CP all-reduce; the others time out on the CP group."""
    ps.initialize_model_parallel(context_parallel_size=4)
    group = ps.get_context_model_parallel_group()
    dist.barrier()
    if rank == 1:
        time.sleep(STALL_TIMEOUT + 8)  # longer than the timeout, bounded
        return {"stalled": True}
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4), group=group)
        return {"error": None, "elapsed": time.monotonic() - start}
    except RuntimeError as e:
        return {"error": str(e)[:200], "elapsed": time.monotonic() - start}


def test_groups_inherit_world_timeout():
    """Issue 15: a stalled CP rank makes every other rank raise within the world group's
    timeout (init_process_group(timeout=10 s)) + a few seconds, not torch's 30-minute default."""
    results = run_ranks(_stall, 4, pg_timeout=STALL_TIMEOUT, timeout=120)
    for rank in (0, 2, 3):
        r = results[rank]
        assert r["error"] is not None, f"rank {rank} did not fail: {r}"
        # gloo aborts the wait at the group's timeout; 5 s of slack for 2 loaded cores.
        assert STALL_TIMEOUT - 1 <= r["elapsed"] <= STALL_TIMEOUT + 5, (rank, r)


def _explicit(rank, world):
    """explicit_rank inside a running (fallback) world: its state, then the real one back."""
    ps.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    before = ps.get_context_model_parallel_group()
    with ps.explicit_rank(8, 5, tensor_model_parallel_size=2, context_parallel_size=2):
        inside = {"tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_size()),
                  "cp": (ps.get_context_model_parallel_rank(),
                         ps.get_context_model_parallel_size()),
                  "dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_size()),
                  "cp_groups": ps.get_context_model_parallel_replica_groups(),
                  "pairs": ps.get_context_model_parallel_src_tgt_pairs(),
                  "dpcp": list(ps.get_group_spec("data_context").ranks),
                  "pg": ps.get_context_model_parallel_group()}
    after = ps.get_context_model_parallel_group() is before
    return {"inside": inside, "restored": after}


def test_explicit_rank():
    """Rank 5 of 8 at TP2 x CP2 (DP2), with no process groups; the previous state comes back."""
    with ps.explicit_rank(8, 5, tensor_model_parallel_size=2, context_parallel_size=2):
        assert ps.model_parallel_is_initialized()
        assert ps.get_context_model_parallel_src_tgt_pairs() == [(5, 7), (7, 5)]
        assert ps.get_group_spec("tensor").process_group is None
    assert not ps.model_parallel_is_initialized()
    with pytest.raises(ValueError, match="rank=8 must be an integer in"):
        with ps.explicit_rank(8, 8):
            pass
    r = run_ranks(_explicit, 4)[0]
    assert r["restored"]
    assert r["inside"] == {"tp": (1, 2), "cp": (0, 2), "dp": (1, 2),
                           "cp_groups": [[0, 2], [1, 3], [4, 6], [5, 7]],
                           "pairs": [(5, 7), (7, 5)], "dpcp": [1, 3, 5, 7], "pg": None}
