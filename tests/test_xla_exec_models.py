"""One training step of transformed Llama / Mistral executed on XLA at TP2 x CP2: ONE module.

Every rank's step (forward, loss, backward, CP gradient reduction, AdamW step, then the full
gradients and parameters gathered over TP) is lowered in this torch-xla process. The four
ranks' graphs must be the same HLO (after ``normalise_hlo``): the TP and CP ranks, the
embedding's vocabulary range and the vocab-parallel loss's columns are device data. Then rank
0's module alone is executed by ``tests/xla_exec.py`` for all 4 ranks, each feeding its own
inputs (its weight shards, batch shard and rank values), the TP and CP collectives running
over gloo. One module holds all four (architecture, comm type) steps. Reference: the
unmodified transformers model in fp32 on the same full batch, one ``torch.optim.AdamW`` step
(``tests/test_models.py``'s model and batch builders: hidden 64, 2 layers, 4 heads, sequence
256, batch 2; Llama with GQA and llama3 rope scaling, Mistral with MQA and a sliding window of
48 < sequence). The transformed models step with ``nxd_cp.training.optim.AdamW`` (torch's AdamW
math, no f64 on XLA); Llama p2p uses vocab-parallel logits (TP-split cross entropy). Batches enter
as int32 (docs/trn1.md), except Mistral all_gather's, int64 as tokenizers give them: the model
converts those once at its entry.
"""
import re

import pytest
import torch

pytest.importorskip("torch_xla")
pytest.importorskip("jax")

from test_models import configure, make_batch, make_model, rel  # noqa: E402
from xla_exec import execute, lower_world, normalise_hlo  # noqa: E402

TP, CP, WORLD = 2, 2, 4
LR, EPS = 1e-3, 1e-6  # eps as in test_models.py (exactly-zero gradients, see there)
CASES = [(a, c) for a in ("llama", "mistral") for c in ("p2p", "all_gather")]
VOCAB_PARALLEL = {("llama", "p2p")}
INT64_BATCH = {("mistral", "all_gather")}


def traced_step(model, dtype, prefix=""):
    """One traced step of a transformed ``model`` moved to XLA (batch ``make_batch(100)`` as
    ``dtype``): forward, loss, backward, the CP gradient reduction, AdamW. Returns the loss,
    the full gradients and the full parameters after the step, keys prefixed by ``prefix``."""
    import torch_xla

    from nxd_cp.models import full_gradients, full_state_dict
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank
    from nxd_cp.training.grads import allreduce_context_parallel_gradients
    from nxd_cp.training.optim import AdamW

    dev = torch_xla.device()
    opt = AdamW(model.parameters(), lr=LR, eps=EPS)
    batch = {k: v.to(dtype).to(dev) for k, v in
             get_batch_on_this_context_parallel_rank(make_batch(100)).items()}
    loss = model(**batch).loss
    loss.backward()
    allreduce_context_parallel_gradients(model)
    grads = full_gradients(model)
    opt.step()
    outputs = {f"{prefix}loss": loss.detach()}
    outputs.update({f"{prefix}grad/{n}": g for n, g in grads.items()})
    outputs.update({f"{prefix}param/{n}": p for n, p in full_state_dict(model).items()})
    return outputs


def training_step(rank, cases=CASES):
    """This rank's step of every case: loss, full gradients and full parameters after it."""
    import torch_xla

    from nxd_cp.models import transform

    outputs = {}
    for arch, comm in cases:
        model = transform(make_model(arch), configure(comm),
                          vocab_parallel_logits=(arch, comm) in VOCAB_PARALLEL)
        model = model.to(torch_xla.device())
        model.tie_weights()  # moving to XLA unties Mistral's embeddings (docs/models.md)
        dtype = torch.int64 if (arch, comm) in INT64_BATCH else torch.int32
        outputs.update(traced_step(model, dtype, prefix=f"{arch}-{comm}/"))
    return outputs


