"""Sequence parallelism (SP) inside the TP group, and TP collectives shared by sibling layers.

Layout with SP (Megatron / NxD): between the TP regions of a decoder layer the residual stream
``[B, S_local, H]`` (``S_local = S / cp``, this CP rank's tokens in its load-balance order) is
split over the TP ranks along the sequence: TP rank r holds the contiguous tokens
``[r * S_local/tp, (r+1) * S_local/tp)``, so norms, residual adds and dropout run on
``S / (cp * tp)`` tokens. Entering attention / MLP, the input is all-gathered over TP (backward
reduce-scatter); leaving them, the row-parallel output is reduce-scattered (backward all-gather).

Grouping: the column-parallel projections that read one input (q/k/v, gate/up) share one
communication of it: ``share_tp_input`` hooks the parent module (attention, MLP) to all-gather
its input once with SP (backward: one reduce-scatter of the summed input gradient), or, without
SP, to pass it through ``copy_to_group`` once (backward: one all-reduce), and marks the
projections ``input_communicated`` so they do not communicate it again. With SP the projections
save only this rank's shard of the gathered input and all-gather it again, once, in backward
(``_Regather``, Megatron's choice): activation memory ``S/(cp*tp)`` for that input too.

Parameters used on sequence-sharded activations (norm weights / biases, the bias of a
sequence-parallel row layer) get only this rank's tokens' share of their gradient: they carry
``sequence_parallel_enabled = True`` as in NxD, and ``allreduce_sequence_parallel_gradients``
sums those gradients over TP. Call it after ``loss.backward()``, before (or after) the CP / DP
reduction of ``nxd_cp.grads`` and before clipping / ``optimizer.step()``.
"""
from __future__ import annotations

from typing import Iterable, List

import torch
import torch.nn.functional as F
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.comm import get_transport
from nxd_cp.comm import autograd as cg
from nxd_cp.grads import ModelOrParams, _all_reduce_grads, _grads

SEQUENCE_DIM = 1  # transformers' activations are batch-first: [B, S, H]
# False (benchmark baseline): each projection all-reduces its input gradient itself, and with SP
# the input is gathered as on the NxD path (gather_tp_input).
GROUP_TP_INPUTS = True


def check_sequence_split(local_len: int, tp: int) -> None:
    """``ValueError`` unless the local sequence ``S/cp`` splits over the TP ranks."""
    if local_len % tp:
        raise ValueError(f"sequence_parallel=True: the local sequence length S/cp={local_len} is "
                         f"not divisible by tensor_model_parallel_size={tp}")


def _tp_transport(x: torch.Tensor):
    return get_transport(ps.get_group_spec("tensor"), x.device)


def _replace_input(args, kwargs, fn):
    """Apply ``fn`` to a module call's hidden-states input (first positional or keyword)."""
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = fn(kwargs["hidden_states"])
    return args, kwargs


class _Regather:
    """The TP shard of an all-gathered input, all-gathered again (once) in backward for the
    weight gradients of the projections that read it, as Megatron's SP does: the input costs
    ``1/tp`` of its size in saved memory, for one more all-gather per backward."""

    def __init__(self, local: torch.Tensor, transport):
        self.local, self.transport, self.users, self.cache = local.detach(), transport, 0, None

    def linear(self, x, weight, bias=None):
        """``F.linear(x, weight, bias)`` for x the gathered input, saving only the shard."""
        self.users += 1
        return _RegatherLinear.apply(x, weight, bias, self)

    def full(self) -> torch.Tensor:
        if self.cache is None:
            self.cache = self.transport.all_gather(self.local, SEQUENCE_DIM)
        return self.cache

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:  # the last projection's backward: free the re-gathered input
            self.cache = None


