"""Local block attention: one (Q block, KV block) pair, returning ``(out, lse)`` for LSE merging.

Layouts: ``q`` ``[B, Hq, Sq, D]``, ``k``/``v`` ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0``; query
head ``h`` reads KV head ``h // (Hq // Hkv)`` (the ``repeat_interleave`` convention of SDPA's
``enable_gqa``). ``out`` fp32 ``[B, Hq, Sq, D]``, ``lse`` fp32 ``[B, Hq, Sq]`` (natural log).
Which keys a query sees comes from global positions (``BlockMask``) and an optional key-padding
mask ``kv_keep`` bool ``[B, Sk]``.

Kernels: the pure-torch blockwise kernel (``TorchBlockKernel``) is the reference, the XLA/Neuron
path and the fallback of every device. ``register_kernel`` plugs a faster one in per device type
(built in: the fused SDPA ops on CPU and CUDA, for the masks they compute exactly); an NKI kernel
would register for ``"xla"``. ``NXD_CP_KERNEL=torch`` forces the pure-torch kernel everywhere.
"""
from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_TILE_Q = 256
DEFAULT_TILE_K = 512
KERNEL_ENV = "NXD_CP_KERNEL"

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class BlockMask:
    """Visibility inside one (Q block, KV block) pair, from global positions.

    The Q block holds global positions ``q_start .. q_start+Sq-1`` and the KV block
    ``k_start .. k_start+Sk-1`` (contiguous ranges). The key at position ``kp`` is visible to
    the query at ``qp`` iff ``(not causal or kp <= qp) and (window is None or qp - kp < window)``
    (the sliding-window semantics of transformers' ``masking_utils``).
    """
    q_start: int
    k_start: int
    causal: bool = True
    window: Optional[int] = None

    def __post_init__(self):
        if self.window is not None and not self.causal:
            raise ValueError(f"window={self.window} requires causal=True")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1")


class Visibility(enum.Enum):
    EMPTY = 0
    FULL = 1
    PARTIAL = 2


def visibility(mask: Optional[BlockMask], q0: int, q1: int, k0: int, k1: int) -> Visibility:
    """Static class of the query positions ``[q0, q1)`` against the key positions ``[k0, k1)``."""
    if mask is None or not mask.causal:
        return Visibility.FULL
    min_gap, max_gap = q0 - (k1 - 1), (q1 - 1) - k0  # extremes of qp - kp over the tile
    if max_gap < 0 or (mask.window is not None and min_gap >= mask.window):
        return Visibility.EMPTY
    if min_gap >= 0 and (mask.window is None or max_gap < mask.window):
        return Visibility.FULL
    return Visibility.PARTIAL


def _position_mask(mask: BlockMask, q0: int, q1: int, k0: int, k1: int,
                   device: torch.device) -> Tensor:
    """Bool ``[q1-q0, k1-k0]``: visibility of global key positions ``[k0, k1)`` to ``[q0, q1)``."""
    gap = (torch.arange(q0, q1, device=device).unsqueeze(1)
           - torch.arange(k0, k1, device=device).unsqueeze(0))
    visible = gap >= 0
    if mask.window is not None:
        visible = visible & (gap < mask.window)
    return visible


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, kv_keep: Optional[Tensor]) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         f"[B, H, S, D] with k.shape == v.shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need equal B and D and "
                         f"Hq % Hkv == 0")
    if kv_keep is not None and tuple(kv_keep.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"kv_keep {tuple(kv_keep.shape)} must be [B, Sk] = "
                         f"{(k.shape[0], k.shape[2])}")


