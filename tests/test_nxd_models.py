"""nxd_cp with NeuronX Distributed's REAL code in charge (../shared/nxd, NXD_CPU_MODE=1, gloo).

Only the spawned ranks import NxD (tests/nxd_source.py). Two spawns: one 4-rank world (parallel
state and every getter against NxD's own, group timeouts, NxD's re-initialisation, then transform
at TP2xCP2, TP1xCP4, TP4xCP1, with and without sequence parallelism, and the training loop with
NxD's optimizer) and one 8-rank world (TP2xCP2xDP2, and NxD's optimizer over DP x CP). Model
cases reuse tests/test_models.py's ``run_case`` (reference: the unmodified transformers model on
rank 0) with one AdamW step. Each case is its own test (tests/cases.py).
"""

import pytest
import test_models as tm
import torch
from cases import CaseRunner, case_result, wanted_cases
from nxd_source import NXD_RANKS, requires_nxd

from nxd_cp.testing import run_ranks

pytestmark = requires_nxd
PG_TIMEOUT = 120  # seconds: the world group's timeout, which every group must inherit
SP = {"sp": True}  # neuronx_distributed_config(sequence_parallel=True) -> transform


# ---------------------------------------------------------------------------------------------
# Rank side
# ---------------------------------------------------------------------------------------------
def _ranks(group):
    import torch.distributed as dist
    return dist.get_process_group_ranks(group)


def _timeout(group):
    backend = group._get_backend(torch.device("cpu"))
    return backend.options._timeout.total_seconds()


def compare_state():
    """(ours, NxD's) for every getter of nxd_cp.parallel_state with an NxD counterpart."""
    from neuronx_distributed.parallel_layers import parallel_state as nps

    from nxd_cp import parallel_state as ps

    out = {}
    for ours, theirs in (("tensor_model_parallel", "tensor_model_parallel"),
                         ("context_model_parallel", "context_model_parallel"),
                         ("data_parallel", "data_parallel"),
                         ("pipeline_model_parallel", "pipeline_model_parallel"),
                         ("data_context_parallel", "expert_data_parallel")):
        g, ng = getattr(ps, f"get_{ours}_group")(), getattr(nps, f"get_{theirs}_group")()
        out[f"{ours}_group_is_nxds"] = (g is ng, True)
        out[f"{ours}_as_list"] = (getattr(ps, f"get_{ours}_group")(as_list=True),
                                  getattr(nps, f"get_{theirs}_group")(as_list=True))
        for what in ("rank", "size"):
            out[f"{ours}_{what}"] = (getattr(ps, f"get_{ours}_{what}")(),
                                     getattr(nps, f"get_{theirs}_{what}")())
        if ours != "data_context_parallel":
            out[f"{ours}_replica_groups"] = (
                getattr(ps, f"get_{ours}_replica_groups")(),
                getattr(nps, f"get_{theirs}_replica_groups")())
        kind = {"tensor_model_parallel": "tensor", "context_model_parallel": "context",
                "data_parallel": "data", "pipeline_model_parallel": "pipeline",
                "data_context_parallel": "data_context"}[ours]
        spec = ps.get_group_spec(kind)
        out[f"{ours}_spec"] = (list(spec.ranks), _ranks(ng))
        out[f"{ours}_timeout"] = (_timeout(g), float(PG_TIMEOUT))
    out["src_tgt_pairs"] = (ps.get_context_model_parallel_src_tgt_pairs(),
                            nps.get_context_model_parallel_src_tgt_pairs())
    out["initialized"] = (ps.model_parallel_is_initialized(), nps.model_parallel_is_initialized())
    return out


