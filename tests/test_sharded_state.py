"""Sharded model state under TP x CP (x DP): clipping, ZeRO-1 over DP x CP, FSDP2 over DP x CP.

One 8-rank world runs every case (tests/cases.py; ``-k clip-tp2cp2dp2-llama`` runs one):
TP2 x CP2 x DP2, TP4 x CP2 (Llama's 2 KV heads replicated over TP4) and TP1 x CP2 x DP4, on
tests/test_models.py's tiny Llama and Mistral (Mistral: 1 KV head, replicated over TP2/TP4).
The scenarios are in tests/sharded_state_scenarios.py; the SP ZeRO-1 case gives
``initialize_parallel_optimizer`` the model itself, the others ``model.parameters()``.
"""
import pytest
from cases import CaseRunner, case_result, wanted_cases
from sharded_state_scenarios import (MAX_NORM, bench_case, clip_case, fsdp_case,
                                     zero1_adamw_case, zero1_resume_case, zero1_sgd_case)

from nxd_cp.testing import run_ranks

pytestmark = [pytest.mark.gloo, pytest.mark.slow]

# key -> (function, args, kwargs), grouped by layout (parallel state is built once per layout)
CASES = {
    "clip-tp2cp2dp2-llama": (clip_case, ("llama", 2, 2), {}),
    "clip-tp2cp2dp2-mistral": (clip_case, ("mistral", 2, 2), {}),
    "clip-tp2cp2dp2-llama-sp": (clip_case, ("llama", 2, 2), {"sp": True}),
    "zero1-sgd-tp2cp2dp2-llama": (zero1_sgd_case, ("llama", 2, 2), {}),
    "zero1-sgd-tp2cp2dp2-mistral": (zero1_sgd_case, ("mistral", 2, 2), {}),
    "zero1-sgd-tp2cp2dp2-llama-sp": (zero1_sgd_case, ("llama", 2, 2), {"sp": True}),
    "plain-sgd-tp2cp2dp2-mistral": (zero1_sgd_case, ("mistral", 2, 2), {"zero1": False}),
    "zero1-adamw-tp2cp2dp2-llama": (zero1_adamw_case, ("llama", 2, 2), {}),
    "zero1-resume-tp2cp2dp2-mistral": (zero1_resume_case, ("mistral", 2, 2), {}),
    "fsdp-tp2cp2dp2-llama": (fsdp_case, ("llama", 2, 2), {}),
    "fsdp-tp2cp2dp2-mistral": (fsdp_case, ("mistral", 2, 2), {}),
    "fsdp-bf16-tp2cp2dp2-llama": (fsdp_case, ("llama", 2, 2), {"mixed_precision": "bf16"}),
    "bench-tp2cp2dp2": (bench_case, (2, 2), {}),
    "clip-tp4cp2-llama": (clip_case, ("llama", 4, 2), {}),
    "clip-tp1cp2dp4-mistral": (clip_case, ("mistral", 1, 2), {}),
    "zero1-sgd-tp1cp2dp4-llama": (zero1_sgd_case, ("llama", 1, 2), {}),
    "zero1-sgd-tp1cp2dp4-mistral": (zero1_sgd_case, ("mistral", 1, 2), {}),
    "fsdp-tp1cp2dp4-llama": (fsdp_case, ("llama", 1, 2), {}),
}
KEYS = list(CASES)


def eight_rank_world(rank, world, wanted=None):
    runner = CaseRunner(wanted)
    for key, (fn, args, kwargs) in CASES.items():
        runner.run(key, fn, *args, **kwargs)
    return runner.results


