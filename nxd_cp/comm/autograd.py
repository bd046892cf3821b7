"""Differentiable collectives: each forward collective paired with the one its gradient needs.

| function           | forward                 | backward                          |
|--------------------|-------------------------|-----------------------------------|
| all_gather         | all-gather on ``dim``   | reduce-scatter (ranks' grads differ) |
| gather_from_group  | all-gather on ``dim``   | keep own chunk (grads replicated) |
| reduce_scatter     | reduce-scatter          | all-gather                        |
| scatter_to_group   | keep own chunk          | all-gather                        |
| copy_to_group      | identity                | all-reduce                        |
| reduce_from_group  | all-reduce              | identity                          |
| all_to_all         | split a dim, concat another | the inverse all-to-all        |

``gather_from_group`` / ``scatter_to_group`` / ``copy_to_group`` / ``reduce_from_group`` are the
tensor-parallel mappings (Megatron / NxD ``mappings.py`` semantics); ``all_gather`` is the one
whose downstream computation differs per rank, as for K/V in context parallelism.
"""
from __future__ import annotations

import torch

from nxd_cp.comm.base import Transport


def own_chunk(x: torch.Tensor, dim: int, transport: Transport) -> torch.Tensor:
    """Chunk ``rank`` of ``x`` along ``dim`` (``size`` equal chunks). On XLA the rank is device
    data (``Transport.rank_value``), so every rank of the group lowers the same graph."""
    n = transport.size
    rank = transport.rank_value(x.device)
    if isinstance(rank, int):
        return x.chunk(n, dim=dim)[rank].contiguous()
    dim = dim % x.dim()  # a negative dim would name the wrong axis after unflatten
    return x.unflatten(dim, (n, x.shape[dim] // n)).index_select(dim, rank).squeeze(dim)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, transport):
        ctx.dim, ctx.transport = dim, transport
        return transport.all_gather(x, dim)

    @staticmethod
    def backward(ctx, g):
        return ctx.transport.reduce_scatter(g, ctx.dim), None, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, transport):
        ctx.dim, ctx.transport = dim, transport
        return transport.all_gather(x, dim)

    @staticmethod
    def backward(ctx, g):
        return own_chunk(g, ctx.dim, ctx.transport), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, transport):
        ctx.dim, ctx.transport = dim, transport
        return transport.reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx, g):
        return ctx.transport.all_gather(g, ctx.dim), None, None


class _ScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, transport):
        ctx.dim, ctx.transport = dim, transport
        if x.shape[dim] % transport.size:
            raise ValueError(f"scatter_to_group: size {x.shape[dim]} of dim {dim} is not "
                             f"divisible by the group size {transport.size}")
        return own_chunk(x, dim, transport)

    @staticmethod
    def backward(ctx, g):
        return ctx.transport.all_gather(g, ctx.dim), None, None


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, transport):
        ctx.transport = transport
        return x

    @staticmethod
    def backward(ctx, g):
        return ctx.transport.all_reduce(g), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, transport):
        return transport.all_reduce(x)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, split_dim, concat_dim, transport):
        ctx.dims, ctx.transport = (split_dim, concat_dim), transport
        return transport.all_to_all(x, split_dim, concat_dim)

    @staticmethod
    def backward(ctx, g):  # the inverse exchange: split where forward concatenated
        split_dim, concat_dim = ctx.dims
        return ctx.transport.all_to_all(g, concat_dim, split_dim), None, None, None


def all_to_all(x: torch.Tensor, split_dim: int, concat_dim: int,
               transport: Transport) -> torch.Tensor:
    return x if transport.size == 1 else _AllToAll.apply(x, split_dim, concat_dim, transport)


def all_gather(x: torch.Tensor, dim: int, transport: Transport) -> torch.Tensor:
    return x if transport.size == 1 else _AllGather.apply(x, dim, transport)


def gather_from_group(x: torch.Tensor, dim: int, transport: Transport) -> torch.Tensor:
    return x if transport.size == 1 else _GatherFromGroup.apply(x, dim, transport)


def reduce_scatter(x: torch.Tensor, dim: int, transport: Transport) -> torch.Tensor:
    return x if transport.size == 1 else _ReduceScatter.apply(x, dim, transport)


def scatter_to_group(x: torch.Tensor, dim: int, transport: Transport) -> torch.Tensor:
    return x if transport.size == 1 else _ScatterToGroup.apply(x, dim, transport)


def copy_to_group(x: torch.Tensor, transport: Transport) -> torch.Tensor:
    return x if transport.size == 1 else _CopyToGroup.apply(x, transport)


def reduce_from_group(x: torch.Tensor, transport: Transport) -> torch.Tensor:
    return x if transport.size == 1 else _ReduceFromGroup.apply(x, transport)
