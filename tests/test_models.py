"""TP x CP Llama / Mistral / GPT-NeoX against the unmodified transformers model.

Reference: the unmodified model in fp32 on rank 0, built from the same seed (same weights),
trained on the same full batches (one per DP rank, loss averaged over DP). The transformed model
gets ``get_batch_on_this_context_parallel_rank`` of its DP rank's batch, its gradients reduced
with ``allreduce_data_context_parallel_gradients``, three AdamW steps on both.

Two spawns (imports dominate on 2 cores): one 4-rank world that runs TP2xCP2, TP1xCP4 and TP4xCP1
one after the other (parallel state rebuilt in between), and one 8-rank world TP2xCP2xDP2; each
case is its own test (tests/cases.py: ``-k tp2cp2-llama-p2p`` runs that case alone).

Tiny models: hidden 64, 2 layers, 4 heads, vocab 256, sequence 256, batch 2.
- Llama: GQA (2 KV heads: split at TP2, replicated at TP4), rope_scaling llama3, pad_token_id 0.
- Mistral: 1 KV head (replicated at TP2 and TP4), sliding_window 48 < sequence, tied embeddings.
- GPT-NeoX: rotary_pct 0.25, parallel residual, attention bias.
"""
import tempfile

import pytest
import torch
from cases import CaseRunner, case_result, wanted_cases

from nxd_cp.testing import run_ranks

SEQ, BATCH, STEPS, LR = 256, 2, 3, 1e-3
ARCHS = ("llama", "mistral", "gpt_neox")
A2A_SIZE = 2  # comm "a2a+p2p" in these tests: all-to-all inside pairs of CP ranks


# ---------------------------------------------------------------------------------------------
# Models and batches (identical on every rank: seeded)
# ---------------------------------------------------------------------------------------------
# arch -> (make_config, model_class) of families other test modules add (test_custom_models)
EXTRA_ARCHS = {}


def make_config(arch):
    import transformers as tf

    if arch in EXTRA_ARCHS:
        return EXTRA_ARCHS[arch][0]()
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=1024)
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, pad_token_id=0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **common)
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=1, sliding_window=48,
                                tie_word_embeddings=True, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True, hidden_dropout=0.0,
                                attention_dropout=0.0, **common)
    raise ValueError(arch)


def model_class(arch):
    import transformers as tf

    if arch in EXTRA_ARCHS:
        return EXTRA_ARCHS[arch][1]()
    return {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM,
            "gpt_neox": tf.GPTNeoXForCausalLM}[arch]


def make_model(arch, seed=1, meta=False):
    config = make_config(arch)  # a config object per model: transform changes it
    if meta:
        with torch.device("meta"):
            return model_class(arch)(config)
    torch.manual_seed(seed)
    return model_class(arch)(config)


