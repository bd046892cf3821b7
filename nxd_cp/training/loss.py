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

The vocab-parallel per-token loss is ``tensor_parallel.cross_entropy.parallel_cross_entropy``
(NxD's when NxD is in charge, else nxd_cp's fallback).
"""
from __future__ import annotations

from typing import Optional

import torch

from nxd_cp import parallel_state as ps
from nxd_cp.comm import autograd as cg
from nxd_cp.comm import get_transport
from nxd_cp.sequence.validation import num_items_error
from nxd_cp.tensor_parallel.cross_entropy import parallel_cross_entropy


def _per_token_loss(logits: torch.Tensor, target: torch.Tensor, vocab_parallel: bool,
                    use_nxd: Optional[bool]):
    """Per-token loss ``[N]`` in fp32 of logits ``[N, V]`` (``[N, V/tp]`` if vocab-parallel),
    target int32 ``[N]`` in ``[0, V)``."""
    if vocab_parallel and ps.get_tensor_model_parallel_size() > 1:
        return parallel_cross_entropy(logits, target, use_nxd=use_nxd).float()
    # F.cross_entropy(reduction="none") written with an int32 gather: torch's takes int64
    # targets only, which on XLA puts s64 index arithmetic in the graph.
    logits = logits.float()
    return logits.logsumexp(-1) - logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def context_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = -100, vocab_parallel: bool = False,
                                   group=None,
                                   num_items_in_batch: Optional[torch.Tensor] = None,
                                   use_nxd: Optional[bool] = None) -> torch.Tensor:
    """Cross entropy of the whole CP group's tokens, token-weighted; a scalar (fp32).

    logits: ``[..., V]`` for this rank's tokens (``[B, S_local, V]``), or ``[..., V/tp]`` with
        ``vocab_parallel=True`` (columns of TP rank r: ``[r*V/tp, (r+1)*V/tp)``).
    labels: ``[...]`` (``[B, S_local]``), *already shifted* to the next token (as
        ``get_batch_on_this_context_parallel_rank`` returns them); ``ignore_index``
        marks tokens without a target.
    group: CP group (``GroupSpec`` / ProcessGroup); None for the CP group of parallel_state.
    num_items_in_batch: optional denominator (HF Trainer's argument) replacing the count of
        non-ignored tokens; it must then count the tokens of the full, unsharded batch.
    use_nxd: vocab-parallel loss by NxD's ``parallel_cross_entropy`` (None: when NxD is in
        charge; a model from ``transform`` passes the choice its layers were built with).

    Returns ``sum of token losses over CP / count over CP``, identical on every rank of the
    group; 0 (not NaN) when the group has no non-ignored token.
    """
    error = num_items_error(num_items_in_batch)
    if error:
        raise ValueError(error)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match labels shape "
                         f"{tuple(labels.shape)}: logits must be [..., vocab] over labels' shape")
    flat = logits.reshape(-1, logits.shape[-1])
    # Label arithmetic in int32 against tensors (XLA: no s64 compute, no Python-scalar operand).
    target = labels.reshape(-1).to(flat.device).to(torch.int32)
    valid = target != target.new_full((), ignore_index)
    target = torch.where(valid, target, torch.zeros_like(target))
    per_token = _per_token_loss(flat, target, vocab_parallel, use_nxd)
    valid = valid.to(per_token.dtype)
    local_sum = (per_token * valid).sum()
    t = get_transport(ps.resolve_group(group), flat.device)
    total = cg.reduce_from_group(local_sum, t)
    if num_items_in_batch is not None:
        count = torch.as_tensor(num_items_in_batch, dtype=total.dtype, device=total.device)
    else:
        count = t.all_reduce(valid.sum())
    return total / count.clamp(min=1)
