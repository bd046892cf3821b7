"""The pure-torch block kernel: one (Q block, KV block) pair, returning ``(out, lse)``.

Layouts: ``q`` ``[B, Hq, Sq, D]``, ``k``/``v`` ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0``; query
head ``h`` reads KV head ``h // (Hq // Hkv)`` (the ``repeat_interleave`` convention of SDPA's
``enable_gqa``). ``out`` fp32 ``[B, Hq, Sq, D]``, ``lse`` fp32 ``[B, Hq, Sq]`` (natural log).
Which keys a query sees comes from global positions (``BlockMask``, static ints or device data),
an optional key-padding mask ``kv_keep`` bool ``[B, Sk]`` and, for packed documents, an optional
``documents`` term (``documents.DocumentMask``: same document, data), all ANDed.

``TorchBlockKernel`` is the reference, the CPU fallback and — with large tiles — the XLA kernel
(``dispatch.XLA_BLOCK``): on XLA every tile is unrolled into the graph, so large tiles keep the
graph small and let the compiler tile the matmuls. No f64 and no s64 in what it lowers to:
comparisons are against tensors of the same dtype (a Python scalar operand of a comparison
lowers to f64/s64), positions are int32.
"""
from __future__ import annotations

from typing import Dict, Optional, Protocol, Tuple

import torch
from torch import Tensor

from nxd_cp.attention.schedule import BlockMask, Visibility, visibility

DEFAULT_TILE_Q = 256
DEFAULT_TILE_K = 512

_NEG_INF = float("-inf")
_LOWEST = torch.finfo(torch.float32).min


def position_mask(mask: BlockMask, q0: int, q1: int, k0: int, k1: int,
                  device: torch.device) -> Tensor:
    """Bool ``[q1-q0, k1-k0]``: visibility of block-local keys ``[k0, k1)`` to queries
    ``[q0, q1)`` (int32 positions; ``mask.q_start`` may be device data)."""
    rows = torch.arange(q1 - q0, dtype=torch.int32, device=device).unsqueeze(1)
    cols = torch.arange(k1 - k0, dtype=torch.int32, device=device).unsqueeze(0)
    gap = (rows - cols) + (q0 - k0 - mask.k_start) + mask.q_start
    visible = gap >= gap.new_zeros(())
    if mask.window is not None:
        visible = visible & (gap < gap.new_full((), mask.window))
    return visible


