"""Compute efficiency on CPU: one rank's CP attention schedule vs full-sequence SDPA / cp.

One process, no communication: ``feed.FeedTransport`` hands the library's own
ring / all-gather K/V streams the blocks the rank would receive (the shards of
the other ranks), so what is timed is exactly the rank's work in a real run -- its schedule of
local kernels, LSE merges, buffer packing and dK/dV accumulation -- minus the wire.

Figure: (full-sequence ``scaled_dot_product_attention`` fwd+bwd time / cp) / (rank time), both
causal, fp32, GQA, the same thread count; interleaved repetitions, median. Target >= 0.85 (the
ring-flash-attention zigzag figure on 8xH800 is 0.90). Zigzag ranks do equal work but differ in
block shapes (rank 0: half Q x whole KV blocks; rank cp-1: whole Q x half KV blocks; the others
mix both), so p2p times ranks 0 and cp-1 and reports the slower. Two kernel registries: the
default (CPU fused flash op) and the pure-torch blockwise kernel (``reference_kernel_only()``,
the XLA/reference path), for which the ratio against the same kernel on the full sequence is also
given (the cost of the CP decomposition alone).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import forced_kernel, interleaved_medians, parser, print_table, write_json  # noqa: E402
from feed import fed_rank_attention  # noqa: E402

from nxd_cp.attention import BlockMask, local_attention  # noqa: E402
from nxd_cp.sequence.layout import shard_sequence  # noqa: E402

TARGET = 0.85


def with_kernel(kernel: str, fn):
    """``fn`` run with ``kernel`` ("auto": the default registry; "torch": the reference)."""
    def run():
        with forced_kernel(kernel):
            fn()
    return run


def fwd_bwd(fn, inputs, dout):
    """A callable: fresh leaves from ``inputs``, ``fn(*leaves)``, backward with ``dout``."""
    def run():
        leaves = [t.clone().requires_grad_() for t in inputs]
        fn(*leaves).backward(dout)
    return run


def rank_step(q, k, v, dout, cp: int, rank: int, comm: str):
    """One rank's forward + backward of CP attention, K/V of the others fed locally."""
    attention, inputs = fed_rank_attention(q, k, v, cp, rank, comm)
    return fwd_bwd(attention, inputs, shard_sequence(dout, 2, rank, cp).contiguous())


def measure(seq_len: int, cps, kernels, heads, d: int, reps: int, clock: str):
    """Median times of the references and of the rank schedules for one sequence length."""
    hq, hkv = heads
    g = torch.Generator().manual_seed(seq_len)
    q, k, v, dout = (torch.randn(1, h, seq_len, d, generator=g) for h in (hq, hkv, hkv, hq))
    fns = {("sdpa", "full"): fwd_bwd(
        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True),
        (q, k, v), dout)}
    for kernel in kernels:
        if kernel == "torch":
            fns[("torch", "full")] = with_kernel("torch", fwd_bwd(
                lambda a, b, c: local_attention(a, b, c, mask=BlockMask(0, 0, causal=True)),
                (q, k, v), dout))
        for cp in cps:
            for rank, comm in ((0, "p2p"), (cp - 1, "p2p"), (0, "all_gather")):
                fns[(kernel, cp, comm, rank)] = with_kernel(
                    kernel, rank_step(q, k, v, dout, cp, rank, comm))
    return interleaved_medians(fns, reps=reps, warmup=1, clock=clock)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (both sides)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed rounds (default: 5 below S=16K, 3 from it; quick 1)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: process CPU time (one thread on a shared machine); "
                        "forced to wall with more than one thread")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = args.clock if args.threads == 1 else "wall"
    heads, d = (4, 1), 64
    cps = (2, 4, 8)
    if args.quick:
        plan = {1024: ("auto", "torch")}
    else:  # the pure-torch kernel at 16K would take minutes for a figure 4K/8K already show
        plan = {4096: ("auto", "torch"), 8192: ("auto", "torch"), 16384: ("auto",)}
    def reps_for(seq_len):  # more rounds where they are cheap: a 2-core shared box is noisy
        return args.reps or (1 if args.quick else (5 if seq_len < 16384 else 3))

    rows, results, full_times = [], [], {}
    for seq_len, kernels in plan.items():
        reps = reps_for(seq_len)
        t = measure(seq_len, cps, kernels, heads, d, reps, clock)
        full_times[seq_len] = {k[0]: v for k, v in t.items() if k[1] == "full"}
        for kernel in kernels:
            for cp in cps:
                for comm in ("p2p", "all_gather"):
                    ranks = (0, cp - 1) if comm == "p2p" else (0,)
                    rank_time = max(t[(kernel, cp, comm, r)] for r in ranks)
                    limit = t[("sdpa", "full")] / cp
                    ratio = limit / rank_time
                    own = t[("torch", "full")] / cp / rank_time if kernel == "torch" else None
                    name = "default (CPU fused)" if kernel == "auto" else "pure torch"
                    rows.append([seq_len, cp, name, comm, f"{rank_time * 1e3:.1f}",
                                 f"{limit * 1e3:.1f}", f"{ratio:.3f}",
                                 "yes" if ratio >= TARGET else "NO",
                                 "" if own is None else f"{own:.3f}"])
                    rows[-1].insert(2, reps)
                    results.append(dict(seq_len=seq_len, cp=cp, kernel=kernel, comm=comm,
                                        reps=reps, rank_time=rank_time, limit=limit, ratio=ratio,
                                        ratio_vs_own_full=own,
                                        per_rank={str(r): t[(kernel, cp, comm, r)] for r in ranks}))
    hq, hkv = heads
    print_table(f"CPU compute efficiency per rank: fwd+bwd, fp32, causal zigzag, B=1, "
                f"Hq={hq}, Hkv={hkv}, D={d}, {args.threads} thread(s), {clock} time",
                ["S", "cp", "median of", "kernel", "comm", "rank (ms)",
                 "limit: SDPA full / cp (ms)",
                 "ratio", f">= {TARGET}", "vs same kernel full / cp"], rows,
                note="Rank time: the slower of ranks 0 and cp-1 for p2p, rank 0 for all_gather "
                     "(zigzag gives every rank the same work). The pure-torch rows miss the "
                     "target by the kernel, not by CP: their last column (against the "
                     "pure-torch kernel on the full sequence) is the decomposition overhead.")
    write_json(args.json, {"target": TARGET, "threads": args.threads, "clock": clock,
                           "heads": heads, "head_dim": d,
                           "full_times": full_times, "rows": results})


if __name__ == "__main__":
    main()
