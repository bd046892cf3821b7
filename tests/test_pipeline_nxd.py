"""Pipeline parallelism x CP with NeuronX Distributed's REAL code in charge (issue 27).

``transform`` + ``model.run_train(**batch)`` with NxD in charge (../shared/nxd, NXD_CPU_MODE=1,
gloo) run on NxD's own ``NxDPPModel`` (traced and partitioned by NxD; ``nxd_cp.pipeline
.nxd_engine``) with NxD's TP layers and nxd_cp's CP attention inside. Against the unmodified
transformers model on rank 0: the batch's token-weighted loss (every rank), every parameter's
gradient after ``run_train`` (gathered over TP and stages by ``full_gradients``), and the
parameters after one SGD step (``full_state_dict``). Cases: TP1xCP2xPP2 Llama (p2p, padded),
Mistral (all_gather, tied embeddings), a packed Llama batch (``seq_idx``, documents of very
different lengths across the two microbatches); one 8-rank TP2xCP2xPP2 Mistral. Negative
control: ``allreduce_context_parallel_gradients`` after ``run_train`` raises (NxDPPModel already
reduced over DP x CP; a second reduction would double the CP sum).

Tolerances (fp32, reordered sums only): loss 1e-5 relative, gradients 1e-4 norm-wise relative,
parameters after one SGD step 1e-4 norm-wise relative (tests/test_models' standard).
"""

import pytest
import test_models as tm
import torch
from cases import CaseRunner, case_result, wanted_cases
from nxd_source import NXD_RANKS, requires_nxd

from nxd_cp.testing import run_ranks

pytestmark = [requires_nxd, pytest.mark.slow]  # a 4-rank and an 8-rank world: 60-120 s each
PG_TIMEOUT = 120
SGD_LR = 0.1
LOSS_TOL, GRAD_TOL, PARAM_TOL = 1e-5, 1e-4, 1e-4


# ---------------------------------------------------------------------------------------------
# Rank side
# ---------------------------------------------------------------------------------------------
def _batch(kind):
    """(full batch, reference (loss, grads) or None when the reference is the model itself)."""
    if kind == "packed":
        import test_models_packed as tp

        docs = tp.documents()
        ref = tp.reference  # rank 0 only: per-document reference
        return tp.packed_batch(docs, "seq_idx"), lambda arch: ref(arch, docs)
    return tm.make_batch(100, padded=kind == "padded"), None


def pp_case(arch, tp, cp, comm, kind, m=2):
    """One step of ``run_train`` then SGD; on rank 0 the errors against the reference."""
    import torch.distributed as dist

    import nxd_cp
    from nxd_cp import parallel_state as ps
    from nxd_cp.models import full_gradients, full_state_dict

    cfg = nxd_cp.neuronx_distributed_config(
        tensor_parallel_size=tp, context_parallel_size=cp, pipeline_parallel_size=2,
        pipeline_config={"num_microbatches": m}, context_parallel_config={"comm_type": comm})
    try:
        model = nxd_cp.transform(tm.make_model(arch), cfg)
        engine = model.__dict__["nxd_cp_pipeline"]
        full, packed_ref = _batch(kind)
        mine = nxd_cp.get_batch_on_this_context_parallel_rank(full)
        opt = torch.optim.SGD(model.parameters(), lr=SGD_LR)
        loss = model.run_train(**mine)
        nxd_models = list(engine._models.values())
        res = {"in_charge": ps.nxd_in_charge(), "engine": type(engine).__name__,
               "nxd_model": [type(x).__name__ for x in nxd_models],
               # NxDPPModel itself all-reduces over DP x CP only without its optimizer wrapper
               "nxd_reduces": [not (x.use_optimizer_wrapper or x.use_zero1_optimizer)
                               for x in nxd_models],
               "keys": sorted(mine), "loss": loss.item()}
        grads = full_gradients(model)
        try:  # negative control: a second DP x CP reduction must be refused
            nxd_cp.allreduce_context_parallel_gradients(model)
            res["refused"] = "no error"
        except RuntimeError as e:
            res["refused"] = str(e)
        opt.step()
        params = full_state_dict(model)
        if dist.get_rank() == 0:
            if packed_ref is not None:
                ref_loss, ref_grads = packed_ref(arch)
                res["ref_loss"] = ref_loss
            else:
                ref = tm.make_model(arch)
                ref_opt = torch.optim.SGD(ref.parameters(), lr=SGD_LR)
                out = ref(**full).loss
                out.backward()
                res["ref_loss"] = out.item()
                ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
                ref_opt.step()
                res["param_err"] = {n: tm.rel(params[n], t) for n, t in ref.state_dict().items()}
            res["grad_err"] = {n: tm.rel(grads[n], g) for n, g in ref_grads.items()}
        return res
    finally:
        ps.destroy_model_parallel()


FOUR = {"tp1cp2pp2-llama-p2p-padded": ("llama", 1, 2, "p2p", "padded"),
        "tp1cp2pp2-mistral-all_gather": ("mistral", 1, 2, "all_gather", "plain"),
        "tp1cp2pp2-llama-all_gather-packed": ("llama", 1, 2, "all_gather", "packed")}
EIGHT = {"tp2cp2pp2-mistral-p2p-padded": ("mistral", 2, 2, "p2p", "padded")}


def world(rank, world_size, plans, wanted=None):
    runner = CaseRunner(wanted)
    for key, args in plans.items():
        runner.run(key, pp_case, *args)
    return runner.results


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four(request):
    return run_ranks(world, 4, FOUR, wanted_cases(request, "four"), timeout=400,
                     pg_timeout=PG_TIMEOUT, **NXD_RANKS)


@pytest.fixture(scope="module")
def eight(request):
    return run_ranks(world, 8, EIGHT, wanted_cases(request, "eight"), timeout=400,
                     pg_timeout=PG_TIMEOUT, **NXD_RANKS)


def _check(per_rank, key):
    res0 = per_rank[0]
    want = res0["ref_loss"]
    for rank, r in enumerate(per_rank):
        # NxD's engine really ran: nxd_cp's NxD-path engine over NxD's NxDPPModel
        assert r["in_charge"] and r["engine"] == "NxDPipelineEngine", (rank, r["engine"])
        assert r["nxd_model"] == ["NxDPPModel"] and r["nxd_reduces"] == [True], (rank, r)
        assert abs(r["loss"] - want) / want < LOSS_TOL, (rank, r["loss"], want)
        assert "already reduced the step's gradients" in r["refused"], (rank, r["refused"])
    worst = max(res0["grad_err"], key=res0["grad_err"].get)
    print(f"\n{key}: loss rel err {abs(res0['loss'] - want) / want:.1e}, worst gradient "
          f"{worst} {res0['grad_err'][worst]:.1e}")
    assert res0["grad_err"][worst] < GRAD_TOL, (worst, res0["grad_err"][worst])
    if "param_err" in res0:
        worst = max(res0["param_err"], key=res0["param_err"].get)
        print(f"{key}: worst parameter after one SGD step {worst} "
              f"{res0['param_err'][worst]:.1e}")
        assert res0["param_err"][worst] < PARAM_TOL, (worst, res0["param_err"][worst])


@pytest.mark.parametrize("case", sorted(FOUR))
def test_nxd_pipeline_matches_reference(four, case):
    per_rank = case_result(four, case)
    if case.endswith("packed"):
        assert "seq_idx" in per_rank[0]["keys"], per_rank[0]["keys"]
    _check(per_rank, case)


@pytest.mark.parametrize("case", sorted(EIGHT))
def test_nxd_pipeline_matches_reference_tp2(eight, case):
    _check(case_result(eight, case), case)