def vocab_parallel_logits(arch):
    """Vocab-parallel logits after the loss: unchanged (NxD's cross entropy modifies its input
    in place) and equal to the reference's for this rank's tokens and vocabulary slice."""
    from nxd_cp import parallel_state as ps
    from nxd_cp.models import transform
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank
    from nxd_cp.sequence.layout import shard_sequence

    model = transform(tm.make_model(arch), tm.configure("p2p"), vocab_parallel_logits=True)
    batch = tm.make_batch(5, padded=True)
    out = model(**get_batch_on_this_context_parallel_rank(batch))
    before = out.logits.detach().clone()
    out.loss.backward(retain_graph=True)
    (out.logits.float() ** 2).mean().backward()  # the logits are still usable by autograd
    ref = tm.make_model(arch)(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).logits.detach()
    ref = shard_sequence(ref, 1, ps.get_context_model_parallel_rank(),
                         ps.get_context_model_parallel_size(), "zigzag")
    ref = ref.chunk(ps.get_tensor_model_parallel_size(), dim=-1)[
        ps.get_tensor_model_parallel_rank()]
    return {"unchanged": torch.equal(before, out.logits.detach()),
            "rel_err": tm.rel(out.logits.detach(), ref)}


def _refusal(fn, arg):
    try:
        fn(arg)
    except RuntimeError as e:
        return str(e)
    return "no error"


def nxd_optimizer_loop(arch, comm, padded, sp=False):
    """The README loop with NxD's initialize_parallel_optimizer: its step reduces the gradients
    (over DP x CP; with ``sequence_parallel=True`` in its config also the SP parameters' over
    TP) and nxd_cp's reductions refuse it; gradients and parameters after the step against the
    reference's (one AdamW step)."""
    import torch.distributed as dist
    from neuronx_distributed.trainer import initialize_parallel_optimizer

    import nxd_cp
    from nxd_cp import parallel_state as ps
    from nxd_cp.models import full_gradients, full_state_dict

    cfg = nxd_cp.neuronx_distributed_config(
        tensor_parallel_size=ps.get_tensor_model_parallel_size(),
        context_parallel_size=ps.get_context_model_parallel_size(), sequence_parallel=sp,
        optimizer_config={"zero_one_enabled": False, "grad_clipping": False},
        context_parallel_config={"comm_type": comm})
    model = nxd_cp.transform(tm.make_model(arch), cfg)
    opt = initialize_parallel_optimizer(cfg, torch.optim.AdamW, model.parameters(), lr=tm.LR,
                                        eps=1e-6)  # eps: see tests/test_models.run_case
    dp, dp_rank = ps.get_data_parallel_size(), ps.get_data_parallel_rank()
    batches = [tm.make_batch(200 + d, padded) for d in range(dp)]
    loss = model(**nxd_cp.get_batch_on_this_context_parallel_rank(batches[dp_rank])).loss
    loss.backward()
    res = {"refused": _refusal(nxd_cp.allreduce_context_parallel_gradients, opt),
           "sp_refused": _refusal(nxd_cp.allreduce_sequence_parallel_gradients, opt),
           "loss": loss.item()}
    opt.step()  # reduces the gradients in place (net: sum over CP, mean over DP), then steps
    grads, params = full_gradients(model), full_state_dict(model)
    if dist.get_rank() == 0:
        ref = tm.make_model(arch)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=tm.LR, eps=1e-6)
        losses = [ref(**b).loss for b in batches]
        torch.stack(losses).mean().backward()
        ref_opt.step()
        res["ref_loss"] = [x.item() for x in losses]
        res["grad_err"] = {n: tm.rel(grads[n], p.grad) for n, p in ref.named_parameters()}
        res["param_err"] = {n: tm.rel(params[n], t) for n, t in ref.state_dict().items()}
    return res


def sp_wiring_and_controls():
    """TP2xCP2 Llama with SP on NxD's layers: which of NxD's layers are sequence-parallel (and
    on which dim); the negative control of the norms' TP reduction; and why NxD's SP layers run
    sequence-first: batch-first (``sequence_dimension=1``) their backward fails."""
    import test_sequence_parallel as tsp
    from neuronx_distributed.parallel_layers.layers import RowParallelLinear

    from nxd_cp.models import transform

    model = transform(tm.make_model("llama"), tm.configure("p2p", sp=True))
    layer0 = {n.split(".", 3)[-1]: (type(m).__module__, getattr(m, "sequence_parallel_enabled",
                                                                None),
                                    getattr(m, "sequence_dimension", None))
              for n, m in model.named_modules() if n.startswith("model.layers.0.")
              and n.endswith("_proj")}
    layer0["lm_head"] = (type(model.lm_head).__module__,
                         model.lm_head.sequence_parallel_enabled, None)
    row = RowParallelLinear(8, 6, input_is_parallel=True, sequence_parallel_enabled=True,
                            sequence_dimension=1)
    try:
        row(torch.randn(2, 8, 4, requires_grad=True)).sum().backward()
        batch_first = "no error"
    except RuntimeError as e:
        batch_first = str(e)
    return {"layer0": layer0, "unreduced": tsp.unreduced_norm_gradient(),
            "batch_first_backward": batch_first}


