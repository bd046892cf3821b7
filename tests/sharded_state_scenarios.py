"""Rank-side scenarios of tests/test_sharded_state.py: clipping, ZeRO-1 and FSDP2 under TP x CP.

Reference: the unmodified transformers model in fp32 on rank 0, same seed, trained on every DP
rank's full batch (loss averaged over DP), clipped with ``torch.nn.utils.clip_grad_norm_``.
Models and batches are tests/test_models.py's (hidden 64, 2 layers, 4 heads, sequence 256,
batch 2; Llama with 2 KV heads, Mistral with 1 KV head, tied embeddings, sliding window 48).
"""
import os
import tempfile

import torch
from test_models import make_batch, make_model, rel

STEPS = 3
MAX_NORM = 0.02  # below the tiny models' gradient norm (~0.4): clipping is active at each step


def setup(tp, cp, sp=False, **optimizer_config):
    """Parallel state for (tp, cp) (dp = world / (tp * cp)) and its active config dict."""
    import nxd_cp
    from nxd_cp import parallel_state as ps

    # Same sizes: keep the groups (the config is replaced). DTensor caches meshes by their
    # ranks, so FSDP2 in a group recreated with the same ranks in one process would reach the
    # destroyed group: test_sharded_state orders its cases by layout.
    lay = ps.get_layout() if ps.model_parallel_is_initialized() else None
    if lay is None or (lay.tp, lay.cp) != (tp, cp):
        ps.destroy_model_parallel()
    return nxd_cp.neuronx_distributed_config(
        tensor_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp,
        optimizer_config={"grad_clipping": False, **optimizer_config},
        context_parallel_config={"comm_type": "p2p"})


def _batches():
    from nxd_cp import parallel_state as ps
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank

    dp, dp_rank = ps.get_data_parallel_size(), ps.get_data_parallel_rank()
    full = [make_batch(100 + d) for d in range(dp)]
    return full, get_batch_on_this_context_parallel_rank(full[dp_rank])


def _ref_step(ref, batches, opt, max_norm):
    """One reference step: mean loss over the DP batches, clipped; returns the norm."""
    opt.zero_grad()
    torch.stack([ref(**b).loss for b in batches]).mean().backward()
    grads = [p.grad for p in ref.parameters() if p.grad is not None]
    inf = max(g.abs().max() for g in grads).item()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item()
    opt.step()
    return norm, inf


def _param_err(model, ref, res=None, arch=None):
    """Max relative error of the full parameters vs ``ref``'s; with ``res``, also of the
    updates (parameters minus the seeded initial ones) into ``res["update_err"]``."""
    from nxd_cp.models import full_state_dict

    params = full_state_dict(model)
    if ref is None:
        return None
    if res is not None:
        start = make_model(arch).state_dict()
        errs = {n: rel(params[n] - start[n], t - start[n]) for n, t in ref.state_dict().items()}
        res["update_err"] = max(errs.values())
        res["worst_updates"] = sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    return max(rel(params[n], t) for n, t in ref.state_dict().items())


# --- 1. clipping ------------------------------------------------------------------------------
def clip_case(arch, tp, cp, sp=False):
    """One clipped SGD step after ``allreduce_data_context_parallel_gradients``."""
    import torch.distributed as dist

    import nxd_cp
    from nxd_cp.training.clipping import global_grad_norm

    cfg = setup(tp, cp, sp=sp)
    model = nxd_cp.transform(make_model(arch), cfg)
    rank0 = dist.get_rank() == 0
    ref = make_model(arch) if rank0 else None
    full, mine = _batches()
    model(**mine).loss.backward()
    nxd_cp.allreduce_data_context_parallel_gradients(model)
    from nxd_cp.models import full_gradients

    # Before clipping: the unmodified model's, on rank 0. Cloned: at tp = 1 full_gradients
    # returns the live gradient tensors (a one-rank all-gather is the identity), which
    # clip_grad_norm then scales in place.
    grads = full_gradients(model)
    grads = {n: g.clone() for n, g in grads.items()} if grads is not None else None
    res = {"sp": bool(model.nxd_cp_config.get("sequence_parallel")),
           "naive": torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item(),
           "inf": global_grad_norm(model, float("inf")).item(),
           "from_params": global_grad_norm(list(model.parameters())).item(),
           "norm": nxd_cp.clip_grad_norm(model, MAX_NORM).item()}
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    if rank0:
        opt = torch.optim.SGD(ref.parameters(), lr=0.5)
        opt.zero_grad()
        torch.stack([ref(**b).loss for b in full]).mean().backward()
        errs = {n: rel(grads[n], p.grad) for n, p in ref.named_parameters()}
        res["grad_err"] = max(errs.values())
        res["worst_grad"] = max(errs, key=errs.get)
        res["ref_inf"] = max(p.grad.abs().max() for p in ref.parameters()).item()
        res["ref_norm"] = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM).item()
        opt.step()
    res["param_err"] = _param_err(model, ref, res, arch)
    return res