@pytest.fixture(scope="module")
def eight(request):
    return run_ranks(eight_rank_world, 8, wanted_cases(request, "eight"), timeout=900)


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("case", [k for k in KEYS if k.startswith("clip-")])
def test_clip_grad_norm(eight, case):
    per_rank = case_result(eight, case)
    r0 = per_rank[0]
    # Every rank returns the same norm and clips with it (same coefficient).
    assert len({r["norm"] for r in per_rank}) == 1, [r["norm"] for r in per_rank]
    # fp32 gradients whose only difference from the reference is the order of sums (CP/TP
    # all-reduces, blockwise softmax): ~1e-7 relative; 1e-5 as the issue asks.
    assert _rel(r0["norm"], r0["ref_norm"]) <= 1e-5, (r0["norm"], r0["ref_norm"])
    assert _rel(r0["from_params"], r0["ref_norm"]) <= 1e-5  # layouts from parameter attributes
    assert _rel(r0["inf"], r0["ref_inf"]) <= 1e-5, (r0["inf"], r0["ref_inf"])
    assert r0["ref_norm"] > 5 * MAX_NORM  # clipping is active (coefficient < 0.2)
    assert r0["sp"] == case.endswith("-sp")  # the SP case runs with sequence parallelism
    # Unclipped gradients vs the reference, per parameter: 1e-4 as in test_models.py.
    assert r0["grad_err"] <= 1e-4, (r0["worst_grad"], r0["grad_err"])
    # The clipped SGD step: 1e-4 relative (the issue's bound; measured ~1e-7).
    assert r0["param_err"] <= 1e-4, r0["param_err"]
    # Negative control: torch's clip_grad_norm_ on the TP shards misses the other shards
    # (tp > 1) or counts nothing wrong only at tp = 1.
    if "tp1" not in case:
        assert _rel(r0["naive"], r0["ref_norm"]) > 1e-2, (r0["naive"], r0["ref_norm"])
    print(f"{case}: grads {r0['grad_err']:.1e} ({r0['worst_grad']}), "
          f"norm rel err {_rel(r0['norm'], r0['ref_norm']):.1e}, inf "
          f"{_rel(r0['inf'], r0['ref_inf']):.1e}, step {r0['param_err']:.1e}, naive "
          f"{_rel(r0['naive'], r0['ref_norm']):.2f}")


@pytest.mark.parametrize("case", [k for k in KEYS if "-sgd-" in k])
def test_parallel_optimizer_sgd_momentum(eight, case):
    per_rank = case_result(eight, case)
    r0 = per_rank[0]
    # 3 clipped SGD-momentum steps vs the unmodified model: 1e-4 relative (measured ~1e-7).
    assert r0["param_err"] <= 1e-4, r0["param_err"]
    # The updates themselves (parameters minus the initial ones): 2e-3. At TP2, Mistral's
    # layer-0 post_attention_layernorm.weight update is 9e-4 off the reference after 3
    # momentum steps in every nxd_cp path alike (plain, ZeRO-1, FSDP2), while its step-0
    # gradient is within 5e-7 (test_clip_grad_norm): a small update, sensitive to rounding;
    # every other parameter ~1e-5.
    assert r0["update_err"] <= 2e-3, r0["worst_updates"]
    print(f"{case}: params {r0['param_err']:.1e}, updates {r0['update_err']:.1e}")
    # grad_norm of the last step (before clipping) is the reference's: 1e-5 relative.
    assert _rel(r0["grad_norm"], r0["ref_norms"][-1]) <= 1e-5
    if case.startswith("zero1"):
        # Momentum buffers (4 bytes per element) of whole parameters: summed over DP x CP they
        # are exactly one copy of the TP shard's; each rank holds ~1/(dp*cp), within one
        # parameter of it (ZeRO balances whole parameters by size).
        dp_cp = r0["dp_cp"]
        groups = {}
        for rank, r in enumerate(per_rank):
            groups.setdefault(r["local_param_bytes"], []).append(r["state_bytes"])
        for local, states in groups.items():
            assert sum(states) * dp_cp == local * len(states), (local, states)  # exact
        for r in per_rank:
            ideal = r["local_param_bytes"] / dp_cp
            assert abs(r["state_bytes"] - ideal) <= r["largest_param_bytes"], (r, ideal)
    else:
        assert all(r["state_bytes"] == r["local_param_bytes"] for r in per_rank)


def test_zero1_adamw_matches_unsharded(eight):
    per_rank = case_result(eight, "zero1-adamw-tp2cp2dp2-llama")
    r0 = per_rank[0]
    # Same code, sharded or not: elementwise the same AdamW arithmetic -> 1e-6 relative
    # (measured: bit-identical, reported).
    assert r0["max_err"] <= 1e-6, r0["max_err"]
    print(f"ZeRO-1 AdamW vs unsharded: max rel err {r0['max_err']:.1e}, bit-identical "
          f"{r0['bit_identical']}; state bytes {r0['bytes_plain']} -> {r0['bytes_zero1']}")
    for r in per_rank:  # AdamW: exp_avg + exp_avg_sq (+ a 4-byte step per parameter)
        assert r["bytes_zero1"] < r["bytes_plain"] / 2, r  # dp*cp = 4 (exact shares: SGD test)


