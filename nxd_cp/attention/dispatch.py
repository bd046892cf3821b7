"""Kernel registry and the block-attention entry points every CP algorithm calls.

``register_kernel`` plugs a kernel in per device type (built in: the fused SDPA ops on CPU and
CUDA; on XLA ``tile_loop.TileLoopKernel``, one large pure-torch tile or a loop over tiles inside
the graph; an NKI kernel would register for ``"xla"``).
``use_reference_kernel(True)`` (or the context manager ``reference_kernel_only()``) forces the
pure-torch reference kernel (small tiles) on every device, a registry setting like
``register_kernel``. Its initial value comes from the environment variable ``NXD_CP_KERNEL``
(``auto``, the default, or ``torch``), read once when this module is imported.
Shapes as ``kernels.py``; callers (the CP algorithms, validated once by the api) pass
consistent shapes, so nothing is re-checked per block.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from nxd_cp.attention.fused import CpuFlashKernel, CudaSdpaKernel
from nxd_cp.attention.kernels import EMPTY_LSE, BlockKernel, TorchBlockKernel
from nxd_cp.attention.schedule import BlockMask
from nxd_cp.attention.tile_loop import TileLoopKernel

KERNEL_ENV = "NXD_CP_KERNEL"

REFERENCE_KERNEL = TorchBlockKernel()
# XLA: a block of at most XLA_BLOCK x XLA_BLOCK scores is one unrolled tile (the zigzag halves up
# to S_local = 2*XLA_BLOCK), a larger one a loop over Q tiles inside the graph (tile_loop.py), so
# the graph does not grow with the sequence; one tile's scores buffer is at most
# B * Hq * XLA_BLOCK^2 * 4 bytes. Register TileLoopKernel(block) for "xla" to trade graph size
# against that buffer.
XLA_BLOCK = 2048
_KERNELS: Dict[str, BlockKernel] = {"cpu": CpuFlashKernel(), "cuda": CudaSdpaKernel(),
                                    "xla": TileLoopKernel(XLA_BLOCK)}


def register_kernel(device_type: str, kernel: Optional[BlockKernel]) -> Optional[BlockKernel]:
    """Use ``kernel`` for tensors on ``device_type`` (``"cpu"``, ``"cuda"``, ``"xla"``) where it
    ``supports`` the call; ``None`` unregisters. Returns the kernel registered before."""
    previous = _KERNELS.pop(device_type, None)
    if kernel is not None:
        _KERNELS[device_type] = kernel
    return previous


def _reference_from_env() -> bool:
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in ("auto", "torch"):
        raise ValueError(f"{KERNEL_ENV}={choice!r} must be 'auto' or 'torch'")
    return choice == "torch"


_reference_only = _reference_from_env()  # NXD_CP_KERNEL is read once, at import


def use_reference_kernel(enabled: bool) -> bool:
    """Run every block on the pure-torch reference kernel (``True``) or on the registered
    kernels (``False``). Returns the setting before."""
    global _reference_only
    previous, _reference_only = _reference_only, bool(enabled)
    return previous


@contextlib.contextmanager
def reference_kernel_only(enabled: bool = True) -> Iterator[None]:
    """``use_reference_kernel(enabled)`` inside the block, the previous setting after it."""
    previous = use_reference_kernel(enabled)
    try:
        yield
    finally:
        use_reference_kernel(previous)


def get_kernel(device_type: str) -> BlockKernel:
    """The kernel for ``device_type``: the registered one, else the pure-torch reference;
    always the reference under ``use_reference_kernel(True)``."""
    if _reference_only:
        return REFERENCE_KERNEL
    return _KERNELS.get(device_type, REFERENCE_KERNEL)


def _select(q: Tensor, k: Tensor, v: Tensor, mask: Optional[BlockMask],
            kv_keep: Optional[Tensor], documents=None) -> BlockKernel:
    kernel = get_kernel(q.device.type)
    if documents is not None:  # a document term: a kernel that takes one (XLA's large tiles)
        return kernel if getattr(kernel, "supports_documents", False) else REFERENCE_KERNEL
    return kernel if kernel.supports(q, k, mask, kv_keep) else REFERENCE_KERNEL


def _document_kwargs(documents) -> dict:
    # Kernels without a document term keep their signature: they get no ``documents=``.
    return {} if documents is None else {"documents": documents}


def block_attention_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                            mask: Optional[BlockMask] = None,
                            kv_keep: Optional[Tensor] = None,
                            documents=None) -> Tuple[Tensor, Tensor]:
    """Attention of one Q block over one KV block, as a partial result for LSE merging.

    ``q`` ``[B, Hq, Sq, D]``, ``k``/``v`` ``[B, Hkv, Sk, D]`` (``Hq % Hkv == 0``; K/V are not
    repeated by the caller). ``mask`` None: every key visible. ``kv_keep``: optional bool
    ``[B, Sk]``, True = the key may be attended. ``documents``: optional
    ``documents.DocumentMask`` (packed documents), ANDed too. Returns ``out`` fp32
    ``[B, Hq, Sq, D]`` and ``lse`` fp32 ``[B, Hq, Sq]``, the natural-log logsumexp of
    ``scale * q.k`` over the visible keys. Rows with no visible key: ``out = 0``,
    ``lse = EMPTY_LSE`` (the lowest finite fp32; a registered kernel may return ``-inf``
    there, which is raised to it). Dispatches on ``q.device.type``.
    """
    kernel = _select(q, k, v, mask, kv_keep, documents)
    out, lse = kernel.forward(q, k, v, scale=scale, mask=mask, kv_keep=kv_keep,
                              **_document_kwargs(documents))
    if not isinstance(kernel, (TorchBlockKernel, TileLoopKernel)):
        lse = lse.clamp_min(EMPTY_LSE)
    return out, lse


def block_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                             lse: Tensor, *, scale: float, mask: Optional[BlockMask] = None,
                             kv_keep: Optional[Tensor] = None,
                             documents=None) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of one (Q block, KV block) pair, FlashAttention-style recompute.

    ``out`` fp32 ``[B, Hq, Sq, D]`` and ``lse`` fp32 ``[B, Hq, Sq]`` are the final *merged*
    results of the rows (over all KV blocks), not this block's partials; ``dout`` has ``q``'s
    shape, any float dtype. Returns fp32 ``dq``, ``dk``, ``dv`` with the shapes of ``q``, ``k``,
    ``v`` (``dk``/``dv`` summed over the query heads of each KV head). Rows with
    ``lse = EMPTY_LSE`` (no visible key) contribute nothing.
    """
    kernel = _select(q, k, v, mask, kv_keep, documents)
    return kernel.backward(dout, q, k, v, out, lse, scale=scale, mask=mask, kv_keep=kv_keep,
                           **_document_kwargs(documents))


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, mask, kv_keep, documents=None):
        out, lse = block_attention_forward(q, k, v, scale=scale, mask=mask, kv_keep=kv_keep,
                                           documents=documents)
        # Saved in the input dtype (as the CP paths and FlashAttention do) and in [B, S, H, D]
        # memory order (see loop.ContextParallelAttentionFunction).
        b, h, s, d = q.shape
        out = q.new_empty((b, s, h, d)).transpose(1, 2).copy_(out)
        ctx.save_for_backward(q, k, v, out, lse, kv_keep)
        ctx.scale, ctx.mask, ctx.documents = scale, mask, documents
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, kv_keep = ctx.saved_tensors
        dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, scale=ctx.scale,
                                              mask=ctx.mask, kv_keep=kv_keep,
                                              documents=ctx.documents)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def local_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                    mask: Optional[BlockMask] = None, kv_keep: Optional[Tensor] = None,
                    documents=None) -> Tensor:
    """Differentiable attention of one block, ``out`` ``[B, Hq, Sq, D]`` in ``q.dtype``.

    Shapes and masks as ``block_attention_forward``; ``scale`` None means ``1/sqrt(D)``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _LocalAttention.apply(q, k, v, scale, mask, kv_keep, documents)
