"""``nxd_cp.training.optim.AdamW``: torch's AdamW numbers, an XLA graph without f64.

Reference: ``torch.optim.AdamW`` on the same parameters and gradients (CPU, fp32, 4 steps).
The f64-free update (``_adamw_update``, what runs on XLA) is called here on CPU tensors and must
match torch's to fp32 rounding (relative 1e-6: the bias corrections are f32 powers instead of
Python doubles, ~1e-7 relative). On XLA the lowered step holds no f64 and is the same text
on every step after the first (which creates the state).
"""
import os

import pytest
import torch

from nxd_cp.training.optim import AdamW, _adamw_update

CASES = [dict(), dict(weight_decay=0.1), dict(amsgrad=True, weight_decay=0.05),
         dict(maximize=True), dict(betas=(0.8, 0.95), eps=1e-6)]


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((5, 7), (3,))]


def _grads(step, params):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(c) or "default")
def test_xla_update_matches_torch_adamw(case):
    ref, mine = _params(0), _params(0)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, **case)
    group = dict(torch.optim.AdamW(_params(0), lr=1e-2, **case).param_groups[0])
    states = [{} for _ in mine]
    for step in range(4):
        for p, g in zip(ref, _grads(step, ref)):
            p.grad = g
        ref_opt.step()
        with torch.no_grad():
            for p, g, st in zip(mine, _grads(step, mine), states):
                _adamw_update(p, g, st, group)
    for p, r, st in zip(mine, ref, states):
        err = ((p - r).norm() / r.norm()).item()
        assert err <= 1e-6, err  # fp32 rounding (f32 bias corrections)
        assert torch.allclose(st["exp_avg_sq"], ref_opt.state[r]["exp_avg_sq"], rtol=1e-6)
        assert st["step"].item() == ref_opt.state[r]["step"].item() == 4


def test_off_xla_it_is_torch_adamw():
    ref, mine = _params(1), _params(1)
    opts = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1), AdamW(mine, lr=1e-2,
                                                                     weight_decay=0.1)
    for step in range(2):
        for params, opt in zip((ref, mine), opts):
            for p, g in zip(params, _grads(step, params)):
                p.grad = g
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ref, mine))
    assert opts[1].state_dict()["state"][0].keys() == opts[0].state_dict()["state"][0].keys()


def test_xla_step_has_no_f64_and_one_graph():
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    torch_xla = pytest.importorskip("torch_xla")
    dev = torch_xla.device()
    params = [torch.nn.Parameter(p.detach().to(dev)) for p in _params(2)]
    opt = AdamW(params, lr=1e-3, weight_decay=0.1)
    graphs = []
    for step in range(3):
        for p, g in zip(params, _grads(step, params)):
            p.grad = g.to(dev)
        opt.step()
        tensors = params + [t for p in params for t in opt.state[p].values()]
        graphs.append(torch_xla._XLAC._get_xla_tensors_hlo(tensors))
        torch_xla.sync()
    assert not any("f64" in h for h in graphs)
    assert graphs[1] == graphs[2]  # the same graph every step once the state exists
    # Negative control: torch's AdamW lowers its addcmul value as an f64 scalar.
    ref = torch.optim.AdamW([params[0]], lr=1e-3)
    params[0].grad = torch.ones_like(params[0])
    ref.step()
    assert "f64" in torch_xla._XLAC._get_xla_tensors_hlo([params[0]])
    torch_xla.sync()


def _schedule_compiles(optimizer_class, steps=10, weight_decay=0.1):
    """New graphs compiled per step while a warm-up to 1e-3 (3 steps) then a linear decay
    changes the learning rate (and weight decay switches to 0 at step 6) every step."""
    import torch_xla

    from nxd_cp.compat.torch_xla import compile_count

    dev = torch_xla.device()
    params = [torch.nn.Parameter(p.detach().to(dev)) for p in _params(3)]
    opt = optimizer_class(params, lr=1e-3, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / 4 if s < 3 else max(0.0, 1 - (s - 3) / steps))
    torch_xla.sync()
    new = []
    for step in range(steps):
        before = compile_count()
        for p, g in zip(params, _grads(step, params)):
            p.grad = g.to(dev)
        opt.step()
        sched.step()
        if step == 6:
            for group in opt.param_groups:
                group["weight_decay"] = 0.0
                group["betas"] = (0.85, 0.99)
        torch_xla.sync()
        new.append(compile_count() - before)
    return new, [p.cpu() for p in params]


def test_lr_schedule_compiles_no_new_graph_on_xla():
    """lr, betas, eps and weight decay are device data: a warm-up + decay schedule and a change
    of weight decay / betas compile no new step graph after step 2 (step 1 creates the state)."""
    pytest.importorskip("torch_xla")
    new, params = _schedule_compiles(AdamW)
    print("new graphs per step:", new)
    assert sum(new[2:]) == 0, new
    # The same numbers as torch's AdamW on CPU with the same schedule (fp32 rounding: 1e-6).
    ref = _params(3)
    opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / 4 if s < 3 else max(0.0, 1 - (s - 3) / 10))
    for step in range(10):
        for p, g in zip(ref, _grads(step, ref)):
            p.grad = g
        opt.step()
        sched.step()
        if step == 6:
            for group in opt.param_groups:
                group["weight_decay"], group["betas"] = 0.0, (0.85, 0.99)
    for p, r in zip(params, ref):
        err = ((p - r.detach()).norm() / r.detach().norm()).item()
        assert err <= 1e-6, err  # fp32 rounding (f32 hyper-parameters and bias corrections)
