"""The XLA block kernel: one tile when the block is small, a loop in the graph when it is not.

A (Q block, KV block) pair of at most ``block x block`` scores runs as one unrolled tile of the
pure-torch kernel (``kernels.TorchBlockKernel``), classified statically where it can be. A
larger pair runs as one XLA ``While`` loop over Q tiles of ``tile_q`` rows, each tile against
the whole KV block, ``tile_q * Sk <= block**2`` (``tile_plan``: the largest divisor of ``Sq``
within that bound, or, where that divisor degenerates, equal tiles with the last one padded):
the graph holds the loop body once, so its size no longer depends on ``S_local``, and the
scores buffer of one iteration is at most ``B * Hq * block**2 * 4`` bytes. The loop is
``comm.xla_loop.while_scan`` (torch-xla is reached from ``nxd_cp.comm`` only, through
``nxd_cp.compat.torch_xla``; no autograd: the CP
algorithms call forward and backward themselves, and torch-xla's public ``scan`` would trace the
body's autograd and stack its saved activations, every tile's scores, as loop outputs): forward
loops over Q tiles producing ``out`` / ``lse`` tiles; backward loops over Q tiles too, producing
``dq`` tiles and accumulating ``dk`` / ``dv`` in the loop carry. The body's math is
``softmax.py``'s (one online-softmax step; the tile gradients), shared with the pure-torch kernel.

Every tensor the loop body reads is a loop input (carry, scanned, or read-only ``consts``: K/V
and masks), never a closure: a traced closure would be recomputed inside the body (a
collective-permute result with it). Inside the loop a tile is never skipped, so a causal
diagonal block computes its invisible half too (masked); blocks the plan knows to be invisible
never reach the kernel. The loop counts in ``s32``. Layouts as ``kernels.py``.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from nxd_cp.attention.documents import DocumentMask
from nxd_cp.attention.kernels import TorchBlockKernel, position_rows, rows_visible
from nxd_cp.attention.schedule import BlockMask, Visibility, visibility
from nxd_cp.attention.softmax import (
    group_heads,
    masked_scores,
    softmax_finish,
    softmax_update,
    tile_grads,
)
from nxd_cp.comm.xla_loop import while_scan, zeros_after


def _tiles(x: Tensor, dim: int, n: int) -> Tensor:
    """``x`` with ``dim`` cut into ``n`` equal tiles, the tile index moved first."""
    return x.unflatten(dim, (n, x.shape[dim] // n)).movedim(dim, 0)


def _untile(x: Tensor, dim: int) -> Tensor:
    """Inverse of ``_tiles``: ``[n, ..., t, ...]`` -> ``[..., n * t, ...]`` at ``dim``."""
    return x.movedim(0, dim).flatten(dim, dim + 1)


FLOOR = 64  # rows: the smallest tile a loop uses where the scores bound allows it


def tile_plan(sq: int, sk: int, block: int) -> Tuple[int, int]:
    """``(tile_q, n)``: the loop over ``sq`` query rows runs ``n`` trips of ``tile_q`` rows,
    ``tile_q * sk <= block**2`` scores each (at least 1 row); ``n * tile_q >= sq``, the rows past
    ``sq`` are padding.

    The largest divisor of ``sq`` within the bound when it is not degenerate: at least
    ``min(sq, FLOOR, ceil(limit / 2))`` rows (``limit = block**2 // sk``) and at most twice the
    fewest trips ``ceil(sq / limit)``. Otherwise (``sq`` prime or nearly: ``S_local = 8198``
    gives ``sq = 4099``, whose only divisor below the bound is 1) the fewest trips with equal
    tiles, the last one padded: ``n = ceil(sq / limit)``, ``tile_q = ceil(sq / n)`` (then
    ``tile_q >= min(sq, limit / 2)``, fewer than ``n`` padded rows). So no tile is below
    ``min(sq, FLOOR, ceil(limit / 2))`` rows: 64 rows up to ``sk = 32768`` at ``block = 2048``.
    """
    limit = min(sq, max(1, block * block // sk))
    fewest = -(-sq // limit)
    floor = min(sq, FLOOR, -(-limit // 2))
    divisor = max(t for t in range(1, limit + 1) if sq % t == 0)
    if divisor >= floor and sq // divisor <= 2 * fewest:
        return divisor, sq // divisor
    return -(-sq // fewest), fewest


def tile_rows(sq: int, sk: int, block: int) -> int:
    """The rows of one tile of ``tile_plan`` (a divisor of ``sq`` unless the loop pads)."""
    return tile_plan(sq, sk, block)[0]


def _pad(x: Tensor, dim: int, rows: int, edge: bool = False) -> Tensor:
    """``x`` with ``rows`` more entries at the end of ``dim``: zeros, or copies of the last
    entry (``edge``: mask rows stay valid rows). ``x`` itself when ``rows == 0``."""
    if rows == 0:
        return x
    if edge:
        last = x.narrow(dim, x.shape[dim] - 1, 1)
        return torch.cat([x, last.expand(*x.shape[:dim], rows, *x.shape[dim + 1:])], dim)
    return torch.cat([x, x.new_zeros(*x.shape[:dim], rows, *x.shape[dim + 1:])], dim)


class _Masks:
    """The masks of one block as loop inputs: ``tensors`` are read-only, ``rows`` (per query)
    are scanned, and ``visible(tensors, rows)`` rebuilds the tile's visibility in the body."""

    def __init__(self, mask: Optional[BlockMask], kv_keep: Optional[Tensor],
                 documents: Optional[DocumentMask], sq: int, sk: int, device: torch.device):
        static = mask is not None and mask.is_static
        qs, ks = (mask.q_start, mask.k_start) if static else (0, 0)
        self.mask = mask
        self.positional = mask is not None and (
            visibility(mask, qs, qs + sq, ks, ks + sk) is Visibility.PARTIAL)
        self.dynamic_start = self.positional and not mask.is_static
        self.kv_keep, self.documents, self.sk = kv_keep, documents, sk
        self.tensors: List[Tensor] = []
        self.rows: List[Tensor] = []  # each [Sq, ...] before tiling
        if self.positional:
            self.rows.append(position_rows(mask, 0, sq, 0, device))
        if self.dynamic_start:
            self.tensors.append(mask.q_start)
        if kv_keep is not None:
            self.tensors.append(kv_keep)
        if documents is not None:
            self.tensors += [documents.k_ids] + ([documents.k_pos] if documents.window else [])
            # [B, Sq] -> [Sq, B]: rows are scanned on dim 0
            self.rows += [documents.q_ids.transpose(0, 1)] + (
                [documents.q_pos.transpose(0, 1)] if documents.window else [])

    def visible(self, tensors: Sequence[Tensor], rows: Sequence[Tensor]) -> Optional[Tensor]:
        """Bool broadcastable to ``[B, 1, 1, tq, Sk]``, or None (every key visible)."""
        tensors, rows = list(tensors), list(rows)
        visible = None
        if self.positional:
            mask = self.mask
            if self.dynamic_start:
                mask = dataclasses.replace(mask, q_start=tensors.pop(0))
            visible = rows_visible(mask, rows.pop(0), self.sk)
        if self.kv_keep is not None:
            keep = tensors.pop(0)[:, None, None, None, :]  # [B, Sk] -> [B, 1, 1, 1, Sk]
            visible = keep if visible is None else keep & visible
        if self.documents is not None:
            window = self.documents.window
            k_ids = tensors.pop(0)
            k_pos = tensors.pop(0) if window else None
            q_ids = rows.pop(0).transpose(0, 1)  # [tq, B] -> [B, tq]
            q_pos = rows.pop(0).transpose(0, 1) if window else None
            same = DocumentMask(q_ids, k_ids, q_pos, k_pos, window).visible(0, q_ids.shape[1],
                                                                            0, self.sk)
            visible = same if visible is None else same & visible
        return visible


class TileLoopKernel:
    """The XLA kernel (module docstring); ``block`` bounds the scores of one tile."""

    supports_documents = True

    def __init__(self, block: int):
        if block < 1:
            raise ValueError(f"block={block} must be >= 1")
        self.block = block
        self.unrolled = TorchBlockKernel(block, block)

    def supports(self, q, k, mask, kv_keep) -> bool:
        return True

    def _loops(self, q: Tensor, k: Tensor, mask: Optional[BlockMask]) -> bool:
        """Whether the block runs as a loop: more than one tile, and not statically empty (the
        unrolled kernel then computes nothing)."""
        sq, sk = q.shape[2], k.shape[2]
        if mask is not None and mask.is_static and visibility(
                mask, mask.q_start, mask.q_start + sq, mask.k_start,
                mask.k_start + sk) is Visibility.EMPTY:
            return False
        return sq > self.block or sk > self.block

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                mask: Optional[BlockMask] = None, kv_keep: Optional[Tensor] = None,
                documents=None) -> Tuple[Tensor, Tensor]:
        """See ``dispatch.block_attention_forward``."""
        if not self._loops(q, k, mask):
            return self.unrolled.forward(q, k, v, scale=scale, mask=mask, kv_keep=kv_keep,
                                         documents=documents)
        hkv, sq, sk = k.shape[1], q.shape[2], k.shape[2]
        tq, n = tile_plan(sq, sk, self.block)
        pad = tq * n - sq  # padded query rows (zeros; their outputs are dropped)
        masks = _Masks(mask, kv_keep, documents, sq, sk, q.device)
        qs = _pad(group_heads(q.float() * scale, hkv), 3, pad)  # [B, Hkv, G, Sq + pad, D]

        def body(carry, xs, consts):
            kf, vf, extra = consts[0], consts[1], consts[2:]
            visible = masks.visible(extra, xs[1:])
            # One KV tile (the whole block): the online softmax's first and last step.
            out, lse = softmax_finish(softmax_update(None, masked_scores(xs[0], kf, visible), vf))
            return carry, [out, lse]

        # Scanned: Q tiles [n, B, Hkv, G, tq, D] and the mask rows [n, tq, ...].
        xs = [_tiles(qs, 3, n)] + [_tiles(_pad(r, 0, pad, edge=True), 0, n) for r in masks.rows]
        _, (out, lse) = while_scan(body, [], xs, [k.float(), v.float()] + masks.tensors)
        # [n, B, Hkv, G, tq, ...] -> [B, Hkv, G, Sq (+ pad), ...] -> [B, Hq, Sq, ...]
        out, lse = _untile(out, 3).flatten(1, 2), _untile(lse, 3).flatten(1, 2)
        return (out[:, :, :sq], lse[:, :, :sq]) if pad else (out, lse)

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 *, scale: float, mask: Optional[BlockMask] = None,
                 kv_keep: Optional[Tensor] = None,
                 documents=None) -> Tuple[Tensor, Tensor, Tensor]:
        """See ``dispatch.block_attention_backward``."""
        if not self._loops(q, k, mask):
            return self.unrolled.backward(dout, q, k, v, out, lse, scale=scale, mask=mask,
                                          kv_keep=kv_keep, documents=documents)
        hkv, sq, sk = k.shape[1], q.shape[2], k.shape[2]
        tq, n = tile_plan(sq, sk, self.block)
        # Padded query rows: q, dout, lse and delta zero, so each padded row's dS = P * (dP -
        # delta) and dV = P^T dout are exactly 0 (P finite): nothing reaches dk / dv.
        pad = tq * n - sq
        masks = _Masks(mask, kv_keep, documents, sq, sk, q.device)
        qs = group_heads(q.float() * scale, hkv)  # [B, Hkv, G, Sq, D]
        dof = group_heads(dout.float(), hkv)
        # rowsum(dout * merged out) and the merged lse, [B, Hkv, G, Sq]
        delta = torch.einsum("bhgqd,bhgqd->bhgq", dof, group_heads(out.float(), hkv))
        lse_g = group_heads(lse, hkv)
        qs, dof, lse_g, delta = (_pad(t, 3, pad) for t in (qs, dof, lse_g, delta))

        def body(carry, xs, consts):
            (dk, dv), (kf, vf), extra = carry, consts[:2], consts[2:]
            qt, dot, lse_t, delta_t = xs[:4]
            visible = masks.visible(extra, xs[4:])
            dq_t, dk_t, dv_t = tile_grads(qt, kf, vf, dot, lse_t.unsqueeze(-1),
                                          delta_t.unsqueeze(-1), visible)
            return [dk + dk_t, dv + dv_t], [dq_t]

        kf, vf = k.float(), v.float()
        xs = [_tiles(t, 3, n) for t in (qs, dof, lse_g, delta)]  # [n, B, Hkv, G, tq, ...]
        xs += [_tiles(_pad(r, 0, pad, edge=True), 0, n) for r in masks.rows]
        (dk, dv), (dq,) = while_scan(body, [zeros_after(kf), zeros_after(vf)], xs,
                                     [kf, vf] + masks.tensors)
        dq = _untile(dq, 3).flatten(1, 2)  # [B, Hq, Sq (+ pad), D]
        return (dq[:, :, :sq] if pad else dq) * scale, dk, dv
