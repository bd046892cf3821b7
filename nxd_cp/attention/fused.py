"""Fused attention ops of torch as block kernels, for the masks they compute exactly.

``CpuFlashKernel`` (CPU) and ``CudaSdpaKernel`` (CUDA) are registered by default
(``dispatch``); each ``supports`` only unmasked blocks and diagonal causal blocks with static
positions, and the dispatcher falls back to the pure-torch kernel for everything else.
Shapes as ``kernels.py``. The aten ops are private: they are called through
``nxd_cp.compat.torch`` only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from nxd_cp.attention.kernels import finite_lse, group_heads
from nxd_cp.attention.schedule import BlockMask, Visibility, visibility
from nxd_cp.compat import torch as torch_compat


def _fused_is_causal(q: Tensor, k: Tensor, mask: Optional[BlockMask]) -> Optional[bool]:
    """The ``is_causal`` flag under which a fused SDPA op computes ``mask`` exactly, or None.

    Exact cases: every key visible (``False``), or a diagonal block with a causal mask whose
    window (if any) covers the whole block (``True``: top-left causal, as Sq == Sk).
    """
    sq, sk = q.shape[2], k.shape[2]
    if mask is None:
        return False
    if not mask.is_static:
        return None
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
        return torch_compat.cpu_flash_attention(q.float(), k.float(), v.float(),
                                                _fused_is_causal(q, k, mask), scale)

    def backward(self, dout, q, k, v, out, lse, *, scale, mask=None, kv_keep=None):
        return torch_compat.cpu_flash_attention_backward(
            dout.float(), q.float(), k.float(), v.float(), out.float(), finite_lse(lse.float()),
            _fused_is_causal(q, k, mask), scale)


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
        out, lse = torch_compat.cuda_efficient_attention(
            q, self._expand(k, g), self._expand(v, g), _fused_is_causal(q, k, mask), scale)
        return out.float(), lse[:, :, :q.shape[2]].float()  # lse [B, Hq, Sq (padded)] -> Sq

    def backward(self, dout, q, k, v, out, lse, *, scale, mask=None, kv_keep=None):
        hkv, sq = k.shape[1], q.shape[2]
        g = q.shape[1] // hkv
        lse = finite_lse(lse.float())
        if not torch.version.hip:
            lse = F.pad(lse, (0, -sq % 32))
        dq, dk, dv = torch_compat.cuda_efficient_attention_backward(
            dout.to(q.dtype), q, self._expand(k, g), self._expand(v, g), out.to(q.dtype),
            lse.contiguous(), _fused_is_causal(q, k, mask), scale)
        # [B, Hq, Sk, D] -> [B, Hkv, G, Sk, D], summed over the G query heads of a KV head
        dk, dv = (group_heads(x.float(), hkv).sum(2) for x in (dk, dv))
        return dq.float(), dk, dv
