"""``python -m nxd_cp.plan``: the layouts that fit a model, sequence length and instances.

Prints a table of the best layouts (``--json``: a list of objects), then the
``neuronx_distributed_config(...)`` call and the ``scripts/run_trn1.sh`` command of the best.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from nxd_cp.plan.catalog import config_path, load_config, shipped_models
from nxd_cp.plan.comm import INSTANCES
from nxd_cp.plan.memory import GIB
from nxd_cp.plan.search import (DEFAULT_RESERVE, PRECISIONS, Plan, distinct_layouts,
                                launcher_command, nxd_config_call, search)

def table(plans: List[Plan]) -> str:
    """A markdown table of ``plans`` (memory in GiB, step time in seconds)."""
    head = ("| # | tp | cp | pp | dp | comm | SP | ckpt | shard | m x mb | GiB/core "
            "| step s | seq/s | bubble |")
    rows = [head, "|" + "---|" * 14]
    for i, p in enumerate(plans, 1):
        comm = p.comm_type + (f"({p.a2a_size})" if p.a2a_size else "")
        rows.append(f"| {i} | {p.tp} | {p.cp} | {p.pp} | {p.dp} | {comm} "
                    f"| {'y' if p.sequence_parallel else '-'} | {'y' if p.checkpointing else '-'} "
                    f"| {p.sharding} | {p.num_microbatches} x {p.micro_batch} "
                    f"| {p.memory_per_core_bytes / GIB:.1f} | {p.step_time_s:.3f} "
                    f"| {p.sequences_per_s:.3f} "
                    f"| {p.time['bubble']:.2f} |")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    """The command line (module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m nxd_cp.plan", description=__doc__)
    ap.add_argument("--model", required=True,
                    help=f"config.json, its directory, or a shipped name: {shipped_models()}")
    ap.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    ap.add_argument("--instance", default="trn1.32xlarge", choices=sorted(INSTANCES))
    ap.add_argument("--nodes", type=int, default=1, help="number of instances")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="sequences per step (default: one per DP rank)")
    ap.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS),
                    help="bf16: 8 B/parameter of model state; mixed: 18 (fp32 master, grads)")
    ap.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE / GIB,
                    help="GiB per core kept free for compiler scratch and buffers")
    ap.add_argument("--top", type=int, default=5, help="layouts to print")
    ap.add_argument("--json", action="store_true", help="print a JSON list instead")
    ap.add_argument("--all-variants", action="store_true",
                    help="list every variant (comm type, SP, ...), not the best per layout")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    """Run the planner (module docstring); returns the exit status (1: nothing fits)."""
    args = parser().parse_args(argv)
    cfg = load_config(args.model)
    plans = search(cfg, args.seq_len, args.instance, args.nodes, args.global_batch,
                   args.precision, args.reserve_gib * GIB)
    best = (plans if args.all_variants else distinct_layouts(plans))[:args.top]
    if args.json:
        print(json.dumps([p.to_dict() for p in best], indent=1))
        return 0 if plans else 1
    if not plans:
        print(f"no layout of {args.model} at seq_len {args.seq_len} fits {args.nodes} x "
              f"{args.instance}: add nodes or use a shorter sequence")
        return 1
    print(f"{args.model}, seq_len {args.seq_len}, {args.nodes} x {args.instance} "
          f"({len(plans)} fitting layouts; memory per core incl. a "
          f"{args.reserve_gib:g} GiB reserve, estimated step time)\n")
    print(table(best))
    ranks = int(INSTANCES[args.instance]["ranks"])
    print("\n" + nxd_config_call(best[0]))
    model = os.path.relpath(config_path(args.model))
    print("\n" + launcher_command(best[0], args.seq_len, args.nodes, ranks, model,
                                  args.precision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
