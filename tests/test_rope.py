"""Every RoPE type transformers 4.57 ships, under CP, against the unmodified model.

Reference: the unmodified model (fp32, rank 0, same seed) on the full batch. The transformed
model gets ``get_batch_on_this_context_parallel_rank`` of the same batch in the layout under
test; its CP-reduced gradients are gathered over TP (``full_gradients``).

Each case runs two steps: S=128 (> max_position_embeddings=64: ``dynamic`` grows its NTK base,
``longrope`` takes its long factors) then S=32 (< 64: ``dynamic`` resets, ``longrope`` takes its
short factors), so both branches of transformers' frequency update are compared.

One 4-rank spawn runs TP2xCP2 and TP1xCP4 (parallel state rebuilt in between), both layouts,
Llama with the six rope types and GPT-NeoX (partial rotary) with the two length-dependent ones;
each case is its own test (tests/cases.py).
Negative control: the same cases with the fix removed (the rotary module unwrapped) for the
length-dependent types; ``dynamic`` must then be visibly wrong, showing the test can fail.
"""
import pytest
import torch
from cases import CaseRunner, case_result, wanted_cases

from nxd_cp.testing import run_ranks

ROPE = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "factor": 2.0, "long_factor": [1.0, 1.5, 2.0, 3.0],
                 "short_factor": [1.0, 1.1, 1.2, 1.3]},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}
NEOX_ROPE = {  # rotary_pct 0.5 of head_dim 8: 2 frequencies
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "longrope": {"rope_type": "longrope", "factor": 2.0, "long_factor": [1.5, 3.0],
                 "short_factor": [1.1, 1.3]},
}
LENGTHS = (128, 32)
TOPOLOGIES = ((2, 2), (1, 4))
LAYOUTS = ("zigzag", "contiguous")


def make_model(arch, rope, seed=3):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(seed)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2,
                                                  rope_scaling=ROPE[rope], **common))
    return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(rotary_pct=0.5, rope_scaling=NEOX_ROPE[rope],
                                                  hidden_dropout=0.0, attention_dropout=0.0,
                                                  **common))


def make_batch(seq, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def rel(a, b):
    a, b = a.double(), b.double()
    n = b.norm().item()
    return (a - b).norm().item() / n if n else (a - b).norm().item()


def run_case(arch, rope, layout, comm, unwrap):
    """Worst loss and gradient relative errors over the two steps (rank 0), else None."""
    import torch.distributed as dist
    from test_models import configure

    from nxd_cp.models import full_gradients, transform
    from nxd_cp.models.rope import GlobalLengthRotary
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank
    from nxd_cp.tensor_parallel.partition import set_path
    from nxd_cp.training.grads import allreduce_context_parallel_gradients

    model = transform(make_model(arch, rope), configure(comm, layout))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, GlobalLengthRotary)]
    if unwrap:
        for name in wrapped:
            set_path(model, name, model.get_submodule(name).inner)
    ref = make_model(arch, rope) if dist.get_rank() == 0 else None
    loss_err = grad_err = 0.0
    for i, seq in enumerate(LENGTHS):
        batch = make_batch(seq, 10 + i)
        model.zero_grad()
        out = model(**get_batch_on_this_context_parallel_rank(batch))
        out.loss.backward()
        allreduce_context_parallel_gradients(model)
        grads = full_gradients(model)
        if ref is not None:
            ref.zero_grad()
            ref_loss = ref(**batch).loss
            ref_loss.backward()
            loss_err = max(loss_err, abs(out.loss.item() - ref_loss.item()) / ref_loss.item())
            grad_err = max([grad_err] + [rel(grads[n], p.grad)
                                         for n, p in ref.named_parameters()])
    if ref is None:
        return None
    return {"loss": loss_err, "grad": grad_err, "wrapped": len(wrapped)}


CASES = [("llama", r) for r in ROPE] + [("gpt_neox", r) for r in NEOX_ROPE]


def plan():
    """(tp, cp, layout, arch, rope, comm, key) of every case, in the order the world runs them;
    the comm type alternates over cases and layouts."""
    out = []
    for tp, cp in TOPOLOGIES:
        for i, layout in enumerate(LAYOUTS):
            for j, (arch, rope) in enumerate(CASES):
                comm = ("p2p", "all_gather")[(i + j) % 2]
                out.append((tp, cp, layout, arch, rope, comm,
                            f"tp{tp}cp{cp}-{layout}-{arch}-{rope}"))
    return out


FIXED_KEYS = [c[-1] for c in plan()]
# Negative control: the length-dependent types again, with the rotary module unwrapped.
UNFIXED_KEYS = [c[-1] + "-unfixed" for c in plan() if c[4] in NEOX_ROPE]


def rope_world(rank, world, wanted=None):
    from nxd_cp import parallel_state as ps

    runner = CaseRunner(wanted)
    for tp, cp in TOPOLOGIES:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        for tp_, cp_, layout, arch, rope, comm, key in plan():
            if (tp_, cp_) != (tp, cp):
                continue
            runner.run(key, run_case, arch, rope, layout, comm, unwrap=False)
            if rope in NEOX_ROPE:
                runner.run(key + "-unfixed", run_case, arch, rope, layout, comm, unwrap=True)
        ps.destroy_model_parallel()
    return runner.results


@pytest.fixture(scope="module")
def results(request):
    return run_ranks(rope_world, 4, wanted_cases(request, "results"), timeout=300)


def test_case_lists():
    assert len(FIXED_KEYS) == len(set(FIXED_KEYS)) == \
        len(TOPOLOGIES) * len(LAYOUTS) * (len(ROPE) + len(NEOX_ROPE))


@pytest.mark.parametrize("case", FIXED_KEYS)
def test_every_rope_type_matches_unmodified_model(results, case):
    r = case_result(results, case)[0]
    print(f"{case:45s} loss {r['loss']:.1e}  grad {r['grad']:.1e}")
    # fp32; CP only reorders sums (blockwise softmax merge, reductions over CP/TP):
    # 1e-5 on the loss, 1e-4 norm-wise per parameter gradient (measured <= ~1e-6).
    assert r["loss"] <= 1e-5 and r["grad"] <= 1e-4, \
        f"{case}: loss rel err {r['loss']:.2e}, worst gradient {r['grad']:.2e}"
    rope = case.rsplit("-", 1)[1]
    assert r["wrapped"] == (1 if rope in NEOX_ROPE else 0), case


@pytest.mark.parametrize("case", UNFIXED_KEYS)
def test_negative_control_without_global_length(results, case):
    """Without the wrapper (the behaviour before the fix), dynamic RoPE (every layout) and
    longrope (contiguous layout) are visibly wrong."""
    r = case_result(results, case)[0]
    print(f"{case:55s} loss {r['loss']:.1e}  grad {r['grad']:.1e}")
    if "-dynamic-" in case or ("-longrope-" in case and "-contiguous-" in case):
        # Each rank's frequencies come from its own max position (< 128); the gradients
        # then differ by 5e-4 .. 0.3 (measured). Zigzag longrope is right by luck: every
        # zigzag shard's max position exceeds original_max_position_embeddings.
        assert r["grad"] > 1e-4, f"{case}: the control did not show the defect ({r})"
