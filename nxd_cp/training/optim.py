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
``lerp``, ``add(alpha=)``, ``div``) and the step count an f32 device tensor: no f64, no host
value, the same graph every step. Elsewhere (CPU, CUDA) it is torch's own step, unchanged.
"""
from __future__ import annotations

import torch

_XLA_UNSUPPORTED = ("fused", "differentiable")


def _adamw_update(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """One AdamW update of ``param`` in place (torch's single-tensor algorithm, decoupled
    weight decay), every scalar an f32 operand; ``state`` as torch's AdamW keeps it."""
    lr, wd, eps, amsgrad = group["lr"], group["weight_decay"], group["eps"], group["amsgrad"]
    beta1, beta2 = group["betas"]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    if state["step"].device != param.device:  # a state dict loaded on the host
        state["step"] = state["step"].to(param.device, torch.float32)
    step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
    if group["maximize"]:
        grad = -grad
    step.add_(1)
    if wd:
        param.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).add_(grad * grad, alpha=1 - beta2)
    second = exp_avg_sq
    if amsgrad:
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
            bad = [k for k in _XLA_UNSUPPORTED if group.get(k)]
            if bad:
                raise NotImplementedError(f"nxd_cp.training.optim.AdamW on XLA: {bad[0]}=True is not "
                                          "supported (torch's AdamW has it)")
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse or torch.is_complex(p):
                        raise NotImplementedError("nxd_cp.training.optim.AdamW on XLA: sparse gradients "
                                                  "and complex parameters are not supported")
                    _adamw_update(p, p.grad, self.state[p], group)
        return loss

__all__ = ["AdamW"]
