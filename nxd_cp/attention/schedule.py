"""Mask types and the static plan of CP attention: which (Q part, KV part) products each step runs.

Everything here is pure Python on chunk ranges (no tensors), computed once per
(cp size, length, layout, mask) and cached: the plan of a CP step is the same every training
step and, in its *uniform* form, on every rank.

Mask rule (transformers' sliding-window semantics): key ``kp`` is visible to query ``qp`` iff
``(not causal or kp <= qp) and (window is None or qp - kp < window)``.

Step ``i`` of either algorithm attends this rank's Q (CP rank ``r``) to the K/V shard of
``source = (r - i) mod cp`` (ring order; all-gather uses the same order on its gathered copy).
A shard is cut into *parts* of equal length: the two zigzag chunks (part 0 = chunk ``r``,
part 1 = chunk ``2cp-1-r``), or the whole shard (contiguous). A ``Product`` is one kernel call
of a step, Q part x KV part, given per rank: on most steps every rank runs the same parts, but
under zigzag + causal a rank computes Q part 0 x KV part 0 when ``source < r`` and Q part 1 x
KV part 1 when ``source > r`` — same shapes, the part picked per rank (at run time from the
rank, which is device data on XLA). So the products, their shapes and their order do not
depend on the rank: one graph for every rank.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

from nxd_cp.sequence.layout import chunk_ranges, num_chunks

ALL = -1  # a Product part meaning "the whole shard"


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Visibility inside one (Q block, KV block) pair, from global positions.

    The Q block holds global positions ``q_start .. q_start+Sq-1`` and the KV block
    ``k_start .. k_start+Sk-1`` (contiguous ranges). The key at position ``kp`` is visible to
    the query at ``qp`` iff ``(not causal or kp <= qp) and (window is None or qp - kp < window)``.
    Only ``q_start - k_start`` matters; ``q_start`` may be a 0-d int32 tensor (device data, the
    same graph for every rank), then every tile is treated as partial.
    """
    q_start: Union[int, "object"]
    k_start: int
    causal: bool = True
    window: Optional[int] = None

    def __post_init__(self):
        if self.window is not None and not self.causal:
            raise ValueError(f"window={self.window} requires causal=True")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1")

    @property
    def is_static(self) -> bool:
        return isinstance(self.q_start, int)


class Visibility(enum.Enum):
    EMPTY = 0
    FULL = 1
    PARTIAL = 2


EMPTY, FULL, PARTIAL = Visibility.EMPTY, Visibility.FULL, Visibility.PARTIAL


def classify_gap(min_gap: int, max_gap: int, causal: bool, window: Optional[int]) -> Visibility:
    """Class of a block whose ``qp - kp`` ranges over ``[min_gap, max_gap]``."""
    if not causal:
        return FULL
    if max_gap < 0 or (window is not None and min_gap >= window):
        return EMPTY
    if min_gap >= 0 and (window is None or max_gap < window):
        return FULL
    return PARTIAL


def visibility(mask: Optional[BlockMask], q0: int, q1: int, k0: int, k1: int) -> Visibility:
    """Static class of the query positions ``[q0, q1)`` against the key positions ``[k0, k1)``;
    ``PARTIAL`` when the mask's positions are device data (unknown here)."""
    if mask is None:
        return FULL
    if not mask.is_static:
        return PARTIAL if mask.causal else FULL
    return classify_gap(q0 - (k1 - 1), (q1 - 1) - k0, mask.causal, mask.window)


def visible_pairs(offset: int, sq: int, sk: int, causal: bool, window: Optional[int]) -> int:
    """Visible (query, key) pairs of an ``sq`` x ``sk`` block whose ``qp - kp`` is
    ``offset + i - j`` (closed form per query row)."""
    if not causal:
        return sq * sk
    total = 0
    for i in range(sq):
        hi = min(sk, offset + i + 1)                       # keys j <= offset + i
        lo = 0 if window is None else max(0, offset + i - window + 1)
        total += max(0, hi - lo)
    return total


@dataclass(frozen=True)
class Product:
    """One kernel call of a step, given for every rank (tuples indexed by CP rank).

    q_part / k_part: the part of the local Q / of the visiting K/V (0, 1 or ``ALL``);
    offset: global position of the first query minus that of the first key;
    kinds: how much of the block is visible on that rank.
    """
    q_part: Tuple[int, ...]
    k_part: Tuple[int, ...]
    offset: Tuple[int, ...]
    kinds: Tuple[Visibility, ...]

    @property
    def needs_mask(self) -> bool:
        """False when every rank sees the whole block (no mask in any rank's graph)."""
        return any(k is not FULL for k in self.kinds)


@dataclass(frozen=True)
class BlockTask:
    """One rank's resolved kernel call: Q rows ``q`` against KV rows ``k`` with ``mask``."""
    q: slice
    k: slice
    mask: Optional[BlockMask]
    _pairs: Tuple[int, Optional[int], bool] = field(repr=False, compare=False)

    @functools.cached_property
    def score_pairs(self) -> int:
        """Visible (query, key) pairs: the attention work of the call (computed on demand)."""
        offset, window, causal = self._pairs
        return visible_pairs(offset, self.q.stop - self.q.start, self.k.stop - self.k.start,
                             causal, window)


