"""save_checkpoint / load_checkpoint of an FSDP2 model (nxd_cp.fully_shard) and its optimizer.

Two spawns, tests/test_models.py's tiny Llama (2 layers, tied embeddings off), nxd_cp's AdamW
with weight decay and an LR schedule:

1. One 4-rank gloo world, TP1 x CP2 x DP2 (FSDP2 over the 4 DP x CP ranks), runs the cases
   (tests/cases.py; ``-k resume`` runs one): 2 steps, save, 1 more step; a fresh model of
   other weights + a fresh optimizer + scheduler load the checkpoint and run the same step:
   parameters and optimizer state bit-identical to the uninterrupted run (negative control:
   the fresh model without the checkpoint is measurably off). Refusals: an FSDP2 checkpoint
   into a model without FSDP2 and the reverse, an optimizer without its model, a truncated DCP
   file. Last, TP2 x CP2 x DP1: the TP1 checkpoint is refused (another tp); a TP2 checkpoint
   (one DCP folder per TP rank, each saved by its DP x CP group) loads back bit for bit.
2. A 2-rank world, TP1 x CP2 x DP1 (dp*cp = 2, the checkpoint's is 4): DCP reshards; the
   loaded parameters and optimizer state are bit-identical to the saved ones.
"""
import os
import shutil

import pytest
import torch
from cases import CaseRunner, case_result, wanted_cases
from test_models import make_batch, make_model, rel

from nxd_cp.testing import run_ranks

pytestmark = [pytest.mark.gloo, pytest.mark.slow]

ARCH = "llama"
KW = dict(lr=1e-3, eps=1e-6, weight_decay=0.01)


def _setup(tp, cp):
    import nxd_cp
    from nxd_cp import parallel_state as ps

    ps.destroy_model_parallel()
    return nxd_cp.neuronx_distributed_config(
        tensor_parallel_size=tp, context_parallel_size=cp,
        optimizer_config={"grad_clipping": False}, context_parallel_config={"comm_type": "p2p"})


def _build(cfg, seed=1, fsdp=True):
    import nxd_cp

    model = nxd_cp.transform(make_model(ARCH, seed=seed), cfg)
    if fsdp:
        model = nxd_cp.fully_shard(model)
    opt = nxd_cp.optim.AdamW(model.parameters(), **KW)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2) * 0.8 ** s)
    return model, opt, sched


def _step(model, opt, sched, step):
    """One step on this DP rank's batch of ``step`` (its CP shard)."""
    import nxd_cp
    from nxd_cp import parallel_state as ps
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank

    batch = get_batch_on_this_context_parallel_rank(
        make_batch(100 * step + ps.get_data_parallel_rank()))
    opt.zero_grad()
    model(**batch).loss.backward()
    nxd_cp.clip_grad_norm(model, 1.0)
    opt.step()
    sched.step()