def make_batch(seed, padded=False):
    """Full batch as a user would build it (labels = input_ids, unshifted)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 256, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padded:
        mask[1, 150:] = 0  # right padding: the CP ranks hold different numbers of tokens
        mask[0, 20:30] = 0  # masked keys inside the sequence
        ids[mask == 0] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def configure(comm="p2p", layout="zigzag", sp=False):
    """The active config for the current sizes (``nxd_cp.testing.activate_config``)."""
    from nxd_cp.testing import activate_config

    return activate_config(comm, layout, sp, A2A_SIZE if comm == "a2a+p2p" else None)


def rel(a, b):
    """Norm-wise relative error ||a - b|| / ||b|| (0 when both are 0)."""
    a, b = a.double(), b.double()
    d = (a - b).norm().item()
    n = b.norm().item()
    return d / n if n else d


# ---------------------------------------------------------------------------------------------
# Rank-side scenarios
# ---------------------------------------------------------------------------------------------
def run_case(arch, comm, padded=False, ckpt=False, vocab_parallel=False, meta=False, sp=False):
    """Train the transformed model and (on rank 0) the reference; return errors."""
    import torch.distributed as dist

    from nxd_cp import parallel_state as ps
    from nxd_cp.models import full_gradients, full_state_dict, transform
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank
    from nxd_cp.training.grads import (
        allreduce_data_context_parallel_gradients,
        allreduce_sequence_parallel_gradients,
    )

    rank0 = dist.get_rank() == 0
    dp, dp_rank = ps.get_data_parallel_size(), ps.get_data_parallel_rank()
    config = configure(comm, sp=sp)
    if meta:
        model = transform(make_model(arch, meta=True), config,
                          state_dict=make_model(arch).state_dict())
    else:
        model = transform(make_model(arch), config, vocab_parallel_logits=vocab_parallel)
    ref = make_model(arch) if rank0 else None
    if ckpt:
        model.gradient_checkpointing_enable()
    # eps=1e-6, not 1e-8: Adam divides each element by its own gradient scale, and some
    # elements have an exactly-zero true gradient (GPT-NeoX's key bias outside the rotary dims:
    # softmax ignores a constant added to a row of scores), so both runs step them by rounding
    # noise (~1e-11). With eps=1e-8 that noise moves them ~1e-3*lr per step, differently in
    # each run; eps=1e-6 keeps it ~1e-5*lr, while real gradients (>= 1e-5 here) are unaffected.
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-6)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, eps=1e-6) if rank0 else None
    batches = [make_batch(100 + d, padded) for d in range(dp)]
    mine = get_batch_on_this_context_parallel_rank(batches[dp_rank])
    res = {"dp_rank": dp_rank, "loss": [], "ref_loss": []}
    for step in range(STEPS):
        opt.zero_grad()
        out = model(**mine)
        out.loss.backward()
        allreduce_data_context_parallel_gradients(model)
        allreduce_sequence_parallel_gradients(model)  # norms' partial gradients (SP only)
        res["loss"].append(out.loss.item())
        grads = full_gradients(model) if step == 0 else None
        opt.step()
        if rank0:
            ref_opt.zero_grad()
            losses = [ref(**b).loss for b in batches]
            torch.stack(losses).mean().backward()
            res["ref_loss"].append([loss.item() for loss in losses])
            if step == 0:
                res["grad_err"] = {n: rel(grads[n], p.grad) for n, p in ref.named_parameters()}
                res["grad_none"] = [n for n, g in grads.items() if g is None]
            ref_opt.step()
    params = full_state_dict(model)
    if rank0:
        ref_sd = ref.state_dict()
        res["param_keys_equal"] = sorted(params) == sorted(ref_sd)
        res["param_err"] = {n: rel(params[n], t) for n, t in ref_sd.items()}
    return res


def round_trip(arch):
    """transform -> full_state_dict -> save_pretrained -> unmodified from_pretrained."""
    import torch.distributed as dist

    from nxd_cp.models import full_state_dict, transform

    model = transform(make_model(arch), configure("p2p"))
    for p in model.parameters():  # as after .to("xla"): new Parameters without NxD attributes
        p.__dict__.clear()
    sd = full_state_dict(model)
    if dist.get_rank() != 0:
        return None
    ref = make_model(arch)
    ref_sd = ref.state_dict()
    same_bits = sorted(sd) == sorted(ref_sd) and all(
        sd[k].dtype == ref_sd[k].dtype and torch.equal(sd[k], ref_sd[k]) for k in ref_sd)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, state_dict=sd)
        loaded = model_class(arch).from_pretrained(d)
    batch = make_batch(7)
    with torch.no_grad():
        want = ref(input_ids=batch["input_ids"]).logits
        got = loaded(input_ids=batch["input_ids"]).logits
    return {"state_dict_bit_exact": same_bits, "logits_identical": torch.equal(got, want)}


def bad_inputs():
    """Messages of the errors a TP2 x CP2 rank raises for inputs that cannot work."""
    import transformers as tf

    from nxd_cp.models import transform
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank

    def message(fn):
        try:
            fn()
        except ValueError as e:
            return str(e)
        return None

    small = dict(vocab_size=256, intermediate_size=128, num_hidden_layers=1)
    out = {
        "heads": message(lambda: transform(tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=48, num_attention_heads=3, num_key_value_heads=3, **small)))),
        "kv_heads": message(lambda: transform(tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=96, num_attention_heads=6, num_key_value_heads=3, **small)))),
        "sequence": message(lambda: get_batch_on_this_context_parallel_rank(
            {k: v[:, :250] for k, v in make_batch(1).items()})),
    }
    model = transform(make_model("llama"), configure("p2p"))
    batch = get_batch_on_this_context_parallel_rank(make_batch(1))
    odd = {k: v[:, :63] for k, v in batch.items()}
    out["local_sequence"] = message(lambda: model(**odd))
    out["position_ids"] = message(lambda: model(input_ids=batch["input_ids"]))
    out["twice"] = message(lambda: transform(model))
    return out


# One 4-rank world: (tp, cp) -> cases (arch, comm, run_case options), in this order.
FOUR_PLANS = {
    (2, 2): [(a, c, {}) for a in ARCHS for c in ("p2p", "all_gather")] + [
        ("llama", "p2p", {"padded": True}), ("mistral", "all_gather", {"padded": True}),
        ("gpt_neox", "p2p", {"padded": True}), ("llama", "all_gather", {"ckpt": True}),
        ("mistral", "p2p", {"ckpt": True}), ("gpt_neox", "all_gather", {"ckpt": True}),
        ("llama", "p2p", {"vocab_parallel": True}), ("mistral", "p2p", {"meta": True}),
        # all-to-all (Ulysses): Hq/tp = 2 heads over cp = 2; Mistral's 1 KV head replicated
        ("llama", "a2a", {}), ("mistral", "a2a", {"padded": True, "ckpt": True}),
        ("llama", "a2a", {"sp": True})],
    (1, 4): [(a, c, {}) for a in ARCHS for c in ("p2p", "all_gather")] + [
        ("mistral", "p2p", {"padded": True, "ckpt": True}),
        ("llama", "a2a", {}), ("mistral", "a2a+p2p", {}),
        ("gpt_neox", "a2a+p2p", {"padded": True})],
    (4, 1): [(a, "p2p", {}) for a in ARCHS] + [("llama", "p2p", {"ckpt": True})],
}
# One 8-rank world, TP2 x CP2 x DP2.
EIGHT_CASES = [("llama", "p2p", {}), ("mistral", "all_gather", {}),
               ("gpt_neox", "p2p", {"padded": True})]


def case_key(tp, cp, arch, comm, opts, dp=1):
    return f"tp{tp}cp{cp}" + (f"dp{dp}" if dp > 1 else "") + f"-{arch}-{comm}" + "".join(
        f"-{k}" for k in sorted(opts))


FOUR_KEYS = [case_key(tp, cp, a, c, o) for (tp, cp), cases in FOUR_PLANS.items()
             for a, c, o in cases]
EIGHT_KEYS = [case_key(2, 2, a, c, o, dp=2) for a, c, o in EIGHT_CASES]
ROUND_TRIP_KEYS = [f"round_trip-{a}" for a in ARCHS]


def four_rank_world(rank, world, wanted=None):
    from nxd_cp import parallel_state as ps

    runner = CaseRunner(wanted)
    for (tp, cp), cases in FOUR_PLANS.items():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        for arch, comm, opts in cases:
            runner.run(case_key(tp, cp, arch, comm, opts), run_case, arch, comm, **opts)
        if (tp, cp) == (2, 2):
            for a in ARCHS:
                runner.run(f"round_trip-{a}", round_trip, a)
            runner.run("bad_inputs", bad_inputs)
        ps.destroy_model_parallel()
    return runner.results


def eight_rank_world(rank, world, wanted=None):
    from nxd_cp import parallel_state as ps

    runner = CaseRunner(wanted)
    ps.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    for a, c, o in EIGHT_CASES:
        runner.run(case_key(2, 2, a, c, o, dp=2), run_case, a, c, **o)
    return runner.results


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four(request):
    return run_ranks(four_rank_world, 4, wanted_cases(request, "four"), timeout=400)


@pytest.fixture(scope="module")
def eight(request):
    return run_ranks(eight_rank_world, 8, wanted_cases(request, "eight"), timeout=400)


def check_case(results, key, report):
    """Failures of training case ``key`` (``results``: every rank's value of that case), and
    its figures into ``report``."""
    fails = []
    res0 = results[0]
    # fp32 throughout; the CP model only reorders sums (blockwise softmax merge, all-reduces
    # over CP/TP), which moves a loss of ~5.5 by ~1e-7 relative: 1e-5 leaves 100x headroom.
    for rank, r in enumerate(results):
        got, want = r["loss"][0], res0["ref_loss"][0][r["dp_rank"]]
        err = abs(got - want) / abs(want)
        if err > 1e-5:
            fails.append(f"{key} rank {rank}: loss {got} vs {want} (rel {err:.2e})")
    assert not res0["grad_none"], f"{key}: parameters without gradient {res0['grad_none']}"
    grad_err = max(res0["grad_err"].values())
    # Gradients go through more reordered sums (ring backward, reduce over CP and TP);
    # norm-wise relative error per parameter, 1e-4 as the issue asks (measured ~1e-6).
    if grad_err > 1e-4:
        worst = max(res0["grad_err"], key=res0["grad_err"].get)
        fails.append(f"{key}: gradient of {worst} rel err {grad_err:.2e}")
    assert res0["param_keys_equal"], f"{key}: full_state_dict keys differ from HF's"
    param_err = max(res0["param_err"].values())
    # After three AdamW steps (lr 1e-3) from identical weights: the updates differ only
    # through the ~1e-6 gradient differences; 1e-4 norm-wise as the issue asks.
    if param_err > 1e-4:
        worst = max(res0["param_err"], key=res0["param_err"].get)
        fails.append(f"{key}: parameter {worst} after {STEPS} AdamW steps rel err "
                     f"{param_err:.2e}")
    report[key] = (max(abs(r["loss"][0] - res0["ref_loss"][0][r["dp_rank"]])
                       / res0["ref_loss"][0][r["dp_rank"]] for r in results),
                   grad_err, param_err)
    return fails


def _print_report(report):
    for key, (loss, grad, param) in sorted(report.items()):
        print(f"{key:45s} loss {loss:.1e}  grad {grad:.1e}  params {param:.1e}")


def assert_training_case(world_results, key):
    """One training case against the reference: prints its figures, fails naming the case."""
    report = {}
    fails = check_case(case_result(world_results, key), key, report)
    _print_report(report)
    assert not fails, "\n".join(fails)


def test_case_lists():
    """TP2xCP2, TP1xCP4, TP4xCP1; all archs; p2p and all_gather; padded, checkpointed, vocab-
    parallel logits and meta-device cases (25), a2a / a2a+p2p (6), and TP2xCP2xDP2 (3): one
    test each below."""
    assert len(FOUR_KEYS) == len(set(FOUR_KEYS)) == 31
    assert len(EIGHT_KEYS) == len(set(EIGHT_KEYS)) == 3


@pytest.mark.parametrize("case", FOUR_KEYS)
def test_tp_cp_training_matches_reference(four, case):
    """Loss, full gradients and 3 AdamW steps against the unmodified model."""
    assert_training_case(four, case)


@pytest.mark.parametrize("case", FOUR_KEYS)
def test_loss_identical_on_cp_ranks(four, case):
    """``model(**batch).loss`` is the global loss: the same on every rank, not a local mean."""
    losses = {r["loss"][0] for r in case_result(four, case)}
    # Every rank computes sum/count from the same all-reduced numbers (TP ranks too).
    assert len(losses) == 1, f"{case}: losses differ across ranks {losses}"


@pytest.mark.parametrize("case", EIGHT_KEYS)
def test_dp_tp_cp_training_matches_reference(eight, case):
    """TP2xCP2xDP2 on 8 ranks, a different batch per DP rank, gradients averaged over DP."""
    per_rank = case_result(eight, case)
    dp_losses = {r["dp_rank"]: r["loss"][0] for r in per_rank}
    assert dp_losses[0] != dp_losses[1], "DP ranks must see different batches"
    assert_training_case(eight, case)


@pytest.mark.parametrize("case", ROUND_TRIP_KEYS)
def test_round_trip_to_unmodified_model(four, case):
    res = case_result(four, case)[0]
    assert res == {"state_dict_bit_exact": True, "logits_identical": True}, case


@pytest.mark.parametrize("case", ["bad_inputs"])
def test_bad_inputs_are_clear_errors(four, case):
    msgs = case_result(four, case)[0]
    assert "num_attention_heads=3 is not divisible by tensor_model_parallel_size=2" in msgs["heads"]
    assert "num_key_value_heads=3 must be divisible by tensor_model_parallel_size=2" in \
        msgs["kv_heads"]
    assert "sequence length 250 is not divisible by 2*context_parallel_size=4" in \
        msgs["sequence"]
    assert "full sequence length 126 is not divisible by 2*context_parallel_size=4" in \
        msgs["local_sequence"]
    assert "position_ids is required" in msgs["position_ids"]
    assert "already transformed" in msgs["twice"]


def test_unsupported_architecture():
    import transformers as tf

    from nxd_cp.models import transform

    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel: "
                       "nxd_cp.transform supports LlamaForCausalLM, MistralForCausalLM, "
                       "GPTNeoXForCausalLM"):
        transform(model)
