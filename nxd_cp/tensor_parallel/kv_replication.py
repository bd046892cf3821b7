"""K/V projections replicated over TP when there are fewer KV heads than TP ranks.

``ReplicatedKVLinear`` (public through ``nxd_cp.tensor_parallel.layers``): TP rank r holds KV head
``r // (tp / num_kv_heads)``; the replicas of a head sum their weight gradients in backward.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nxd_cp.comm import autograd as cg
from nxd_cp.tensor_parallel.common import TPLayer, default_linear_init, init_shard


class _SumOverReplicas(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the TP ranks that hold the same slot.

    ``slot`` is a Python int (torch.distributed) or an int32 0-d device tensor (XLA: one graph
    for every TP rank). Each rank puts its gradient into its slot of a zero ``[n_slots, ...]``
    buffer, the buffer is all-reduced over TP and the rank reads its slot back: the sum over
    its replicas. The result is a tensor of its own, not a view of the buffer (an in-place
    write into a gradient view is a dynamic-update-slice with s64 indices on XLA).
    """

    @staticmethod
    def forward(ctx, w, slot, n_slots, transport):
        ctx.slot, ctx.n_slots, ctx.transport = slot, n_slots, transport
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        if ctx.n_slots == 1:
            return ctx.transport.all_reduce(g), None, None, None
        if isinstance(ctx.slot, int):
            buf = g.new_zeros((ctx.n_slots,) + tuple(g.shape))
            buf[ctx.slot] = g
            return ctx.transport.all_reduce(buf)[ctx.slot].clone(), None, None, None
        slots = torch.arange(ctx.n_slots, dtype=torch.int32, device=g.device)
        mine = (slots == ctx.slot).to(g.dtype).view((-1,) + (1,) * g.dim())  # one-hot [n, 1..]
        return (ctx.transport.all_reduce(mine * g) * mine).sum(0), None, None, None


class ReplicatedKVLinear(TPLayer):
    """K or V projection when there are fewer KV heads than TP ranks (tp % num_kv_heads == 0).

    TP rank r holds the rows of KV head ``r // (tp / num_kv_heads)`` (the head its local query
    heads use): weight ``[head_dim, in]``; x ``[..., in]`` -> ``[..., head_dim]``. The
    ``tp / num_kv_heads`` ranks holding the same head are replicas: their weight gradients are
    summed in backward, so each holds the full gradient of that head and optimizer steps keep
    them identical. Parameters carry ``nxd_cp_kv_replicas = tp / num_kv_heads``.
    """

    def __init__(self, input_size: int, num_kv_heads: int, head_dim: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 init_method: Optional[Callable] = None, tensor_model_parallel_group=None):
        super().__init__(tensor_model_parallel_group)
        tp = self._tp.size
        if tp % num_kv_heads:
            raise ValueError(f"ReplicatedKVLinear needs tensor_model_parallel_size={tp} to be "
                             f"a multiple of num_key_value_heads={num_kv_heads}")
        self.input_size, self.num_kv_heads, self.head_dim = input_size, num_kv_heads, head_dim
        self.replicas = tp // num_kv_heads
        self.input_communicated = False
        self.head = self._tp.rank // self.replicas
        self.weight = nn.Parameter(torch.empty(head_dim, input_size, dtype=dtype, device=device))
        self.weight.nxd_cp_kv_replicas = self.replicas
        init_shard(self.weight, (num_kv_heads * head_dim, input_size), 0, self.head,
                    num_kv_heads, init_method or default_linear_init)
        if bias:
            self.bias = nn.Parameter(torch.zeros(head_dim, dtype=dtype, device=device))
            self.bias.nxd_cp_kv_replicas = self.replicas
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self._transport(x)
        w, b = self.weight, self.bias
        if t.size > 1:
            rank = t.rank_value(x.device)  # an int, or device data on XLA
            head = (rank // self.replicas if isinstance(rank, int)
                    else torch.div(rank.reshape(()), self.replicas, rounding_mode="floor"))
            w = _SumOverReplicas.apply(w, head, self.num_kv_heads, t)
            b = None if b is None else _SumOverReplicas.apply(b, head, self.num_kv_heads, t)
        x = x if self.input_communicated else cg.copy_to_group(x, t)
        linear = F.linear if self.sequence_regather is None else self.sequence_regather.linear
        return linear(x, w, b)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, kv head {self.head} of {self.num_kv_heads}, "
                f"head_dim={self.head_dim}, replicas={self.replicas}")
