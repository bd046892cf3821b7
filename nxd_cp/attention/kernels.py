"""The pure-torch block kernel: one (Q block, KV block) pair, returning ``(out, lse)``.

Layouts: ``q`` ``[B, Hq, Sq, D]``, ``k``/``v`` ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0``; query
head ``h`` reads KV head ``h // (Hq // Hkv)`` (the ``repeat_interleave`` convention of SDPA's
``enable_gqa``). ``out`` fp32 ``[B, Hq, Sq, D]``, ``lse`` fp32 ``[B, Hq, Sq]`` (natural log).
A row that sees no key has ``out = 0`` and ``lse = EMPTY_LSE``, the lowest finite fp32: merges
and the backward's ``exp(s - lse)`` then need no NaN guard (masked scores are ``-inf``).
Which keys a query sees comes from ``tile_visibility``: global positions (``BlockMask``, static
ints or device data) and data masks travelling with the keys (``kv_keep`` bool ``[B, Sk]``;
for packed documents a ``documents`` term, ``documents.DocumentMask``: same document), ANDed.

``TorchBlockKernel`` is the reference, the CPU fallback and — as one large tile — the XLA
kernel for blocks up to ``dispatch.XLA_BLOCK`` (larger blocks: ``tile_loop.py``): on XLA every
tile is unrolled into the graph, so large tiles keep the graph small and let the compiler tile
the matmuls. The per-tile math (online softmax, tile gradients) is ``softmax.py``'s, shared
with the tile loop; positions are int32 and comparisons are against tensors of the same dtype
(a Python scalar operand of a comparison lowers to f64/s64).
"""
from __future__ import annotations

from typing import Dict, Optional, Protocol, Tuple

import torch
from torch import Tensor

from nxd_cp.attention.schedule import BlockMask, Visibility, visibility
from nxd_cp.attention.softmax import (
    EMPTY_LSE,
    group_heads,
    masked_scores,
    softmax_finish,
    softmax_update,
    tile_grads,
)

DEFAULT_TILE_Q = 256
DEFAULT_TILE_K = 512

__all__ = ["EMPTY_LSE", "BlockKernel", "TorchBlockKernel", "finite_lse", "group_heads",
           "masked_scores", "position_rows", "rows_visible", "tile_visibility"]


def position_rows(mask: BlockMask, q0: int, q1: int, k0: int, device: torch.device) -> Tensor:
    """int32 ``[q1-q0]``: query position minus the position of block-local key ``k0``, for the
    block-local queries ``[q0, q1)`` (without a device-data ``mask.q_start``, which
    ``rows_visible`` adds)."""
    static = mask.q_start if isinstance(mask.q_start, int) else 0
    start = q0 - k0 - mask.k_start + static  # query position - key position at (0, 0)
    return torch.arange(start, start + q1 - q0, dtype=torch.int32, device=device)


def rows_visible(mask: BlockMask, rows: Tensor, num_keys: int) -> Tensor:
    """Bool ``[len(rows), num_keys]``: visibility of ``num_keys`` consecutive keys to the
    queries whose ``position_rows`` are ``rows``."""
    cols = torch.arange(num_keys, dtype=torch.int32, device=rows.device)
    gap = rows.unsqueeze(1) - cols
    if not isinstance(mask.q_start, int):
        gap = gap + mask.q_start
    visible = gap >= gap.new_zeros(())
    if mask.window is not None:
        visible = visible & (gap < gap.new_full((), mask.window))
    return visible


def position_mask(mask: BlockMask, q0: int, q1: int, k0: int, k1: int,
                  device: torch.device) -> Tensor:
    """Bool ``[q1-q0, k1-k0]``: visibility of block-local keys ``[k0, k1)`` to queries
    ``[q0, q1)`` (int32 positions; ``mask.q_start`` may be device data)."""
    return rows_visible(mask, position_rows(mask, q0, q1, k0, device), k1 - k0)


