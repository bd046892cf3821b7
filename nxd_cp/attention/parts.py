"""Rank-dependent choices of the plan, resolved with a rank that is a Python int or device data.

On torch.distributed the CP rank is a Python int: a product that is empty on this rank is
skipped, masks have static positions and parts are plain slices (the fastest form). On XLA it
is an int32 device tensor (``Transport.rank_value``, NxD's ``SPMDRank`` idea): every rank runs
every product of the plan, a rank-dependent part is picked with ``torch.where`` and a
rank-dependent mask offset is looked up from a per-rank table — the same graph on every rank.
Shapes: parts are cut along the sequence dim (``dim``) of ``[B, H, S_local, ...]`` tensors.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from nxd_cp.attention.merge import merge_into, merge_partial
from nxd_cp.attention.schedule import ALL, EMPTY, FULL, BlockMask, Plan, Product

Part = Union[int, Tensor]  # 0, 1, ALL, or an int32 0-d device tensor holding 0 or 1


@functools.lru_cache(maxsize=1024)
def _device_table(values: Tuple[int, ...], device: str) -> Tensor:
    """A per-rank table as device data (transferred once, then reused every step)."""
    return torch.tensor(values, dtype=torch.int32).to(device)


class RankIndex:
    """This rank's CP index: ``int``, or an int32 tensor ``[1]`` on the compute device."""

    def __init__(self, value: Union[int, Tensor]):
        self.value = value
        self.is_static = isinstance(value, int)

    def lookup(self, table: Tuple[int, ...]) -> Union[int, Tensor]:
        """``table[rank]``: a Python int where the table is constant or the rank static."""
        if len(set(table)) == 1:
            return table[0]
        if self.is_static:
            return table[self.value]
        t = _device_table(table, str(self.value.device))
        return t.index_select(0, self.value).reshape(())

    def resolve(self, product: Product, plan: Plan) -> Optional[Tuple[Part, Part, Optional[BlockMask]]]:
        """(Q part, KV part, mask) of ``product`` on this rank; None where it is skipped."""
        if self.is_static:
            r = self.value
            kind = product.kinds[r]
            if kind is EMPTY:
                return None
            mask = (None if kind is FULL
                    else BlockMask(product.offset[r], 0, plan.causal, plan.window))
            return product.q_part[r], product.k_part[r], mask
        mask = None
        if product.needs_mask:
            mask = BlockMask(self.lookup(product.offset), 0, plan.causal, plan.window)
        return self.lookup(product.q_part), self.lookup(product.k_part), mask


def _halves(x: Tensor, dim: int, c: int) -> Tuple[Tensor, Tensor]:
    return x.narrow(dim, 0, c), x.narrow(dim, c, c)


def take(x: Tensor, dim: int, part: Part, plan: Plan) -> Tensor:
    """Part ``part`` of ``x`` along ``dim`` (a view for a static part)."""
    if isinstance(part, int):
        sl = plan.part_slice(part)
        return x.narrow(dim, sl.start, sl.stop - sl.start)
    first, second = _halves(x, dim, plan.part_len)
    return torch.where(_bcast(part.bool(), dim, x.dim()), second, first)


def _bcast(flag: Tensor, dim: int, ndim: int) -> Tensor:
    return flag.reshape((1,) * ndim)


def add_to_part(acc: Tensor, dim: int, part: Part, value: Tensor, plan: Plan) -> None:
    """``acc[part] += value`` in place along ``dim``."""
    if isinstance(part, int):
        take(acc, dim, part, plan).add_(value)
        return
    flag = _bcast(part.bool(), dim, acc.dim())
    first, second = _halves(acc, dim, plan.part_len)
    zero = torch.zeros_like(value)
    first.add_(torch.where(flag, zero, value))
    second.add_(torch.where(flag, value, zero))


def merge_into_part(out: Tensor, lse: Tensor, o: Tensor, l: Tensor, part: Part,
                    plan: Plan) -> None:
    """Merge the partial result ``(o, l)`` of Q part ``part`` into the accumulators
    ``out`` fp32 ``[B, H, S, D]`` / ``lse`` fp32 ``[B, H, S]``, in place."""
    if isinstance(part, int):
        merge_into(out, lse, o, l, plan.part_slice(part))
        return
    m_out, m_lse = merge_partial(take(out, 2, part, plan), take(lse, 2, part, plan), o, l)
    for acc, merged in ((out, m_out), (lse, m_lse)):
        flag = _bcast(part.bool(), 2, acc.dim())
        first, second = _halves(acc, 2, plan.part_len)
        new_first, new_second = torch.where(flag, first, merged), torch.where(flag, merged, second)
        first.copy_(new_first)
        second.copy_(new_second)


__all__ = ["ALL", "RankIndex", "take", "add_to_part", "merge_into_part"]
