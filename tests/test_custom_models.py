"""Own models under TP x CP: ContextParallelAttention, architecture / module registration,
Qwen2 and Qwen3 (registered through the public API only), and examples/custom_model_cp.py.

References nobody here wrote: torch SDPA in float64 on the full sequence (the attention module),
the unmodified transformers Qwen2 / Qwen3 in fp32 on one process (the helpers of
test_models.py: same weights, batches, three AdamW steps), and the example's plain-torch GPT on
one process.

One 4-rank spawn runs everything (imports dominate on 2 cores): TP2xCP2, then TP1xCP4; each
case is its own test (tests/cases.py).
- Qwen2: q/k/v biases, 1 KV head (replicated at TP2), use_sliding_window with
  max_window_layers=1 (layer 0 full, layer 1 sliding window 48 < sequence 256).
- Qwen3: head_dim 32 != hidden/heads, q/k RMSNorm, attention bias, 2 KV heads (also 1: k/v
  and k_norm on a replicated head at TP2), explicit layer_types (layer 0 sliding window 40,
  layer 1 full), tied embeddings; also built on the meta device and loaded from a state dict.
"""
import importlib.util
import os

import pytest
import test_models as tm
import torch
from cases import CaseRunner, case_result, wanted_cases

from nxd_cp.testing import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN = ("qwen2", "qwen3")
COMMS = ("p2p", "all_gather")


def qwen2_config(**overrides):
    import transformers as tf

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
              use_sliding_window=True, sliding_window=48, max_window_layers=1)
    return tf.Qwen2Config(**{**kw, **overrides})


def qwen3_config(num_key_value_heads=2):
    import transformers as tf

    return tf.Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=num_key_value_heads, head_dim=32,
                          attention_bias=True, max_position_embeddings=1024,
                          use_sliding_window=True, sliding_window=40,
                          layer_types=["sliding_attention", "full_attention"],
                          tie_word_embeddings=True)


def _qwen2_class():
    import transformers as tf
    return tf.Qwen2ForCausalLM


def _qwen3_class():
    import transformers as tf
    return tf.Qwen3ForCausalLM


tm.EXTRA_ARCHS.update(qwen2=(qwen2_config, _qwen2_class), qwen3=(qwen3_config, _qwen3_class),
                      qwen3_kv1=(lambda: qwen3_config(num_key_value_heads=1), _qwen3_class))


class GatedMLP(torch.nn.Module):
    """A user's TP version of LlamaMLP (same parameter names), with its own signature:
    forward(*, hidden_states) -> (out, None)."""

    def __init__(self, hidden, intermediate, act):
        from nxd_cp.layers import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, intermediate, bias=False,
                                              gather_output=False)
        self.up_proj = ColumnParallelLinear(hidden, intermediate, bias=False,
                                            gather_output=False)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=False,
                                           input_is_parallel=True)
        self.act = act

    def forward(self, *, hidden_states):
        h = self.act(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)
        return self.down_proj(h), None


# ---------------------------------------------------------------------------------------------
# Rank-side scenarios
# ---------------------------------------------------------------------------------------------
ATTENTION_CASES = ("causal", "window_padding", "bidirectional_contiguous")