def tile_visibility(mask: Optional[BlockMask], vis: Visibility, kv_keep: Optional[Tensor],
                    q0: int, q1: int, k0: int, k1: int, device: torch.device,
                    documents=None) -> Optional[Tensor]:
    """Which keys of the tile each query sees: bool broadcastable to ``[B, 1, 1, tq, tk]``,
    or None where every key is visible. Every mask is one ``&`` term here (positions, then
    the data masks that travel with K/V)."""
    visible = None
    if vis is Visibility.PARTIAL:
        visible = position_mask(mask, q0, q1, k0, k1, device)
    if kv_keep is not None:
        keep = kv_keep[:, None, None, None, k0:k1]  # [B, 1, 1, 1, tk]
        visible = keep if visible is None else keep & visible
    if documents is not None:  # packed documents: same document (and window on positions)
        same = documents.visible(q0, q1, k0, k1)  # [B, 1, 1, tq, tk]
        visible = same if visible is None else same & visible
    return visible


def finite_lse(lse: Tensor) -> Tensor:
    """``lse`` with ``-inf`` (rows with no visible key) replaced by ``+inf``, so that the
    recomputed probabilities ``exp(s - lse)`` of those rows are 0 instead of NaN (for kernels
    that are handed an lse from elsewhere; ``EMPTY_LSE`` needs no such guard here)."""
    return torch.where(torch.isneginf(lse), float("inf"), lse)


def _cat(parts, dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class BlockKernel(Protocol):
    """What ``register_kernel`` accepts; signatures as ``block_attention_forward/backward``.

    A kernel with ``supports_documents = True`` also takes ``documents=`` (a ``DocumentMask``
    or None) in ``forward`` / ``backward``; the others never see a document term (the
    dispatcher runs those blocks on the reference kernel).
    """

    def supports(self, q: Tensor, k: Tensor, mask: Optional[BlockMask],
                 kv_keep: Optional[Tensor]) -> bool: ...

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                mask: Optional[BlockMask] = None,
                kv_keep: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]: ...

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 *, scale: float, mask: Optional[BlockMask] = None,
                 kv_keep: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]: ...


