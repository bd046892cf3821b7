"""Activation checkpointing through ``activation_checkpoint_config`` (``nxd_cp.transform``).

Reference: the unmodified transformers model (fp32, rank 0, same seed and full batch) — the
checkpointed TP2 x CP2 model must give its loss (1e-5 relative: fp32 summation order over TP
and CP) and every parameter's gradient (1e-4 norm-wise relative: fp32 rounding of sharded
matmuls and the CP online softmax, the project's fp32 gradient tolerance). Checkpointing
changes no number by itself: the same model without it is compared too (1e-6 relative:
recomputation is the same arithmetic, only fusion / order may differ).

Models: tiny Llama (GQA, 2 layers, hidden 64, sequence 256, batch 2) and GPT-NeoX (parallel
residual); forms ``"full"`` and a class list (``LlamaMLP``).
"""
import copy

import pytest
import torch
from nxd_source import NXD_RANKS, requires_nxd
from test_models import make_batch, make_model, rel

from nxd_cp.testing import run_ranks

pytestmark = [pytest.mark.gloo]


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach()


def world(rank, world_size, only=None):
    import transformers as tf

    import nxd_cp
    from nxd_cp.models import full_gradients, transform
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank
    from nxd_cp.training.checkpointing import checkpointed_modules
    from nxd_cp.training.grads import allreduce_context_parallel_gradients
    from nxd_cp.training.memory import count_saved_bytes

    results = {}
    for arch, form in (("llama", "full"), ("llama", [tf.models.llama.modeling_llama.LlamaMLP]),
                       ("gpt_neox", "full")):
        key = f"{arch}-{form if isinstance(form, str) else 'mlp'}"
        if only is not None and key not in only:
            continue
        runs = {}
        for ckpt in (None, form):
            cfg = nxd_cp.neuronx_distributed_config(
                tensor_parallel_size=2, context_parallel_size=2,
                activation_checkpoint_config=ckpt)
            model = transform(make_model(arch), cfg)
            batch = get_batch_on_this_context_parallel_rank(make_batch(100))
            with count_saved_bytes(model.parameters()) as saved:
                loss = _step(model, batch)
            allreduce_context_parallel_gradients(model)
            runs[ckpt is not None] = (loss, full_gradients(model), saved.total,
                                      checkpointed_modules(model), sorted(model.state_dict()),
                                      model.nxd_cp_config["activation_checkpoint"])
        if rank:
            continue
        ref = make_model(arch)
        ref_loss = _step(ref, make_batch(100))
        (loss, grads, saved, names, keys, recorded), plain = runs[True], runs[False]
        results[key] = {
            "loss_err": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
            "grad_err": max(rel(grads[n], p.grad) for n, p in ref.named_parameters()),
            "vs_plain_loss": abs(loss.item() - plain[0].item()) / abs(plain[0].item()),
            "vs_plain_grad": max(rel(grads[n], plain[1][n]) for n in grads),
            "saved": saved, "saved_plain": plain[2], "names": names,
            "keys_equal": keys == plain[4], "recorded": recorded,
            "nxd": nxd_cp.parallel_state.nxd_in_charge()}
    return results


@pytest.fixture(scope="module")
def results():
    return run_ranks(world, 4, timeout=400)[0]


@pytest.mark.parametrize("key", ["llama-full", "llama-mlp", "gpt_neox-full"])
def test_checkpointed_tp2xcp2_matches_unmodified_model(results, key):
    r = results[key]
    assert r["loss_err"] <= 1e-5, r  # fp32 summation order over TP and CP
    assert r["grad_err"] <= 1e-4, r  # fp32, norm-wise per parameter (worst parameter)
    assert r["vs_plain_loss"] <= 1e-6 and r["vs_plain_grad"] <= 1e-6, r  # same arithmetic
    assert r["keys_equal"]  # no wrapper module: the same state-dict keys
    assert r["saved"] < r["saved_plain"], r  # it saves less for backward
    if key.endswith("full"):
        assert r["recorded"] == "full" and len(r["names"]) == 2, r  # both decoder layers
        assert all(".layers." in n for n in r["names"]), r
    else:
        assert r["recorded"] == ["LlamaMLP"] and len(r["names"]) == 2, r


@pytest.mark.nxd
@requires_nxd
def test_checkpointed_on_nxd_layers_matches_unmodified_model():
    """NxD in charge (its real source, NXD_CPU_MODE=1): the same entry point, on NxD's layers."""
    r = run_ranks(world, 4, ["llama-full"], timeout=400, **NXD_RANKS)[0]["llama-full"]
    assert r["nxd"], r  # NxD's layers and groups
    assert r["loss_err"] <= 1e-5 and r["grad_err"] <= 1e-4, r  # as above
    assert r["saved"] < r["saved_plain"] and r["keys_equal"] and len(r["names"]) == 2, r


def test_recomputes_in_backward_and_copies_rebind():
    """One process, CPU: the checkpointed module's forward runs twice in a training step,
    once in eval / no_grad; a deep copy's forward is the copy's own."""
    from nxd_cp.training.checkpointing import checkpoint_modules, modules_to_checkpoint

    calls = []

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x, scale=None):
            calls.append(1)
            return torch.tanh(self.lin(x)) * (1.0 if scale is None else scale)

    torch.manual_seed(0)
    net = torch.nn.Sequential(Block(), Block())
    ref = copy.deepcopy(net)
    assert checkpoint_modules(modules_to_checkpoint(net, [Block], [])) == 2
    assert checkpoint_modules(list(net)) == 0  # already checkpointed: left as it is
    x = torch.randn(4, 8, requires_grad=True)
    calls.clear()
    net(x).sum().backward()
    assert len(calls) == 4  # 2 forwards + 2 recomputations
    ref(x.detach().requires_grad_()).sum().backward()
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-7)  # same arithmetic
    calls.clear()
    with torch.no_grad():
        net(x)
    assert len(calls) == 2
    twin = copy.deepcopy(net)
    assert twin[0].forward.__self__ is twin[0]
    with pytest.raises(ValueError, match="matches no module"):
        modules_to_checkpoint(net, [torch.nn.Conv1d], [])
    with pytest.raises(ValueError, match="'some' is invalid"):
        modules_to_checkpoint(net, "some", [])
