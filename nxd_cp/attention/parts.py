"""Rank-dependent choices of the plan, resolved with a rank that is a Python int or device data.

On torch.distributed the CP rank is a Python int: a product that is empty on this rank is
skipped, masks have static positions and parts are plain slices (the fastest form). On XLA it
is an int32 device tensor (``Transport.rank_value``, NxD's ``SPMDRank`` idea): every rank runs
every product of the plan and the same graph, with the rank-dependent values looked up from
per-rank tables: part indices (``Selection``), mask offsets (``BlockMask.q_start``).

A kernel call runs ``P`` (Q part, KV part) pairs stacked on the batch dim. Parts are cut along
the sequence dim (``dim``) of ``[.., S_local, ..]`` tensors; a stacked call's inputs are
gathered with one ``index_select`` and its results go back with one ``index_add`` (sums) or a
merge masked per part (``-inf`` lse where a part is not the pair's). Accumulators are updated
functionally (no in-place writes through views: on XLA those lower to dynamic-update-slices
with s64 indices and bloat the graph).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from nxd_cp.attention.kernels import EMPTY_LSE
from nxd_cp.attention.merge import merge_partial
from nxd_cp.attention.schedule import ALL, EMPTY, FULL, BlockMask, Plan, Product


@functools.lru_cache(maxsize=1024)
def _device_table(values: Tuple, device: str) -> Tensor:
    """A per-rank table as device data (transferred once, then reused every step)."""
    return torch.tensor(values, dtype=torch.int32).to(device)


@dataclass(frozen=True, eq=False)
class Selection:
    """The parts of a ``[.., S_local, ..]`` tensor one kernel call reads, stacked on its batch
    dim: ``parts`` None (the whole shard), a tuple of static part indices, or an int32 ``[P]``
    device tensor (rank-dependent). ``count`` is ``P``."""
    parts: Union[None, Tuple[int, ...], Tensor]
    count: int = 1

    def take(self, x: Tensor, dim: int, plan: Plan, batch: int = 0) -> Tensor:
        """The selected parts of ``x`` along ``dim``, stacked on ``batch``: ``[.., P*B, ..]``
        (views for a single static part)."""
        c = plan.part_len
        if self.parts is None:
            return x
        if isinstance(self.parts, tuple):
            return _cat([x.narrow(dim, p * c, c) for p in self.parts], batch)
        # [.., S_local, ..] -> [.., parts, c, ..] -> [.., P, c, ..] (P at dim)
        picked = x.unflatten(dim, (plan.parts, c)).index_select(dim, self.parts)
        # P moved in front of the batch dim and merged with it: [.., P*B, .., c, ..]
        return picked.movedim(dim, batch).flatten(batch, batch + 1)

    def bias(self, plan: Plan) -> Tensor:
        """fp32 ``[P, parts]``: 0 where the part is the pair's, ``-inf`` elsewhere."""
        ids = torch.arange(plan.parts, dtype=torch.int32, device=self.parts.device)
        return torch.log((self.parts.unsqueeze(1) == ids).float())

    def spread(self, value: Tensor, dim: int, batch: int) -> Tensor:
        """``[.., P*B, ..]`` results of a call -> ``[.., P, c, ..]`` with ``P`` at ``dim``."""
        # [.., P*B, ..] -> [.., P, B, ..] -> P moved to ``dim`` (before the c rows)
        return value.unflatten(batch, (self.count, -1)).movedim(batch, dim)


