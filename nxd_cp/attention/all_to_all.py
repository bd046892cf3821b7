"""All-to-all CP: Ulysses (``comm_type="a2a"``) and hierarchical ``"a2a+p2p"``.

Ulysses trades heads for sequence: an all-to-all inside a group of ``n`` CP ranks turns this
rank's ``[B, H, S_local, D]`` into ``[B, H/n, n·S_local, D]`` — its ``H/n`` heads over the
``n`` shards of the group, concatenated in group order — attention runs on that, and the
inverse all-to-all brings the output ``[B, Hq, S_local, D]`` back. Each rank sends ``(n−1)/n``
of its q, k, v and output per layer (and as much again in backward), whatever the sequence.

The ``n`` shards are put in the order of a CP layout of ``cp/n`` ranks by one static
permutation (``group_order``): with zigzag, CP rank ``r`` holds chunks ``r`` and
``2·cp−1−r`` of ``2·cp``, so the ``n`` contiguous ranks of group ``g`` hold chunks
``[g·n, (g+1)·n)`` and ``[2·cp−(g+1)·n, 2·cp−g·n)``: exactly zigzag chunks ``g`` and
``2·cp'−1−g`` of a ``2·cp'`` split (``cp' = cp/n``) once the first halves are put in order
and the second halves in reverse order. Contiguous groups are already in order; per_document
shards are zigzag in their slots. The permutation does not depend on the rank: one graph for
every rank. Then the ring (``streams.stream_attention``, ``"p2p"``) runs over the *outer* group
(the ranks ``n`` apart, one per inner group) with ``cp'`` ranks and the full sequence length,
every mask as before; with ``n = cp`` (``"a2a"``) the outer group is the rank alone.

GQA / MQA: the K/V heads must split over the ``n`` ranks too. When ``Hkv % n != 0`` each K/V
head is repeated ``lcm(Hkv, n) / Hkv`` times before the all-to-all (the fewest copies that
split evenly and keep each rank's query heads on their own K/V head). ``Hq`` must be divisible
by ``n`` (``ValueError`` naming the sizes otherwise); then it is by ``lcm(Hkv, n)`` too. Under
TP these are the heads of this TP rank (``H/tp``): ``Hq/tp`` must be divisible by ``n``.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from nxd_cp.attention.documents import PackedDocuments
from nxd_cp.attention.streams import stream_attention
from nxd_cp.comm.autograd import all_to_all
from nxd_cp.comm.base import Transport


def kv_repeats(hq: int, hkv: int, n: int) -> int:
    """How many copies of each K/V head the all-to-all over ``n`` ranks needs (module doc)."""
    if hq % n:
        raise ValueError(f"query heads {hq} (per TP rank) are not divisible by the all-to-all "
                         f"group size {n} (comm_type 'a2a': context_parallel_size; 'a2a+p2p': "
                         "a2a_size): each rank of the group takes an equal share of the heads")
    # hq is a multiple of hkv (checked by the api) and of n, hence of lcm(hkv, n): the copies
    # always split, and each rank's hq/n query heads fall on its own K/V heads.
    return n // math.gcd(hkv, n)


def group_order(n: int, shard_len: int, load_balance: str) -> Optional[List[int]]:
    """Index ``[n·shard_len]`` putting the concatenated shards of ``n`` contiguous CP ranks in
    the order of the outer layout (module doc); None where it is the identity."""
    if n == 1 or load_balance == "contiguous":
        return None
    half = shard_len // 2
    first = [i * shard_len + j for i in range(n) for j in range(half)]
    second = [i * shard_len + half + j for i in reversed(range(n)) for j in range(half)]
    return first + second


def _index(order: List[int], device) -> Tensor:
    # int32 constants: no s64 in an XLA graph; the same on every rank
    return torch.tensor(order, dtype=torch.int32, device=device)


def _gathered(x: Optional[Tensor], inner: Transport, order: Optional[Tensor]
              ) -> Optional[Tensor]:
    """A per-token tensor ``[B, S_local]`` of the group's ranks, ``[B, n·S_local]`` in order."""
    if x is None:
        return None
    x = inner.all_gather(x, 1)
    return x if order is None else x.index_select(1, order)


def a2a_attention(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], *,
                  inner: Transport, outer: Transport, seq_len: int, load_balance: str,
                  causal: bool, window: Optional[int], scale: float,
                  seq_idx: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                  positions: bool = False) -> Tensor:
    """Attention of this rank's shard by all-to-all inside ``inner`` and the ring over ``outer``.

    q ``[B, Hq, S_local, D]``; k, v ``[B, Hkv, S_local, D]``; keep None or uint8 ``[B, S_local]``;
    seq_idx / position_ids ``[B, S_local]`` (packed rows; positions read when ``positions``:
    per_document with a window). Returns ``[B, Hq, S_local, D]`` in q's dtype.
    """
    n, s_local = inner.size, q.shape[2]
    reps = kv_repeats(q.shape[1], k.shape[1], n)
    if reps > 1:
        k, v = k.repeat_interleave(reps, dim=1), v.repeat_interleave(reps, dim=1)
    order_list = group_order(n, s_local, load_balance)
    order = None if order_list is None else _index(order_list, q.device)
    heads = []
    for x in (q, k, v):  # [B, H, S_local, D] -> [B, H/n, n·S_local, D] in the outer layout
        x = all_to_all(x, 1, 2, inner)
        heads.append(x if order is None else x.index_select(2, order))
    keep, seq_idx = _gathered(keep, inner, order), _gathered(seq_idx, inner, order)
    position_ids = _gathered(position_ids, inner, order) if positions else None
    documents = None
    if seq_idx is not None:
        per_document = load_balance == "per_document"
        # per_document: the group's shards hold every document's chunks interleaved, so the
        # ids are not monotonic inside a part here; the api checked them in the CP layout.
        documents = PackedDocuments(seq_idx, per_document, position_ids,
                                    window if positions else None,
                                    check_order=not per_document)
    out = stream_attention(*heads, keep, comm_type="p2p", transport=outer, seq_len=seq_len,
                           load_balance="zigzag" if load_balance == "per_document"
                           else load_balance, causal=causal,
                           window=None if positions and documents is not None else window,
                           scale=scale, documents=documents)
    if order_list is not None:
        inverse = [0] * len(order_list)
        for i, j in enumerate(order_list):
            inverse[j] = i
        out = out.index_select(2, _index(inverse, q.device))
    return all_to_all(out, 2, 1, inner)


def split_for(comm_type: str, a2a_size: Optional[int], cp: int) -> int:
    """The all-to-all group size of ``comm_type``: cp for ``"a2a"``, ``a2a_size`` for
    ``"a2a+p2p"``."""
    return cp if comm_type == "a2a" else int(a2a_size)