def _key(tp, cp, dp, arch, comm, opts):
    return f"tp{tp}cp{cp}" + (f"dp{dp}" if dp > 1 else "") + f"-{arch}-{comm}" + "".join(
        f"-{k}" for k in sorted(opts) if opts[k])


FOUR_PLANS = {
    (2, 2): [("llama", "p2p", {"padded": True}), ("llama", "all_gather", {}),
             ("mistral", "p2p", {"ckpt": True}), ("mistral", "all_gather", {"padded": True}),
             ("gpt_neox", "p2p", {"vocab_parallel": True}),
             ("gpt_neox", "all_gather", {"ckpt": True}),
             ("llama", "all_gather", {"nxd_optimizer": True}),
             # sequence parallelism on NxD's SP layers, both comm types per architecture
             ("llama", "p2p", {"sp": True, "padded": True}), ("llama", "all_gather", SP),
             ("mistral", "p2p", SP), ("mistral", "all_gather", {"sp": True, "ckpt": True}),
             ("gpt_neox", "p2p", {"sp": True, "vocab_parallel": True}),
             ("gpt_neox", "all_gather", {"sp": True, "padded": True}),
             ("llama", "p2p", {"nxd_optimizer": True, "sp": True})],
    (1, 4): [("llama", "p2p", {"ckpt": True}), ("llama", "all_gather", {"padded": True}),
             ("mistral", "p2p", {"padded": True}), ("mistral", "all_gather", {}),
             ("gpt_neox", "p2p", {}), ("gpt_neox", "all_gather", {"padded": True})],
    (4, 1): [("llama", "p2p", {"padded": True, "vocab_parallel": True}),
             ("mistral", "all_gather", {"ckpt": True}), ("gpt_neox", "p2p", {"padded": True}),
             ("llama", "p2p", SP), ("mistral", "all_gather", {"sp": True, "padded": True}),
             ("gpt_neox", "p2p", {"sp": True, "ckpt": True})],
}
EIGHT_PLANS = {(2, 2): [("llama", "all_gather", {"padded": True}),
                        ("mistral", "p2p", {"ckpt": True}),
                        ("gpt_neox", "all_gather", {"vocab_parallel": True}),
                        ("mistral", "p2p", {"nxd_optimizer": True}),
                        ("llama", "p2p", SP),
                        ("mistral", "all_gather", {"sp": True, "padded": True}),
                        ("gpt_neox", "p2p", SP),
                        ("gpt_neox", "all_gather", {"nxd_optimizer": True, "sp": True})]}


def case_key(tp, cp, dp, arch, comm, opts):
    """The id of a model case; ``optim-...`` for the NxD-optimizer loop."""
    if opts.get("nxd_optimizer"):
        return "optim-" + _key(tp, cp, dp, arch, comm, {"sp": opts.get("sp", False)})
    return _key(tp, cp, dp, arch, comm, opts)


def _keys(plans, dp, optim, sp):
    return [k for (tp, cp), cases in plans.items() for a, c, o in cases
            for k in [case_key(tp, cp, dp, a, c, o)]
            if k.startswith("optim-") == optim and (optim or ("-sp" in k) == sp)]


FOUR_TRANSFORM, FOUR_SP = _keys(FOUR_PLANS, 1, False, False), _keys(FOUR_PLANS, 1, False, True)
EIGHT_TRANSFORM, EIGHT_SP = _keys(EIGHT_PLANS, 2, False, False), _keys(EIGHT_PLANS, 2, False, True)
FOUR_OPTIM, EIGHT_OPTIM = _keys(FOUR_PLANS, 1, True, None), _keys(EIGHT_PLANS, 2, True, None)