def _group_heads(x: Tensor, hkv: int) -> Tensor:
    """``[B, Hq, S, ...]`` -> ``[B, Hkv, G, S, ...]`` (a view): the query heads of each KV head."""
    return x.unflatten(1, (hkv, x.shape[1] // hkv))


def _finite_lse(lse: Tensor) -> Tensor:
    """``lse`` with ``-inf`` (rows with no visible key) replaced by ``+inf``, so that the
    recomputed probabilities ``exp(s - lse)`` of those rows are 0 instead of NaN."""
    return torch.where(lse == _NEG_INF, torch.full_like(lse, float("inf")), lse)


class BlockKernel(Protocol):
    """What ``register_kernel`` accepts; signatures as ``block_attention_forward/backward``."""

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

    def __init__(self, tile_q: int = DEFAULT_TILE_Q, tile_k: int = DEFAULT_TILE_K):
        if tile_q < 1 or tile_k < 1:
            raise ValueError(f"tile_q={tile_q} and tile_k={tile_k} must be >= 1")
        self.tile_q, self.tile_k = tile_q, tile_k

    def supports(self, q, k, mask, kv_keep) -> bool:
        return True

    def _tiles(self, q: Tensor, k: Tensor, mask: Optional[BlockMask]):
        """Yield ``(q0, q1, [(k0, k1, vis), ...])`` for every q tile, empty k tiles left out."""
        sq, sk = q.shape[2], k.shape[2]
        qs, ks = (mask.q_start, mask.k_start) if mask is not None else (0, 0)
        for q0 in range(0, sq, self.tile_q):
            q1 = min(q0 + self.tile_q, sq)
            ktiles = []
            for k0 in range(0, sk, self.tile_k):
                k1 = min(k0 + self.tile_k, sk)
                vis = visibility(mask, qs + q0, qs + q1, ks + k0, ks + k1)
                if vis is not Visibility.EMPTY:
                    ktiles.append((k0, k1, vis))
            yield q0, q1, ktiles

    @staticmethod
    def _scores(qt: Tensor, kt: Tensor, scale: float, groups: int, vis: Visibility,
                mask: Optional[BlockMask], kv_keep: Optional[Tensor],
                q0: int, q1: int, k0: int, k1: int) -> Tensor:
        """Scaled scores fp32 ``[B, Hkv, G*tq, tk]`` with invisible entries at ``-inf``.

        ``qt`` fp32 ``[B, Hkv, G*tq, D]`` (rows ordered (group, position)), ``kt`` fp32
        ``[B, Hkv, tk, D]``; ``q0..k1`` are block-local tile bounds.
        """
        s = torch.matmul(qt, kt.transpose(-1, -2)) * scale
        if vis is Visibility.FULL and kv_keep is None:
            return s
        s = s.unflatten(2, (groups, q1 - q0))  # [B, Hkv, G, tq, tk]
        visible = None
        if vis is Visibility.PARTIAL:
            visible = _position_mask(mask, mask.q_start + q0, mask.q_start + q1,
                                     mask.k_start + k0, mask.k_start + k1, s.device)
        if kv_keep is not None:
            keep = kv_keep[:, k0:k1].reshape(kv_keep.shape[0], 1, 1, 1, k1 - k0)
            visible = keep if visible is None else keep & visible
        return torch.where(visible, s, _NEG_INF).flatten(2, 3)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                mask: Optional[BlockMask] = None,
                kv_keep: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """See ``block_attention_forward``."""
        _check_shapes(q, k, v, kv_keep)
        b, hq, _, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        qf, kf, vf = _group_heads(q.float(), hkv), k.float(), v.float()
        outs, lses = [], []
        for q0, q1, ktiles in self._tiles(q, k, mask):
            qt = qf[:, :, :, q0:q1].flatten(2, 3)  # [B, Hkv, G*tq, D]
            rows = qt.shape[2]
            row_max = qt.new_full((b, hkv, rows), _NEG_INF)
            row_sum = qt.new_zeros((b, hkv, rows))
            acc = qt.new_zeros((b, hkv, rows, d))
            for k0, k1, vis in ktiles:
                s = self._scores(qt, kf[:, :, k0:k1], scale, g, vis, mask, kv_keep, q0, q1, k0, k1)
                new_max = torch.maximum(row_max, s.amax(-1))
                # Rows that have seen no visible key yet keep max -inf: shift by 0 instead.
                shift = torch.where(new_max == _NEG_INF, 0.0, new_max)
                p = torch.exp(s - shift.unsqueeze(-1))
                rescale = torch.exp(row_max - shift)
                row_sum = row_sum * rescale + p.sum(-1)
                acc = acc * rescale.unsqueeze(-1) + torch.matmul(p, vf[:, :, k0:k1])
                row_max = new_max
            shift = torch.where(row_max == _NEG_INF, 0.0, row_max)
            lses.append((shift + torch.log(row_sum)).unflatten(2, (g, q1 - q0)))
            norm = torch.where(row_sum == 0, 1.0, row_sum)  # empty rows: acc is 0, out 0
            outs.append((acc / norm.unsqueeze(-1)).unflatten(2, (g, q1 - q0)))
        out = torch.cat(outs, dim=3).flatten(1, 2)
        lse = torch.cat(lses, dim=3).flatten(1, 2)
        return out, lse

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 *, scale: float, mask: Optional[BlockMask] = None,
                 kv_keep: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """See ``block_attention_backward``."""
        _check_shapes(q, k, v, kv_keep)
        hkv = k.shape[1]
        g = q.shape[1] // hkv
        qf, kf, vf = _group_heads(q.float(), hkv), k.float(), v.float()
        dof = _group_heads(dout.float(), hkv)
        delta = _group_heads((dout.float() * out).sum(-1), hkv)  # rowsum(dout * merged out)
        lse_f = _group_heads(_finite_lse(lse), hkv)
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
                s = self._scores(qt, kt, scale, g, vis, mask, kv_keep, q0, q1, k0, k1)
                p = torch.exp(s - lse_t)  # [B, Hkv, G*tq, tk]
                ds = p * (torch.matmul(dot, vt.transpose(-1, -2)) - delta_t)
                dq_t = dq_t + torch.matmul(ds, kt)
                # The matmuls over the G*tq rows sum dK/dV over the query heads of a KV head.
                dk_t = torch.matmul(ds.transpose(-1, -2), qt)
                dv_t = torch.matmul(p.transpose(-1, -2), dot)
                dk_tiles[k0] = dk_tiles[k0] + dk_t if k0 in dk_tiles else dk_t
                dv_tiles[k0] = dv_tiles[k0] + dv_t if k0 in dv_tiles else dv_t
            dq_tiles.append(dq_t.unflatten(2, (g, q1 - q0)))
        dq = torch.cat(dq_tiles, dim=3).flatten(1, 2) * scale
        dk = self._gather_tiles(dk_tiles, kf) * scale
        dv = self._gather_tiles(dv_tiles, vf)
        return dq, dk, dv

    def _gather_tiles(self, tiles: Dict[int, Tensor], like: Tensor) -> Tensor:
        """Concatenate per-k-tile gradients ``{k0: [B, Hkv, tk, D]}``; absent tiles are 0."""
        sk = like.shape[2]
        parts = [tiles[k0] if k0 in tiles else torch.zeros_like(like[:, :, k0:k0 + self.tile_k])
                 for k0 in range(0, sk, self.tile_k)]
        return torch.cat(parts, dim=2)


def _fused_is_causal(q: Tensor, k: Tensor, mask: Optional[BlockMask]) -> Optional[bool]:
    """The ``is_causal`` flag under which a fused SDPA op computes ``mask`` exactly, or None.

    Exact cases: every key visible (``False``), or a diagonal block with a causal mask whose
    window (if any) covers the whole block (``True``: top-left causal, as Sq == Sk).
    """
    sq, sk = q.shape[2], k.shape[2]
    if mask is None:
        return False
    vis = visibility(mask, mask.q_start, mask.q_start + sq, mask.k_start, mask.k_start + sk)
    if vis is Visibility.FULL:
        return False
    diagonal = mask.q_start == mask.k_start and sq == sk
    if vis is Visibility.PARTIAL and diagonal and (mask.window is None or mask.window >= sq):
        return True
    return None


class CpuFlashKernel:
    """CPU fused flash attention (``aten._scaled_dot_product_flash_attention_for_cpu``).

    The op returns the fp32 logsumexp, handles Hq != Hkv itself (dK/dV come back per KV head)
    and its backward accepts the merged ``out``/``lse`` of the row. It runs in fp32 here: exact
    to the fp32 API, and on CPUs without bf16 matrix units the fp32 op is also the faster one.
    """

    def supports(self, q, k, mask, kv_keep) -> bool:
        return (kv_keep is None and q.is_floating_point()
                and _fused_is_causal(q, k, mask) is not None)

    def forward(self, q, k, v, *, scale, mask=None, kv_keep=None):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.float(), k.float(), v.float(), 0.0, _fused_is_causal(q, k, mask), scale=scale)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, scale, mask=None, kv_keep=None):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.float(), q.float(), k.float(), v.float(), out.float(), _finite_lse(lse.float()),
            0.0, _fused_is_causal(q, k, mask), scale=scale)
        return dq, dk, dv