class TorchBlockKernel:
    """Blockwise attention in pure torch (FlashAttention-2 algorithm), fp32 compute.

    Q is cut into tiles of ``tile_q`` rows and K/V into tiles of ``tile_k`` keys (the last tile
    of each may be smaller); one step holds ``O(tile_q * tile_k)`` scores per (batch, head).
    Every (q tile, k tile) pair is classified from the static positions: wholly invisible pairs
    are skipped, wholly visible ones run unmasked, partial ones build their mask from
    ``torch.arange``. No ``.item()`` and no branch on tensor values: one static XLA graph.
    GQA: the ``G = Hq // Hkv`` query heads of a KV head share one batched product with that KV
    head (``einsum`` over ``[B, Hkv, G, tq, D]``), so K/V are never repeated.
    """

    supports_documents = True

    def __init__(self, tile_q: int = DEFAULT_TILE_Q, tile_k: int = DEFAULT_TILE_K):
        if tile_q < 1 or tile_k < 1:
            raise ValueError(f"tile_q={tile_q} and tile_k={tile_k} must be >= 1")
        self.tile_q, self.tile_k = tile_q, tile_k

    def supports(self, q, k, mask, kv_keep) -> bool:
        return True

    def _tiles(self, q: Tensor, k: Tensor, mask: Optional[BlockMask]):
        """Yield ``(q0, q1, [(k0, k1, vis), ...])`` for every q tile, empty k tiles left out."""
        sq, sk = q.shape[2], k.shape[2]
        static = mask is not None and mask.is_static
        qs, ks = (mask.q_start, mask.k_start) if static else (0, 0)
        for q0 in range(0, sq, self.tile_q):
            q1 = min(q0 + self.tile_q, sq)
            ktiles = []
            for k0 in range(0, sk, self.tile_k):
                k1 = min(k0 + self.tile_k, sk)
                vis = (visibility(mask, qs + q0, qs + q1, ks + k0, ks + k1) if static
                       else visibility(mask, 0, 0, 0, 0))
                if vis is not Visibility.EMPTY:
                    ktiles.append((k0, k1, vis))
            yield q0, q1, ktiles

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                mask: Optional[BlockMask] = None, kv_keep: Optional[Tensor] = None,
                documents=None) -> Tuple[Tensor, Tensor]:
        """See ``block_attention_forward``."""
        hkv = k.shape[1]
        # [B, Hkv, G, Sq, D], pre-scaled; k/v fp32 [B, Hkv, Sk, D]
        qs, kf, vf = group_heads(q.float() * scale, hkv), k.float(), v.float()
        outs, lses = [], []
        for q0, q1, ktiles in self._tiles(q, k, mask):
            qt = qs[:, :, :, q0:q1].contiguous()  # one copy per q tile, not per product (CPU)
            state = None
            for k0, k1, vis in ktiles:
                visible = tile_visibility(mask, vis, kv_keep, q0, q1, k0, k1, q.device,
                                          documents)
                state = softmax_update(state, masked_scores(qt, kf[:, :, k0:k1], visible),
                                       vf[:, :, k0:k1])
            if state is None:  # every key tile of this row tile is invisible
                b, _, g, _, d = qt.shape
                lses.append(qt.new_full((b, hkv, g, q1 - q0), EMPTY_LSE))
                outs.append(qt.new_zeros((b, hkv, g, q1 - q0, d)))
                continue
            out_t, lse_t = softmax_finish(state)
            outs.append(out_t)
            lses.append(lse_t)
        # [B, Hkv, G, Sq, ...] -> [B, Hq, Sq, ...]
        return _cat(outs, 3).flatten(1, 2), _cat(lses, 3).flatten(1, 2)

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 *, scale: float, mask: Optional[BlockMask] = None,
                 kv_keep: Optional[Tensor] = None,
                 documents=None) -> Tuple[Tensor, Tensor, Tensor]:
        """See ``block_attention_backward``."""
        hkv = k.shape[1]
        qs, kf, vf = group_heads(q.float() * scale, hkv), k.float(), v.float()
        dof = group_heads(dout.float(), hkv)
        # rowsum(dout * merged out) and the merged lse, both [B, Hkv, G, Sq, 1]
        delta = torch.einsum("bhgqd,bhgqd->bhgq", dof, group_heads(out.float(), hkv)).unsqueeze(-1)
        lse_g = group_heads(lse, hkv).unsqueeze(-1)
        dk_tiles: Dict[int, Tensor] = {}
        dv_tiles: Dict[int, Tensor] = {}
        dq_tiles = []
        for q0, q1, ktiles in self._tiles(q, k, mask):
            qt, dot = qs[:, :, :, q0:q1].contiguous(), dof[:, :, :, q0:q1].contiguous()
            dq_t = None
            for k0, k1, vis in ktiles:
                kt, vt = kf[:, :, k0:k1], vf[:, :, k0:k1]
                visible = tile_visibility(mask, vis, kv_keep, q0, q1, k0, k1, q.device,
                                          documents)
                dq_part, dk_t, dv_t = tile_grads(qt, kt, vt, dot, lse_g[:, :, :, q0:q1],
                                                 delta[:, :, :, q0:q1], visible)
                dq_t = dq_part if dq_t is None else dq_t + dq_part
                dk_tiles[k0] = dk_t + dk_tiles[k0] if k0 in dk_tiles else dk_t
                dv_tiles[k0] = dv_t + dv_tiles[k0] if k0 in dv_tiles else dv_t
            dq_tiles.append(torch.zeros_like(qt) if dq_t is None else dq_t)
        dq = _cat(dq_tiles, 3).flatten(1, 2) * scale  # [B, Hkv, G, Sq, D] -> [B, Hq, Sq, D]
        return dq, self._gather_tiles(dk_tiles, kf), self._gather_tiles(dv_tiles, vf)

    def _gather_tiles(self, tiles: Dict[int, Tensor], like: Tensor) -> Tensor:
        """Concatenate per-k-tile gradients ``{k0: [B, Hkv, tk, D]}``; absent tiles are 0."""
        sk = like.shape[2]
        parts = [tiles[k0] if k0 in tiles else torch.zeros_like(like[:, :, k0:k0 + self.tile_k])
                 for k0 in range(0, sk, self.tile_k)]
        return _cat(parts, 2)