@dataclass(frozen=True)
class Plan:
    """The products of every step (``steps[i]``: source ``(r - i) mod cp``) and the layout."""
    cp_size: int
    seq_len: int
    load_balance: str
    causal: bool
    window: Optional[int]
    part_len: int               # tokens per part (a zigzag chunk, or the whole shard)
    parts: int                  # parts per shard: 2 (zigzag) or 1 (contiguous)
    steps: Tuple[Tuple[Product, ...], ...]

    def part_slice(self, part: int) -> slice:
        if part == ALL:
            return slice(0, self.parts * self.part_len)
        return slice(part * self.part_len, (part + 1) * self.part_len)

    def tasks(self, rank: int) -> List[List[BlockTask]]:
        """The kernel calls of rank ``rank`` at every step, empty products left out (tests,
        benchmarks); all-gather runs the same calls, its steps read from the gathered copy."""
        out = []
        for products in self.steps:
            tasks = []
            for p in products:
                kind = p.kinds[rank]
                if kind is EMPTY:
                    continue
                mask = None if kind is FULL else BlockMask(p.offset[rank], 0, self.causal,
                                                           self.window)
                tasks.append(BlockTask(self.part_slice(p.q_part[rank]),
                                       self.part_slice(p.k_part[rank]), mask,
                                       (p.offset[rank], self.window, self.causal)))
            out.append(tasks)
        return out


def _part_starts(seq_len: int, rank: int, n: int, load_balance: str) -> List[int]:
    return [a for a, _ in chunk_ranges(seq_len, rank, n, load_balance)]


@dataclass(frozen=True)
class _PlanInputs:
    """What the products of a step are computed from (``make_plan``'s arguments)."""
    seq_len: int
    cp_size: int
    load_balance: str
    causal: bool
    window: Optional[int]
    part_len: int  # tokens per part
    parts: int     # parts per shard


def _pair(spec: _PlanInputs, r: int, s: int, a: int, b: int) -> Tuple[Visibility, int]:
    """(class, offset) of Q part ``a`` of rank ``r`` against KV part ``b`` of rank ``s``."""
    qs = _part_starts(spec.seq_len, r, spec.cp_size, spec.load_balance)[a]
    ks = _part_starts(spec.seq_len, s, spec.cp_size, spec.load_balance)[b]
    c = spec.part_len
    return classify_gap(qs - ks - (c - 1), qs - ks + (c - 1), spec.causal, spec.window), qs - ks


def _step_products(spec: _PlanInputs, step: int) -> Tuple[Product, ...]:
    n, parts = spec.cp_size, spec.parts
    ranks = range(n)
    if not spec.causal:
        return (Product((ALL,) * n, (ALL,) * n, (0,) * n, (FULL,) * n),)
    if step == 0 and spec.window is None:
        # The local block under a plain causal mask: local order is increasing in global
        # position, so the local lower triangle is the global causal mask, on every rank.
        return (Product((ALL,) * n, (ALL,) * n, (0,) * n, (PARTIAL,) * n),)
    pairs = [(a, b) for a in range(parts) for b in range(parts)]
    table = {r: {ab: _pair(spec, r, (r - step) % n, *ab) for ab in pairs} for r in ranks}
    live = {r: [ab for ab in pairs if table[r][ab][0] is not EMPTY] for r in ranks}
    common = [ab for ab in pairs if all(ab in live[r] for r in ranks)]
    rest = {r: [ab for ab in live[r] if ab not in common] for r in ranks}
    products = [Product((ab[0],) * n, (ab[1],) * n, tuple(table[r][ab][1] for r in ranks),
                        tuple(table[r][ab][0] for r in ranks)) for ab in common]
    for j in range(max(len(v) for v in rest.values())):
        # Rank r runs its j-th remaining pair; a rank with fewer runs one of its empty pairs,
        # whose mask (from positions) hides every key: the same shapes on every rank.
        chosen = {r: rest[r][j] if j < len(rest[r]) else
                  next(ab for ab in pairs if table[r][ab][0] is EMPTY) for r in ranks}
        products.append(Product(tuple(chosen[r][0] for r in ranks),
                                tuple(chosen[r][1] for r in ranks),
                                tuple(table[r][chosen[r]][1] for r in ranks),
                                tuple(table[r][chosen[r]][0] for r in ranks)))
    return tuple(products)


@functools.lru_cache(maxsize=256)
def make_plan(cp_size: int, seq_len: int, load_balance: str, causal: bool,
              window: Optional[int]) -> Plan:
    """The plan of CP attention (pure, cached); inputs validated by the caller (the api)."""
    parts = 2 if load_balance == "zigzag" else 1
    c = seq_len // num_chunks(cp_size, load_balance)
    spec = _PlanInputs(seq_len, cp_size, load_balance, causal, window, c, parts)
    steps = tuple(_step_products(spec, i) for i in range(cp_size))
    return Plan(cp_size, seq_len, load_balance, causal, window, c, parts, steps)


def score_pairs(tasks: Sequence[BlockTask]) -> int:
    """Attention work of a list of calls, in visible (query, key) pairs."""
    return sum(t.score_pairs for t in tasks)
