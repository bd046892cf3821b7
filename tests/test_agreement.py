"""Cross-rank agreement check (issue 15, item 3) on 2 real gloo ranks forming one CP group.

Each disagreement used to fail silently (load_balance, window_size), hang (comm_type) or abort
the process inside gloo (local sequence length); now every rank raises a ValueError naming the
argument and which ranks hold which value. Positive control: an agreeing call runs, and
repeating it does not run the check again (cached: no store traffic in the steady state).
"""
import pytest
import torch

from nxd_cp.testing import run_ranks

S_LOCAL = 8


def _qkv(s=S_LOCAL, dtype=torch.float32, b=1):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, s, 4, generator=g).to(dtype) for h in (2, 1, 1)]


def agreement_world(rank, world):
    from datetime import timedelta

    import transformers as tf

    import nxd_cp
    from nxd_cp.topology import agreement
    from nxd_cp import parallel_state as ps
    from nxd_cp.topology.agreement import check_group_agreement
    from nxd_cp.attention import context_parallel_attention as cpa
    from nxd_cp.models import transform

    ps.initialize_model_parallel(context_parallel_size=2)
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = None
        except (ValueError, RuntimeError) as e:
            out[name] = f"{type(e).__name__}: {e}"

    # positive control, and the cache: the second identical call adds no check round
    attempt("agree", lambda: cpa(*_qkv()))
    rounds = dict(agreement._ROUNDS)
    attempt("agree_again", lambda: cpa(*_qkv()))
    out["rounds_unchanged"] = agreement._ROUNDS == rounds
    # Each case uses a batch size no earlier call used, so that it is a new signature on every
    # rank (a signature one rank has already checked is not checked again: see the module doc).
    attempt("load_balance", lambda: cpa(*_qkv(b=2), load_balance=("zigzag", "contiguous")[rank]))
    attempt("window", lambda: cpa(*_qkv(b=3), window_size=(None, 4)[rank]))
    attempt("comm_type", lambda: cpa(*_qkv(b=4), comm_type=("p2p", "all_gather")[rank]))
    attempt("sequence", lambda: cpa(*_qkv(b=5, s=(S_LOCAL, 2 * S_LOCAL)[rank])))
    attempt("dtype", lambda: cpa(*_qkv(b=6, dtype=(torch.float32, torch.bfloat16)[rank])))

    config = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4)
    attempt("transform_config", lambda: transform(tf.LlamaForCausalLM(tf.LlamaConfig(
        max_position_embeddings=(64, 128)[rank], **config))))
    # ranks whose neuronx_distributed_config calls disagree on the layout
    nxd_cp.neuronx_distributed_config(context_parallel_size=2, context_parallel_config={
        "load_balance": ("zigzag", "contiguous")[rank]})
    attempt("transform_layout", lambda: transform(tf.LlamaForCausalLM(tf.LlamaConfig(
        **config))))
    # A rank that never reaches the check: the other raises after the timeout, naming it.
    if rank == 1:
        attempt("absent", lambda: check_group_agreement(
            "probe", {"x": 1}, ps.get_group_spec("context"), timeout=timedelta(seconds=2)))
    torch.distributed.barrier()  # rank 0 hosts the store: keep it up until rank 1 is done
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(agreement_world, 2, timeout=120)


def test_agreeing_ranks_pass_and_are_cached(results):
    for r in results:
        assert r["agree"] is None and r["agree_again"] is None
        assert r["rounds_unchanged"]


@pytest.mark.parametrize("case,argument,values", [
    ("load_balance", "load_balance", ["zigzag on ranks [0]", "contiguous on ranks [1]"]),
    ("window", "window_size", ["None on ranks [0]", "4 on ranks [1]"]),
    ("comm_type", "comm_type", ["p2p on ranks [0]", "all_gather on ranks [1]"]),
    ("sequence", "q shape", ["(5, 2, 8, 4) on ranks [0]", "(5, 2, 16, 4) on ranks [1]"]),
    ("dtype", "dtype", ["torch.float32 on ranks [0]", "torch.bfloat16 on ranks [1]"]),
    ("transform_config", "model config (sha256)", []),
    ("transform_layout", "load_balance", ["zigzag on ranks [0]", "contiguous on ranks [1]"]),
])
def test_disagreement_is_a_clear_error_on_every_rank(results, case, argument, values):
    for r in results:
        msg = r[case]
        assert msg is not None and msg.startswith("ValueError"), (case, msg)
        assert "the ranks of the CP group [0, 1] disagree on" in msg, msg
        assert f"disagree on {argument}" in msg, msg
        for v in values:
            assert v in msg, (v, msg)


def test_absent_rank_is_named_after_the_timeout(results):
    msg = results[1]["absent"]
    assert msg.startswith("RuntimeError: probe: ranks [0] of the CP group [0, 1] did not reach "
                          "the cross-rank agreement check within 2s"), msg