def attention_errors(comm, name):
    """ContextParallelAttention (fp32) vs float64 SDPA on the full sequence: forward and the
    gradients of q, k, v (each rank's shard), relative norm-wise errors of case ``name``."""
    import torch.nn.functional as F

    from nxd_cp import parallel_state as ps
    from nxd_cp.nn import ContextParallelAttention
    from nxd_cp.sequence.layout import shard_sequence

    rank, cp = ps.get_context_model_parallel_rank(), ps.get_context_model_parallel_size()
    b, hq, hkv, s, d = 2, 4, 2, 64, 16
    cases = {  # name -> (ContextParallelAttention kwargs, load_balance, causal, window, mask)
        "causal": (dict(), "zigzag", True, None, False),
        "window_padding": (dict(window_size=24), "zigzag", True, 24, True),
        "bidirectional_contiguous": (dict(causal=False), "contiguous", False, None, True),
    }
    kw, layout, causal, window, padded = cases[name]
    g = torch.Generator().manual_seed(11)
    q = torch.randn(b, hq, s, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64)
    dout = torch.randn(b, hq, s, d, generator=g, dtype=torch.float64)
    keep = torch.ones(b, s, dtype=torch.bool)
    if padded:
        keep[1, 40:46] = False
        keep[0, 60:] = False
    i = torch.arange(s)
    allowed = torch.ones(s, s, dtype=torch.bool)
    if causal:
        allowed &= i[None, :] <= i[:, None]
    if window:
        allowed &= i[:, None] - i[None, :] < window
    mask = allowed[None, None] & keep[:, None, None, :]
    assert mask.any(-1).all(), "every query row must see a key (SDPA gives NaN else)"
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, attn_mask=mask, enable_gqa=True)
    ref.backward(dout)

    def mine(x, dim=2):
        return shard_sequence(x, dim, rank, cp, layout)
    local = [mine(t).float().requires_grad_() for t in (q, k, v)]
    # the active config, set as a user does; the module gets it explicitly (padded
    # cases: the dict of neuronx_distributed_config) or reads it (config=None)
    cfg = tm.configure(comm, layout)
    attn = ContextParallelAttention(cfg, **kw) if padded else ContextParallelAttention(**kw)
    # 0/1 integer mask, as Hugging Face batches carry it
    got = attn(*local, key_padding_mask=mine(keep, 1).long() if padded else None)
    got.backward(mine(dout).float())
    errs = [tm.rel(got, mine(ref))]
    errs += [tm.rel(t.grad, mine(r.grad)) for t, r in zip(local, ref_in)]
    return errs


def register_gated_mlp():
    """Replace LlamaMLP by GatedMLP through register_module (once; transform then uses it)."""
    import transformers as tf

    from nxd_cp.nn import register_module, registered_modules

    if tf.models.llama.modeling_llama.LlamaMLP not in registered_modules():
        register_module(tf.models.llama.modeling_llama.LlamaMLP, GatedMLP,
                        init_hook=lambda m: ((m.hidden_size, m.intermediate_size, m.act_fn), {}),
                        forward_hook=lambda x: ((), {"hidden_states": x}),
                        return_hook=lambda out: out[0])


def registered_mlp_model():
    """A Llama whose MLPs are replaced through register_module while transform runs."""
    from nxd_cp.models import transform

    register_gated_mlp()
    model = transform(tm.make_model("llama"))
    return sum(isinstance(m, GatedMLP) for m in model.modules())


def registered_mlp_training():
    register_gated_mlp()
    return tm.run_case("llama", "p2p")


def windows_and_control():
    """Per-layer windows transform read, and (rank 0) that the window changes the reference
    logits: a CP model ignoring Qwen2's per-layer window would fail the parity check."""
    import torch.distributed as dist
    import transformers as tf

    from nxd_cp.models import transform

    out = {a: transform(tm.make_model(a)).nxd_cp_config["window_size"] for a in QWEN}
    if dist.get_rank() == 0:
        batch = tm.make_batch(3)
        logits = []
        for cfg in (qwen2_config(), qwen2_config(use_sliding_window=False)):
            torch.manual_seed(1)
            with torch.no_grad():
                logits.append(tf.Qwen2ForCausalLM(cfg)(**batch).logits)
        out["window_changes_logits"] = tm.rel(logits[0], logits[1])
    return out


