"""Sequence parallelism (SP) inside TP: fallback layers, transform, grouped TP collectives.

References: ``nn.Linear`` on the full input (layers), the unmodified transformers model on one
process (``tests/test_models.run_case``: loss, every gradient, three AdamW steps), the HLO of
the XLA transport (lowering). Two spawns: a 4-rank world (layers at TP2, TP2xCP2 and TP4xCP1
models, collective counts, negative control, bad input) and an 8-rank world (TP2xCP2xDP2); each
case is its own test (tests/cases.py).
"""
import pytest
import test_models as tm
import torch
from cases import CaseRunner, case_result, wanted_cases

from nxd_cp.testing import run_ranks

B, S, IN, OUT = 2, 8, 12, 10


# ---------------------------------------------------------------------------------------------
# Rank-side scenarios
# ---------------------------------------------------------------------------------------------
def layer_errors():
    """Fallback SP column / row layers vs nn.Linear on the full input (run at TP2)."""
    from nxd_cp import parallel_state as ps
    from nxd_cp.layers import FallbackColumnParallelLinear, FallbackRowParallelLinear
    from nxd_cp.training.grads import allreduce_sequence_parallel_gradients

    tp, r = ps.get_tensor_model_parallel_size(), ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(5)
    out = {}
    for seq_dim in (0, 1):  # 0: NxD's default sequence-first [S, B, H]; 1: batch-first
        shape = (S, B) if seq_dim == 0 else (B, S)
        x = torch.randn(*shape, IN, generator=g, dtype=torch.float64)
        gy = torch.randn(*shape, OUT, generator=g, dtype=torch.float64)
        torch.manual_seed(seq_dim)  # the same reference weights on every rank
        ref = torch.nn.Linear(IN, OUT, dtype=torch.float64)
        xr = x.clone().requires_grad_()
        (ref(xr) * gy).sum().backward()
        col = FallbackColumnParallelLinear(
            IN, OUT, gather_output=False, dtype=torch.float64, sequence_parallel_enabled=True,
            **({} if seq_dim == 0 else {"sequence_dimension": 1}))
        with torch.no_grad():
            col.weight.copy_(ref.weight.chunk(tp, 0)[r])
            col.bias.copy_(ref.bias.chunk(tp, 0)[r])
        xl = x.chunk(tp, seq_dim)[r].clone().requires_grad_()
        y = col(xl)
        (y * gy.chunk(tp, -1)[r]).sum().backward()
        out[f"column{seq_dim}"] = [
            tm.rel(y, ref(x).chunk(tp, -1)[r]), tm.rel(xl.grad, xr.grad.chunk(tp, seq_dim)[r]),
            tm.rel(col.weight.grad, ref.weight.grad.chunk(tp, 0)[r]),
            tm.rel(col.bias.grad, ref.bias.grad.chunk(tp, 0)[r])]
        out[f"column{seq_dim}_dim"] = col.sequence_dimension

        row = FallbackRowParallelLinear(OUT, IN, input_is_parallel=True, dtype=torch.float64,
                                        sequence_parallel_enabled=True,
                                        sequence_dimension=seq_dim)
        torch.manual_seed(10 + seq_dim)
        ref2 = torch.nn.Linear(OUT, IN, dtype=torch.float64)
        with torch.no_grad():
            row.weight.copy_(ref2.weight.chunk(tp, 1)[r])
            row.bias.copy_(ref2.bias)
        h = torch.randn(*shape, OUT, generator=g, dtype=torch.float64)
        gz = torch.randn(*shape, IN, generator=g, dtype=torch.float64)
        hr = h.clone().requires_grad_()
        (ref2(hr) * gz).sum().backward()
        hl = h.chunk(tp, -1)[r].clone().requires_grad_()
        z = row(hl)
        (z * gz.chunk(tp, seq_dim)[r]).sum().backward()
        bias_partial = tm.rel(row.bias.grad, ref2.bias.grad)  # negative control: not reduced
        allreduce_sequence_parallel_gradients(row)  # by attribute, as NxD marks the bias
        out[f"row{seq_dim}"] = [
            tm.rel(z, ref2(h).chunk(tp, seq_dim)[r]), tm.rel(hl.grad, hr.grad.chunk(tp, -1)[r]),
            tm.rel(row.weight.grad, ref2.weight.grad.chunk(tp, 1)[r]),
            tm.rel(row.bias.grad, ref2.bias.grad)]
        out[f"row{seq_dim}_bias_unreduced"] = bias_partial
        out["row_bias_marked"] = getattr(row.bias, "sequence_parallel_enabled", False)
    try:
        FallbackRowParallelLinear(OUT, IN, input_is_parallel=False,
                                  sequence_parallel_enabled=True)
        out["row_not_parallel"] = None
    except RuntimeError as e:
        out["row_not_parallel"] = str(e)
    return out


