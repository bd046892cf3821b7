"""The static CP schedules: load balance, skipped blocks, exact work, and input validation."""
import pytest
import torch

from nxd_cp.attention import context_parallel_attention
from nxd_cp.attention.schedule import make_plan, score_pairs
from nxd_cp.topology.groups import GroupSpec


def ring_schedule(r, cp, s, layout, causal, window):
    """Kernel calls of each ring step of CP rank ``r``."""
    return make_plan(cp, s, layout, causal, window).tasks(r)


def all_gather_schedule(r, cp, s, layout, causal, window):
    """Kernel calls of CP rank ``r`` against the gathered K/V: the ring's steps, flattened."""
    return [task for step in ring_schedule(r, cp, s, layout, causal, window) for task in step]


def ring_pairs_per_rank(cp, s, layout, causal=True, window=None):
    return [sum(score_pairs(step) for step in ring_schedule(r, cp, s, layout, causal, window))
            for r in range(cp)]


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_zigzag_causal_is_balanced_and_contiguous_is_not(cp):
    s = 64 * cp
    zigzag = ring_pairs_per_rank(cp, s, "zigzag")
    contiguous = ring_pairs_per_rank(cp, s, "contiguous")
    exact = s * (s + 1) // 2  # the causal mask's visible pairs: no work missed or repeated
    assert sum(zigzag) == exact and sum(contiguous) == exact
    assert max(zigzag) == min(zigzag)  # max/min = 1.0
    # the last rank does ~2cp-1 x the first: the exact ratios docs/concepts.md quotes
    assert round(max(contiguous) / min(contiguous), 2) == {2: 2.97, 4: 6.91, 8: 14.78}[cp]
    ag = [score_pairs(all_gather_schedule(r, cp, s, "zigzag", True, None)) for r in range(cp)]
    assert ag == zigzag


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_steps_are_half_blocks(cp):
    s = 32 * cp
    s_local = s // cp
    for r in range(cp):
        steps = ring_schedule(r, cp, s, "zigzag", True, None)
        assert len(steps[0]) == 1 and steps[0][0].mask is not None  # one local causal call
        for step in steps[1:]:
            # Two unmasked half-by-half calls per step: half a block.
            assert len(step) == 2 and all(t.mask is None for t in step)
            assert score_pairs(step) == s_local * s_local // 2


def test_window_skips_far_blocks():
    cp, s, window = 4, 256, 8  # window far smaller than a chunk of 32
    for r in range(cp):
        steps = ring_schedule(r, cp, s, "zigzag", True, window)
        work = [score_pairs(t) for t in steps]
        # Only the local block and the blocks adjacent in sequence order hold visible pairs.
        assert sum(1 for w in work if w) <= 3
    i = torch.arange(s)
    visible = ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)).sum().item()
    assert sum(ring_pairs_per_rank(cp, s, "zigzag", True, window)) == visible


def test_bidirectional_every_pair_once():
    for layout in ("zigzag", "contiguous"):
        assert sum(ring_pairs_per_rank(4, 96, layout, causal=False)) == 96 * 96


GROUP4 = GroupSpec.explicit([[0, 1, 2, 3]], 0)


def _qkv(b=2, hq=8, hkv=2, s=16, d=8, dtype=torch.float32):
    return (torch.randn(b, hq, s, d, dtype=dtype), torch.randn(b, hkv, s, d, dtype=dtype),
            torch.randn(b, hkv, s, d, dtype=dtype))


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v: (q[0], k, v),
     r"q must be a 4-D tensor \[B, H, S_local, D\], got \(8, 16, 8\)"),
    (lambda q, k, v: (q, k, v[..., :4]), "k and v must have the same shape"),
    (lambda q, k, v: (q[:, :, :8], k, v), "must agree on batch, sequence and head dim"),
    (lambda q, k, v: (q[:, :7], k, v), r"query heads 7 must be a multiple of key/value heads 2"),
    (lambda q, k, v: (q.double(), k, v), "q, k, v must share a dtype"),
    (lambda q, k, v: (q.long(), k, v), "q must be a floating-point tensor"),
])
def test_bad_tensors(change, match):
    with pytest.raises(ValueError, match=match):
        context_parallel_attention(*change(*_qkv()), group=GROUP4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(comm_type="ring"),
     r"comm_type='ring' must be one of \('p2p', 'all_gather', 'a2a', 'a2a\+p2p'\)"),
    (dict(load_balance="striped"), r"load_balance='striped' must be one of"),
    (dict(window_size=0), "window_size=0 must be None or an integer >= 1"),
    (dict(window_size=8, causal=False), "window_size=8 needs causal=True"),
    (dict(key_padding_mask=torch.ones(2, 16)), r"key_padding_mask must be a bool tensor"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        context_parallel_attention(*_qkv(), group=GROUP4, **kwargs)


def test_sequence_not_divisible():
    q, k, v = _qkv(s=3)
    with pytest.raises(ValueError, match=r"sequence length 12 is not divisible by "
                                         r"2\*context_parallel_size=8 \(zigzag\)"):
        context_parallel_attention(q, k, v, group=GROUP4)
    q, k, v = _qkv(s=3)
    context_parallel_attention(q, k, v, group=GroupSpec.explicit([[0]], 0),
                               load_balance="contiguous")  # cp=1 contiguous: any length
