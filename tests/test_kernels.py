"""Local block attention kernels and the LSE merge against SDPA (math backend, float64).

The reference mask is built here from global positions, independently of the kernels' tile
classification; rows with no visible key are expected at out 0, lse ``EMPTY_LSE`` (the lowest
finite fp32) and zero gradients.
"""
import os
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nxd_cp.attention import dispatch as kernels
from nxd_cp.attention.dispatch import (
    block_attention_backward,
    block_attention_forward,
    local_attention,
    register_kernel,
)
from nxd_cp.attention.documents import DocumentMask
from nxd_cp.attention.fused import CpuFlashKernel, CudaSdpaKernel
from nxd_cp.attention.kernels import EMPTY_LSE, TorchBlockKernel
from nxd_cp.attention.merge import merge_partial
from nxd_cp.attention.schedule import BlockMask
from nxd_cp.attention.tile_loop import TileLoopKernel, tile_rows

NEG_INF = float("-inf")


class Dispatched:
    """The public entry points: the device's registered kernel where it supports the call."""
    forward = staticmethod(block_attention_forward)
    backward = staticmethod(block_attention_backward)

    @staticmethod
    def supports(q, k, mask, kv_keep):
        return True


SMALL_TILES = TorchBlockKernel(tile_q=64, tile_k=48)  # several tiles, ragged last tiles
KERNELS = {"torch": SMALL_TILES, "cpu_fused": CpuFlashKernel(), "dispatch": Dispatched()}

# name -> (Sq, Sk, mask); positions chosen so every tile class (empty/full/partial) occurs.
CASES = {
    "no_mask": (200, 333, None),
    "diag_causal": (200, 200, BlockMask(0, 0)),
    "offset_causal": (200, 333, BlockMask(q_start=400, k_start=150)),
    "diag_window_small": (200, 200, BlockMask(300, 300, window=50)),
    "diag_window_large": (200, 200, BlockMask(0, 0, window=500)),
    "offset_window": (200, 333, BlockMask(q_start=400, k_start=150, window=120)),
    "future_keys": (200, 333, BlockMask(q_start=0, k_start=300)),
}


def rand(shape, gen, dtype=torch.float32):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def make_qkv(gen, b=2, hq=8, hkv=2, sq=200, sk=333, d=64, dtype=torch.float32):
    return rand((b, hq, sq, d), gen, dtype), rand((b, hkv, sk, d), gen, dtype), \
        rand((b, hkv, sk, d), gen, dtype)


def visibility(sq, sk, mask, kv_keep=None):
    """Bool [B or 1, 1, Sq, Sk]: key kp visible to query qp under ``mask`` and ``kv_keep``."""
    vis = torch.ones(sq, sk, dtype=torch.bool)
    if mask is not None:
        qp = torch.arange(sq).view(-1, 1) + mask.q_start
        kp = torch.arange(sk).view(1, -1) + mask.k_start
        if mask.causal:
            vis &= kp <= qp
        if mask.window is not None:
            vis &= (qp - kp) < mask.window
    vis = vis.view(1, 1, sq, sk)
    if kv_keep is not None:
        vis = vis & kv_keep.view(kv_keep.shape[0], 1, 1, sk)
    return vis