def _cat(parts: List[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


WHOLE = Selection(None)
Call = Tuple[Selection, Selection, Optional[BlockMask]]


class RankIndex:
    """This rank's CP index: ``int``, or an int32 tensor ``[1]`` on the compute device."""

    def __init__(self, value: Union[int, Tensor]):
        self.value = value
        self.is_static = isinstance(value, int)
        self._looked_up = {}  # one lookup per table and call: a smaller graph

    def lookup(self, table: Tuple) -> Union[int, Tensor]:
        """``table[rank]`` for a table of ints (a Python int where the table is constant or
        the rank static, else an int32 0-d device tensor) or of tuples (an int32 ``[P]``)."""
        if self.is_static:
            return table[self.value]
        if not isinstance(table[0], tuple) and len(set(table)) == 1:
            return table[0]
        if table not in self._looked_up:
            t = _device_table(table, str(self.value.device))
            row = t.index_select(0, self.value)  # [1] or [1, P]
            self._looked_up[table] = row.reshape(row.shape[1:] if row.dim() > 1 else ())
        return self._looked_up[table]

    def calls(self, plan: Plan, products: Tuple[Product, ...]) -> List[Call]:
        """Kernel calls of one step: ``(Q selection, KV selection, mask)``.

        Python-int rank: every non-empty product is its own call, with static parts. Device
        rank: every product runs; the unmasked half-by-half products (the two of a zigzag
        causal step) are one stacked call, so a step holds one kernel in the graph, not two.
        """
        if self.is_static:
            return [c for c in (self._static_call(p, plan) for p in products) if c is not None]
        calls, stack = [], []
        for p in products:
            mask = None
            if p.needs_mask:
                mask = BlockMask(self.lookup(p.offset), 0, plan.causal, plan.window)
            if ALL in p.q_part or ALL in p.k_part or mask is not None:
                calls.append((self._select(p.q_part), self._select(p.k_part), mask))
            else:
                stack.append(p)
        if stack:  # per-rank index vectors [P]: table[rank] = (part of product 0, 1, ...)
            q_idx = self.lookup(tuple(zip(*(p.q_part for p in stack))))
            k_idx = self.lookup(tuple(zip(*(p.k_part for p in stack))))
            calls.insert(0, (Selection(q_idx, len(stack)), Selection(k_idx, len(stack)), None))
        return calls

    def _select(self, table: Tuple[int, ...]) -> Selection:
        if table[0] == ALL:  # the whole shard: the same on every rank (schedule's products)
            return WHOLE
        return Selection(self.lookup(tuple((t,) for t in table)))

    def _static_call(self, product: Product, plan: Plan) -> Optional[Call]:
        r = self.value
        kind = product.kinds[r]
        if kind is EMPTY:
            return None
        mask = None if kind is FULL else BlockMask(product.offset[r], 0, plan.causal,
                                                   plan.window)
        qp, kp = product.q_part[r], product.k_part[r]
        return (WHOLE if qp == ALL else Selection((qp,)),
                WHOLE if kp == ALL else Selection((kp,)), mask)


class _PerPart:
    """A result over the local shard, sequence along ``dim``: kept per part (static parts,
    no concatenation per step) or whole (the whole shard, or device-picked parts)."""

    def __init__(self, plan: Plan, dim: int):
        self.plan, self.dim = plan, dim
        self.parts: list = [None] * plan.parts
        self.whole = None

    def _untouched(self) -> bool:
        return self.whole is None and all(p is None for p in self.parts)

    def _split(self) -> None:
        """Whole -> per part (views)."""
        if self.whole is not None:
            c = self.plan.part_len
            self.parts = [self._narrow(self.whole, i * c, c) for i in range(self.plan.parts)]
            self.whole = None

    def _joined(self):
        """The value over the whole shard (untouched parts empty)."""
        if self.whole is None:
            n, c = self.plan.parts, self.plan.part_len
            self.whole = (self._empty(n * c) if self._untouched() else
                          self._cat([self._empty(c) if p is None else p for p in self.parts]))
            self.parts = [None] * self.plan.parts
        return self.whole


class PartSum(_PerPart):
    """A sum over the local shard of per-call results stacked on the ``batch`` dim (dQ; dK/dV
    ``[2, B, Hkv, S_local, D]``); ``zeros(n)`` makes ``n`` rows of zeros."""

    def __init__(self, plan: Plan, dim: int, batch: int, zeros: Callable[[int], Tensor]):
        super().__init__(plan, dim)
        self.batch, self._empty = batch, zeros

    def _narrow(self, x, start, n):
        return x.narrow(self.dim, start, n)

    def _cat(self, pieces):
        return _cat(pieces, self.dim)

    def add(self, sel: Selection, value: Tensor) -> None:
        if isinstance(sel.parts, tuple):
            self._split()
            (p,) = sel.parts
            self.parts[p] = value if self.parts[p] is None else self.parts[p] + value
        elif sel.parts is None:
            self.whole = value if self._untouched() else self._joined() + value
        else:
            n, c = self.plan.parts, self.plan.part_len
            grid = self._joined().unflatten(self.dim, (n, c))  # [.., parts, c, ..]
            self.whole = grid.index_add(self.dim, sel.parts, sel.spread(
                value, self.dim, self.batch)).flatten(self.dim, self.dim + 1)  # [.., S_local, ..]

    def value(self) -> Tensor:
        return self._joined()


class PartMerge(_PerPart):
    """The merged ``(out, lse)`` of the local queries: fp32 ``[B, H, S_local, D]`` and
    ``[B, H, S_local]`` (sequence at dim 2)."""

    def __init__(self, plan: Plan, q: Tensor):
        super().__init__(plan, 2)
        b, h, _, d = q.shape
        self._empty = lambda n: (q.new_zeros((b, h, n, d), dtype=torch.float32),
                                 q.new_full((b, h, n), EMPTY_LSE, dtype=torch.float32))

    def _narrow(self, x, start, n):
        return tuple(t.narrow(2, start, n) for t in x)

    def _cat(self, pieces):
        return tuple(_cat([p[i] for p in pieces], 2) for i in range(2))

    def merge(self, sel: Selection, out: Tensor, lse: Tensor) -> None:
        """Merge a call's results ``out`` ``[P*B, H, c, D]``, ``lse`` ``[P*B, H, c]``."""
        if isinstance(sel.parts, tuple):
            self._split()
            (p,) = sel.parts
            self.parts[p] = (out, lse) if self.parts[p] is None else merge_partial(
                *self.parts[p], out, lse)
        elif sel.parts is None:
            self.whole = (out, lse) if self._untouched() else merge_partial(*self._joined(),
                                                                            out, lse)
        else:
            self._merge_picked(sel, out, lse)

    def _merge_picked(self, sel: Selection, out: Tensor, lse: Tensor) -> None:
        """Each pair merges into every part, its lse at -inf outside its own part."""
        n, c = self.plan.parts, self.plan.part_len
        acc_out, acc_lse = (t.unflatten(2, (n, c)) for t in self._joined())  # [B, H, parts, c, ..]
        outs, lses = sel.spread(out, 2, 0), sel.spread(lse, 2, 0)  # [B, H, P, c, ..]
        bias = sel.bias(self.plan).unsqueeze(-1)  # [P, parts, 1]
        for i in range(sel.count):
            acc_out, acc_lse = merge_partial(acc_out, acc_lse, outs[:, :, i:i + 1],
                                             lses[:, :, i:i + 1] + bias[i])
        self.whole = (acc_out.flatten(2, 3), acc_lse.flatten(2, 3))

    def value(self) -> Tuple[Tensor, Tensor]:
        return self._joined()