class CudaSdpaKernel:
    """CUDA memory-efficient attention (``aten._scaled_dot_product_efficient_attention``).

    Not yet verified on a GPU in CI (argument order checked against the op schemas and meta
    kernels of torch 2.9 only). Runs in the input dtype (fp16/bf16/fp32); the op needs equal
    head counts, so K/V heads are repeated locally and dK/dV summed back per KV head. Its
    logsumexp is padded on the sequence dim to a multiple of 32 (not on ROCm): sliced on the
    way out, padded again for the backward.
    """

    _DTYPES = (torch.float16, torch.bfloat16, torch.float32)

    def supports(self, q, k, mask, kv_keep) -> bool:
        return (kv_keep is None and q.dtype in self._DTYPES and q.shape[3] % 8 == 0
                and _fused_is_causal(q, k, mask) is not None)

    @staticmethod
    def _expand(x: Tensor, groups: int) -> Tensor:
        return x.repeat_interleave(groups, dim=1) if groups > 1 else x

    def forward(self, q, k, v, *, scale, mask=None, kv_keep=None):
        g = q.shape[1] // k.shape[1]
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, self._expand(k, g), self._expand(v, g), None, True, 0.0,
            _fused_is_causal(q, k, mask), scale=scale)
        return out.float(), lse[:, :, :q.shape[2]].float()

    def backward(self, dout, q, k, v, out, lse, *, scale, mask=None, kv_keep=None):
        hkv, sq = k.shape[1], q.shape[2]
        g = q.shape[1] // hkv
        lse = _finite_lse(lse.float())
        if not torch.version.hip:
            lse = F.pad(lse, (0, -sq % 32))
        no_dropout = torch.zeros((), dtype=torch.int64, device=q.device)  # philox seed/offset
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout.to(q.dtype), q, self._expand(k, g), self._expand(v, g), None,
            out.to(q.dtype), lse.contiguous(), no_dropout, no_dropout, 0.0,
            [True, True, True, False], _fused_is_causal(q, k, mask), scale=scale)
        dk, dv = (_group_heads(x.float(), hkv).sum(2) for x in (dk, dv))
        return dq.float(), dk, dv