def reference(q, k, v, vis, scale, dout):
    """SDPA (math backend, float64) out, lse and autograd dq, dk, dv."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=vis, scale=scale,
                                             enable_gqa=True)
    out.backward(dout.double())
    g = q.shape[1] // k.shape[1]
    scores = scale * q64.detach() @ k64.detach().repeat_interleave(g, 1).transpose(-1, -2)
    lse = torch.logsumexp(scores.masked_fill(~vis, NEG_INF), dim=-1)
    return out.detach(), lse, q64.grad, k64.grad, v64.grad


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_lse(lse, ref_lse):
    """Close where the reference is finite (abs error returned), ``EMPTY_LSE`` exactly where the
    reference is -inf (no visible key)."""
    empty = ref_lse == NEG_INF
    assert torch.equal(lse == EMPTY_LSE, empty)
    return (lse.double() - ref_lse)[~empty].abs().max().item() if (~empty).any() else 0.0


def run_kernel(kernel, q, k, v, dout, scale, mask=None, kv_keep=None):
    out, lse = kernel.forward(q, k, v, scale=scale, mask=mask, kv_keep=kv_keep)
    grads = kernel.backward(dout, q, k, v, out, lse, scale=scale, mask=mask, kv_keep=kv_keep)
    for t in (out, lse, *grads):
        assert t.dtype == torch.float32 and not t.isnan().any()
    return out, lse, grads


# The fused CPU op runs only where it is exact; the other cases fall back to pure torch.
KERNEL_CASES = [("torch", c) for c in CASES] + [
    ("cpu_fused", c) for c in ("no_mask", "diag_causal", "diag_window_large")] + [
    ("dispatch", c) for c in ("diag_causal", "offset_window")]


@pytest.mark.parametrize("kernel_name,case", KERNEL_CASES)
@pytest.mark.parametrize("d", [64, 80])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2), (8, 1)])
def test_block_fp32_matches_sdpa(kernel_name, case, d, hq, hkv):
    kernel = KERNELS[kernel_name]
    sq, sk, mask = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case}-{d}-{hq}-{hkv}".encode()))
    q, k, v = make_qkv(gen, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d)
    assert kernel.supports(q, k, mask, None)
    dout = rand(q.shape, gen)
    scale = d ** -0.5
    vis = visibility(sq, sk, mask)
    ref_out, ref_lse, *ref_grads = reference(q, k, v, vis, scale, dout)
    out, lse, grads = run_kernel(kernel, q, k, v, dout, scale, mask)
    assert rel_err(out, ref_out) <= 1e-5  # fp32 compute vs float64: rounding only
    assert check_lse(lse, ref_lse) <= 1e-4  # |lse| ~ 5: a few fp32 ulps of the log-sum
    for g, ref_g in zip(grads, ref_grads):
        assert rel_err(g, ref_g) <= 1e-4  # fp32 recompute backward (two matmul chains)
    if not vis.any():
        assert not out.any() and all(not g.any() for g in grads)


@pytest.mark.parametrize("kernel_name", list(KERNELS))
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2)])
def test_block_bf16_within_te_bounds(kernel_name, hq, hkv):
    kernel = KERNELS[kernel_name]
    gen = torch.Generator().manual_seed(11)
    mask = BlockMask(0, 0)
    q, k, v = make_qkv(gen, hq=hq, hkv=hkv, sq=200, sk=200, dtype=torch.bfloat16)
    dout = rand(q.shape, gen, torch.bfloat16)
    ref_out, _, *ref_grads = reference(q, k, v, visibility(200, 200, mask), 0.125, dout)
    out, _, grads = run_kernel(kernel, q, k, v, dout, 0.125, mask)
    tol = 2.5e-2 if hq == hkv else 3.5e-2  # TransformerEngine's bf16 bounds (GQA looser)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), ref_g, atol=tol, rtol=tol)


@pytest.mark.parametrize("mask", [None, BlockMask(q_start=0, k_start=0)], ids=["no_mask", "causal"])
def test_kv_keep_with_fully_masked_rows(mask):
    """Random keys dropped; batch 1 drops every key, so its rows see nothing."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(gen, hq=8, hkv=2, sq=200, sk=200, d=64)
    kv_keep = torch.rand((2, 200), generator=gen) > 0.3
    kv_keep[0, 0] = False  # causal: query 0 of batch 0 sees only key 0 -> fully masked row
    kv_keep[1] = False
    dout = rand(q.shape, gen)
    vis = visibility(200, 200, mask, kv_keep)
    ref_out, ref_lse, *ref_grads = reference(q, k, v, vis, 0.125, dout)
    out, lse, grads = run_kernel(SMALL_TILES, q, k, v, dout, 0.125, mask, kv_keep)
    assert rel_err(out, ref_out) <= 1e-5  # fp32 vs float64 rounding
    assert check_lse(lse, ref_lse) <= 1e-4  # fp32 ulps of the log-sum
    for g, ref_g in zip(grads, ref_grads):
        assert rel_err(g, ref_g) <= 1e-4  # fp32 recompute backward
    assert not out[1].any() and not grads[0][1].any()


# (Q positions, KV split points, mask): ring-like halves (both blocks exact for the fused CPU
# op) and an uneven split of an unmasked row.
SPLITS = {
    "causal_ring_halves": (128, 256, 128, BlockMask(q_start=128, k_start=0)),
    "no_mask_uneven": (0, 333, 100, None),
}


