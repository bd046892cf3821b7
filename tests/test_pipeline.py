"""Pipeline parallelism x CP on the fallback (torch.distributed.pipelining) vs the unmodified model.

Reference (nobody here wrote it): the unmodified transformers model in fp32 on rank 0, same seed,
on every DP rank's full batch (loss averaged over DP); for packed rows the model run on each
document alone (tests/test_models_packed.py's ``reference``). The pipelined model gets
``get_batch_on_this_context_parallel_rank`` of its DP rank's batch and runs
``model.run_train(**batch)`` over 2 microbatches (one row each: the rows hold different numbers
of target tokens when padded or packed, so an equal mean of the microbatch losses would be
wrong); then one SGD step on both.

Tolerances (fp32): loss 1e-5 relative on every rank; every parameter's gradient and updated
parameter 1e-4 norm-wise relative. Negative controls: a second gradient reduction after
``run_train`` raises (model, parameter list, optimizer), and done anyway (bypassing the guard)
it moves the gradients far outside the tolerance; the errors of the pipeline settings are
``ValueError`` on every rank.

Worlds: one 4-rank world runs TP1 x CP2 x PP2 (Llama, Mistral with tied embeddings and a
sliding window, GPT-NeoX, Qwen2 with per-layer windows, Qwen3 with q/k norms and tied
embeddings; p2p and all_gather; 1F1B and GPipe; padded and packed rows; activation
checkpointing; checkpoints) and TP2 x PP2 with SP; one 8-rank world runs TP2 x CP2 x PP2.
"""
import tempfile

import pytest
import test_custom_models  # noqa: F401  (registers qwen2 / qwen3 in test_models.EXTRA_ARCHS)
import torch
from cases import CaseRunner, case_result, wanted_cases
from test_models import make_batch, make_model, rel
from test_models_packed import documents, packed_batch, reference

from nxd_cp.testing import run_ranks

M, LR = 2, 0.5


def setup(tp, cp, pp, comm="p2p", sp=False, schedule="1F1B", ckpt=None, layout="zigzag"):
    import nxd_cp
    from nxd_cp import parallel_state as ps

    lay = ps.get_layout() if ps.model_parallel_is_initialized() else None
    if lay is None or (lay.tp, lay.cp, lay.pp) != (tp, cp, pp):
        ps.destroy_model_parallel()
    return nxd_cp.neuronx_distributed_config(
        tensor_parallel_size=tp, context_parallel_size=cp, pipeline_parallel_size=pp,
        pipeline_config={"num_microbatches": M, "schedule": schedule}, sequence_parallel=sp,
        activation_checkpoint_config=ckpt, optimizer_config={"grad_clipping": False},
        context_parallel_config={"comm_type": comm, "load_balance": layout,
                                 "a2a_size": 2 if comm == "a2a+p2p" else None})


def _reference(arch, full):
    """Rank 0: (loss, grads, params after one SGD step) of the unmodified model."""
    ref = make_model(arch)
    loss = torch.stack([ref(**b).loss for b in full]).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    torch.optim.SGD(ref.parameters(), lr=LR).step()
    return loss.item(), grads, ref.state_dict()


def train_case(arch, tp, cp, pp, comm="p2p", batch="plain", sp=False, schedule="1F1B",
               ckpt=None, double_reduce=False):
    import torch.distributed as dist

    import nxd_cp
    from nxd_cp import parallel_state as ps
    from nxd_cp.models import full_gradients, full_state_dict
    from nxd_cp.training.clipping import global_grad_norm

    layout = "per_document" if batch == "packed" else "zigzag"
    cfg = setup(tp, cp, pp, comm, sp, schedule, ckpt, layout)
    model = nxd_cp.transform(make_model(arch), cfg)
    dp, dp_rank = ps.get_data_parallel_size(), ps.get_data_parallel_rank()
    if batch == "packed":
        docs = documents()
        full = [packed_batch(docs, "seq_idx") for _ in range(dp)]
    else:
        full = [make_batch(100 + d, padded=batch == "padded") for d in range(dp)]
    mine = nxd_cp.get_batch_on_this_context_parallel_rank(full[dp_rank], config=model)
    loss = model.run_train(**mine)
    res = {"loss": loss.item(), "stage": model.nxd_cp_config["pipeline"]["stage"],
           "layers": model.nxd_cp_config["pipeline"]["layers"]}
    if double_reduce:  # negative control, bypassing the guard: what the guard prevents
        from nxd_cp.training.grads import reduce_step_gradients
        reduce_step_gradients(model)
    grads = full_gradients(model)
    res["norm"] = global_grad_norm(model).item()  # over TP and the stages, tied weight once
    torch.optim.SGD(model.parameters(), lr=LR).step()
    params = full_state_dict(model)
    if dist.get_rank() == 0:
        if batch == "packed":
            ref_loss, ref_grads = reference(arch, docs)
            ref_params = None
        else:
            ref_loss, ref_grads, ref_params = _reference(arch, full)
        res["ref_loss"] = ref_loss
        res["grad_err"] = {n: rel(grads[n], g) for n, g in ref_grads.items()}
        res["ref_norm"] = torch.stack([g.double().norm() for g in ref_grads.values()]).norm()
        res["ref_norm"] = res["ref_norm"].item()
        if ref_params is not None:
            res["param_err"] = max(rel(params[n], t) for n, t in ref_params.items())
    return res


