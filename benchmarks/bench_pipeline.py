"""Pipeline parallelism with CP: per-stage XLA graphs, the pipeline bubble, bytes between stages.

1. XLA (torch-xla on CPU, one process, no torch.distributed): for every global rank of a
   TP x CP x PP world, ``transform`` under ``parallel_state.explicit_rank`` keeps the rank's
   stage; its ``CausalLMStage`` runs one microbatch forward + backward (the first stage from the
   int32 token ids, the others from a hidden-state input ``[mb, S_local, H]``; the last stage
   backward from the model's loss, the others from a gradient of their output's shape). The
   lowered outputs are the stage output (loss), the input's gradient and every parameter
   gradient. Per stage: HLO instructions, collectives, f64 / s64 instructions, and the number
   of distinct graphs (``normalise_hlo``) over the TP x CP ranks of the stage: 1 means one
   graph to compile per stage. The gradient reduction over DP x CP and the P2P between stages
   run outside the stage graph (``pipeline.engine``) and are not in it.
2. Bubble and bytes (real gloo ranks, ``model.run_train`` on ``torch.distributed.pipelining``):
   every ``forward_one_chunk`` / ``backward_one_chunk`` of the stage (and the last stage's
   loss, counted with its forward) is timed (``time.perf_counter``: CLOCK_MONOTONIC, one clock
   for all processes) and every P2P batch of the schedule (``schedules._batch_p2p``, the one
   door of the schedules' sends) is counted: bytes of its ``isend`` ops (nxd_cp's CP ring also
   uses ``dist.batch_isend_irecv`` but not that door, so it is not counted). Bubble figures
   per step: ``measured`` = 1 - mean over stages of (stage compute time / span of the step's
   compute over all stages); ``replay, unit`` = the idle fraction of the recorded action order
   of every stage replayed with forward = 1, backward = 2 and free communication
   (deterministic: checks the schedule, equals (pp-1)/(m+pp-1) for GPipe and 1F1B);
   ``replay, measured`` = the same replay with each stage's median forward and backward
   durations (what unequal stages alone cost). Bytes per step vs 2·m·(mb·S_local·H·e) per
   stage boundary (forward activations + backward gradients).
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, fmt_bytes, parser, print_table, run_ranks, write_json  # noqa: E402

TESTS = os.path.join(ROOT, "tests")
VOCAB, HEADS, KV_HEADS = 256, 4, 2


def llama(layers: int, hidden: int):
    import torch
    import transformers as tf
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, max_position_embeddings=65536)
    torch.manual_seed(1)
    return tf.LlamaForCausalLM(cfg)


def batch(rows: int, seq: int):
    import torch
    g = torch.Generator().manual_seed(100)
    ids = torch.randint(1, VOCAB, (rows, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


# ---------------------------------------------------------------------------------------------
# 1. XLA graphs per stage
# ---------------------------------------------------------------------------------------------
def stage_tensors(rank: int, tp: int, cp: int, pp: int, layers: int = 4, hidden: int = 64,
                  rows: int = 2, seq: int = 256, m: int = 2):
    """Global rank ``rank``'s stage: one microbatch forward + backward as lazy XLA tensors
    (module docstring); returns (tensors, stage index)."""
    import torch
    import torch_xla

    from nxd_cp import parallel_state as ps
    from nxd_cp.compat import torch_xla as xla_compat
    from nxd_cp.models import transform
    from nxd_cp.models.inputs import check_inputs
    from nxd_cp.nxd_config import build_config
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank

    dev = torch_xla.device()
    xla_compat.reset_collective_token(dev)
    with ps.explicit_rank(tp * cp * pp, rank, tp, cp, pp):
        cfg = build_config(tensor_parallel_size=tp, context_parallel_size=cp,
                           pipeline_parallel_size=pp, pipeline_config={"num_microbatches": m})
        ps.set_training_config(cfg)
        model = transform(llama(layers, hidden), cfg.to_dict()).to(dev)
        stage = model.__dict__["nxd_cp_pipeline"].stage_module
        mine = get_batch_on_this_context_parallel_rank(batch(rows, seq))
        mine = {k: v[: rows // m].to(torch.int32).to(dev) for k, v in mine.items()}
        _, kw = check_inputs(model, (), mine)  # what run_train hands the engine
        ids, labels = kw.pop("input_ids"), kw.pop("labels")
        kw.pop("use_cache", None)
        x = ids
        if not stage.is_first:
            g = torch.Generator().manual_seed(2)
            x = torch.randn(*ids.shape, hidden, generator=g).to(dev).requires_grad_()
        out = stage(x, **kw)
        if stage.is_last:
            # N over the CP group (equal shards): a graph input, as the engine counts it apart
            count = torch.tensor(float((labels.cpu() != -100).sum()) * cp).to(dev)
            out = model.loss_function(out, labels, num_items_in_batch=count)
            out.backward()
        else:
            out.backward(torch.ones_like(out))
        tensors = [out.detach()] + ([] if stage.is_first else [x.grad])
        return tensors + [p.grad for p in stage.parameters()], ps.get_pipeline_model_parallel_rank()


def stage_graphs(tp: int, cp: int, pp: int, compile_graphs: bool = False, **sizes) -> list:
    """One row per stage: figures of its graph and the distinct graphs over its ranks."""
    from bench_xla_graph import _figures

    from nxd_cp.compat import torch_xla as xla_compat
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    from xla_exec import normalise_hlo

    stages: dict = {}
    compiled: dict = {}  # graph hash -> the stage whose first rank compiled it
    for rank in range(tp * cp * pp):
        tensors, s = stage_tensors(rank, tp, cp, pp, **sizes)
        hlo = xla_compat.tensors_hlo(tensors)
        digest = hashlib.sha256(normalise_hlo(hlo).encode()).hexdigest()[:12]
        row = stages.setdefault(s, dict(tp=tp, cp=cp, pp=pp, stage=s, ranks=0, hashes=set(),
                                        **_figures(hlo)))
        row["ranks"] += 1
        row["hashes"].add(digest)
        if compile_graphs and "compile_s" not in row:
            if digest in compiled:  # XLA's cache would hand back that stage's executable
                row["compile_s"] = f"= stage {compiled[digest]}"
                continue
            t0 = time.perf_counter()
            xla_compat.warm_up_cache(tensors)
            row["compile_s"], compiled[digest] = round(time.perf_counter() - t0, 2), s
    for row in stages.values():
        row["distinct"], row["hashes"] = len(row["hashes"]), sorted(row["hashes"])
    return [stages[s] for s in sorted(stages)]


def xla_rows(layouts, compile_graphs: bool) -> list:
    """``stage_graphs`` for each layout, in a torch-xla subprocess (PJRT_DEVICE=CPU)."""
    env = dict(os.environ, PJRT_DEVICE="CPU", XLA_ALWAYS_ALLREDUCE="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker",
           json.dumps([layouts, compile_graphs])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise RuntimeError(f"XLA worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# 2. Bubble and bytes on gloo
# ---------------------------------------------------------------------------------------------
def _instrument(events: list, sent: dict) -> None:
    """Time the stage's chunks and count the schedule's isend bytes (rank-side)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import schedules
    from torch.distributed.pipelining.schedules import _PipelineSchedule
    from torch.distributed.pipelining.stage import _PipelineStageBase

    def timed(kind, fn):
        def wrapper(self, chunk, *args, **kwargs):
            t0 = time.perf_counter()
            out = fn(self, chunk, *args, **kwargs)
            events.append((kind, chunk, t0, time.perf_counter()))
            return out
        return wrapper

    _PipelineStageBase.forward_one_chunk = timed("F", _PipelineStageBase.forward_one_chunk)
    _PipelineStageBase.backward_one_chunk = timed("B", _PipelineStageBase.backward_one_chunk)
    loss = _PipelineSchedule._maybe_compute_loss  # the last stage's loss: part of its forward

    def timed_loss(self, stage, output, target_mbs, i):
        t0 = time.perf_counter()
        out = loss(self, stage, output, target_mbs, i)
        if stage.is_last:
            events.append(("L", i, t0, time.perf_counter()))
        return out

    _PipelineSchedule._maybe_compute_loss = timed_loss
    batch_p2p = schedules._batch_p2p  # the schedules' P2P (nxd_cp's ring uses dist directly)

    def counted(ops, *args, **kwargs):
        for op in ops:
            if op.op is dist.isend:  # op.peer: the global rank
                sent[op.peer] = sent.get(op.peer, 0) + op.tensor.numel() * op.tensor.element_size()
        return batch_p2p(ops, *args, **kwargs)

    schedules._batch_p2p = counted