class _RegatherLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, holder):
        ctx.holder, ctx.has_bias = holder, bias is not None
        ctx.save_for_backward(holder.local, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        _, weight = ctx.saved_tensors
        full = ctx.holder.full()
        g2 = g.reshape(-1, g.shape[-1])
        grad_w = g2.t().matmul(full.reshape(-1, full.shape[-1]).to(g2.dtype))
        grad_b = g2.sum(0) if ctx.has_bias else None
        ctx.holder.release()
        return g.matmul(weight), grad_w, grad_b, None


def share_tp_input(parent: nn.Module, layers: Iterable[nn.Module], sequence_parallel: bool):
    """Communicate ``parent``'s input once for the fallback column layers ``layers`` inside it.

    With SP: ``[B, S_local/tp, H]`` -> all-gather -> ``[B, S_local, H]`` (backward reduce-scatter),
    carrying ``nxd_cp_linear`` (``_Regather.linear``) that the layers use to save only the shard;
    without: identity forward, one all-reduce of the input gradient in backward.
    """
    for layer in layers:
        layer.input_communicated = True

    def communicate(x):
        t = _tp_transport(x)
        if not sequence_parallel:
            return cg.copy_to_group(x, t)
        full = cg.all_gather(x, SEQUENCE_DIM, t).contiguous()
        full.nxd_cp_linear = _Regather(x, t).linear
        return full

    return parent.register_forward_pre_hook(
        lambda m, args, kwargs: _replace_input(args, kwargs, communicate), with_kwargs=True)


def gather_tp_input(parent: nn.Module):
    """For NxD's column layers (which all-reduce their input gradient themselves): all-gather
    the sequence-sharded input of ``parent``; backward keeps this rank's chunk of the (already
    all-reduced) gradient."""
    return parent.register_forward_pre_hook(
        lambda m, args, kwargs: _replace_input(
            args, kwargs, lambda x: cg.gather_from_group(x, SEQUENCE_DIM, _tp_transport(x))),
        with_kwargs=True)


def scatter_tp_sequence(first_layer: nn.Module):
    """Split the first decoder layer's input (the embedding output) over TP along the sequence:
    ``[B, S_local, H]`` (replicated over TP) -> ``[B, S_local/tp, H]`` (backward all-gather)."""
    return first_layer.register_forward_pre_hook(
        lambda m, args, kwargs: _replace_input(
            args, kwargs, lambda x: cg.scatter_to_group(x, SEQUENCE_DIM, _tp_transport(x))),
        with_kwargs=True)


def mark_sequence_parallel(params: Iterable[torch.Tensor]) -> None:
    for p in params:
        p.sequence_parallel_enabled = True


def _sequence_parallel_grads(model_or_params: ModelOrParams) -> List[torch.Tensor]:
    cfg = getattr(model_or_params, "nxd_cp_config", None)
    if isinstance(model_or_params, nn.Module) and cfg is not None:
        # By name: attributes do not survive .to("xla") (new Parameter objects).
        names = set(cfg.get("sequence_parallel_parameters", ()))
        return _grads([p for n, p in model_or_params.named_parameters() if n in names])
    return _grads(model_or_params, keep=lambda p: getattr(p, "sequence_parallel_enabled", False))


@torch.no_grad()
def allreduce_sequence_parallel_gradients(model_or_params: ModelOrParams) -> None:
    """Sum over TP, in place, the gradients of the sequence-parallel parameters (NxD's name).

    ``model_or_params``: a model from ``nxd_cp.transform(..., sequence_parallel=True)`` (its
    parameters are found by name), or a module / optimizer / iterable whose parameters carry
    ``sequence_parallel_enabled = True``. One all-reduce per (dtype, device); a no-op at tp == 1
    or when no parameter is sequence-parallel.
    """
    grads = _sequence_parallel_grads(model_or_params)
    if grads and ps.get_tensor_model_parallel_size() > 1:
        _all_reduce_grads(grads, "tensor", 1.0)


def wire_model(model: nn.Module, spec, new, sequence_parallel: bool) -> List[str]:
    """Set up ``transform``'s TP communication for a model whose TP modules are ``new``
    (path -> module); return the names of its sequence-parallel parameters.

    Fallback layers: one shared input collective per attention / MLP (``share_tp_input``), SP or
    not. NxD's layers (SP only): ``gather_tp_input`` before each attention / MLP / lm_head, as
    NxD's sequence-parallel column layers would hand transformers' attention a sequence length
    that differs from its input's; NxD's row layers reduce-scatter (``sequence_parallel_enabled``).
    """
    from nxd_cp import layers as L
    from nxd_cp.models.common import get_path

    decoder = get_path(model, f"{spec.base}.{spec.layers}")
    for i in range(len(decoder)):
        parents = {}
        for p in spec.column + spec.kv:
            path = f"{spec.base}.{spec.layers}.{i}.{p}"
            if path not in new:  # replaced through nxd_cp.register_module: its own wiring
                continue
            parents.setdefault(path.rpartition(".")[0], []).append(new[path])
        for parent, cols in parents.items():
            if GROUP_TP_INPUTS and all(
                    isinstance(c, (L.FallbackColumnParallelLinear, L.ReplicatedKVLinear))
                    for c in cols):
                share_tp_input(get_path(model, parent), cols, sequence_parallel)
            elif sequence_parallel:
                gather_tp_input(get_path(model, parent))
    if not sequence_parallel:
        return []
    scatter_tp_sequence(decoder[0])
    lm_head = new[spec.lm_head]
    if not getattr(lm_head, "sequence_parallel_enabled", False):
        gather_tp_input(lm_head)
    names = []
    for name, p in model.named_parameters():
        owner = next((path for path in new if name.startswith(path + ".")), None)
        row = isinstance(new.get(owner), (L.RowParallelLinear, L.FallbackRowParallelLinear))
        if owner is None or (row and name == owner + ".bias"):  # norms; biases after the RS
            names.append(name)
    mark_sequence_parallel(p for n, p in model.named_parameters() if n in set(names))
    return names