@pytest.mark.parametrize("kernel_name", list(KERNELS))
@pytest.mark.parametrize("split", list(SPLITS))
def test_split_kv_merge_equals_full_attention(kernel_name, split):
    """Forward per KV block + merge, backward per block with the merged out/lse: dq summed
    and dk/dv concatenated equal the gradients of full attention."""
    kernel = KERNELS[kernel_name]
    q_start, sk, cut, mask = SPLITS[split]
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(gen, hq=8, hkv=2, sq=128, sk=sk, d=64)
    dout = rand(q.shape, gen)
    blocks = [(slice(0, cut), 0), (slice(cut, sk), cut)]

    def block_mask(k_start):
        return None if mask is None else BlockMask(q_start=q_start, k_start=k_start)

    partials = []
    for sl, k_start in blocks:
        assert kernel.supports(q, k[:, :, sl], block_mask(k_start), None)
        partials.append(kernel.forward(q, k[:, :, sl], v[:, :, sl], scale=0.125,
                                       mask=block_mask(k_start)))
    out, lse = merge_partial(*partials[0], *partials[1])
    grads = [kernel.backward(dout, q, k[:, :, sl], v[:, :, sl], out, lse, scale=0.125,
                             mask=block_mask(k_start)) for sl, k_start in blocks]
    dq = grads[0][0] + grads[1][0]
    dk = torch.cat([g[1] for g in grads], dim=2)
    dv = torch.cat([g[2] for g in grads], dim=2)

    full_mask = None if mask is None else BlockMask(q_start=q_start, k_start=0)
    ref_out, ref_lse, *ref_grads = reference(q, k, v, visibility(128, sk, full_mask), 0.125, dout)
    assert rel_err(out, ref_out) <= 1e-5  # fp32 blocks + fp32 merge vs float64
    assert check_lse(lse, ref_lse) <= 1e-4  # fp32 ulps of the log-sum
    for g, ref_g in zip((dq, dk, dv), ref_grads):
        assert rel_err(g, ref_g) <= 1e-4  # fp32 recompute backward


def test_merge_partial_empty_and_masked_rows():
    """Row 0 empty on both sides, row 1 empty on side a, row 2 empty on side b (EMPTY_LSE, out
    0); row 3 a masked contribution (lse_b -inf: side a kept exactly); row 4 regular."""
    gen = torch.Generator().manual_seed(1)
    out_a, out_b = rand((1, 2, 5, 8), gen), rand((1, 2, 5, 8), gen)
    lse_a, lse_b = rand((1, 2, 5), gen), rand((1, 2, 5), gen)
    lse_a[:, :, 0] = lse_b[:, :, 0] = EMPTY_LSE
    lse_a[:, :, 1] = EMPTY_LSE
    lse_b[:, :, 2] = EMPTY_LSE
    lse_b[:, :, 3] = NEG_INF
    for out, lse in ((out_a, lse_a), (out_b, lse_b)):
        out[lse == EMPTY_LSE] = 0.0
    out, lse = merge_partial(out_a, lse_a, out_b, lse_b)
    assert not out.isnan().any() and not lse.isnan().any() and out.isfinite().all()
    assert not out[:, :, 0].any() and (lse[:, :, 0] == EMPTY_LSE).all()
    assert torch.equal(out[:, :, 1], out_b[:, :, 1]) and torch.equal(lse[:, :, 1], lse_b[:, :, 1])
    torch.testing.assert_close(out[:, :, 2], out_a[:, :, 2], atol=0, rtol=1e-6)  # 1 - 0 weights
    assert torch.equal(out[:, :, 3], out_a[:, :, 3]) and torch.equal(lse[:, :, 3], lse_a[:, :, 3])
    # fp32 log-sum of two terms: a few ulps
    torch.testing.assert_close(lse[:, :, 4], torch.logaddexp(lse_a, lse_b)[:, :, 4])


@pytest.mark.parametrize("force_torch", [False, True])
def test_local_attention_autograd(force_torch):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (x.requires_grad_() for x in make_qkv(gen, hq=8, hkv=1, sq=96, sk=96, d=80))
    mask = BlockMask(50, 50, window=30)
    dout = rand(q.shape, gen)
    with kernels.reference_kernel_only(force_torch):
        out = local_attention(q, k, v, mask=mask)
        out.backward(dout)
    ref_out, _, *ref_grads = reference(q, k, v, visibility(96, 96, mask), 80 ** -0.5, dout)
    assert out.dtype == q.dtype
    assert rel_err(out.detach(), ref_out) <= 1e-5  # fp32 vs float64 rounding
    for x, ref_g in zip((q, k, v), ref_grads):
        assert rel_err(x.grad, ref_g) <= 1e-4  # fp32 recompute backward


