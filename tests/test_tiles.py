"""The XLA tile loop's tiles never degenerate (``tile_loop.tile_plan``), and padded tiles are exact.

Before: the tile was the largest divisor of the query rows within the scores bound, so a prime
zigzag half (``S_local = 8198`` -> 4099 rows) ran 4099 one-row trips per product. Now a divisor
is taken only when it is at least ``min(sq, 64, ceil(limit / 2))`` rows and at most twice the
fewest trips; otherwise equal tiles with the last one padded.

Exactness reference: the pure-torch block kernel (``TorchBlockKernel``) on CPU, the same fp32
math: forward 1e-5 relative (XLA:CPU codegen vs eager rounding), gradients 1e-4 (fp32
recompute backward, the project's fp32 gradient bound); the padded rows add exactly zero to
dK / dV (their dout, lse and delta are zero).
"""
import os
import re

import pytest
import torch
from test_kernels import make_qkv, rand, rel_err

from nxd_cp.attention.documents import DocumentMask
from nxd_cp.attention.kernels import EMPTY_LSE, TorchBlockKernel
from nxd_cp.attention.schedule import BlockMask
from nxd_cp.attention.tile_loop import FLOOR, TileLoopKernel, tile_plan, tile_rows

PRIMES = [2, 3, 5, 7, 11, 13, 101, 127, 509, 1021, 2039, 2053, 4099, 8191, 16381, 32771]