def run_example(argv):
    spec = importlib.util.spec_from_file_location(
        "custom_model_cp", os.path.join(ROOT, "examples", "custom_model_cp.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.main(argv)


PLANS = ((2, 2), (1, 4))
TRAINING_KEYS = [f"tp{tp}cp{cp}-{arch}-{comm}" for tp, cp in PLANS for arch in QWEN
                 for comm in COMMS] + [
    "tp2cp2-qwen3_kv1-all_gather", "tp2cp2-qwen3-p2p-meta", "tp2cp2-llama-p2p-registered_mlp"]
ATTENTION_KEYS = [f"cp{cp}-{comm}-{name}" for tp, cp in PLANS for comm in COMMS
                  for name in ATTENTION_CASES]
EXAMPLE_KEYS = [f"example-tp{tp}cp{cp}" for tp, cp in PLANS]


def four_rank_world(rank, world, wanted=None):
    from nxd_cp import parallel_state as ps
    from nxd_cp.nn import registered_modules, unregister_module

    runner = CaseRunner(wanted)
    for tp, cp in PLANS:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        for arch in QWEN:
            for comm in COMMS:
                runner.run(f"tp{tp}cp{cp}-{arch}-{comm}", tm.run_case, arch, comm)
        for comm in COMMS:
            for name in ATTENTION_CASES:
                runner.run(f"cp{cp}-{comm}-{name}", attention_errors, comm, name)
        if (tp, cp) == (2, 2):
            for a in QWEN:
                runner.run(f"round_trip-{a}", tm.round_trip, a)
            runner.run("windows", windows_and_control)
            runner.run("registered_mlps", registered_mlp_model)
            # k_norm on a KV head replicated over both TP ranks; a meta-device Qwen3
            runner.run("tp2cp2-qwen3_kv1-all_gather", tm.run_case, "qwen3_kv1", "all_gather")
            runner.run("tp2cp2-qwen3-p2p-meta", tm.run_case, "qwen3", "p2p", meta=True)
            runner.run("tp2cp2-llama-p2p-registered_mlp", registered_mlp_training)
            for cls in list(registered_modules()):
                unregister_module(cls)
        example_args = ["--tensor_parallel_size", str(tp), "--context_parallel_size", str(cp),
                        "--steps", "4", "--seq_len", "128", "--check",
                        "--cp_comm_type", "p2p" if tp == 2 else "all_gather"]
        runner.run(f"example-tp{tp}cp{cp}", run_example, example_args)
        ps.destroy_model_parallel()
    return runner.results


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four(request):
    return run_ranks(four_rank_world, 4, wanted_cases(request, "four"), timeout=400)


def test_case_lists():
    assert len(TRAINING_KEYS) == len(set(TRAINING_KEYS)) == 11
    # cp 2 and 4, two comm types, three cases
    assert len(ATTENTION_KEYS) == len(set(ATTENTION_KEYS)) == 2 * 2 * 3


@pytest.mark.parametrize("case", TRAINING_KEYS)
def test_qwen_training_matches_unmodified_transformers(four, case):
    """Qwen2 / Qwen3 at TP2xCP2 and TP1xCP4, p2p and all_gather; Qwen3 with 1 KV head
    (replicated k/v and k_norm at TP2) and from the meta device; a Llama whose MLPs are
    replaced through register_module. Loss, every gradient, 3 AdamW steps (test_models'
    tolerances: fp32 loss 1e-5, gradients and parameters 1e-4)."""
    tm.assert_training_case(four, case)


@pytest.mark.parametrize("case", [f"round_trip-{a}" for a in QWEN])
def test_qwen_round_trip(four, case):
    res = case_result(four, case)[0]
    assert res == {"state_dict_bit_exact": True, "logits_identical": True}, case


@pytest.mark.parametrize("case", ["windows"])
def test_qwen_per_layer_windows(four, case):
    w = case_result(four, case)[0]
    print(w)
    assert w["qwen2"] == (None, 48) and w["qwen3"] == (40, None), w
    # negative control: Qwen2's one sliding layer changes the logits by far more than the
    # parity bounds (measured 0.14 relative), so a model ignoring it would fail the parity test
    assert w["window_changes_logits"] > 1e-3, w


@pytest.mark.parametrize("case", ["registered_mlps"])
def test_registered_module_replaced_inside_transform(four, case):
    per_rank = case_result(four, case)
    assert per_rank[0] == 2  # both LlamaMLPs, on every rank
    assert all(r == 2 for r in per_rank)


@pytest.mark.parametrize("case", ATTENTION_KEYS)
def test_context_parallel_attention_matches_float64_sdpa(four, case):
    for rank, errs in enumerate(case_result(four, case)):
        out_err, *grad_errs = errs
        # fp32 against float64: blockwise softmax merge in fp32 (measured ~1e-7)
        assert out_err <= 1e-5, f"{case} rank {rank}: output rel err {out_err:.1e}"
        assert max(grad_errs) <= 1e-4, f"{case} rank {rank}: dq/dk/dv rel err {grad_errs}"
    print(case, f"{max(case_result(four, case)[0]):.1e}")


@pytest.mark.parametrize("case", EXAMPLE_KEYS)
def test_custom_gpt_example_parity(four, case):
    per_rank = case_result(four, case)
    s = per_rank[0]
    print(case, {k: s[k] for k in ("loss_rel_err", "grad_rel_err", "param_rel_err")})
    # the example's own fp32 bounds (it prints FAIL and exits 1 above them)
    assert s["loss_rel_err"] <= 1e-5 and s["grad_rel_err"] <= 1e-4, s
    assert s["param_rel_err"] <= 1e-4, s
    assert s["last_loss"] < s["first_loss"], s  # it trains
    assert all(r["losses"] == s["losses"] for r in per_rank)  # the same loss on all ranks