MAX_NORM = 0.02  # below the tiny models' gradient norm (~0.4): clipping is active


def zero1_case(arch):
    """ZeRO-1 over DP x CP with clipping (initialize_parallel_optimizer) on a pipelined model:
    its step must not reduce again, and its norm must cover every stage; vs the unmodified
    model clipped by torch.nn.utils.clip_grad_norm_, one SGD step. FSDP2 refuses PP."""
    import torch.distributed as dist

    import nxd_cp
    from nxd_cp.models import full_state_dict

    cfg = setup(1, 2, 2)
    cfg = nxd_cp.neuronx_distributed_config(
        context_parallel_size=2, pipeline_parallel_size=2,
        pipeline_config={"num_microbatches": M},
        optimizer_config={"zero_one_enabled": True, "grad_clipping": True,
                          "max_grad_norm": MAX_NORM},
        context_parallel_config={"comm_type": "p2p"})
    model = nxd_cp.transform(make_model(arch), cfg)
    opt = nxd_cp.initialize_parallel_optimizer(cfg, torch.optim.SGD, model.parameters(), lr=LR)
    full = make_batch(100)
    model.run_train(**nxd_cp.get_batch_on_this_context_parallel_rank(full, config=model))
    opt.step()
    params = full_state_dict(model)
    res = {"norm": opt.grad_norm.item(), "zero1": type(opt.optimizer).__name__}
    try:
        nxd_cp.fully_shard(model)
        res["fsdp"] = None
    except NotImplementedError as e:
        res["fsdp"] = str(e)
    if dist.get_rank() == 0:
        ref = make_model(arch)
        ref(**full).loss.backward()
        res["ref_norm"] = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM).item()
        torch.optim.SGD(ref.parameters(), lr=LR).step()
        res["param_err"] = max(rel(params[n], t) for n, t in ref.state_dict().items())
    return res


def guard_case():
    """After run_train, every second reduction raises on every rank."""
    import nxd_cp

    cfg = setup(1, 2, 2)
    model = nxd_cp.transform(make_model("llama"), cfg)
    model.run_train(**nxd_cp.get_batch_on_this_context_parallel_rank(make_batch(7)))
    caught = {}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for name, fn, arg in (
            ("cp-model", nxd_cp.allreduce_context_parallel_gradients, model),
            ("dpcp-params", nxd_cp.allreduce_data_context_parallel_gradients,
             list(model.parameters())),
            ("dpcp-generator", nxd_cp.allreduce_data_context_parallel_gradients,
             model.parameters()),
            ("sp-optimizer", nxd_cp.allreduce_sequence_parallel_gradients, opt)):
        try:
            fn(arg)
            caught[name] = None
        except RuntimeError as e:
            caught[name] = str(e)
    try:
        model(**nxd_cp.get_batch_on_this_context_parallel_rank(make_batch(7)))
        caught["forward"] = None
    except RuntimeError as e:
        caught["forward"] = str(e)
    return caught


