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
(Megatron's choice): activation memory ``S/(cp*tp)`` for that input too. The projections reach
that shard through a ``SequenceRegather`` handle set on them at wiring time
(``layer.sequence_regather``), which the parent's hook fills at every forward.

NxD's layers (NxD in charge): its sequence-parallel linears run sequence-first, Megatron's
``[S, B, H]`` with ``sequence_dimension=0``. Its linear backward ``.view``s the gathered input
and the output gradient to 2-D, which fails for the non-contiguous tensors that its all-gather
along dim 1 of a batch-first ``[B, S, H]`` returns (measured on NxD 0.18). So each of NxD's SP
layers gets ``run_sequence_first``: its input is transposed to ``[S, B, H]`` and its output back
to ``[B, S, H]``, contiguous forward and backward (``_SwapBatchSequence``; on XLA a layout op).
Which of NxD's layers are SP is ``layer_options``: the row layers and the columns outside
attention (the MLP's). Transformers' attention views q/k/v with its *input's* ``[B, S]``, so it
must see the gathered sequence: it gets ``gather_tp_input`` and NxD's non-SP columns (their
backward all-reduces the input gradient); the lm_head too (NxD refuses ``gather_output`` with SP).

Parameters used on sequence-sharded activations (norm weights / biases, the bias of a
sequence-parallel row layer) get only this rank's tokens' share of their gradient: they carry
``sequence_parallel_enabled = True`` as in NxD, and their gradients are summed over TP once per
step (``training.grads.allreduce_sequence_parallel_gradients``, or NxD's optimizer).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.comm import autograd as cg
from nxd_cp.comm import get_transport

SEQUENCE_DIM = 1  # transformers' activations are batch-first: [B, S, H]
NXD_SEQUENCE_DIM = 0  # NxD's SP layers run sequence-first (run_sequence_first)


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


class SequenceRegather:
    """The handle a parent's column layers share (``layer.sequence_regather``): set at wiring
    time, filled by the parent's forward pre-hook with this step's input shard."""

    def __init__(self) -> None:
        self.current: Optional[_Regather] = None

    def linear(self, x, weight, bias=None):
        """``F.linear`` of the gathered input ``x``, saving only this rank's shard of it."""
        if self.current is None:
            raise RuntimeError("a sequence-parallel projection ran outside its parent module "
                               "(its input was not all-gathered by the parent's hook)")
        return self.current.linear(x, weight, bias)


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

    With SP: ``[B, S_local/tp, H]`` -> all-gather -> ``[B, S_local, H]`` (backward reduce-scatter);
    the layers get one ``SequenceRegather`` handle and save only the shard; without: identity
    forward, one all-reduce of the input gradient in backward.
    """
    handle = SequenceRegather() if sequence_parallel else None
    for layer in layers:
        layer.input_communicated = True
        layer.sequence_regather = handle

    def communicate(x):
        t = _tp_transport(x)
        if not sequence_parallel:
            return cg.copy_to_group(x, t)
        handle.current = _Regather(x, t)
        return cg.all_gather(x, SEQUENCE_DIM, t).contiguous()

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


class _SwapBatchSequence(torch.autograd.Function):
    """``[B, S, ...]`` <-> ``[S, B, ...]`` (dims 0 and 1 swapped), contiguous in forward and in
    backward: NxD's linear backward ``.view``s its output gradient and saved input to 2-D."""

    @staticmethod
    def forward(ctx, x):
        return x.transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, g):
        return g.transpose(0, 1).contiguous()


def run_sequence_first(layer: nn.Module) -> None:
    """Run NxD's sequence-parallel linear ``layer`` (``sequence_dimension=0``) inside
    transformers' batch-first model: input ``[B, S_in, H]`` -> ``[S_in, B, H]`` before it, output
    ``[S_out, B, N]`` -> ``[B, S_out, N]`` after it (column: ``S_out = tp * S_in``; row: the
    converse)."""
    dim = getattr(layer, "sequence_dimension", None)
    if dim != NXD_SEQUENCE_DIM:
        raise RuntimeError(f"run_sequence_first needs sequence_dimension={NXD_SEQUENCE_DIM}, "
                           f"{type(layer).__name__} has {dim}")
    layer.register_forward_pre_hook(
        lambda m, args: (_SwapBatchSequence.apply(args[0]),) + tuple(args[1:]))
    layer.register_forward_hook(lambda m, args, out: _SwapBatchSequence.apply(out))


def layer_options(kind: str, in_attention: bool, sequence_parallel: bool, use_nxd: bool) -> dict:
    """SP constructor arguments of one of ``transform``'s TP linears (``kind``: "column", "row"
    or "lm_head"; ``in_attention``: a column inside the attention module).

    | layer               | nxd_cp's layers                | NxD's (NxD in charge)              |
    |---------------------|--------------------------------|------------------------------------|
    | row                 | SP, ``sequence_dimension=1``   | SP, ``sequence_dimension=0``        |
    | column, attention   | none (``share_tp_input``)      | none (``gather_tp_input``)          |
    | column, elsewhere   | none (``share_tp_input``)      | SP, ``sequence_dimension=0``        |
    | lm_head             | SP, ``sequence_dimension=1``   | none (``gather_tp_input``)          |
    """
    if kind not in ("column", "row", "lm_head"):
        raise ValueError(f"kind={kind!r} must be 'column', 'row' or 'lm_head'")
    if not sequence_parallel:
        return {}
    nxd = use_nxd
    if kind == "row" or (nxd and kind == "column" and not in_attention) or (
            not nxd and kind == "lm_head"):
        return {"sequence_parallel_enabled": True,
                "sequence_dimension": NXD_SEQUENCE_DIM if nxd else SEQUENCE_DIM}
    return {}


def mark_sequence_parallel(params: Iterable[torch.Tensor]) -> None:
    for p in params:
        p.sequence_parallel_enabled = True