# --- 2. ZeRO-1 --------------------------------------------------------------------------------
def _train(arch, cfg, opt_class, steps, model=None, pass_model=False, **kw):
    """``steps`` steps with ``initialize_parallel_optimizer`` given the parameters (or, with
    ``pass_model``, the model itself: SP parameters found by name)."""
    import nxd_cp

    model = model or nxd_cp.transform(make_model(arch), cfg)
    params = model if pass_model else model.parameters()
    opt = nxd_cp.initialize_parallel_optimizer(cfg, opt_class, params, **kw)
    _, mine = _batches()
    for _ in range(steps):
        opt.zero_grad()
        model(**mine).loss.backward()
        opt.step()
    return model, opt


def zero1_sgd_case(arch, tp, cp, zero1=True, sp=False):
    """3 clipped SGD-with-momentum steps with the optimizer of initialize_parallel_optimizer vs
    the unmodified model; the ZeRO-1 state bytes of this rank."""
    import torch.distributed as dist

    from nxd_cp import parallel_state as ps
    from nxd_cp.training.zero1 import optimizer_state_bytes

    cfg = setup(tp, cp, sp=sp, zero_one_enabled=zero1, grad_clipping=True,
                max_grad_norm=MAX_NORM)
    model, opt = _train(arch, cfg, torch.optim.SGD, STEPS, pass_model=sp, lr=0.5, momentum=0.9)
    ref, res = None, {}
    if dist.get_rank() == 0:
        ref = make_model(arch)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
        full, _ = _batches()
        res["ref_norms"] = [_ref_step(ref, full, ref_opt, MAX_NORM)[0] for _ in range(STEPS)]
    res["grad_norm"] = opt.grad_norm.item()
    res["param_err"] = _param_err(model, ref, res, arch)
    local = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}
                .values())
    res.update(state_bytes=optimizer_state_bytes(opt), local_param_bytes=local,
               largest_param_bytes=max(p.numel() * p.element_size() for p in model.parameters()),
               dp_cp=ps.get_data_context_parallel_size())
    return res


def zero1_adamw_case(arch, tp, cp):
    """ZeRO-1 AdamW vs the same code unsharded (both nxd_cp); state bytes of AdamW."""
    import nxd_cp
    from nxd_cp.models import full_state_dict
    from nxd_cp.training.zero1 import optimizer_state_bytes

    runs = {}
    for zero1 in (False, True):
        cfg = setup(tp, cp, zero_one_enabled=zero1, grad_clipping=True, max_grad_norm=MAX_NORM)
        model, opt = _train(arch, cfg, nxd_cp.optim.AdamW, STEPS, lr=1e-3, eps=1e-6)
        runs[zero1] = (full_state_dict(model, rank0_only=False), optimizer_state_bytes(opt),
                       opt.grad_norm.item())
    sharded, plain = runs[True][0], runs[False][0]
    return {"max_err": max(rel(sharded[n], t) for n, t in plain.items()),
            "bit_identical": all(torch.equal(sharded[n], t) for n, t in plain.items()),
            "bytes_plain": runs[False][1], "bytes_zero1": runs[True][1],
            "norms": (runs[False][2], runs[True][2])}