def settings_errors_case():
    """Bad microbatch settings: ValueError on every rank, before any pipeline traffic."""
    import nxd_cp

    out = {}
    cfg = setup(1, 2, 2)
    model = nxd_cp.transform(make_model("llama"), cfg)
    batch = nxd_cp.get_batch_on_this_context_parallel_rank(make_batch(7))
    odd = {k: v[:1] for k, v in batch.items()}  # one row, two microbatches
    for name, kwargs in (("rows", odd), ("keys", {**batch, "inputs_embeds": None})):
        try:
            model.run_train(**kwargs)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def checkpoint_case(root):
    """Save after one step, train one more; a fresh model loading the checkpoint and taking the
    same step ends bit-identical. A PP=1 layout refuses the PP=2 checkpoint."""
    import nxd_cp
    from nxd_cp import parallel_state as ps
    from nxd_cp.models import full_state_dict

    cfg = setup(1, 2, 2)
    batches = [nxd_cp.get_batch_on_this_context_parallel_rank(make_batch(s)) for s in (3, 4)]

    def step(model, opt, b):
        opt.zero_grad()
        model.run_train(**b)
        opt.step()

    model = nxd_cp.transform(make_model("mistral"), cfg)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    step(model, opt, batches[0])
    nxd_cp.save_checkpoint(root, "one", model=model, optimizer=opt)
    step(model, opt, batches[1])
    want = full_state_dict(model)
    again = nxd_cp.transform(make_model("mistral", seed=9), cfg)
    opt2 = torch.optim.SGD(again.parameters(), lr=LR, momentum=0.9)
    nxd_cp.load_checkpoint(root, "one", model=again, optimizer=opt2)
    step(again, opt2, batches[1])
    got = full_state_dict(again)
    res = {"diff": None if want is None else max(
        (want[k] - got[k]).abs().max().item() for k in want)}
    ps.destroy_model_parallel()
    cfg1 = nxd_cp.neuronx_distributed_config(context_parallel_size=2)
    try:
        nxd_cp.load_checkpoint(root, "one", model=nxd_cp.transform(make_model("mistral"), cfg1))
        res["other_pp"] = None
    except ValueError as e:
        res["other_pp"] = str(e)
    ps.destroy_model_parallel()
    return res


FOUR = {  # key -> (function, args, kwargs), grouped by layout
    "tp1cp2pp2-llama-p2p": (train_case, ("llama", 1, 2, 2), {}),
    "tp1cp2pp2-mistral-all_gather": (train_case, ("mistral", 1, 2, 2, "all_gather"), {}),
    "tp1cp2pp2-llama-padded-gpipe": (train_case, ("llama", 1, 2, 2), {
        "batch": "padded", "schedule": "GPipe"}),
    "tp1cp2pp2-mistral-padded-p2p": (train_case, ("mistral", 1, 2, 2), {"batch": "padded"}),
    "tp1cp2pp2-llama-packed-all_gather": (train_case, ("llama", 1, 2, 2, "all_gather"), {
        "batch": "packed"}),
    "tp1cp2pp2-mistral-packed-p2p": (train_case, ("mistral", 1, 2, 2), {"batch": "packed"}),
    "tp1cp2pp2-qwen2-p2p": (train_case, ("qwen2", 1, 2, 2), {}),
    "tp1cp2pp2-llama-a2a-padded": (train_case, ("llama", 1, 2, 2, "a2a"), {"batch": "padded"}),
    "tp1cp2pp2-qwen3-all_gather": (train_case, ("qwen3", 1, 2, 2, "all_gather"), {}),
    "tp1cp2pp2-gpt_neox-ckpt": (train_case, ("gpt_neox", 1, 2, 2), {"ckpt": "full"}),
    "tp1cp2pp2-llama-double-reduce": (train_case, ("llama", 1, 2, 2), {
        "double_reduce": True}),
    "zero1-clip-tp1cp2pp2-mistral": (zero1_case, ("mistral",), {}),
    "zero1-clip-tp1cp2pp2-llama": (zero1_case, ("llama",), {}),
    "guard": (guard_case, (), {}),
    "settings-errors": (settings_errors_case, (), {}),
    "tp2pp2-llama-sp": (train_case, ("llama", 2, 1, 2), {"sp": True}),
    "tp2pp2-mistral-sp-padded": (train_case, ("mistral", 2, 1, 2), {
        "sp": True, "batch": "padded"}),
}
EIGHT = {
    "tp2cp2pp2-llama-p2p": (train_case, ("llama", 2, 2, 2), {}),
    "tp1cp4pp2-mistral-a2a+p2p": (train_case, ("mistral", 1, 4, 2, "a2a+p2p"), {}),
    "tp2cp2pp2-mistral-all_gather-sp-padded": (train_case, ("mistral", 2, 2, 2, "all_gather"), {
        "sp": True, "batch": "padded"}),
}
TRAIN = [k for k, v in {**FOUR, **EIGHT}.items()
         if v[0] is train_case and not v[2].get("double_reduce")]


def world(rank, world_size, wanted=None, root=None):
    runner = CaseRunner(wanted)
    for key, (fn, args, kwargs) in (FOUR if world_size == 4 else EIGHT).items():
        runner.run(key, fn, *args, **kwargs)
    if world_size == 4:
        runner.run("checkpoint", checkpoint_case, root)
    return runner.results


@pytest.fixture(scope="module")
def four(request):
    with tempfile.TemporaryDirectory() as root:
        yield run_ranks(world, 4, wanted_cases(request, "four"), root, timeout=900)


