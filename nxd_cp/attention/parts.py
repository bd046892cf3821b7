"""Rank-dependent choices of the plan, resolved with a rank that is a Python int or device data.

On torch.distributed the CP rank is a Python int: a product that is empty on this rank is
skipped, masks have static positions and parts are plain slices (the fastest form). On XLA it
is an int32 device tensor (``Transport.rank_value``, NxD's ``SPMDRank`` idea): every rank runs
every product of the plan, a rank-dependent part is picked with ``torch.where`` and a
rank-dependent mask offset is looked up from a per-rank table — the same graph on every rank.

Parts are cut along the sequence dim (``dim``) of ``[B, H, S_local, ...]`` tensors.
Accumulators are kept as one tensor per part and updated functionally (no in-place writes
through views: on XLA those lower to dynamic-update-slices with s64 indices and bloat the graph).
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from nxd_cp.attention.merge import merge_partial
from nxd_cp.attention.schedule import ALL, EMPTY, FULL, BlockMask, Plan, Product

Part = Union[int, Tensor]  # 0, 1, ALL, or a bool 0-d device tensor (True: part 1)


@functools.lru_cache(maxsize=1024)
def _device_table(values: Tuple[int, ...], device: str) -> Tensor:
    """A per-rank table as device data (transferred once, then reused every step)."""
    return torch.tensor(values, dtype=torch.int32).to(device)


class RankIndex:
    """This rank's CP index: ``int``, or an int32 tensor ``[1]`` on the compute device."""

    def __init__(self, value: Union[int, Tensor]):
        self.value = value
        self.is_static = isinstance(value, int)
        self._looked_up = {}  # one lookup per table and call: a smaller graph

    def lookup(self, table: Tuple[int, ...], as_flag: bool = False) -> Union[int, Tensor]:
        """``table[rank]``: a Python int where the table is constant or the rank static, else
        an int32 0-d device tensor (a bool one with ``as_flag``, for a part 0/1)."""
        if len(set(table)) == 1:
            return table[0]
        if self.is_static:
            return table[self.value]
        key = (table, as_flag)
        if key not in self._looked_up:
            t = _device_table(table, str(self.value.device))
            value = t.index_select(0, self.value).reshape(())
            self._looked_up[key] = value.bool() if as_flag else value
        return self._looked_up[key]

    def resolve(self, product: Product,
                plan: Plan) -> Optional[Tuple[Part, Part, Optional[BlockMask]]]:
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
        return (self.lookup(product.q_part, as_flag=True),
                self.lookup(product.k_part, as_flag=True), mask)


def _flag(part: Tensor, ndim: int) -> Tensor:
    return part.reshape((1,) * ndim)


def take(x: Tensor, dim: int, part: Part, plan: Plan) -> Tensor:
    """Part ``part`` of ``x`` along ``dim`` (a view for a static part)."""
    if isinstance(part, int):
        sl = plan.part_slice(part)
        return x.narrow(dim, sl.start, sl.stop - sl.start)
    c = plan.part_len
    return torch.where(_flag(part, x.dim()), x.narrow(dim, c, c), x.narrow(dim, 0, c))


class PartAccumulator:
    """A ``[.., S_local, ..]`` result kept as one tensor per part along ``dim``.

    ``empty(shape)`` makes the value of a part no product has touched yet (zeros, or -inf
    for an lse); ``update(part, fn)`` replaces the part's value ``x`` with ``fn(x)``.
    """

    def __init__(self, plan: Plan, dim: int, empty: Callable[[], Tensor]):
        self.plan, self.dim, self._empty = plan, dim, empty
        self.parts: List[Optional[Tensor]] = [None] * plan.parts

    def _get(self, i: int) -> Tensor:
        return self._empty() if self.parts[i] is None else self.parts[i]

    def update(self, part: Part, fn: Callable[[Optional[Tensor]], Tensor]) -> None:
        """``fn(None)`` is called for a static part nobody has written yet."""
        c = self.plan.part_len
        if isinstance(part, int) and part != ALL:
            self.parts[part] = fn(self.parts[part])
        elif isinstance(part, int):  # the whole shard
            current = (None if all(p is None for p in self.parts)
                       else torch.cat([self._get(i) for i in range(self.plan.parts)], self.dim))
            new = fn(current)
            self.parts = [new.narrow(self.dim, i * c, c) for i in range(self.plan.parts)]
        else:
            first, second = self._get(0), self._get(1)
            flag = _flag(part, first.dim())
            new = fn(torch.where(flag, second, first))
            self.parts = [torch.where(flag, first, new), torch.where(flag, new, second)]

    def add(self, part: Part, value: Tensor) -> None:
        if isinstance(part, int):
            self.update(part, lambda x: value if x is None else x + value)
            return
        # Rank-dependent part: each half gets the value or zero (no read-select-write).
        flag = _flag(part, value.dim())
        zero = torch.zeros_like(value)
        for i, new in enumerate((torch.where(flag, zero, value), torch.where(flag, value, zero))):
            self.parts[i] = new if self.parts[i] is None else self.parts[i] + new

    def value(self) -> Tensor:
        return torch.cat([self._get(i) for i in range(self.plan.parts)], self.dim)


def merge_part(out: PartAccumulator, lse: PartAccumulator, o: Tensor, l: Tensor,
               part: Part) -> None:
    """Merge the partial result ``(o, l)`` (fp32 ``[B, H, S_part, D]`` / ``[B, H, S_part]``)
    of Q part ``part`` into the accumulators (the first result of a part is taken as is)."""
    if not _untouched(lse, part):
        o, l = merge_partial(take_acc(out, part), take_acc(lse, part), o, l)
    out.update(part, lambda _: o)
    lse.update(part, lambda _: l)


def _untouched(acc: PartAccumulator, part: Part) -> bool:
    if isinstance(part, int) and part != ALL:
        return acc.parts[part] is None
    return isinstance(part, int) and all(p is None for p in acc.parts)


def take_acc(acc: PartAccumulator, part: Part) -> Tensor:
    """The current value of ``part`` (materialised where empty)."""
    if isinstance(part, int) and part != ALL:
        return acc._get(part)
    if isinstance(part, int):
        return acc.value()
    flag = _flag(part, acc._get(0).dim())
    return torch.where(flag, acc._get(1), acc._get(0))