REFERENCE_KERNEL = TorchBlockKernel()
_KERNELS: Dict[str, BlockKernel] = {"cpu": CpuFlashKernel(), "cuda": CudaSdpaKernel()}


def register_kernel(device_type: str, kernel: Optional[BlockKernel]) -> Optional[BlockKernel]:
    """Use ``kernel`` for tensors on ``device_type`` (``"cpu"``, ``"cuda"``, ``"xla"``) where it
    ``supports`` the call; ``None`` unregisters. Returns the kernel registered before."""
    previous = _KERNELS.pop(device_type, None)
    if kernel is not None:
        _KERNELS[device_type] = kernel
    return previous


def get_kernel(device_type: str) -> BlockKernel:
    """The kernel for ``device_type``: the registered one, else the pure-torch reference;
    always the reference under ``NXD_CP_KERNEL=torch``."""
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in ("auto", "torch"):
        raise ValueError(f"{KERNEL_ENV}={choice!r} must be 'auto' or 'torch'")
    if choice == "torch":
        return REFERENCE_KERNEL
    return _KERNELS.get(device_type, REFERENCE_KERNEL)


def _select(q: Tensor, k: Tensor, v: Tensor, mask: Optional[BlockMask],
            kv_keep: Optional[Tensor]) -> BlockKernel:
    _check_shapes(q, k, v, kv_keep)
    kernel = get_kernel(q.device.type)
    return kernel if kernel.supports(q, k, mask, kv_keep) else REFERENCE_KERNEL


