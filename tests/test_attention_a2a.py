"""All-to-all CP (``"a2a"``, Ulysses) and hierarchical ``"a2a+p2p"`` against float64 SDPA.

The harness is tests/test_attention_cp.py's (inputs drawn on rank 0 and broadcast, every rank's
shards of out, dq, dk, dv compared with SDPA on the full sequence in float64, tolerances fp32
1e-5 forward / 1e-4 gradients, bf16 TransformerEngine's bounds and at most 2x the no-CP bf16
error). cp = 4: ``a2a`` over the 4 ranks and ``a2a+p2p`` with a2a_size 2 (all-to-all inside
{0,1} and {2,3}, ring over {0,2} and {1,3}); cp = 2 as TP2 x CP2. Heads 8/8, 8/2 (K/V heads
replicated to 4 for ``a2a``), 8/1; odd head dim; causal, bidirectional, sliding windows, key
padding with rows that see no key, zigzag and contiguous, the rank as device data (XLA's form).
"""
import pytest
import torch
from test_attention_cp import _check, _scenario

from nxd_cp.testing import run_ranks

MASKS = (dict(causal=True, window=None), dict(causal=False, window=None),
         dict(causal=True, window=5), dict(causal=True, window=40))


def a2a_cases(cp):
    cases = []
    comms = [("a2a", None)] + ([("a2a+p2p", 2)] if cp == 4 else [])
    i = 0
    for comm, n in comms:
        for layout in ("zigzag", "contiguous"):
            for mask in (MASKS[:3] if layout == "zigzag" else MASKS[3:]):
                cases.append(dict(comm=comm, a2a_size=n, layout=layout, **mask,
                                  heads=((8, 8), (8, 2), (8, 1))[i % 3], d=(64, 72, 33)[i % 3],
                                  s=(200, 136)[i % 2], kernel="default", dtype=torch.float32,
                                  padding=i % 4 == 3, rank_as_tensor=bool(i % 2)))
                i += 1
    return cases


def bf16_cases():
    return [dict(comm=c, a2a_size=n, causal=True, window=w, layout="zigzag", heads=(8, 2),
                 d=64, s=256, kernel="default", dtype=torch.bfloat16, padding=False)
            for c, n, w in (("a2a+p2p", 2, 40),)]


@pytest.mark.parametrize("world,tp", [(4, 1), (4, 2)], ids=["cp4", "tp2xcp2"])
def test_all_to_all_attention_matches_sdpa(world, tp):
    cases = a2a_cases(world // tp)
    if (world, tp) == (4, 1):
        cases += bf16_cases()
    _check(run_ranks(_scenario, world, tp, cases, timeout=400), cases)


def _errors(rank, world):
    """Head counts that cannot split, and a2a_size rules: ValueError on every rank."""
    from nxd_cp import parallel_state as ps
    from nxd_cp.attention import context_parallel_attention

    ps.initialize_model_parallel(context_parallel_size=world)
    out = {}
    for name, (hq, hkv, comm, n) in {"hq": (6, 6, "a2a", None), "gqa": (12, 3, "a2a", None),
                                     "size": (8, 8, "a2a+p2p", 3),
                                     "p2p-size": (8, 8, "p2p", 2)}.items():
        q, k = torch.randn(1, hq, 16, 8), torch.randn(1, hkv, 16, 8)
        try:
            context_parallel_attention(q, k, k, comm_type=comm, a2a_size=n)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def test_all_to_all_errors_name_the_sizes():
    for out in run_ranks(_errors, 4, timeout=120):
        assert "query heads 6 (per TP rank) are not divisible by the all-to-all group size 4" \
            in out["hq"], out
        assert out["gqa"] is None, out  # 3 K/V heads over 4 ranks: replicated to 12, it runs
        assert "a2a_size=3 does not divide context_parallel_size=4" in out["size"], out
        assert "a2a_size=2 is only for comm_type='a2a+p2p'" in out["p2p-size"], out