def test_zero1_resume_and_refusals(eight):
    per_rank = case_result(eight, "zero1-resume-tp2cp2dp2-mistral")
    r0 = per_rank[0]
    assert r0["files"] == 8  # one optimizer shard per rank (dp*cp=4 x tp=2)
    assert r0["resume_bit_identical"], r0["resume_max_err"]  # exact resume: bit for bit
    errors = r0["errors"]
    assert "dp*cp=8" in errors["other_dp_cp"] and "dp*cp=4" in errors["other_dp_cp"]
    assert errors["into_plain"] and "ZeRO-1" in errors["into_plain"]
    assert errors["reduce_twice"] and "ParallelOptimizer" in errors["reduce_twice"]
    assert errors["sp_twice"] and "ParallelOptimizer" in errors["sp_twice"]
    have, want = r0["consolidated"]  # consolidate_state_dict: every parameter's state on rank 0
    assert have == want, (have, want)


@pytest.mark.parametrize("case", [k for k in KEYS if k.startswith("fsdp-")])
def test_fully_shard(eight, case):
    per_rank = case_result(eight, case)
    r0 = per_rank[0]
    bf16 = "bf16" in case
    # fp32: 3 clipped SGD-momentum steps vs the unmodified model, 1e-4 relative on the
    # parameters (the issue's bound); on the updates themselves 2e-3 (Mistral's cancelling
    # layernorm gradient, as in test_parallel_optimizer_sgd_momentum; others ~1e-5). bf16
    # compute (8-bit mantissa, ~4e-3 per rounding, through 2 layers): 5e-2 on the updates.
    if not bf16:
        assert r0["param_err"] <= 1e-4, r0["param_err"]
    assert r0["update_err"] <= (5e-2 if bf16 else 2e-3), r0["worst_updates"]
    # The global norm with DTensor gradients is the reference's (1e-5; bf16: 5e-2).
    for got, want in zip(r0["norms"], r0["ref_norms"]):
        assert _rel(got, want) <= (5e-2 if bf16 else 1e-5), (got, want)
    assert r0["reduce_twice"] and "FSDP2" in r0["reduce_twice"]  # refused, with the reason
    # FSDP2 checkpoints (DCP, exact resume, another dp*cp): tests/test_fsdp_checkpoint.py
    for r in per_rank:
        # Parameters, gradients and momentum are each ~1/(dp*cp) of the TP shard: FSDP pads
        # dim 0 to a multiple of dp*cp, at most one row per parameter (< 3 % here).
        ideal = r["tp_bytes"] / r["dp_cp"]
        for key in ("param_bytes", "grad_bytes", "state_bytes"):
            assert ideal * 0.97 <= r[key] <= ideal * 1.03, (key, r[key], ideal)
    print(f"{case}: params {r0.get('param_err', 0):.1e}, updates {r0['update_err']:.1e}, "
          f"norm {_rel(r0['norms'][0], r0['ref_norms'][0]):.1e}, bytes/rank "
          f"{r0['param_bytes']} of {r0['tp_bytes']}")


def test_memory_benchmark_against_formula(eight):
    """benchmarks/bench_model_state.py's measurement on every rank (TP2xCP2xDP2, AdamW)."""
    per_rank = case_result(eight, "bench-tp2cp2dp2")
    for rows in per_rank:
        for r in rows:
            want = r["formula"]
            for key, value in want.items():
                # none: exact. FSDP2: dim 0 padded to a multiple of dp*cp (< 3 % here). ZeRO-1
                # state: whole parameters per rank, within 20 % at n = 4 (exact shares are
                # asserted in test_parallel_optimizer_sgd_momentum).
                bound = {"none": 0, "fsdp": 0.03, "zero1": 0.2}[r["mode"]]
                assert abs(r[key] - value) <= bound * value, (r["mode"], key, r[key], value)
        sizes = {r["mode"]: r["param_bytes"] + r["grad_bytes"] + r["state_bytes"] for r in rows}
        assert sizes["fsdp"] < sizes["zero1"] < sizes["none"], sizes


def test_every_case_is_tested():
    tested = {k for k in KEYS if k.startswith(("clip-", "fsdp-")) or "-sgd-" in k}
    tested |= {"zero1-adamw-tp2cp2dp2-llama", "zero1-resume-tp2cp2dp2-mistral",
               "bench-tp2cp2dp2"}
    assert tested == set(KEYS)