def block_attention_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                            mask: Optional[BlockMask] = None,
                            kv_keep: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Attention of one Q block over one KV block, as a partial result for LSE merging.

    ``q`` ``[B, Hq, Sq, D]``, ``k``/``v`` ``[B, Hkv, Sk, D]`` (``Hq % Hkv == 0``; K/V are not
    repeated by the caller). ``mask`` None: every key visible. ``kv_keep``: optional bool
    ``[B, Sk]``, True = the key may be attended. Returns ``out`` fp32 ``[B, Hq, Sq, D]`` and
    ``lse`` fp32 ``[B, Hq, Sq]``, the natural-log logsumexp of ``scale * q.k`` over the visible
    keys. Rows with no visible key: ``out = 0``, ``lse = -inf``. Dispatches on ``q.device.type``.
    """
    kernel = _select(q, k, v, mask, kv_keep)
    return kernel.forward(q, k, v, scale=scale, mask=mask, kv_keep=kv_keep)


def block_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                             lse: Tensor, *, scale: float, mask: Optional[BlockMask] = None,
                             kv_keep: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of one (Q block, KV block) pair, FlashAttention-style recompute.

    ``out`` fp32 ``[B, Hq, Sq, D]`` and ``lse`` fp32 ``[B, Hq, Sq]`` are the final *merged*
    results of the rows (over all KV blocks), not this block's partials; ``dout`` has ``q``'s
    shape, any float dtype. Returns fp32 ``dq``, ``dk``, ``dv`` with the shapes of ``q``, ``k``,
    ``v`` (``dk``/``dv`` summed over the query heads of each KV head). Rows with
    ``lse = -inf`` contribute nothing.
    """
    kernel = _select(q, k, v, mask, kv_keep)
    return kernel.backward(dout, q, k, v, out, lse, scale=scale, mask=mask, kv_keep=kv_keep)


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, mask, kv_keep):
        out, lse = block_attention_forward(q, k, v, scale=scale, mask=mask, kv_keep=kv_keep)
        # Saved in the input dtype (as the CP paths and FlashAttention do) and in [B, S, H, D]
        # memory order (see merge.empty_accumulators).
        b, h, s, d = q.shape
        out = q.new_empty((b, s, h, d)).transpose(1, 2).copy_(out)
        ctx.save_for_backward(q, k, v, out, lse, kv_keep)
        ctx.scale, ctx.mask = scale, mask
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, kv_keep = ctx.saved_tensors
        dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, scale=ctx.scale,
                                              mask=ctx.mask, kv_keep=kv_keep)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def local_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                    mask: Optional[BlockMask] = None, kv_keep: Optional[Tensor] = None) -> Tensor:
    """Differentiable attention of one block, ``out`` ``[B, Hq, Sq, D]`` in ``q.dtype``.

    Shapes and masks as ``block_attention_forward``; ``scale`` None means ``1/sqrt(D)``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _LocalAttention.apply(q, k, v, scale, mask, kv_keep)