def _run_plans(runner, plans, dp=1):
    from nxd_cp import parallel_state as ps

    for (tp, cp), cases in plans.items():
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        for arch, comm, opts in cases:
            key = case_key(tp, cp, dp, arch, comm, opts)
            if opts.get("nxd_optimizer"):
                runner.run(key, nxd_optimizer_loop, arch, comm, padded=True,
                           sp=opts.get("sp", False))
            else:
                runner.run(key, tm.run_case, arch, comm, **opts)
        if (tp, cp) == (2, 2) and dp == 1:
            runner.run("vocab_logits", vocab_parallel_logits, "llama")
            runner.run("sp_controls", sp_wiring_and_controls)
        ps.destroy_model_parallel()


def _in_charge():
    import os

    from nxd_cp import parallel_state as ps

    os.environ["NXD_CPU_MODE"] = "0"  # gloo without NxD's CPU mode: NxD would deadlock
    out = {"in_charge_without_cpu_mode": ps.nxd_in_charge()}
    os.environ["NXD_CPU_MODE"] = "1"
    out["in_charge_before_init"] = ps.nxd_in_charge()
    return out


def _layers():
    from nxd_cp import layers as L
    from nxd_cp import parallel_state as ps

    layers = L.tensor_parallel_layers()  # decided once: NxD's, as NxD is in charge
    layer = layers.ColumnParallelLinear(8, 8, gather_output=False)
    emb = layers.ParallelEmbedding(16, 8, padding_idx=0)
    own = L.ColumnParallelLinear(8, 8, gather_output=False)  # nxd_cp's class, always
    return {"using_nxd": ps.nxd_in_charge() and layers.use_nxd,
            "column_module": type(layer).__module__,
            "isinstance": L.is_column_parallel(layer) and L.is_column_parallel(own),
            "own_module": type(own).__module__,
            "padding_idx": emb.padding_idx}


def four_rank_nxd(rank, world, wanted=None):
    from neuronx_distributed.trainer import neuronx_distributed_config as nxd_config

    from nxd_cp import parallel_state as ps

    tm.STEPS = 1  # one AdamW step per case: the budget of the NxD suite (state in this rank)
    runner = CaseRunner(wanted)
    runner.run("in_charge", _in_charge)
    ps.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    runner.run("state_tp2cp2", compare_state)
    runner.run("layers", _layers)
    # NxD's own config re-initialises NxD's state: nxd_cp must read the new groups.
    ps.destroy_model_parallel()
    nxd_config(tensor_parallel_size=1, context_parallel_size=4)
    runner.run("state_nxd_reinit_tp1cp4", compare_state)
    ps.destroy_model_parallel()
    _run_plans(runner, FOUR_PLANS)
    return runner.results


def eight_rank_nxd(rank, world, wanted=None):
    from nxd_cp import parallel_state as ps

    tm.STEPS = 1
    runner = CaseRunner(wanted)
    ps.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    runner.run("state_tp2cp2dp2", compare_state)
    _run_plans(runner, EIGHT_PLANS, dp=2)
    return runner.results


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four(request):
    return run_ranks(four_rank_nxd, 4, wanted_cases(request, "four"), timeout=400,
                     pg_timeout=PG_TIMEOUT, **NXD_RANKS)


@pytest.fixture(scope="module")
def eight(request):
    return run_ranks(eight_rank_nxd, 8, wanted_cases(request, "eight"), timeout=400,
                     pg_timeout=PG_TIMEOUT, **NXD_RANKS)


def _check_state(per_rank, key, skip=()):
    for rank, r in enumerate(per_rank):
        for name, (ours, theirs) in r.items():
            if not name.endswith(skip):
                assert ours == theirs, f"rank {rank} {key} {name}: nxd_cp {ours} vs NxD {theirs}"


# Every getter returns NxD's live value (groups are NxD's objects); src_tgt pairs mean NxD's;
# DP x CP is NxD's expert-data-parallel group; groups inherit the world's timeout.
@pytest.mark.parametrize("case", ["state_tp2cp2"])
def test_parallel_state_is_nxds(four, case):
    per_rank = case_result(four, case)
    _check_state(per_rank, case)
    assert per_rank[0]["src_tgt_pairs"][0] == [(0, 2), (2, 0)]