def _check(sq, sk, block):
    tq, n = tile_plan(sq, sk, block)
    limit = min(sq, max(1, block * block // sk))
    assert tq * sk <= max(block * block, sk), (sq, sk, tq)  # the scores bound (or 1 row)
    assert tq >= min(sq, FLOOR, -(-limit // 2)), (sq, sk, block, tq)  # never degenerate
    assert sq <= tq * n < sq + n, (sq, tq, n)  # fewer padded rows than trips
    assert tq * (n - 1) < sq  # no trip of padding only
    assert n <= 2 * -(-sq // limit), (sq, sk, n)  # at most twice the fewest trips
    return tq, n


@pytest.mark.unit
@pytest.mark.parametrize("cp", [2, 4, 8])
def test_no_tile_below_the_floor_for_awkward_s_local(cp):
    """Zigzag S_local = 2 * p (the sequence 2 * cp * p over cp ranks), p prime: the products
    the ring and all-gather run (half x half, full x full, full x cp * full, half x full) at the
    default block 2048 and a small block."""
    for p in PRIMES:
        s_local = 2 * p  # zigzag: the sequence p * 2 * cp cut over cp ranks
        for sq, sk in ((p, p), (s_local, s_local), (s_local, cp * s_local), (p, s_local)):
            for block in (2048, 256):
                if sq > block or sk > block:  # what runs as a loop
                    tq, n = _check(sq, sk, block)
                    if block == 2048 and sk <= 32768:
                        assert tq >= min(sq, 64), (sq, sk, tq)  # the 64-row floor holds here
    # the degenerate case of the issue: 4099 rows, 1 row per trip before; 5 trips of 820 now
    assert tile_plan(4099, 4099, 2048) == (820, 5)
    # sizes with good divisors keep their divisor tiles (no padding, unchanged graphs)
    assert tile_plan(4096, 4096, 2048) == (1024, 4) and tile_rows(8192, 8192, 2048) == 512
    assert tile_plan(200, 333, 48) == (5, 40)


@pytest.mark.unit
def test_every_size_up_to_3000_is_planned_sanely():
    """Every sq up to 3000 against sk = sq and sk = 4 sq, block 64 (loops from 65 rows)."""
    for sq in range(1, 3001):
        for sk in (sq, 4 * sq):
            if sq > 64 or sk > 64:
                _check(sq, sk, 64)


def _run(kernel, dev, q, k, v, dout, mask, kv_keep, docs):
    to = (lambda t: t) if dev is None else (lambda t: None if t is None else t.to(dev))
    extra = dict(mask=mask, kv_keep=to(kv_keep),
                 documents=None if docs is None else DocumentMask(*(to(d) for d in docs)))
    qd, kd, vd, dd = (to(x) for x in (q, k, v, dout))
    out, lse = kernel.forward(qd, kd, vd, scale=0.25, **extra)
    grads = kernel.backward(dd, qd, kd, vd, out, lse, scale=0.25, **extra)
    return [t.cpu() for t in (out, lse, *grads)]


@pytest.mark.unit
def test_padded_tile_loop_matches_the_pure_torch_kernel_on_xla():
    """131 query rows (prime) x 131 keys at block 32: 19 trips of 7 rows, 2 padded rows (the
    divisor plan would be 131 trips of 1 row). Causal diagonal, key padding with an empty
    batch row, packed documents; executed on XLA:CPU vs the pure-torch kernel on CPU."""
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    torch_xla = pytest.importorskip("torch_xla")
    assert tile_plan(131, 131, 32) == (7, 19)
    dev = torch_xla.device()
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(gen, b=2, hq=4, hkv=2, sq=131, sk=131, d=16)
    dout = rand(q.shape, gen)
    keep = torch.rand((2, 131), generator=gen) > 0.3
    keep[0, :] = False  # batch row 0: no key at all
    ids = torch.sort(torch.randint(0, 4, (2, 131), generator=gen), 1).values.int()
    cases = {"causal": (BlockMask(0, 0), None, None),
             "padded": (BlockMask(40, 0), keep, None),
             "documents": (BlockMask(0, 0), None, (ids, ids))}
    reference = TorchBlockKernel(tile_q=32, tile_k=32)
    for name, (mask, kv_keep, docs) in cases.items():
        want = _run(reference, None, q, k, v, dout, mask, kv_keep, docs)
        got = _run(TileLoopKernel(32), dev, q, k, v, dout, mask, kv_keep, docs)
        assert got[0].shape == q.shape and got[2].shape == q.shape, name
        assert rel_err(got[0], want[0].double()) <= 1e-5, name  # fp32, XLA:CPU codegen
        empty = want[1] == EMPTY_LSE
        assert torch.equal(got[1] == EMPTY_LSE, empty), name
        assert (got[1] - want[1])[~empty].abs().max() <= 1e-4, name  # fp32 ulps of |lse|
        for g, w in zip(got[2:], want[2:]):
            assert rel_err(g, w.double()) <= 1e-4, name  # fp32 recompute backward


@pytest.mark.unit
def test_loop_buffers_are_not_constant_zero_broadcasts():
    """The loops' stacked outputs and zero carries are built from the loop's own inputs, not
    broadcast from a constant: XLA merged the identical zero broadcasts of every loop and
    scheduled them first, live from the graph's start (cp 8, S_local 8192, one layer fwd+bwd:
    XLA:CPU peak 1,908 -> 1,757 MB; docs/trn1.md). Lowering only."""
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    torch_xla = pytest.importorskip("torch_xla")
    from nxd_cp.compat.torch_xla import tensors_hlo

    dev = torch_xla.device()
    gen = torch.Generator().manual_seed(6)
    q, k, v = (t.to(dev) for t in make_qkv(gen, b=1, hq=4, hkv=2, sq=131, sk=131, d=16))
    kernel = TileLoopKernel(32)
    out, lse = kernel.forward(q, k, v, scale=0.25, mask=BlockMask(0, 0))
    grads = kernel.backward(out, q, k, v, out, lse, scale=0.25, mask=BlockMask(0, 0))
    text = tensors_hlo([out, lse, *grads])
    loops = [ln for ln in text.splitlines() if " while(" in ln]
    assert len(loops) == 2, len(loops)  # forward and backward, each one loop
    zeros = set(re.findall(r"(%constant[\w.]*) = f32\[\] constant\(0\)", text))
    big = [ln for ln in text.splitlines()
           if (m := re.search(r"= f32\[([\d,]+)\]\S* broadcast\(f32\[\] (%constant[\w.]*)\)", ln))
           and m.group(2) in zeros and len(m.group(1).split(",")) >= 4]
    assert not big, big  # before: the ys buffers [19, 1, 2, 2, 7, 16], the dk / dv carries