def reference(arch):
    """Loss, gradients and state dict after one AdamW step of the unmodified model."""
    model = make_model(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    loss = model(**make_batch(100)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return loss.item(), grads, {n: t.clone() for n, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def run():
    """Every rank's lowered step, and rank 0's module executed by all 4 ranks."""
    modules = lower_world(training_step, WORLD, tensor_model_parallel_size=TP,
                          context_parallel_size=CP)
    got = execute(modules[0], world_size=WORLD, inputs=[m.inputs for m in modules], timeout=500)
    return modules, got


def test_every_rank_lowers_the_same_step_graph_without_f64(run):
    """TP2 x CP2: one graph for the 4 ranks (what neuron_parallel_compile would compile once),
    no f64 anywhere in it (Trainium has no f64 arithmetic) and no s64 compute: s64 only as the
    int64 batch's parameters and their one convert each to s32."""
    modules, _ = run
    graphs = {normalise_hlo(m.text) for m in modules}
    assert len(graphs) == 1, f"{len(graphs)} distinct graphs over {WORLD} ranks"
    assert not re.search(r"\bf64\[", modules[0].text)
    s64 = [line.split(", metadata")[0] for line in modules[0].text.splitlines()
           if "s64[" in line and re.match(r"\s+(ROOT )?%", line)]  # instructions
    params = [ln for ln in s64 if re.search(r"= s64\[[\d,]+\]\S* parameter\(", ln)]
    converts = [ln for ln in s64 if re.search(r"= s32\[[\d,]+\]\S* convert\(s64", ln)]
    # The int64 case's input_ids, labels, position_ids, attention_mask: 4 each.
    assert (len(params), len(converts), len(s64)) == (4, 4, 8), s64


def test_python_int_ranks_lower_different_graphs(monkeypatch):
    """Negative control of the equality above: with the ranks as Python ints (the
    torch.distributed form) TP ranks 0 and 1 lower different graphs (the vocab ranges, the
    gathered logits' own chunk in backward)."""
    from nxd_cp.comm.xla import XlaTransport
    monkeypatch.setattr(XlaTransport, "rank_value", lambda self, device: self.rank)
    step = lambda rank: training_step(rank, cases=[("llama", "p2p")])  # noqa: E731
    modules = lower_world(step, 2, tensor_model_parallel_size=2)
    assert normalise_hlo(modules[0].text) != normalise_hlo(modules[1].text)


_REFERENCES = {}


def cached_reference(arch):
    """``reference(arch)``, computed once per architecture (two cases use each)."""
    if arch not in _REFERENCES:
        _REFERENCES[arch] = reference(arch)
    return _REFERENCES[arch]


@pytest.mark.parametrize("case", [f"{a}-{c}" for a, c in CASES])
def test_training_step_matches_transformers(run, case):
    _, got = run
    arch = case.split("-")[0]
    want_loss, want_grads, want_params = cached_reference(arch)
    fails = []
    key = case
    # fp32; CP and TP only reorder sums: ~1e-7 measured, 1e-5 is the fp32 standard.
    loss_err = [abs(float(out[f"{key}/loss"]) - want_loss) / abs(want_loss) for out in got]
    if max(loss_err) > 1e-5:
        fails.append(f"{key}: loss rel err per rank {loss_err}")
    grad_err = {n: max(rel(torch.from_numpy(out[f"{key}/grad/{n}"]), g) for out in got)
                for n, g in want_grads.items()}
    # After one AdamW step from the same weights; gradients and parameters within the
    # project's 1e-4 gradient bound (norm-wise per tensor, worst rank).
    param_err = {n: max(rel(torch.from_numpy(out[f"{key}/param/{n}"]), t) for out in got)
                 for n, t in want_params.items()}
    for what, errs in (("gradient", grad_err), ("parameter", param_err)):
        worst = max(errs, key=errs.get)
        print(f"{key:18s} loss {max(loss_err):.1e}  worst {what} {worst} {errs[worst]:.1e}")
        if errs[worst] > 1e-4:
            fails.append(f"{key}: {what} {worst} rel err {errs[worst]:.2e}")
    assert set(want_params) <= {n.split("/param/")[1] for n in got[0]
                                if n.startswith(f"{key}/param/")}
    assert not fails, "\n".join(fails)


def test_step_modules_run_tp_and_cp_collectives(run):
    """The executed step reduced over CP ({0,2},{1,3}) and gathered over TP ({0,1},{2,3})."""
    modules, _ = run
    for m in modules:
        text = m.hlo_text
        assert 'opcode: "all-reduce"' in text and 'opcode: "collective-permute"' in text
        assert 'opcode: "all-gather"' in text