def backward_collectives(arch, sp):
    """Calls per primitive in one backward of the transformed model (TP2xCP2, p2p)."""
    import nxd_cp
    from nxd_cp.models import transform
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank

    model = transform(tm.make_model(arch), tm.configure("p2p", sp=sp))
    loss = model(**get_batch_on_this_context_parallel_rank(tm.make_batch(3))).loss
    with nxd_cp.count_bytes() as tally:
        loss.backward()
    return dict(tally.calls)


def unreduced_norm_gradient():
    """Negative control: with SP and without allreduce_sequence_parallel_gradients the norm
    weights' gradients are one TP rank's share only."""
    import torch.distributed as dist

    from nxd_cp.models import full_gradients, transform
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank
    from nxd_cp.training.grads import allreduce_data_context_parallel_gradients

    model = transform(tm.make_model("llama"), tm.configure("p2p", sp=True))
    batch = tm.make_batch(4)
    model(**get_batch_on_this_context_parallel_rank(batch)).loss.backward()
    # the parameters, not the model: a model with SP would also get its SP reduction here
    allreduce_data_context_parallel_gradients(list(model.parameters()))
    grads = full_gradients(model)
    if dist.get_rank() != 0:
        return None
    ref = tm.make_model("llama")
    ref(**batch).loss.backward()
    return {"marked": sorted(model.nxd_cp_config["sequence_parallel_parameters"]),
            "norm_err": tm.rel(grads["model.norm.weight"], ref.model.norm.weight.grad),
            "q_err": tm.rel(grads["model.layers.0.self_attn.q_proj.weight"],
                            ref.model.layers[0].self_attn.q_proj.weight.grad)}


def bad_sequence():
    """TP4xCP1: a local sequence of 6 tokens does not split over 4 TP ranks."""
    from nxd_cp.models import transform

    model = transform(tm.make_model("llama"), tm.configure("p2p", sp=True))
    try:
        model(input_ids=torch.ones(1, 6, dtype=torch.long))
    except ValueError as e:
        return str(e)
    return None


# Model cases (arch, comm, run_case options), SP on: TP2xCP2 and TP4xCP1 in one 4-rank world,
# TP2xCP2xDP2 in one 8-rank world.
TP2CP2 = [(a, c, {}) for a in tm.ARCHS for c in ("p2p", "all_gather")] + [
    ("gpt_neox", "p2p", {"ckpt": True})]
TP4CP1 = [(a, "p2p", {}) for a in tm.ARCHS]  # cp=1: no K/V exchange, the comm type does not matter
DP2 = [("llama", "p2p", {}), ("mistral", "all_gather", {}), ("gpt_neox", "p2p", {"padded": True}),
       ("gpt_neox", "all_gather", {})]


def sp_key(prefix, arch, comm, opts):
    return f"{prefix}-{arch}-{comm}-sp" + "".join(f"-{k}" for k in opts)


FOUR_KEYS = [sp_key("tp2cp2", *c) for c in TP2CP2] + [sp_key("tp4cp1", *c) for c in TP4CP1]
EIGHT_KEYS = [sp_key("tp2cp2dp2", *c) for c in DP2]


def four_rank_world(rank, world, wanted=None):
    from nxd_cp import parallel_state as ps

    runner = CaseRunner(wanted)
    ps.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    runner.run("layers", layer_errors)
    for arch, comm, opts in TP2CP2:
        runner.run(sp_key("tp2cp2", arch, comm, opts), tm.run_case, arch, comm, sp=True, **opts)
    runner.run("calls", lambda: {sp: backward_collectives("llama", sp) for sp in (False, True)})
    runner.run("unreduced", unreduced_norm_gradient)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=4, context_parallel_size=1)
    for arch, comm, opts in TP4CP1:
        runner.run(sp_key("tp4cp1", arch, comm, opts), tm.run_case, arch, comm, sp=True, **opts)
    runner.run("bad_sequence", bad_sequence)
    ps.destroy_model_parallel()
    return runner.results


def eight_rank_world(rank, world, wanted=None):
    from nxd_cp import parallel_state as ps

    runner = CaseRunner(wanted)
    ps.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    for a, c, o in DP2:
        runner.run(sp_key("tp2cp2dp2", a, c, o), tm.run_case, a, c, sp=True, **o)
    return runner.results


@pytest.fixture(scope="module")
def four(request):
    return run_ranks(four_rank_world, 4, wanted_cases(request, "four"), timeout=400)


@pytest.fixture(scope="module")
def eight(request):
    return run_ranks(eight_rank_world, 8, wanted_cases(request, "eight"), timeout=400)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["layers"])
