"""GPU (CUDA only): local kernels in TFLOP/s and one rank's zigzag schedule vs full / cp.

Needs a CUDA device; without one it prints "skipped: no CUDA device" and exits 0 (never part of
CI timings). Three tables, bf16, causal, GQA 32/8 heads, D = 128, interleaved repetitions,
median, ``torch.cuda.synchronize`` around each timed call:

1. the local kernel registry (``local_attention`` on one full causal block: the CUDA SDPA op
   registered in ``nxd_cp.attention.dispatch``) vs ``scaled_dot_product_attention`` on the full
   sequence, fwd + bwd TFLOP/s, S up to 128K;
2. one rank's zigzag schedule at cp = 2, 4, 8 (``feed.FeedTransport``: the library's ring with
   the other ranks' K/V fed locally, no wire) vs full-sequence SDPA time / cp -- the
   ring-flash-attention metric, target >= 0.85;
3. the pure-torch blockwise kernel (``reference_kernel_only()``) on the full sequence, for
   contrast.

FLOPs of causal attention fwd + bwd: 3.5 x (4 B Hq S^2 D / 2) (backward = 2.5 x forward, the
FlashAttention convention). ``--device cpu`` runs the same code on the CPU as a smoke test of
the script (no GPU figures).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    forced_kernel,
    interleaved_medians,
    machine_stamp,
    parser,
    print_table,
    write_json,
)
from feed import fed_rank_attention  # noqa: E402

from nxd_cp.attention import BlockMask, local_attention  # noqa: E402
from nxd_cp.sequence.layout import shard_sequence  # noqa: E402

TARGET = 0.85
HQ, HKV, D = 32, 8, 128


def flops(seq_len: int, batch: int = 1) -> float:
    return 3.5 * 4 * batch * HQ * seq_len * seq_len * D / 2


def inputs(seq_len: int, device, dtype):
    g = torch.Generator(device=device).manual_seed(seq_len)
    return [torch.randn(1, h, seq_len, D, generator=g, device=device, dtype=dtype)
            for h in (HQ, HKV, HKV, HQ)]


def fwd_bwd(fn, tensors, dout, kernel="auto"):
    """A callable: fresh leaves, ``fn(*leaves)`` forward and backward under ``kernel``."""
    def run():
        with forced_kernel(kernel):
            leaves = [t.detach().clone().requires_grad_() for t in tensors]
            fn(*leaves).backward(dout)
    return run


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def local(q, k, v):
    return local_attention(q, k, v, mask=BlockMask(0, 0, causal=True))


def rank_step(q, k, v, dout, cp: int, rank: int):
    """One zigzag rank's ring attention fwd + bwd with the other ranks' K/V fed locally."""
    attention, inputs = fed_rank_attention(q, k, v, cp, rank, "p2p")
    return fwd_bwd(attention, inputs, shard_sequence(dout, 2, rank, cp).contiguous())


def device_stamp(device: torch.device) -> dict:
    stamp = machine_stamp()
    if device.type == "cuda":
        stamp.update(gpu=torch.cuda.get_device_name(device), cuda=str(torch.version.cuda),
                     cudnn=str(torch.backends.cudnn.version()))
    return stamp


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: smoke test of this script at tiny sizes, no GPU figures")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device")
        write_json(args.json, {"skipped": "no CUDA device"})
        return
    device = torch.device(args.device)
    dtype = torch.bfloat16
    smoke = args.quick or device.type == "cpu"
    kernel_lens = (256,) if smoke else (4096, 16384, 65536, 131072)
    sched_lens = (256,) if smoke else (32768, 131072)
    torch_lens = (256,) if smoke else (4096, 16384)
    reps = 1 if smoke else args.reps
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {"stamp": device_stamp(device), "kernels": [], "schedule": [], "torch": []}

    rows = []
    for s in kernel_lens:
        q, k, v, dout = inputs(s, device, dtype)
        t = interleaved_medians({"sdpa": fwd_bwd(sdpa, (q, k, v), dout),
                                 "registry": fwd_bwd(local, (q, k, v), dout)},
                                reps=reps, warmup=1, sync=sync)
        tf = {n: flops(s) / x / 1e12 for n, x in t.items()}
        rows.append([s, f"{tf['registry']:.3g}", f"{tf['sdpa']:.3g}",
                     f"{tf['registry'] / tf['sdpa']:.3f}"])
        results["kernels"].append(dict(seq_len=s, times=t, tflops=tf))
        del q, k, v, dout
    print_table(f"Local kernel registry vs SDPA, full causal sequence, fwd+bwd, bf16, "
                f"Hq={HQ}, Hkv={HKV}, D={D} ({results['stamp'].get('gpu', device.type)})",
                ["S", "registry TFLOP/s", "SDPA TFLOP/s (limit)", "ratio"], rows)

    rows = []
    for s in sched_lens:
        q, k, v, dout = inputs(s, device, dtype)
        fns = {"full": fwd_bwd(sdpa, (q, k, v), dout)}
        for cp in (2, 4, 8):
            for rank in (0, cp - 1):
                fns[(cp, rank)] = rank_step(q, k, v, dout, cp, rank)
        t = interleaved_medians(fns, reps=reps, warmup=1, sync=sync)
        for cp in (2, 4, 8):
            rank_time = max(t[(cp, 0)], t[(cp, cp - 1)])
            limit = t["full"] / cp
            rows.append([s, cp, f"{rank_time * 1e3:.2f}", f"{limit * 1e3:.2f}",
                         f"{limit / rank_time:.3f}",
                         "yes" if limit / rank_time >= TARGET else "NO"])
            results["schedule"].append(dict(seq_len=s, cp=cp, rank_time=rank_time, limit=limit,
                                            ratio=limit / rank_time))
        del q, k, v, dout, fns
    print_table("One rank's zigzag ring schedule (p2p, default kernels, no wire) vs SDPA full / cp",
                ["S", "cp", "rank (ms)", "limit: full / cp (ms)", "ratio", f">= {TARGET}"], rows,
                note="Rank time: the slower of ranks 0 and cp-1 (the two extreme block shapes).")

    rows = []
    for s in torch_lens:
        q, k, v, dout = inputs(s, device, dtype)
        t = interleaved_medians({"sdpa": fwd_bwd(sdpa, (q, k, v), dout),
                                 "torch": fwd_bwd(local, (q, k, v), dout, kernel="torch")},
                                reps=reps, warmup=1, sync=sync)
        tf = {n: flops(s) / x / 1e12 for n, x in t.items()}
        rows.append([s, f"{tf['torch']:.3g}", f"{tf['sdpa']:.3g}",
                     f"{tf['torch'] / tf['sdpa']:.3f}"])
        results["torch"].append(dict(seq_len=s, times=t, tflops=tf))
    print_table("Pure-torch blockwise kernel (reference_kernel_only) vs SDPA, full sequence, "
                "fwd+bwd",
                ["S", "pure torch TFLOP/s", "SDPA TFLOP/s", "ratio"], rows,
                note=", ".join(f"{k}: {v}" for k, v in results["stamp"].items()))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