@pytest.fixture(scope="module")
def eight(request):
    return run_ranks(world, 8, wanted_cases(request, "eight"), timeout=600)


def _check_training(per_rank, case):
    res = per_rank[0]
    for r in per_rank:  # fp32: the same token-weighted loss on every rank
        assert abs(r["loss"] - res["ref_loss"]) <= 1e-5 * abs(res["ref_loss"]), (case, r)
    worst = max(res["grad_err"], key=res["grad_err"].get)
    assert res["grad_err"][worst] <= 1e-4, (case, worst, res["grad_err"][worst])
    for r in per_rank:  # clip_grad_norm's norm: the unmodified model's, on every rank (fp32)
        assert abs(r["norm"] - res["ref_norm"]) <= 1e-5 * res["ref_norm"], (case, r["norm"])
    if "param_err" in res:
        assert res["param_err"] <= 1e-4, (case, res["param_err"])  # fp32, one SGD step
    stages = sorted({(r["stage"], tuple(r["layers"])) for r in per_rank})
    assert stages == [(0, (0, 1)), (1, (1, 2))], stages  # 2 layers over 2 stages


@pytest.mark.parametrize("case", [k for k in TRAIN if k in FOUR])
def test_pipeline_matches_unmodified_model_4_ranks(four, case):
    _check_training(case_result(four, case), case)


@pytest.mark.parametrize("case", [k for k in TRAIN if k in EIGHT])
def test_pipeline_matches_unmodified_model_8_ranks(eight, case):
    _check_training(case_result(eight, case), case)


@pytest.mark.parametrize("case", ["tp1cp2pp2-llama-double-reduce"])
def test_double_reduction_is_visible(four, case):
    """Negative control: reducing again after run_train breaks the gradient comparison."""
    res = case_result(four, case)[0]
    assert max(res["grad_err"].values()) > 0.5, res["grad_err"]  # cp = 2: about 2x too large


@pytest.mark.parametrize("case", [k for k in FOUR if k.startswith("zero1-")])
def test_zero1_with_clipping_on_a_pipelined_model(four, case):
    per_rank = case_result(four, case)
    ref = per_rank[0]
    for r in per_rank:
        assert r["zero1"] == "ZeroRedundancyOptimizer", r
        # fp32: the norm over both stages, the tied weight once (Mistral), on every rank
        assert abs(r["norm"] - ref["ref_norm"]) <= 1e-5 * ref["ref_norm"], (r, ref)
        assert "pipelined model" in r["fsdp"], r
    assert ref["param_err"] <= 1e-4, ref  # fp32, one clipped SGD step


@pytest.mark.parametrize("case", ["guard"])
def test_second_reduction_raises(four, case):
    for caught in case_result(four, case):
        assert all(caught.values()), caught
        assert "run_train() already reduced" in caught["cp-model"], caught
        assert "run_train(**batch)" in caught["forward"], caught


@pytest.mark.parametrize("case", ["settings-errors"])
def test_pipeline_settings_errors(four, case):
    for out in case_result(four, case):
        assert "not divisible by pipeline_config['num_microbatches']=2" in out["rows"], out
        assert "inputs_embeds" in out["keys"], out


@pytest.mark.parametrize("case", ["checkpoint"])
def test_checkpoint_resume_per_stage(four, case):
    per_rank = case_result(four, case)
    assert per_rank[0]["diff"] == 0.0, per_rank[0]  # exact resume: bit-identical parameters
    for r in per_rank:
        assert "pp=2" in r["other_pp"], r["other_pp"]


def test_pipeline_config_is_validated():
    from nxd_cp.nxd_subconfigs import pipeline_settings
    from nxd_cp.pipeline.split import stage_layers

    assert pipeline_settings({"num_microbatches": 4}).schedule == "1F1B"
    assert pipeline_settings({"num_microbatches": 4, "schedule": "GPipe",
                              "transformer_layer_cls": object}).schedule == "GPipe"
    for bad, words in (({"num_microbatches": 0}, "num_microbatches"),
                       ({"schedule": "ZB"}, "schedule"),
                       ({"virtual_pipeline_size": 2}, "virtual_pipeline_size"),
                       ({"pipeline_cuts": ["a"]}, "pipeline_cuts")):
        with pytest.raises(ValueError, match=words):
            pipeline_settings(bad)
    assert [stage_layers(5, 2, s) for s in (0, 1)] == [(0, 2), (2, 5)]
    assert [stage_layers(32, 8, s)[0] for s in range(8)] == list(range(0, 32, 4))
    with pytest.raises(ValueError, match="num_hidden_layers=2 is less than"):
        stage_layers(2, 4, 0)