def pipeline_world(rank: int, world: int, tp: int, cp: int, pp: int, layers: int, hidden: int,
                   rows: int, seq: int, ms, schedules, reps: int):
    """Rank-side: for each schedule and m, one warm-up step then ``reps`` recorded steps."""
    import torch.distributed as dist

    import nxd_cp
    from nxd_cp import parallel_state as ps

    events, sent = [], {}
    _instrument(events, sent)
    out = []
    for schedule in schedules:
        for m in ms:
            if m < pp:  # torch's single-stage schedules (both) need m >= pp
                continue
            cfg = nxd_cp.neuronx_distributed_config(
                tensor_parallel_size=tp, context_parallel_size=cp, pipeline_parallel_size=pp,
                pipeline_config={"num_microbatches": m, "schedule": schedule})
            model = nxd_cp.transform(llama(layers, hidden), cfg)
            mine = nxd_cp.get_batch_on_this_context_parallel_rank(batch(rows, seq))
            model.run_train(**mine)  # warm-up: the stage's shape exchange, first allocations
            for _ in range(reps):
                model.zero_grad(set_to_none=True)
                dist.barrier()
                events.clear()
                sent.clear()
                model.run_train(**mine)
                out.append(dict(schedule=schedule, m=m, rank=rank, events=list(events),
                                stage=ps.get_pipeline_model_parallel_rank(),
                                fwd=sum(v for k, v in sent.items() if k > rank),
                                bwd=sum(v for k, v in sent.items() if k < rank)))
    return out


