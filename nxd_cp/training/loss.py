"""Token-weighted cross entropy over the CP group (and vocab-parallel over TP).

With the sequence split over CP, each rank holds some of a batch's tokens, and ranks hold
different numbers of non-ignored tokens (padding, prompt masking). The loss here is the loss of
the whole batch::

    loss = sum over the CP group of per-token losses / number of non-ignored tokens in the group

Both sums are all-reduced over CP in forward, so every CP rank returns the same value, equal to
``F.cross_entropy(full_logits, full_labels, ignore_index=...)`` of the unmodified model. The
all-reduce of the loss sum has an identity backward: each rank back-propagates ``1/count`` into
its own tokens only, so its parameter gradients are its share of the full gradient and the CP
gradients are *summed* (``nxd_cp.training.grads.allreduce_context_parallel_gradients``).

With NxD's optimizer (``initialize_parallel_optimizer``), ``NxDOptimizer.step`` reduces the
gradients itself to exactly that: it averages over CP, then sums over NxD's DP x CP group and
divides by dp, a net *sum over CP* and mean over DP. So call no gradient reduction of
``nxd_cp.training.grads`` then (see there).

``parallel_cross_entropy`` is NxD's when NxD is in charge, called on an fp32 *copy* of the
logits (NxD's subtracts the row max from its input in place, which would corrupt the model's
``logits`` and break autograd), else ``fallback_parallel_cross_entropy``.
"""
from __future__ import annotations

from typing import Optional

import torch

from nxd_cp import parallel_state as ps
from nxd_cp.comm import get_transport
from nxd_cp.comm import autograd as cg


def fallback_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor,
                                    target: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy of logits split by vocabulary over TP.

    vocab_parallel_logits ``[..., V/tp]`` (rank r holds columns ``[r*V/tp, (r+1)*V/tp)``),
    target ``[...]`` in ``[0, V)`` -> loss ``[...]`` (fp32), identical on every TP rank. The
    gradient is the local slice of ``softmax - onehot``: the sums are reduced with
    ``reduce_from_group`` whose backward is the identity, right because every TP rank computes
    the same loss from them.
    """
    spec = ps.get_group_spec("tensor")
    t = get_transport(spec, vocab_parallel_logits.device)
    logits = vocab_parallel_logits.float()
    per = logits.shape[-1]
    # The max only stabilises the exponent; gathering [.., tp] maxima avoids a max all-reduce.
    with torch.no_grad():  # amax, not max: no int64 argmax in the graph
        local_max = logits.amax(dim=-1, keepdim=True)
        m = cg.gather_from_group(local_max, -1, t).amax(dim=-1, keepdim=True)
    shifted = logits - m
    sum_exp = cg.reduce_from_group(shifted.exp().sum(dim=-1), t)
    # The range start is device data (one graph on every TP rank); index arithmetic in int32.
    local_t = target.to(torch.int32) - t.rank_value(logits.device) * per
    inside = (local_t >= local_t.new_zeros(())) & (local_t < local_t.new_full((), per))
    local_t = torch.where(inside, local_t, torch.zeros_like(local_t))
    picked = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1)
    picked = cg.reduce_from_group(picked * inside, t)
    return sum_exp.log() - picked



def parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token loss ``[...]`` (fp32) of logits ``[..., V/tp]`` split by vocabulary over TP.

    NxD's ``parallel_cross_entropy`` when NxD is in charge, on an fp32 copy of the logits (it
    modifies its input in place), so the caller's logits stay usable; else the fallback (which
    has no label smoothing).
    """
    if ps.nxd_in_charge():
        from neuronx_distributed.parallel_layers.loss_functions import \
            parallel_cross_entropy as nxd_cross_entropy
        logits = vocab_parallel_logits.to(torch.float32, copy=True)
        return nxd_cross_entropy(logits, target.long(), label_smoothing)
    if label_smoothing:
        raise NotImplementedError(f"label_smoothing={label_smoothing} needs NeuronX "
                                  "Distributed's parallel_cross_entropy (the fallback has none)")
    return fallback_parallel_cross_entropy(vocab_parallel_logits, target)


def _per_token_loss(logits: torch.Tensor, target: torch.Tensor, vocab_parallel: bool):
    """Per-token loss ``[N]`` in fp32 of logits ``[N, V]`` (``[N, V/tp]`` if vocab-parallel),
    target int32 ``[N]`` in ``[0, V)``."""
    if vocab_parallel and ps.get_tensor_model_parallel_size() > 1:
        return parallel_cross_entropy(logits, target).float()
    # F.cross_entropy(reduction="none") written with an int32 gather: torch's takes int64
    # targets only, which on XLA puts s64 index arithmetic in the graph.
    logits = logits.float()
    return logits.logsumexp(-1) - logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def context_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = -100, vocab_parallel: bool = False,
                                   group=None,
                                   num_items_in_batch: Optional[torch.Tensor] = None
                                   ) -> torch.Tensor:
    """Cross entropy of the whole CP group's tokens, token-weighted; a scalar (fp32).

    logits: ``[..., V]`` for this rank's tokens (``[B, S_local, V]``), or ``[..., V/tp]`` with
        ``vocab_parallel=True`` (columns of TP rank r: ``[r*V/tp, (r+1)*V/tp)``).
    labels: ``[...]`` (``[B, S_local]``), *already shifted* to the next token (as
        ``nxd_cp.sequence.batch.get_batch_on_this_context_parallel_rank`` returns them); ``ignore_index``
        marks tokens without a target.
    group: CP group (``GroupSpec`` / ProcessGroup); None for the CP group of parallel_state.
    num_items_in_batch: optional denominator (HF Trainer's argument) replacing the count of
        non-ignored tokens; it must then count the tokens of the full, unsharded batch.

    Returns ``sum of token losses over CP / count over CP``, identical on every rank of the
    group; 0 (not NaN) when the group has no non-ignored token.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match labels shape "
                         f"{tuple(labels.shape)}: logits must be [..., vocab] over labels' shape")
    flat = logits.reshape(-1, logits.shape[-1])
    # Label arithmetic in int32 against tensors (XLA: no s64 compute, no Python-scalar operand).
    target = labels.reshape(-1).to(flat.device).to(torch.int32)
    valid = target != target.new_full((), ignore_index)
    target = torch.where(valid, target, torch.zeros_like(target))
    per_token = _per_token_loss(flat, target, vocab_parallel)
    valid = valid.to(per_token.dtype)
    local_sum = (per_token * valid).sum()
    t = get_transport(ps.resolve_group(group), flat.device)
    total = cg.reduce_from_group(local_sum, t)
    if num_items_in_batch is not None:
        count = torch.as_tensor(num_items_in_batch, dtype=total.dtype, device=total.device)
    else:
        count = t.all_reduce(valid.sum())
    return total / count.clamp(min=1)