def zero1_resume_case(arch, tp, cp):
    """ZeRO-1 AdamW: 2 steps, checkpoint, 1 step == load, 1 step (bit for bit); refusals."""
    import torch.distributed as dist

    import nxd_cp
    from nxd_cp.models import full_state_dict

    from nxd_cp import parallel_state as ps

    cfg = setup(tp, cp, zero_one_enabled=True, grad_clipping=True, max_grad_norm=MAX_NORM)
    kw = dict(lr=1e-3, eps=1e-6)
    tmp = [tempfile.mkdtemp(prefix="zero1_ckpt_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(tmp, 0)
    model, opt = _train(arch, cfg, nxd_cp.optim.AdamW, 2, **kw)
    nxd_cp.save_checkpoint(tmp[0], "step2", model=model, optimizer=opt, step=2)
    res = {"files": len(os.listdir(os.path.join(tmp[0], "step2", "optim")))}
    _, mine = _batches()

    def one_step(m, o):
        o.zero_grad()
        m(**mine).loss.backward()
        o.step()
        return full_state_dict(m, rank0_only=False)

    uninterrupted = one_step(model, opt)
    m2 = nxd_cp.transform(make_model(arch, seed=7), cfg)  # other weights: all from the file
    o2 = nxd_cp.initialize_parallel_optimizer(cfg, nxd_cp.optim.AdamW, m2.parameters(), **kw)
    nxd_cp.load_checkpoint(tmp[0], model=m2, optimizer=o2)
    resumed = one_step(m2, o2)
    res["resume_bit_identical"] = all(torch.equal(resumed[n], t)
                                      for n, t in uninterrupted.items())
    res["resume_max_err"] = max(rel(resumed[n], t) for n, t in uninterrupted.items())
    res["errors"] = _zero1_refusals(opt, tmp[0], arch, cfg)
    opt.consolidate_state_dict(to=0)  # torch's full state dict on DP x CP rank 0
    if ps.get_data_context_parallel_rank() == 0:
        full_state = opt.optimizer.state_dict()["state"]
        res["consolidated"] = (len(full_state), len(list(model.parameters())))
    dist.barrier()
    if dist.get_rank() == 0:
        import shutil
        shutil.rmtree(tmp[0], ignore_errors=True)
    return res


def _zero1_refusals(opt, path, arch, cfg):
    """Messages of the errors: another dp*cp shard, a ZeRO-1 checkpoint into a plain
    optimizer, reducing gradients again given the ZeRO-1 optimizer."""
    import nxd_cp

    def message(fn, kind):
        try:
            fn()
        except kind as e:
            return str(e)
        return None

    state = opt.state_dict()
    state["sharding"] = {"dp_cp": state["sharding"]["dp_cp"] * 2, "rank": 0}
    plain_cfg = dict(cfg, optimizer_config=dict(cfg["optimizer_config"], zero_one_enabled=False))
    model = nxd_cp.transform(make_model(arch), cfg)
    plain = nxd_cp.initialize_parallel_optimizer(plain_cfg, torch.optim.SGD, model.parameters(),
                                                 lr=0.1)
    return {"other_dp_cp": message(lambda: opt.load_state_dict(state), ValueError),
            "into_plain": message(lambda: nxd_cp.load_checkpoint(path, optimizer=plain),
                                  ValueError),
            "reduce_twice": message(
                lambda: nxd_cp.allreduce_data_context_parallel_gradients(opt), RuntimeError),
            "sp_twice": message(
                lambda: nxd_cp.allreduce_sequence_parallel_gradients(opt), RuntimeError)}


# --- 3. FSDP2 ---------------------------------------------------------------------------------
def _local_bytes(tensors):
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size()
               for t in tensors)


def fsdp_case(arch, tp, cp, mixed_precision=None):
    """3 clipped SGD-momentum steps with FSDP2 over DP x CP vs the unmodified model; nothing
    called between backward and step but clip_grad_norm. Also the per-rank bytes."""
    import torch.distributed as dist

    import nxd_cp
    from nxd_cp import parallel_state as ps
    from nxd_cp.models import full_state_dict
    from nxd_cp.training.fsdp import unsharded

    cfg = setup(tp, cp)
    model = nxd_cp.transform(make_model(arch), cfg)
    tp_bytes = _local_bytes({id(p): p for p in model.parameters()}.values())
    model = nxd_cp.fully_shard(model, mixed_precision=mixed_precision)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    _, mine = _batches()
    res = {"norms": []}
    for _ in range(STEPS):
        opt.zero_grad()
        model(**mine).loss.backward()
        res["norms"].append(nxd_cp.clip_grad_norm(model, MAX_NORM).item())
        opt.step()
    params = list({id(p): p for p in model.parameters()}.values())
    res.update(tp_bytes=tp_bytes, param_bytes=_local_bytes(params),
               grad_bytes=_local_bytes([p.grad for p in params if p.grad is not None]),
               state_bytes=nxd_cp.optimizer_state_bytes(opt),
               dp_cp=ps.get_data_context_parallel_size())
    try:
        nxd_cp.allreduce_data_context_parallel_gradients(model)
        res["reduce_twice"] = None
    except RuntimeError as e:
        res["reduce_twice"] = str(e)
    with unsharded(model):
        full = full_state_dict(model)
    if dist.get_rank() == 0:
        ref = make_model(arch)
        start = {n: t.clone() for n, t in ref.state_dict().items()}
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
        batches, _ = _batches()
        res["ref_norms"] = [_ref_step(ref, batches, ref_opt, MAX_NORM)[0] for _ in range(STEPS)]
        want = ref.state_dict()
        res["param_err"] = max(rel(full[n].float(), t) for n, t in want.items())
        errs = {n: rel(full[n].float() - start[n], t - start[n]) for n, t in want.items()}
        res["update_err"] = max(errs.values())
        res["worst_updates"] = sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    return res


# --- 4. the memory benchmark's measurement ----------------------------------------------------
def bench_case(tp, cp):
    """benchmarks/bench_model_state.py's per-rank measurement and formula, every mode."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "benchmarks"))
    import bench_model_state as bench

    rows = [bench.measure(tp, cp, mode) for mode in bench.MODES]
    return [dict(r, formula=bench.formula(r)) for r in rows]