def _full(model, opt):
    """Full parameters and optimizer state (every rank; DTensors gathered over DP x CP)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)

    from nxd_cp.models import full_state_dict
    from nxd_cp.training.fsdp import unsharded

    with unsharded(model):
        params = full_state_dict(model, rank0_only=False)
    state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    flat = {f"{name}.{k}": v.clone() for name, s in state["state"].items() for k, v in s.items()}
    return params, flat, [g["lr"] for g in opt.param_groups]


def _identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _max_err(a, b):
    return max(rel(a[k].float(), b[k].float()) for k in b)


def resume_case(root):
    """2 steps, save, 1 step == fresh model + optimizer, load, the same step (bit for bit)."""
    import torch.distributed as dist

    import nxd_cp

    cfg = _setup(1, 2)
    model, opt, sched = _build(cfg)
    for step in (1, 2):
        _step(model, opt, sched, step)
    saved = _full(model, opt)
    nxd_cp.save_checkpoint(root, "step2", model=model, optimizer=opt, scheduler=sched, step=2)
    draw = torch.rand(1)  # RNG right after the save
    if dist.get_rank() == 0:  # the reference of the 2-rank reshard world
        torch.save(saved, os.path.join(root, "saved_step2.pt"))
    _step(model, opt, sched, 3)
    want = _full(model, opt)

    m2, o2, s2 = _build(cfg, seed=7)  # other weights: everything comes from the checkpoint
    control = _build(cfg, seed=7)
    nxd_cp.load_checkpoint(root, model=m2, optimizer=o2, scheduler=s2)
    res = {"rng": torch.equal(torch.rand(1), draw)}
    loaded = _full(m2, o2)
    res["loaded"] = [_identical(x, y) for x, y in zip(loaded[:2], saved[:2])]
    res["loaded_lr"] = (loaded[2], saved[2])
    _step(m2, o2, s2, 3)
    got = _full(m2, o2)
    res["params"], res["optim"] = _identical(got[0], want[0]), _identical(got[1], want[1])
    res["errs"] = (_max_err(got[0], want[0]), _max_err(got[1], want[1]))
    _step(*control, 3)  # negative control: no checkpoint loaded
    res["control_err"] = _max_err(_full(*control[:2])[0], want[0])
    ckpt = os.path.join(root, "step2")
    res["files"] = sorted(os.listdir(ckpt))
    res["fsdp_files"] = sorted(os.listdir(os.path.join(ckpt, "fsdp", "tp_rank_00_pp_rank_00")))
    res["meta"] = nxd_cp.checkpoint_metadata(root, "step2")
    return res


def _raises(fn, kind=Exception):
    try:
        fn()
    except kind as e:
        return f"{type(e).__name__}: {e}"
    return None


def refusals_case(root):
    """FSDP2 checkpoint <-> plain model, a truncated DCP file, another tp: each raises."""
    import torch.distributed as dist

    import nxd_cp

    cfg = _setup(1, 2)
    res = {}
    plain, plain_opt, _ = _build(cfg, fsdp=False)
    res["into_plain"] = _raises(lambda: nxd_cp.load_checkpoint(root, "step2", model=plain),
                                ValueError)
    res["optim_into_plain"] = _raises(
        lambda: nxd_cp.load_checkpoint(root, "step2", optimizer=plain_opt), ValueError)
    nxd_cp.save_checkpoint(root, "plain", model=plain, optimizer=plain_opt)
    model, opt, _ = _build(cfg)
    res["plain_into_fsdp"] = _raises(
        lambda: nxd_cp.load_checkpoint(root, "plain", model=model, optimizer=opt), ValueError)
    res["optim_alone"] = _raises(lambda: nxd_cp.save_checkpoint(root, "x", optimizer=opt),
                                 ValueError)
    if dist.get_rank() == 0:  # a copy of step2 with one rank's DCP file cut in half
        bad = os.path.join(root, "corrupt")
        shutil.copytree(os.path.join(root, "step2"), bad)
        folder = os.path.join(bad, "fsdp", "tp_rank_00_pp_rank_00")
        victim = os.path.join(folder, sorted(f for f in os.listdir(folder)
                                              if f.endswith(".distcp"))[-1])
        size = os.path.getsize(victim)
        with open(victim, "r+b") as f:
            f.truncate(size // 2)
    dist.barrier()
    res["corrupt"] = _raises(lambda: nxd_cp.load_checkpoint(root, "corrupt", model=model,
                                                            optimizer=opt))
    return res


def tp2_case(root):
    """TP2 x CP2 (two DP x CP groups, one DCP folder each): the TP1 checkpoint is refused; a
    TP2 one saved after a step loads into a fresh model bit for bit. Runs last: DTensor caches
    meshes by their ranks, so no case may rebuild these groups after it."""
    import nxd_cp

    cfg = _setup(2, 2)
    model, opt, sched = _build(cfg)
    res = {"other_tp": _raises(
        lambda: nxd_cp.load_checkpoint(root, "step2", model=model, optimizer=opt), ValueError)}
    _step(model, opt, sched, 1)
    saved = _full(model, opt)
    nxd_cp.save_checkpoint(root, "tp2", model=model, optimizer=opt, scheduler=sched)
    m2, o2, s2 = _build(cfg, seed=7)
    nxd_cp.load_checkpoint(root, "tp2", model=m2, optimizer=o2, scheduler=s2)
    loaded = _full(m2, o2)
    res["loaded"] = [_identical(x, y) for x, y in zip(loaded[:2], saved[:2])]
    folder = os.path.join(root, "tp2", "fsdp")
    res["folders"] = {d: sorted(os.listdir(os.path.join(folder, d))) for d in os.listdir(folder)}
    return res


CASES = {"resume-tp1cp2dp2": resume_case, "refusals-tp1cp2dp2": refusals_case,
         "tp2cp2": tp2_case}


def four_rank_world(rank, world, root, wanted=None):
    runner = CaseRunner(wanted)
    for key, fn in CASES.items():
        runner.run(key, fn, root)
    return runner.results


def reshard_world(rank, world, root):
    """TP1 x CP2 x DP1: load the dp*cp=4 checkpoint into dp*cp=2 shards; one step after."""
    import nxd_cp

    cfg = _setup(1, 2)
    model, opt, sched = _build(cfg, seed=7)
    nxd_cp.load_checkpoint(root, "step2", model=model, optimizer=opt, scheduler=sched)
    loaded = _full(model, opt)
    saved = torch.load(os.path.join(root, "saved_step2.pt"))
    res = {"params": _identical(loaded[0], saved[0]), "optim": _identical(loaded[1], saved[1]),
           "lr": (loaded[2], saved[2]), "dp_cp": nxd_cp.parallel_state
           .get_data_context_parallel_size()}
    _step(model, opt, sched, 3)
    res["finite"] = all(torch.isfinite(t).all().item() for t in _full(model, opt)[0].values())
    return res


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fsdp_ckpt"))


@pytest.fixture(scope="module")
def four(request, root):
    return run_ranks(four_rank_world, 4, root, wanted_cases(request, "four"), timeout=600)


def test_resume_bit_identical(four):
    r0 = case_result(four, "resume-tp1cp2dp2")[0]
    assert r0["files"] == ["done", "fsdp", "metadata.json", "rng", "scheduler.pt"], r0["files"]
    assert ".metadata" in r0["fsdp_files"]
    assert sum(f.endswith(".distcp") for f in r0["fsdp_files"]) == 4  # one per DP x CP rank
    assert r0["meta"]["fsdp_dp_cp"] == 4 and r0["meta"]["layout"]["dp"] == 2
    assert r0["rng"]  # the rank's RNG state restored
    # Loaded state == saved state, and the resumed step == the uninterrupted one: bit for bit
    # (no tolerance: the same operations on the same bits).
    assert r0["loaded"] == [True, True] and r0["loaded_lr"][0] == r0["loaded_lr"][1], r0
    assert r0["params"] and r0["optim"], r0["errs"]
    # Negative control: the same step without the checkpoint (other weights) is far off.
    assert r0["control_err"] > 1e-2, r0["control_err"]
    print(f"FSDP2 resume: params/optimizer max rel err {r0['errs']}; without the checkpoint "
          f"{r0['control_err']:.2e}")


def test_refusals(four):
    errors = case_result(four, "refusals-tp1cp2dp2")[0]
    for key in ("into_plain", "optim_into_plain"):
        assert errors[key] and "FSDP2" in errors[key] and "dp*cp=4" in errors[key], errors
    assert errors["plain_into_fsdp"] and "FSDP2" in errors["plain_into_fsdp"], errors
    assert errors["optim_alone"] and "model" in errors["optim_alone"], errors
    # A truncated DCP shard never loads silently: DCP's error on every rank, as a RuntimeError.
    assert errors["corrupt"] and errors["corrupt"].startswith("RuntimeError"), errors


def test_tp2_folders_and_other_tp(four):
    r0 = case_result(four, "tp2cp2")[0]
    other = r0["other_tp"]  # the existing rule: another tp is refused, both layouts named
    assert other and "tp=1, cp=2, dp=2" in other and "tp=2, cp=2, dp=1" in other, other
    # One DCP folder per TP rank, each written by its DP x CP group of 2 ranks.
    assert r0["folders"] == {f"tp_rank_0{t}_pp_rank_00": [".metadata", "__0_0.distcp",
                                                          "__1_0.distcp"] for t in (0, 1)}
    assert r0["loaded"] == [True, True]  # bit for bit


def test_reshard_other_dp_cp(four, root):
    case_result(four, "resume-tp1cp2dp2")  # the checkpoint exists
    r0 = run_ranks(reshard_world, 2, root, timeout=400)[0]
    assert r0["dp_cp"] == 2
    # DCP reshards the dp*cp=4 shards into 2: the same values, bit for bit.
    assert r0["params"] and r0["optim"] and r0["lr"][0] == r0["lr"][1], r0
    assert r0["finite"]