def test_fallback_sp_layers_match_linear(four, case):
    for rank, lay in enumerate(case_result(four, case)):
        for key in ("column0", "column1", "row0", "row1"):
            # float64 layers; the TP version only splits / reorders sums: 1e-12 relative.
            assert max(lay[key]) < 1e-12, (rank, key, lay[key])
            # Negative control: the row bias gradient before the TP sum is one rank's tokens.
        assert lay["row0_bias_unreduced"] > 0.1 and lay["row1_bias_unreduced"] > 0.1, lay
        assert lay["column0_dim"] == 0 and lay["column1_dim"] == 1
        assert lay["row_bias_marked"] is True
        assert "input_is_parallel=True" in lay["row_not_parallel"]


def test_case_lists():
    assert len(FOUR_KEYS) == len(set(FOUR_KEYS)) == 10
    assert len(EIGHT_KEYS) == len(set(EIGHT_KEYS)) == 4


@pytest.mark.parametrize("case", FOUR_KEYS)
def test_sp_training_matches_reference(four, case):
    """TP2xCP2 (both comm types; one with gradient checkpointing) and TP4xCP1, Llama / Mistral /
    GPT-NeoX, SP on: loss, every gradient, three AdamW steps vs the unmodified model
    (tolerances of test_models)."""
    tm.assert_training_case(four, case)


@pytest.mark.parametrize("case", EIGHT_KEYS)
def test_sp_dp_training_matches_reference(eight, case):
    tm.assert_training_case(eight, case)


@pytest.mark.parametrize("case", ["unreduced"])
def test_norm_gradients_need_the_tp_reduction(four, case):
    res = case_result(four, case)[0]
    # Llama: the decoder layers' two norms and the final norm, nothing else.
    assert res["marked"] == sorted(
        [f"model.layers.{i}.{n}.weight" for i in range(2)
         for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm.weight"])
    assert res["q_err"] < 1e-4  # the TP-split weights are complete without it
    assert res["norm_err"] > 0.1, res  # one TP rank's half of the tokens: far off


@pytest.mark.parametrize("case", ["calls"])
def test_grouped_tp_collectives(four, case):
    """Backward of Llama TP2xCP2 p2p (2 layers): the q/k/v input and the gate/up input are
    communicated once per layer, plus the lm_head input; the ring attention adds ring shifts."""
    off, on = case_result(four, case)[0][False], case_result(four, case)[0][True]
    # Without SP: one all-reduce per shared input (2 per layer) + lm_head = 5 (ungrouped: 11).
    assert off.get("all_reduce") == 5 and "reduce_scatter" not in off, off
    # With SP: 2 reduce-scatters per layer + lm_head; all-gathers: per layer 2 row-output
    # gradients + 2 re-gathers of the saved attention / MLP input (saved as its 1/tp shard), and
    # the scatter of the embedding output: 9; no all-reduce left.
    assert on.get("reduce_scatter") == 5 and on.get("all_gather") == 9, on
    assert "all_reduce" not in on, on


@pytest.mark.parametrize("case", ["bad_sequence"])
def test_sequence_not_divisible_by_tp(four, case):
    msg = case_result(four, case)[0]
    assert msg and "S/cp=6 is not divisible by tensor_model_parallel_size=4" in msg, msg


def test_sp_layers_lower_to_tp_collectives():
    """XLA: the SP column layer all-gathers (backward reduce-scatters) and the row layer
    reduce-scatters (backward all-gathers) over the TP replica groups {0,1},{2,3} of TP2xCP2."""
    torch_xla = pytest.importorskip("torch_xla")
    from test_xla_lowering import LAYOUT, hlo, ops

    from nxd_cp.layers import FallbackColumnParallelLinear, FallbackRowParallelLinear
    from nxd_cp.topology.groups import GroupSpec

    dev = torch_xla.device()
    tp = GroupSpec.explicit(LAYOUT.tensor_parallel_groups(), 0)
    groups = "replica_groups={{0,1},{2,3}}"
    col = FallbackColumnParallelLinear(IN, OUT, gather_output=False, sequence_parallel_enabled=True,
                                       sequence_dimension=1, tensor_model_parallel_group=tp).to(dev)
    row = FallbackRowParallelLinear(OUT, IN, input_is_parallel=True, sequence_parallel_enabled=True,
                                    sequence_dimension=1, tensor_model_parallel_group=tp).to(dev)
    x = torch.randn(B, S // 2, IN, device=dev, requires_grad=True)
    h = col(x)
    ag = ops(hlo(h), "all-gather")
    assert ag and groups in ag[-1] and "dimensions={1}" in ag[-1]
    z = row(h)
    rs = ops(hlo(z), "reduce-scatter")
    assert rs and groups in rs[-1] and "dimensions={1}" in rs[-1]
    assert tuple(z.shape) == (B, S // 2, IN)
    z.sum().backward()
    bwd = hlo(x.grad)
    assert any(groups in a for a in ops(bwd, "all-gather"))  # row backward
    assert any(groups in a and "dimensions={1}" in a for a in ops(bwd, "reduce-scatter"))
