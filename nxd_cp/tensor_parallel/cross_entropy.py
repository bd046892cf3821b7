"""Cross entropy of logits split by vocabulary over TP: NxD's or nxd_cp's fallback.

NxD's ``parallel_cross_entropy`` subtracts the row max from its input in place, so it is called
on an fp32 copy of the logits (the model's ``logits`` stay usable and autograd intact).
"""
from __future__ import annotations

from typing import Optional

import torch

from nxd_cp import parallel_state as ps
from nxd_cp.comm import autograd as cg
from nxd_cp.comm import get_transport
from nxd_cp.compat import nxd as nxd_compat


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
                           label_smoothing: float = 0.0,
                           use_nxd: Optional[bool] = None) -> torch.Tensor:
    """Per-token loss ``[...]`` (fp32) of logits ``[..., V/tp]`` split by vocabulary over TP.

    NxD's ``parallel_cross_entropy`` when ``use_nxd`` (None: ``parallel_state.nxd_in_charge()``;
    ``transform`` binds its model's choice), on an fp32 copy of the logits (it modifies its
    input in place), so the caller's logits stay usable; else the fallback (which has no label
    smoothing).
    """
    if ps.nxd_in_charge() if use_nxd is None else use_nxd:
        logits = vocab_parallel_logits.to(torch.float32, copy=True)
        return nxd_compat.parallel_cross_entropy()(logits, target.long(), label_smoothing)
    if label_smoothing:
        raise NotImplementedError(f"label_smoothing={label_smoothing} needs NeuronX "
                                  "Distributed's parallel_cross_entropy (the fallback has none)")
    return fallback_parallel_cross_entropy(vocab_parallel_logits, target)
