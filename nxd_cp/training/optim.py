"""``AdamW``: torch's AdamW, with an update that lowers to an XLA graph without f64.

torch-xla (2.9) turns a Python float passed as an op's ``value=`` into an f64 scalar graph
input: torch's AdamW calls ``exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)`` and
(not capturable) ``param.addcdiv_(exp_avg, denom, value=-step_size)``, so every step graph
carries f64 scalars and an f64 -> f32 conversion per parameter. ``capturable=True`` removes the
second (the step count and step size become f32 device tensors) but not the first, and no torch
or torch-xla setting removes it (``XLA_DOWNCAST_BF16`` would, by running the model in bf16).
NxD's ``AdamW_FP32OptimParams`` has the same two calls.

``AdamW`` is a subclass of ``torch.optim.AdamW``: the same constructor, param groups, state
(``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and state dict, so NxD's optimizer
wrapper (``initialize_parallel_optimizer(optimizer_class=nxd_cp.training.optim.AdamW, ...)``) and
checkpoints take it. Where a group's parameters live on XLA, ``step`` runs the same update as
torch's with each hyper-parameter an operand of an op torch-xla lowers in f32 (``mul``,
``lerp``, ``add``, ``div``) and the step count an f32 device tensor: no f64, no host
value, the same graph every step. The hyper-parameters (lr, betas, eps, weight decay) are read
from the param group's Python values at every step and uploaded as one f32 tensor per group
(``hyper_parameters``): device data, so learning-rate schedules and warm-ups, or any change of
those values, never change the graph (with Python floats a warm-up + decay compiled new graphs
at steps 1, 2, 4 and 8 of 10). They are not kept in the optimizer state: the state dict is
torch's. Elsewhere (CPU, CUDA) it is torch's own step, unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch

_XLA_UNSUPPORTED = ("fused", "differentiable")


def hyper_parameters(group: dict, device: torch.device) -> torch.Tensor:
    """f32 ``[lr, beta1, beta2, 1 - beta1, 1 - beta2, eps, 1 - lr * weight_decay]`` of ``group``'s
    current Python values (the differences taken in double on the host, as torch's AdamW does) on
    ``device``: one host-to-device upload per group and step. On XLA it is device data (a graph
    input), so a learning-rate schedule, or any change of these values, keeps the same step graph (a
    Python float in an op is a graph constant where torch-xla treats its value as special, 0 or 1,
    and a value-keyed upload otherwise)."""
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    values = [lr, beta1, beta2, 1 - beta1, 1 - beta2, group["eps"],
              1 - lr * group["weight_decay"]]
    return torch.tensor([float(v) for v in values], dtype=torch.float32).to(device)


def _adamw_update(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                  hyper: Optional[torch.Tensor] = None) -> None:
    """One AdamW update of ``param`` in place (torch's single-tensor algorithm, decoupled
    weight decay), every scalar an f32 tensor operand; ``state`` as torch's AdamW keeps it;
    ``hyper`` the group's ``hyper_parameters`` on ``param``'s device (made here if None)."""
    if hyper is None:
        hyper = hyper_parameters(group, param.device)
    lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay = hyper.unbind()
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    if state["step"].device != param.device:  # a state dict loaded on the host
        state["step"] = state["step"].to(param.device, torch.float32)
    step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
    if group["maximize"]:
        grad = -grad
    step.add_(1)
    param.mul_(decay)  # always (a multiply by exactly 1 without weight decay)
    exp_avg.lerp_(grad, one_minus_beta1)
    exp_avg_sq.mul_(beta2).add_(grad * grad * one_minus_beta2)
    second = exp_avg_sq
    if group["amsgrad"]:
        torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
        second = state["max_exp_avg_sq"]
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step).sqrt()
    denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
    param.sub_(exp_avg / denom * (lr / bias_correction1))


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (same arguments) whose step lowers without f64 on XLA."""

    @torch.no_grad()
    def step(self, closure=None):
        """One step over every group; XLA groups by ``_adamw_update``, the others by torch."""
        groups = self.param_groups
        if not any(p.device.type == "xla" for g in groups for p in g["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in groups:
            hyper = {}  # device -> this group's hyper-parameters, uploaded once per step
            bad = [k for k in _XLA_UNSUPPORTED if group.get(k)]
            if bad:
                raise NotImplementedError(f"nxd_cp.training.optim.AdamW on XLA: {bad[0]}=True "
                                          "is not supported (torch's AdamW has it)")
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse or torch.is_complex(p):
                        raise NotImplementedError(
                            "nxd_cp.training.optim.AdamW on XLA: sparse gradients and complex "
                            "parameters are not supported")
                    if p.device not in hyper:
                        hyper[p.device] = hyper_parameters(group, p.device)
                    _adamw_update(p, p.grad, self.state[p], group, hyper[p.device])
        return loss

__all__ = ["AdamW"]