def replay(order: dict, cost) -> float:
    """Idle fraction of the stages' recorded action orders (``order[s]``: [("F"|"B", mb)]) run
    with ``cost(stage, action)`` per action and free communication."""
    pp = len(order)
    done, clock, pos = {}, [0.0] * pp, [0] * pp
    while any(pos[s] < len(order[s]) for s in range(pp)):
        progress = False
        for s in range(pp):
            while pos[s] < len(order[s]):
                kind, i = order[s][pos[s]]
                deps = [(s - 1, "F", i)] if kind == "F" and s else []
                if kind == "B":
                    deps = [(s, "F", i)] + ([(s + 1, "B", i)] if s < pp - 1 else [])
                if any(d not in done for d in deps):
                    break
                start = max([clock[s]] + [done[d] for d in deps])
                clock[s] = done[(s, kind, i)] = start + cost(s, (kind, i))
                pos[s] += 1
                progress = True
        if not progress:
            raise RuntimeError(f"the recorded orders deadlock: {order}")
    busy = sum(cost(s, a) for s in range(pp) for a in order[s])
    return 1 - busy / (pp * max(clock))


def bubble_rows(results, tp: int, cp: int, pp: int, hidden: int, rows: int, seq: int) -> list:
    """One row per (schedule, m): bubble figures (medians over steps) and bytes per step."""
    flat = [r for rank in results for r in rank]
    table = []
    for schedule, m in dict.fromkeys((r["schedule"], r["m"]) for r in flat):
        mine = [r for r in flat if r["schedule"] == schedule and r["m"] == m]
        first = {}  # stage -> its first global rank (timings: that rank's records, step by step)
        for r in mine:
            first[r["stage"]] = min(first.get(r["stage"], r["rank"]), r["rank"])
        steps = list(zip(*[[r for r in mine if r["rank"] == first[s]] for s in range(pp)]))
        measured, times = [], {}
        for recs in steps:  # recs[s]: stage s's record of one step
            ev = {s: recs[s]["events"] for s in range(pp)}
            span = (max(e[3] for s in ev for e in ev[s]) - min(e[2] for s in ev for e in ev[s]))
            busy = statistics.mean(sum(e[3] - e[2] for e in ev[s]) for s in range(pp))
            measured.append(1 - busy / span)
            for s in range(pp):  # F and its loss (last stage) as one action
                for e in ev[s]:
                    key = (s, "F" if e[0] == "L" else e[0], e[1], id(recs[s]))
                    times[key] = times.get(key, 0.0) + e[3] - e[2]
        order = {s: [(e[0], e[1]) for e in steps[-1][s]["events"] if e[0] != "L"]
                 for s in range(pp)}
        median = {(s, k): statistics.median(v for key, v in times.items() if key[:2] == (s, k))
                  for s in range(pp) for k in "FB"}  # per stage: noise of single actions out
        unit = replay(order, lambda s, a: 1.0 if a[0] == "F" else 2.0)
        replayed = replay(order, lambda s, a: median[(s, a[0])])
        act = (rows // m) * (seq // cp) * hidden * 4  # one microbatch's activations, fp32
        pairs = len(steps) * tp * cp * (pp - 1)  # (step, boundary, TP x CP rank) pairs
        table.append(dict(schedule=schedule, m=m, pp=pp, tp=tp, cp=cp, reps=len(steps),
                          formula=(pp - 1) / (m + pp - 1), unit=unit,
                          replay=replayed, f_ms=[median[(s, "F")] * 1e3 for s in range(pp)],
                          b_ms=[median[(s, "B")] * 1e3 for s in range(pp)],
                          measured=statistics.median(measured),
                          fwd_bytes=sum(r["fwd"] for r in mine) / pairs,
                          bwd_bytes=sum(r["bwd"] for r in mine) / pairs,
                          formula_bytes=2 * m * act))
    return table


def print_tables(xla: list, bubble: list, reps: int, hidden: int, seq: int) -> None:
    """The two tables of the module docstring, from the figures (also kept in the JSON)."""
    print_table(
        "Per-stage XLA graphs: one microbatch forward + backward of each stage",
        ["TP x CP x PP", "stage", "ranks", "distinct graphs", "HLO instructions", "dots",
         "collectives", "f64 instr.", "s64 instr.", "compile s"],
        [[f"{r['tp']} x {r['cp']} x {r['pp']}", r["stage"], r["ranks"], r["distinct"],
          f"{r['instructions']:,}", r["dots"],
          ", ".join(f"{n} {k}" for k, n in r["collectives"].items()) or "-", r["f64"], r["s64"],
          r.get("compile_s", "-")] for r in xla],
        note="Tiny Llama (hidden 64, 4 layers, 4 / 2 heads, vocabulary 256), sequence 256, "
             "batch 2 in 2 microbatches (mb 1), int32 batch, fp32; `transform` under "
             "`parallel_state.explicit_rank` for every global rank. Distinct graphs over the "
             "TP x CP ranks of the stage after `normalise_hlo`. Compile: XLA:CPU "
             "(`warm_up_cache`) of the stage's first rank on this shared machine; '= stage k': "
             "the same graph as stage k (middle stages: same layer count, no embedding / "
             "head), compiled once. s64: torch-xla's backward of the plain nn.Embedding (tp = 1, "
             "stage 0) compares the int32 ids as s64 (8 instructions); TP's vocab-parallel "
             "embedding has none.")
    print_table(
        "Pipeline bubble and bytes between stages per step (gloo, torch.distributed.pipelining)",
        ["TP x CP x PP", "schedule", "m", "bubble formula (pp-1)/(m+pp-1)", "replay, unit",
         "replay, measured", "measured", "F / B ms per stage", "sent fwd", "sent bwd",
         "formula 2·m·mb·S_local·H·4",
         "ratio"],
        [[f"{r['tp']} x {r['cp']} x {r['pp']}", r["schedule"], r["m"], f"{r['formula']:.3f}",
          f"{r['unit']:.3f}", f"{r['replay']:.3f}", f"{r['measured']:.3f}",
          ", ".join(f"{f:.0f}/{b:.0f}" for f, b in zip(r["f_ms"], r["b_ms"])),
          fmt_bytes(r["fwd_bytes"]), fmt_bytes(r["bwd_bytes"]), fmt_bytes(r["formula_bytes"]),
          f"{(r['fwd_bytes'] + r['bwd_bytes']) / r['formula_bytes']:.3f}"] for r in bubble],
        note=f"Llama hidden {hidden}, max(4, pp) layers, 4 / 2 heads, batch 8 rows of "
             f"{seq} tokens cut into m microbatches (mb = 8/m), fp32, one thread per "
             "rank. 'replay, unit': the recorded action order of every stage replayed with "
             "F = 1, B = 2, free communication (deterministic). 'replay, measured': the same "
             "with each stage's median F (with the loss on the last stage) and B durations: "
             "what unequal stages alone cost (the last stage's head and loss, the first's "
             "embedding). 'measured': 1 - stage compute / span of the step's compute, mean over "
             f"stages, median of {reps} steps: it adds P2P and Python between the actions, "
             "and it can fall below the formula when ranks computing at once share this "
             "machine's cores (other jobs too): their compute then takes longer and counts as "
             "busy. Sent: the schedule's isend bytes per step and stage boundary, per TP x CP "
             "rank (activations forward, their gradients backward); ratio = (fwd + bwd) / "
             "formula.")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse_hidden())
    p.add_argument("--layouts", default="1,1,2;1,1,4;1,2,2",
                   help="bubble worlds: tp,cp,pp;... (every rank a gloo process)")
    p.add_argument("--m", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    if args.worker:
        layouts, compile_graphs = json.loads(args.worker)
        print(json.dumps([r for lay in layouts for r in stage_graphs(*lay, compile_graphs)]))
        return
    xla_layouts = [[2, 2, 2], [1, 2, 4], [2, 2, 4]]
    layouts = [tuple(map(int, x.split(","))) for x in args.layouts.split(";")]
    if args.quick:
        xla_layouts, layouts, args.m, args.reps, args.hidden = [[1, 2, 2]], [(1, 1, 2)], [2, 4], \
            1, 64
    xla = xla_rows(xla_layouts, compile_graphs=not args.quick)
    bubble = []
    for tp, cp, pp in layouts:
        layers = max(4, pp)
        res = run_ranks(pipeline_world, tp * cp * pp, tp, cp, pp, layers, args.hidden, 8,
                        args.seq, args.m, ["GPipe", "1F1B"], args.reps)
        bubble += bubble_rows(res, tp, cp, pp, args.hidden, 8, args.seq)
    print_tables(xla, bubble, args.reps, args.hidden, args.seq)
    write_json(args.json, {"xla": xla, "bubble": bubble})


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