class SpyKernel(TorchBlockKernel):
    def __init__(self, supported):
        super().__init__()
        self.supported, self.calls = supported, 0

    def supports(self, q, k, mask, kv_keep):
        return self.supported

    def forward(self, *args, **kwargs):
        self.calls += 1
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize("reference_only,supported,expect_calls", [
    (False, True, 1), (True, True, 0), (False, False, 0)])
def test_dispatch_registry_and_reference_switch(reference_only, supported, expect_calls):
    spy = SpyKernel(supported)
    previous = register_kernel("cpu", spy)
    initial = kernels.use_reference_kernel(False)
    kernels.use_reference_kernel(initial)
    try:
        gen = torch.Generator().manual_seed(6)
        q, k, v = make_qkv(gen, sq=16, sk=16, d=8)
        with kernels.reference_kernel_only(reference_only):
            block_attention_forward(q, k, v, scale=0.3)
            expected_default = kernels.REFERENCE_KERNEL if reference_only else spy
            assert kernels.get_kernel("cpu") is expected_default
        assert spy.calls == expect_calls
        assert kernels.use_reference_kernel(initial) is initial  # restored after the block
    finally:
        register_kernel("cpu", previous)
    assert isinstance(kernels.get_kernel("cpu"), (CpuFlashKernel, TorchBlockKernel))


def test_kernel_environment_variable_read_at_import(monkeypatch):
    """NXD_CP_KERNEL sets the initial switch (read once, when dispatch is imported)."""
    for value, expected in (("torch", True), ("auto", False)):
        monkeypatch.setenv(kernels.KERNEL_ENV, value)
        assert kernels._reference_from_env() is expected
    monkeypatch.delenv(kernels.KERNEL_ENV)
    assert kernels._reference_from_env() is False
    monkeypatch.setenv(kernels.KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="NXD_CP_KERNEL='fast' must be 'auto' or 'torch'"):
        kernels._reference_from_env()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="window=8 requires causal=True"):
        BlockMask(0, 0, causal=False, window=8)


def test_fused_cpu_kernel_only_where_exact():
    kernel = CpuFlashKernel()
    exact = {"no_mask", "diag_causal", "diag_window_large"}
    for case, (sq, sk, mask) in CASES.items():
        q, k = torch.empty(1, 2, sq, 8), torch.empty(1, 1, sk, 8)
        assert kernel.supports(q, k, mask, None) == (case in exact), case
    q, k = torch.empty(1, 2, 64, 8), torch.empty(1, 1, 32, 8)
    assert kernel.supports(q, k, BlockMask(q_start=64, k_start=32), None)  # wholly visible
    assert not kernel.supports(q, k, None, torch.ones(1, 32, dtype=torch.bool))


def test_cuda_kernel_plumbing_on_meta_tensors():
    """Argument order and shapes of the CUDA ops, checked against their meta kernels (no GPU)."""
    kernel = CudaSdpaKernel()
    q = torch.empty(2, 8, 70, 64, device="meta")
    k = v = torch.empty(2, 2, 70, 64, device="meta")
    assert kernel.supports(q, k, BlockMask(0, 0), None)
    assert not kernel.supports(q, k, BlockMask(0, 0, window=10), None)
    out, lse = kernel.forward(q, k, v, scale=0.125, mask=BlockMask(0, 0))
    assert out.shape == q.shape and lse.shape == (2, 8, 70) and lse.dtype == torch.float32
    dq, dk, dv = kernel.backward(out, q, k, v, out, lse, scale=0.125, mask=BlockMask(0, 0))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_pure_torch_kernel_on_xla_matches_cpu():
    """The XLA/Neuron path: the same pure-torch kernel traced by torch-xla (CPU PJRT)."""
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    torch_xla = pytest.importorskip("torch_xla")
    dev = torch_xla.device()
    kernel = TorchBlockKernel(tile_q=16, tile_k=16)
    mask = BlockMask(q_start=24, k_start=8, window=20)
    gen = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(gen, b=1, hq=4, hkv=2, sq=40, sk=40, d=16)
    dout = rand(q.shape, gen)
    kv_keep = torch.rand((1, 40), generator=gen) > 0.2
    cpu = run_kernel(kernel, q, k, v, dout, 0.25, mask, kv_keep)
    on_dev = [x.to(dev) for x in (q, k, v, dout, kv_keep)]
    out, lse = kernel.forward(*on_dev[:3], scale=0.25, mask=mask, kv_keep=on_dev[4])
    grads = kernel.backward(on_dev[3], *on_dev[:3], out, lse, scale=0.25, mask=mask,
                            kv_keep=on_dev[4])
    assert rel_err(out.cpu(), cpu[0].double()) <= 1e-5  # same fp32 math, XLA CPU codegen
    assert torch.equal(lse.cpu() == EMPTY_LSE, cpu[1] == EMPTY_LSE)
    for g, ref_g in zip(grads, cpu[2]):
        assert rel_err(g.cpu(), ref_g.double()) <= 1e-5  # same fp32 math