def group_heads(x: Tensor, hkv: int) -> Tensor:
    """``[B, Hq, S, ...]`` -> ``[B, Hkv, G, S, ...]`` (a view): the query heads of each KV head."""
    return x.unflatten(1, (hkv, x.shape[1] // hkv))


def finite_lse(lse: Tensor) -> Tensor:
    """``lse`` with ``-inf`` (rows with no visible key) replaced by ``+inf``, so that the
    recomputed probabilities ``exp(s - lse)`` of those rows are 0 instead of NaN."""
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
    GQA: the ``G = Hq // Hkv`` query heads of a KV head are stacked along the row dim of one
    matmul against that KV head, so K/V are never repeated.
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

    @staticmethod
    def _scores(qt: Tensor, kt: Tensor, scale: float, groups: int, vis: Visibility,
                mask: Optional[BlockMask], kv_keep: Optional[Tensor],
                q0: int, q1: int, k0: int, k1: int, documents=None) -> Tensor:
        """Scaled scores fp32 ``[B, Hkv, G*tq, tk]`` with invisible entries at ``-inf``.

        ``qt`` fp32 ``[B, Hkv, G*tq, D]`` (rows ordered (group, position)), ``kt`` fp32
        ``[B, Hkv, tk, D]``; ``q0..k1`` are block-local tile bounds.
        """
        s = torch.matmul(qt, kt.transpose(-1, -2)) * scale
        if vis is Visibility.FULL and kv_keep is None and documents is None:
            return s
        s = s.unflatten(2, (groups, q1 - q0))  # [B, Hkv, G, tq, tk]
        visible = None
        if vis is Visibility.PARTIAL:
            visible = position_mask(mask, q0, q1, k0, k1, s.device)
        if kv_keep is not None:
            keep = kv_keep[:, k0:k1].reshape(kv_keep.shape[0], 1, 1, 1, k1 - k0)
            visible = keep if visible is None else keep & visible
        if documents is not None:  # packed documents: same document (and window on positions)
            same = documents.visible(q0, q1, k0, k1)
            visible = same if visible is None else same & visible
        return torch.where(visible, s, _NEG_INF).flatten(2, 3)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                mask: Optional[BlockMask] = None, kv_keep: Optional[Tensor] = None,
                documents=None) -> Tuple[Tensor, Tensor]:
        """See ``block_attention_forward``."""
        b, hq, _, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        qf, kf, vf = group_heads(q.float(), hkv), k.float(), v.float()
        outs, lses = [], []
        for q0, q1, ktiles in self._tiles(q, k, mask):
            qt = qf[:, :, :, q0:q1].flatten(2, 3)  # [B, Hkv, G*tq, D]
            rows = qt.shape[2]
            row_max = row_sum = acc = None
            for k0, k1, vis in ktiles:
                s = self._scores(qt, kf[:, :, k0:k1], scale, g, vis, mask, kv_keep, q0, q1, k0, k1,
                                 documents)
                new_max = s.amax(-1) if row_max is None else torch.maximum(row_max, s.amax(-1))
                # Rows that see no key have max -inf: shift them by the lowest float instead
                # (exp still gives 0, and lse = shift + log(0) = -inf).
                shift = new_max.clamp_min(_LOWEST)
                p = torch.exp(s - shift.unsqueeze(-1))
                pv = torch.matmul(p, vf[:, :, k0:k1])
                if row_max is None:  # first tile: nothing to rescale (keeps the graph small)
                    row_sum, acc = p.sum(-1), pv
                else:
                    rescale = torch.exp(row_max - shift)
                    row_sum = row_sum * rescale + p.sum(-1)
                    acc = acc * rescale.unsqueeze(-1) + pv
                row_max = new_max
            if row_max is None:  # every key tile of this row tile is invisible
                shift = qt.new_zeros((b, hkv, rows))
                row_sum = qt.new_zeros((b, hkv, rows))
                acc = qt.new_zeros((b, hkv, rows, d))
            elif len(ktiles) > 1:
                shift = row_max.clamp_min(_LOWEST)
            lses.append((shift + torch.log(row_sum)).unflatten(2, (g, q1 - q0)))
            # A row that sees a key has row_sum >= 1 (its max term is exp(0)); empty rows have
            # row_sum = 0 and acc = 0: dividing by 1 gives out = 0.
            norm = row_sum.clamp_min(1.0)
            outs.append((acc / norm.unsqueeze(-1)).unflatten(2, (g, q1 - q0)))
        out = _cat(outs, 3).flatten(1, 2)
        lse = _cat(lses, 3).flatten(1, 2)
        return out, lse

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 *, scale: float, mask: Optional[BlockMask] = None,
                 kv_keep: Optional[Tensor] = None,
                 documents=None) -> Tuple[Tensor, Tensor, Tensor]:
        """See ``block_attention_backward``."""
        hkv = k.shape[1]
        g = q.shape[1] // hkv
        qf, kf, vf = group_heads(q.float(), hkv), k.float(), v.float()
        dof = group_heads(dout.float(), hkv)
        delta = group_heads((dout.float() * out).sum(-1), hkv)  # rowsum(dout * merged out)
        lse_f = group_heads(finite_lse(lse), hkv)
        dk_tiles: Dict[int, Tensor] = {}
        dv_tiles: Dict[int, Tensor] = {}
        dq_tiles = []
        for q0, q1, ktiles in self._tiles(q, k, mask):
            qt = qf[:, :, :, q0:q1].flatten(2, 3)
            dot = dof[:, :, :, q0:q1].flatten(2, 3)
            lse_t = lse_f[:, :, :, q0:q1].flatten(2, 3).unsqueeze(-1)
            delta_t = delta[:, :, :, q0:q1].flatten(2, 3).unsqueeze(-1)
            dq_t = torch.zeros_like(qt)
            for k0, k1, vis in ktiles:
                kt, vt = kf[:, :, k0:k1], vf[:, :, k0:k1]
                s = self._scores(qt, kt, scale, g, vis, mask, kv_keep, q0, q1, k0, k1, documents)
                p = torch.exp(s - lse_t)  # [B, Hkv, G*tq, tk]
                ds = p * (torch.matmul(dot, vt.transpose(-1, -2)) - delta_t)
                dq_t = dq_t + torch.matmul(ds, kt)
                # The matmuls over the G*tq rows sum dK/dV over the query heads of a KV head.
                dk_t = torch.matmul(ds.transpose(-1, -2), qt)
                dv_t = torch.matmul(p.transpose(-1, -2), dot)
                dk_tiles[k0] = dk_tiles[k0] + dk_t if k0 in dk_tiles else dk_t
                dv_tiles[k0] = dv_tiles[k0] + dv_t if k0 in dv_tiles else dv_t
            dq_tiles.append(dq_t.unflatten(2, (g, q1 - q0)))
        dq = _cat(dq_tiles, 3).flatten(1, 2) * scale
        dk = self._gather_tiles(dk_tiles, kf) * scale
        dv = self._gather_tiles(dv_tiles, vf)
        return dq, dk, dv

    def _gather_tiles(self, tiles: Dict[int, Tensor], like: Tensor) -> Tensor:
        """Concatenate per-k-tile gradients ``{k0: [B, Hkv, tk, D]}``; absent tiles are 0."""
        sk = like.shape[2]
        parts = [tiles[k0] if k0 in tiles else torch.zeros_like(like[:, :, k0:k0 + self.tile_k])
                 for k0 in range(0, sk, self.tile_k)]
        return _cat(parts, 2)