@pytest.mark.parametrize("case", ["state_nxd_reinit_tp1cp4"])
def test_parallel_state_is_nxds_after_nxds_config(four, case):
    per_rank = case_result(four, case)
    # Groups that NxD's own neuronx_distributed_config creates get torch's default timeout
    # (NxD passes none; documented in docs/troubleshooting.md): only nxd_cp's initialisation
    # (nxd_cp.neuronx_distributed_config / parallel_state) gives them the world's.
    _check_state(per_rank, case, skip=("_timeout",))
    assert per_rank[0]["context_model_parallel_timeout"][0] == 1800.0
    assert per_rank[1]["context_model_parallel_size"][0] == 4


@pytest.mark.parametrize("case", ["state_tp2cp2dp2"])
def test_parallel_state_is_nxds_dp(eight, case):
    per_rank = case_result(eight, case)
    _check_state(per_rank, case)
    assert per_rank[5]["data_context_parallel_spec"][0] == [1, 3, 5, 7]


@pytest.mark.parametrize("case", ["in_charge"])
def test_nxd_in_charge(four, case):
    for rank, r in enumerate(case_result(four, case)):
        assert r["in_charge_before_init"]  # NXD_CPU_MODE=1 and importable
        assert not r["in_charge_without_cpu_mode"]  # gloo, no NXD_CPU_MODE: the fallback


@pytest.mark.parametrize("case", ["layers"])
def test_nxd_layers_in_charge(four, case):
    for rank, r in enumerate(case_result(four, case)):
        assert r["using_nxd"] and r["isinstance"]
        assert r["column_module"] == "neuronx_distributed.parallel_layers.layers"
        assert r["own_module"] == "nxd_cp.tensor_parallel.layers"  # no class picked at call
        # pad row 0 lives on TP rank 0 (rows [0, 8)): restored there, absent elsewhere.
        assert r["padding_idx"] == (0 if rank % 2 == 0 else None)


def test_case_lists():
    assert len(FOUR_TRANSFORM) == 15 and len(FOUR_SP) == 9
    assert len(EIGHT_TRANSFORM) == 3 and len(EIGHT_SP) == 3
    assert len(FOUR_OPTIM) == 2 and len(EIGHT_OPTIM) == 2
    keys = FOUR_TRANSFORM + FOUR_SP + FOUR_OPTIM + EIGHT_TRANSFORM + EIGHT_SP + EIGHT_OPTIM
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("case", FOUR_TRANSFORM)
def test_transform_on_nxd_layers_matches_reference(four, case):
    """TP2xCP2, TP1xCP4, TP4xCP1 x Llama / Mistral / GPT-NeoX x p2p / all_gather; padded (pad
    token 0), checkpointed and vocab-parallel cases: loss (1e-5) and every gradient (1e-4);
    parameters after 1 AdamW step (1e-4): tests/test_models.check_case."""
    tm.assert_training_case(four, case)


@pytest.mark.parametrize("case", FOUR_SP)
def test_sequence_parallel_on_nxd_layers_matches_reference(four, case):
    """SP on NxD's own sequence-parallel layers: TP2xCP2 (each architecture with both comm
    types; padded, checkpointed, vocab-parallel variants) and TP4xCP1: loss (1e-5), every
    gradient (1e-4), parameters after one AdamW step (1e-4) vs the unmodified model."""
    tm.assert_training_case(four, case)