def test_tile_loop_kernel_on_xla_matches_sdpa():
    """The XLA kernel for blocks above its block size: a loop over Q tiles inside the graph
    (block 48 here: 200 x 333 blocks run as 40 tiles of 5 rows). Every mask class, a
    device-data ``q_start``, fully padded rows and packed documents, vs float64 SDPA."""
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    torch_xla = pytest.importorskip("torch_xla")
    assert tile_rows(200, 333, 48) == 5 and tile_rows(4096, 4096, 2048) == 1024
    assert tile_rows(7, 10**6, 2) == 1  # at least one row
    dev = torch_xla.device()
    kernel = TileLoopKernel(48)
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(gen, b=2, hq=4, hkv=2, sq=200, sk=333, d=16)
    dout = rand(q.shape, gen)
    keep = torch.rand((2, 333), generator=gen) > 0.3
    keep[0, :] = False  # batch row 0: no key at all
    q_ids = torch.sort(torch.randint(0, 4, (2, 200), generator=gen), 1).values.int()
    k_ids = torch.sort(torch.randint(0, 4, (2, 333), generator=gen), 1).values.int()
    same_doc = (q_ids[:, :, None] == k_ids[:, None, :])[:, None]  # [B, 1, Sq, Sk]
    # Mask classes (compiling each case dominates the cost: a few of CASES, not all)
    cases = {name: (CASES[name][2], None, None)
             for name in ("no_mask", "diag_window_small", "offset_window", "future_keys")}
    cases["device_q_start"] = (BlockMask(q_start=torch.tensor(400, dtype=torch.int32),
                                         k_start=150, window=120), None, None)
    cases["padded"] = (BlockMask(q_start=400, k_start=150), keep, None)
    cases["documents"] = (BlockMask(q_start=400, k_start=150), None, (q_ids, k_ids))
    for name, (mask, kv_keep, docs) in cases.items():
        static = mask if mask is None or mask.is_static else BlockMask(
            int(mask.q_start), mask.k_start, mask.causal, mask.window)
        vis = visibility(200, 333, static, kv_keep) & (True if docs is None else same_doc)
        ref_out, ref_lse, *ref_grads = reference(q, k, v, vis, 0.25, dout)
        on_mask = mask if mask is None or mask.is_static else BlockMask(
            mask.q_start.to(dev), mask.k_start, mask.causal, mask.window)
        extra = dict(mask=on_mask, kv_keep=None if kv_keep is None else kv_keep.to(dev),
                     documents=None if docs is None else DocumentMask(*(d.to(dev) for d in docs)))
        qd, kd, vd, dd = (x.to(dev) for x in (q, k, v, dout))
        out, lse = kernel.forward(qd, kd, vd, scale=0.25, **extra)
        grads = kernel.backward(dd, qd, kd, vd, out, lse, scale=0.25, **extra)
        assert rel_err(out.cpu(), ref_out) <= 1e-5, name  # fp32 vs float64: rounding only
        assert check_lse(lse.cpu(), ref_lse) <= 1e-4, name  # a few fp32 ulps of |lse| ~ 5
        for g, ref_g in zip(grads, ref_grads):
            assert rel_err(g.cpu(), ref_g) <= 1e-4, name  # fp32 recompute backward
