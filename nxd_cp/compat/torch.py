"""torch's private APIs nxd_cp uses, behind one door.

Tested on torch 2.9.0 (``SUPPORTED``); outside that range each function still tries, and a
missing private name becomes a ``RuntimeError`` that names the torch version and this module,
never an ``AttributeError`` deep in a step.

* the world group's timeout: ``distributed_c10d._get_default_group()``, its backend's
  ``options._timeout`` (any group's: ``ProcessGroup._get_backend(device).options._timeout``);
* the default key-value store: ``distributed_c10d._get_default_store()``;
* a tensor's in-place version counter: ``Tensor._version``;
* CPU fused flash attention with its LSE: ``aten._scaled_dot_product_flash_attention_for_cpu``
  (and ``_backward``);
* CUDA memory-efficient attention: ``aten._scaled_dot_product_efficient_attention`` (and
  ``_backward``);
* pipelining's stage warm-up ``PipelineStage._get_init_p2p_neighbors_ops`` (a torch 2.9 gloo
  bug worked around there, version-gated: ``pipeline_stage_class``).
"""
from __future__ import annotations

import datetime
import logging
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

SUPPORTED = ("2.9",)  # major.minor versions these calls were tested on


def version_note() -> str:
    tested = ", ".join(SUPPORTED)
    return f"torch {torch.__version__} (nxd_cp.compat.torch is tested on torch {tested}.x)"


def is_supported(version: str) -> bool:
    """Whether ``version`` (e.g. ``"2.9.0+cu128"``) is a major.minor of ``SUPPORTED``."""
    return ".".join(version.split("+")[0].split(".")[:2]) in SUPPORTED


if not is_supported(torch.__version__):
    logging.getLogger("nxd_cp").warning("nxd_cp: untested %s; its private calls fail with a "
                                        "RuntimeError naming the missing API", version_note())


def _missing(what: str, error: Exception) -> RuntimeError:
    return RuntimeError(f"{what} is not available in {version_note()}: {error}")


# --- c10d ----------------------------------------------------------------------------------
def group_timeout(group: Any, device: str = "cpu") -> Optional[datetime.timedelta]:
    """The collective timeout of ``group`` on ``device``'s backend, None if it has none."""
    try:
        backend = group._get_backend(torch.device(device))
    except (AttributeError, RuntimeError):
        return None
    t = getattr(getattr(backend, "options", None), "_timeout", None)
    return t if isinstance(t, datetime.timedelta) else None


def world_timeout() -> Optional[datetime.timedelta]:
    """The timeout of the default (world) process group; None where it cannot be read (then
    torch's default applies)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        pg = dist.distributed_c10d._get_default_group()
        devices = list(pg._device_types)
    except (AttributeError, RuntimeError):
        return None
    for dev in devices:
        t = group_timeout(pg, str(dev))
        if t is not None:
            return t
    return None


def default_store() -> Optional[Any]:
    """torch.distributed's key-value store of the default process group, or None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # no store reachable
        return None


def tensor_version(t: torch.Tensor) -> int:
    """The in-place modification counter of ``t`` (``Tensor._version``)."""
    return t._version


# --- fused attention ops -------------------------------------------------------------------
def cpu_flash_attention(q, k, v, is_causal: bool, scale: float) -> Tuple[torch.Tensor, ...]:
    """``(out, lse)`` of the CPU flash op: q ``[B, Hq, S, D]``, k/v ``[B, Hkv, S_k, D]`` (fp32),
    ``lse`` fp32 ``[B, Hq, S]`` (natural log)."""
    try:
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except AttributeError as e:
        raise _missing("aten._scaled_dot_product_flash_attention_for_cpu", e) from e
    out, lse = op(q, k, v, 0.0, is_causal, scale=scale)
    return out, lse


def cpu_flash_attention_backward(dout, q, k, v, out, lse, is_causal: bool,
                                 scale: float) -> Tuple[torch.Tensor, ...]:
    """``(dq, dk, dv)`` of the CPU flash op; ``out`` / ``lse`` may be the merged ones of the
    whole row (what the CP algorithms pass)."""
    try:
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    except AttributeError as e:
        raise _missing("aten._scaled_dot_product_flash_attention_for_cpu_backward", e) from e
    return op(dout, q, k, v, out, lse, 0.0, is_causal, scale=scale)


def cuda_efficient_attention(q, k, v, is_causal: bool, scale: float):
    """``(out, lse)`` of CUDA's memory-efficient op (equal head counts; lse padded on the
    sequence dim to a multiple of 32 on CUDA)."""
    try:
        op = torch.ops.aten._scaled_dot_product_efficient_attention
    except AttributeError as e:
        raise _missing("aten._scaled_dot_product_efficient_attention", e) from e
    out, lse, _, _ = op(q, k, v, None, True, 0.0, is_causal, scale=scale)
    return out, lse


def cuda_efficient_attention_backward(dout, q, k, v, out, lse, is_causal: bool, scale: float):
    """``(dq, dk, dv)`` of CUDA's memory-efficient op (no dropout, no bias)."""
    try:
        op = torch.ops.aten._scaled_dot_product_efficient_attention_backward
    except AttributeError as e:
        raise _missing("aten._scaled_dot_product_efficient_attention_backward", e) from e
    no_dropout = torch.zeros((), dtype=torch.int64, device=q.device)  # philox seed / offset
    dq, dk, dv, _ = op(dout, q, k, v, None, out, lse, no_dropout, no_dropout, 0.0,
                       [True, True, True, False], is_causal, scale=scale)
    return dq, dk, dv


# --- torch.distributed.pipelining -------------------------------------------------------------
def _p2p_warmup_in_float32(ops):
    """torch 2.9.0's stage warm-up (``_get_init_p2p_neighbors_ops``) sends an int64 scalar into
    a float32 receive buffer; gloo checks sizes and fails (``8 vs 4``; fixed upstream after
    2.9.0, pytorch PR #165539). The warm-up only opens the connections: send float32 instead."""
    fixed = []
    for op in ops:
        if op.tensor.dtype == torch.int64:
            op = dist.P2POp(op.op, op.tensor.to(torch.float32), group=op.group,
                            group_peer=op.group_peer)
        fixed.append(op)
    return fixed


def pipeline_stage_class():
    """``torch.distributed.pipelining.PipelineStage``; on torch 2.9 a subclass whose warm-up
    sends float32 (``_p2p_warmup_in_float32``), later versions unchanged."""
    from torch.distributed.pipelining import PipelineStage

    if not torch.__version__.startswith("2.9."):
        return PipelineStage
    if not hasattr(PipelineStage, "_get_init_p2p_neighbors_ops"):
        raise RuntimeError(f"PipelineStage._get_init_p2p_neighbors_ops is missing in "
                           f"{version_note()}")

    class _Float32WarmupStage(PipelineStage):
        def _get_init_p2p_neighbors_ops(self):
            return _p2p_warmup_in_float32(super()._get_init_p2p_neighbors_ops())

    return _Float32WarmupStage