@pytest.mark.parametrize("case", ["sp_controls"])
def test_sequence_parallel_wiring_on_nxd_layers(four, case):
    """Which of NxD's layers run SP: rows and the MLP's columns, sequence-first (dim 0); the
    attention's q/k/v and the lm_head take the all-gathered input (transformers' attention views
    q/k/v with its input's [B, S])."""
    controls = case_result(four, case)[0]
    nxd = "neuronx_distributed.parallel_layers.layers"
    want = {"self_attn.q_proj": (nxd, False, None), "self_attn.k_proj": (nxd, False, None),
            "self_attn.v_proj": (nxd, False, None), "self_attn.o_proj": (nxd, True, 0),
            "mlp.gate_proj": (nxd, True, 0), "mlp.up_proj": (nxd, True, 0),
            "mlp.down_proj": (nxd, True, 0), "lm_head": (nxd, False, None)}
    got = {k: (m, bool(on), dim if on else None)
           for k, (m, on, dim) in controls["layer0"].items()}
    assert got == want, got
    # Why sequence-first: NxD 0.18's SP backward .view()s the non-contiguous batch-first
    # gradient of its all-gather along dim 1. If this starts to pass, NxD fixed it and
    # sequence_parallel.run_sequence_first may go.
    msg = controls["batch_first_backward"]
    assert "view" in msg, msg


@pytest.mark.parametrize("case", ["sp_controls"])
def test_sequence_parallel_norm_reduction_on_nxd_layers(four, case):
    """Negative control on NxD's layers: without allreduce_sequence_parallel_gradients the
    norms' gradients are one TP rank's tokens' share (far off); the TP-split weights are not."""
    res = case_result(four, case)[0]["unreduced"]
    assert "model.norm.weight" in res["marked"] and len(res["marked"]) == 5, res["marked"]
    assert res["q_err"] < 1e-4, res  # fp32 gradient tolerance
    assert res["norm_err"] > 0.1, res


@pytest.mark.parametrize("case", EIGHT_TRANSFORM)
def test_transform_on_nxd_layers_dp(eight, case):
    tm.assert_training_case(eight, case)


@pytest.mark.parametrize("case", EIGHT_SP)
def test_sequence_parallel_on_nxd_layers_dp(eight, case):
    tm.assert_training_case(eight, case)


@pytest.mark.parametrize("case", ["vocab_logits"])
def test_vocab_parallel_logits_usable(four, case):
    per_rank = case_result(four, case)
    for rank, r in enumerate(per_rank):
        assert r["unchanged"], f"rank {rank}: logits modified by the loss"
    # fp32 forward of the same weights; blockwise CP attention reorders sums: 1e-5.
    assert per_rank[0]["rel_err"] < 1e-5, per_rank[0]


def _check_nxd_optimizer_loop(results, key):
    """NxD's optimizer alone gives the reference gradients (sum over CP, mean over DP; with SP
    in its config the norms' sum over TP) and parameters after its step, and nxd_cp's
    reductions refuse to reduce a second time."""
    per_rank = case_result(results, key)
    sp = key.endswith("-sp")
    res0 = per_rank[0]
    for r in per_rank:
        assert "already reduces the gradients" in r["refused"]
        if sp:
            assert "already all-reduces the sequence-parallel" in r["sp_refused"]
        else:  # NxD's step does not reduce them without SP in its config: nothing to refuse
            assert r["sp_refused"] == "no error"
    want = res0["ref_loss"][0]  # rank 0 is DP rank 0
    # fp32, reordered sums only: loss 1e-5, gradients 1e-4 (as test_models).
    assert abs(res0["loss"] - want) / want < 1e-5
    worst = max(res0["grad_err"], key=res0["grad_err"].get)
    print(f"\n{key}: loss rel err {abs(res0['loss'] - want) / want:.1e}, worst gradient "
          f"{worst} {res0['grad_err'][worst]:.1e}")
    assert res0["grad_err"][worst] < 1e-4, (worst, res0["grad_err"][worst])
    worst = max(res0["param_err"], key=res0["param_err"].get)
    print(f"{key}: worst parameter after 1 AdamW step {worst} {res0['param_err'][worst]:.1e}")
    assert res0["param_err"][worst] < 1e-4, (worst, res0["param_err"][worst])  # as run_case


@pytest.mark.parametrize("case", FOUR_OPTIM)
def test_readme_loop_with_nxd_optimizer(four, case):
    _check_nxd_optimizer_loop(four, case)


@pytest.mark.parametrize("case", EIGHT_OPTIM)
def test_readme_loop_with_nxd_optimizer_dp(eight, case):
    _check_nxd_optimizer_loop(eight, case)
