"""End to end on CPU: a tiny-Llama training step at TP2 x CP2 on 4 gloo ranks vs one rank.

Every configuration runs in fresh spawned processes (``nxd_cp.testing.run_ranks``), one intra-op
thread per rank: ``nxd_cp.transform`` of the same transformers Llama, batches from
``nxd_cp.get_batch_on_this_context_parallel_rank``, forward + backward + CP gradient all-reduce
+ AdamW. One warm-up step, then the timed steps.

Configurations: TP2 x CP2 on 4 ranks at sequence S; one rank (cp = 1) at S / 2, the sequence a
rank holding half the CP2 sequence can hold (same tokens per rank); one rank at the full S for
the work comparison (``--quick`` runs TP2 x CP2 only: no ratios).

Figures per rank: wall time and tokens/s of the step, CPU seconds of the process per step
(counts the rank's own compute and its gloo threads, not the time other jobs hold the cores),
peak RSS and its rise during the steps (peak minus the RSS after model build). Limits: CPU time
per rank = (one rank's CPU time at S) / 4 (perfect scaling over 4 ranks); step memory per rank
<= the one-rank figure at S / 2. The 4 ranks share the machine's cores (see the stamp: on a
2-core machine tokens/s of the 4-rank run measures the sharing, not CP).
"""
from __future__ import annotations

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import parser, print_table, run_ranks, write_json  # noqa: E402

LLAMA = dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=65536)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train(rank: int, world: int, tp: int, cp: int, seq_len: int, steps: int):
    """Rank-side: build, transform and train; return this rank's figures."""
    import torch
    import transformers as tf

    import nxd_cp

    config = nxd_cp.neuronx_distributed_config(tensor_parallel_size=tp, context_parallel_size=cp)
    torch.manual_seed(0)
    model = nxd_cp.transform(tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)), config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, LLAMA["vocab_size"], (1, seq_len), generator=g)
    batch = nxd_cp.get_batch_on_this_context_parallel_rank({"input_ids": ids, "labels": ids})
    rss_base = _rss_bytes()

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        nxd_cp.allreduce_context_parallel_gradients(model)
        opt.step()

    step()  # warm-up
    torch.distributed.barrier()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    cpu = (time.process_time() - cpu0) / steps
    torch.distributed.barrier()
    wall = (time.perf_counter() - wall0) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(wall=wall, cpu=cpu, peak_rss=peak, step_rss=peak - rss_base)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seq_len, steps = (256, 1) if args.quick else (4096, 2)
    configs = [("TP2 x CP2", 2, 2, seq_len), ("one rank, S/2", 1, 1, seq_len // 2),
               ("one rank, S", 1, 1, seq_len)]
    if args.quick:  # each spawn costs seconds of imports: the TP x CP run only, no ratios
        configs = configs[:1]
    measured = {}
    for name, tp, cp, s in configs:
        per_rank = run_ranks(train, tp * cp, tp, cp, s, steps, timeout=1800)
        measured[name] = dict(tp=tp, cp=cp, seq_len=s, ranks=per_rank,
                              wall=max(r["wall"] for r in per_rank),
                              cpu=max(r["cpu"] for r in per_rank),
                              peak_rss=max(r["peak_rss"] for r in per_rank),
                              step_rss=max(r["step_rss"] for r in per_rank))
    full, half = measured.get("one rank, S"), measured.get("one rank, S/2")
    rows = []
    for name, m in measured.items():
        n = m["tp"] * m["cp"]
        cpu_limit = (full["cpu"] * m["seq_len"] / seq_len / n
                     if full and name != "one rank, S/2" else None)
        m["tokens_per_s"] = m["seq_len"] / m["wall"]
        m["cpu_limit"], m["cpu_ratio"] = cpu_limit, cpu_limit / m["cpu"] if cpu_limit else None
        m["mem_ratio"] = m["step_rss"] / half["step_rss"] if half else None
        rows.append([name, n, m["seq_len"], m["seq_len"] // m["cp"], f"{m['wall']:.2f}",
                     f"{m['tokens_per_s']:,.0f}", f"{m['cpu']:.2f}",
                     "" if cpu_limit is None else f"{cpu_limit:.2f}",
                     "" if cpu_limit is None else f"{m['cpu_ratio']:.3f}",
                     f"{m['peak_rss'] / 2**20:,.0f}", f"{m['step_rss'] / 2**20:,.0f}",
                     "" if half is None else f"{m['mem_ratio']:.2f}"])
    print_table(f"End to end on CPU: tiny Llama (hidden {LLAMA['hidden_size']}, "
                f"{LLAMA['num_hidden_layers']} layers, {LLAMA['num_attention_heads']}/"
                f"{LLAMA['num_key_value_heads']} heads), fp32, p2p zigzag, mean of {steps} steps "
                f"after 1 warm-up, 1 thread per rank, {os.cpu_count()} cores",
                ["config", "ranks", "S", "tokens/rank", "step wall (s)", "tokens/s",
                 "CPU s/step/rank", "limit: 1-rank S CPU / ranks", "ratio",
                 "peak RSS/rank (MiB)", "step rise/rank (MiB)", "rise vs 1 rank S/2"], rows,
                note="Per-rank figures are the worst rank. 4 ranks on "
                     f"{os.cpu_count()} cores time-share them: the wall time and tokens/s of "
                     "the TP2 x CP2 run are not a speed-up measurement here; the CPU time per "
                     "rank is (ratio = perfect-scaling CPU time / measured). Peak RSS includes "
                     "the interpreter, torch and transformers (~the same in every process).")
    write_json(args.json, {"seq_len": seq_len, "steps": steps, "configs": measured})


if __name__ == "__main__":
    main()
