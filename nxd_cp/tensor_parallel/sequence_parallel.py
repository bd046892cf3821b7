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
``sequence_parallel_enabled = True`` as in NxD, and their gradients must be summed over TP
**once** per step:

* a plain torch optimizer: ``allreduce_sequence_parallel_gradients(model)`` after
  ``loss.backward()``, before (or after) the CP / DP reduction of ``nxd_cp.training.grads`` and before
  clipping / ``optimizer.step()``;
* NxD's ``initialize_parallel_optimizer`` with a config that has ``sequence_parallel=True``:
  **nothing**; its ``step()`` all-reduces over TP every parameter with that attribute (NxD's
  ``grads.allreduce_sequence_parallel_gradients``). Given such an optimizer, this module's
  function raises ``RuntimeError`` rather than reduce a second time (tp times too large). With
  ``sequence_parallel=False`` in NxD's config its step does not reduce them: call ours.
  Move the model to XLA with NxD's ``move_model_to_device`` (it keeps the attribute; a plain
  ``.to("xla")`` makes new Parameters without it, so NxD's step would skip them).
"""
from __future__ import annotations

from typing import Iterable, List

import torch
import torch.nn.functional as F
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.comm import get_transport
from nxd_cp.comm import autograd as cg
from nxd_cp.training.grads import ModelOrParams, _all_reduce_grads, _grads

SEQUENCE_DIM = 1  # transformers' activations are batch-first: [B, S, H]
NXD_SEQUENCE_DIM = 0  # NxD's SP layers run sequence-first (run_sequence_first)
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


def layer_options(kind: str, in_attention: bool, sequence_parallel: bool) -> dict:
    """SP constructor arguments of one of ``transform``'s TP linears (``kind``: "column", "row"
    or "lm_head"; ``in_attention``: a column inside the attention module).

    | layer               | fallback (nxd_cp.tensor_parallel.layers)       | NxD's (NxD in charge)              |
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
    nxd = ps.nxd_in_charge()
    if kind == "row" or (nxd and kind == "column" and not in_attention) or (
            not nxd and kind == "lm_head"):
        return {"sequence_parallel_enabled": True,
                "sequence_dimension": NXD_SEQUENCE_DIM if nxd else SEQUENCE_DIM}
    return {}


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


def _check_not_reduced_by_nxd(model_or_params: ModelOrParams) -> None:
    """``RuntimeError`` for NxD's optimizer when its step reduces these gradients already."""
    is_nxd = any(c.__name__ == "NxDOptimizer" for c in type(model_or_params).__mro__)
    if is_nxd and (getattr(model_or_params, "nxd_config", None) or {}).get("sequence_parallel"):
        raise RuntimeError(
            "allreduce_sequence_parallel_gradients(optimizer) got NxD's optimizer with "
            "sequence_parallel=True in its config: NxDOptimizer.step() already all-reduces the "
            "sequence-parallel parameters' gradients over TP; reducing here too would make them "
            "tensor_model_parallel_size times too large. Call nothing before optimizer.step().")


@torch.no_grad()
def allreduce_sequence_parallel_gradients(model_or_params: ModelOrParams) -> None:
    """Sum over TP, in place, the gradients of the sequence-parallel parameters (NxD's name).

    ``model_or_params``: a model from ``nxd_cp.transform`` with ``sequence_parallel=True`` in
    the config (its parameters are found by name), or a module / optimizer / iterable whose
    parameters carry ``sequence_parallel_enabled = True``. One all-reduce per (dtype, device); a
    no-op at tp == 1 or when no parameter is sequence-parallel. Not with NxD's optimizer when its
    config has ``sequence_parallel=True`` (its step reduces them: ``RuntimeError``; module
    docstring).
    """
    _check_not_reduced_by_nxd(model_or_params)
    grads = _sequence_parallel_grads(model_or_params)
    if grads and ps.get_tensor_model_parallel_size() > 1:
        _all_reduce_grads(grads, "tensor", 1.0)


def wire_model(model: nn.Module, spec, new, sequence_parallel: bool) -> List[str]:
    """Set up ``transform``'s TP communication for a model whose TP modules are ``new``
    (path -> module); return the names of its sequence-parallel parameters.

    Fallback layers: one shared input collective per attention / MLP (``share_tp_input``), SP or
    not. NxD's layers (SP only; which are SP: ``layer_options``): ``gather_tp_input`` before the
    attention and the lm_head, whose columns are not SP; every SP layer of NxD's runs
    sequence-first (``run_sequence_first``).
    """
    from nxd_cp.tensor_parallel import layers as L
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
            sp_cols = [getattr(c, "sequence_parallel_enabled", False) for c in cols]
            if any(sp_cols):  # NxD's SP columns all-gather their input themselves
                if not all(sp_cols):
                    raise RuntimeError(f"{parent}: the column layers that read its input must "
                                       "all be sequence-parallel or none")
                continue
            if GROUP_TP_INPUTS and all(
                    isinstance(c, (L.FallbackColumnParallelLinear, L.ReplicatedKVLinear))
                    for c in cols):
                share_tp_input(get_path(model, parent), cols, sequence_parallel)
            elif sequence_parallel:
                gather_tp_input(get_path(model, parent))
    if not sequence_parallel:
        return []
    fallback = (L.FallbackColumnParallelLinear, L.FallbackRowParallelLinear)
    for m in new.values():
        if getattr(m, "sequence_parallel_enabled", False) and not isinstance(m, fallback):
            run_sequence_first(m)
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
