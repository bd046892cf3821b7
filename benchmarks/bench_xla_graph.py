"""The XLA graphs of CP training: size, collectives, distinct graphs over ranks, compile, memory.

Three graphs, lowered by torch-xla on CPU (the first two for every rank of their world):

1. One layer's CP attention, forward + backward (ring ``p2p``, causal zigzag, 8 query / 2 KV
   heads, D = 64, B = 1, fp32) for each cp and S_local: HLO instructions and dots, collectives
   by kind, the number of distinct graphs over all cp ranks (after normalising instruction
   names and source metadata: what ``neuron_parallel_compile`` would compile), f64 / s64
   instructions.
2. One TP2 x CP2 training step of the tiny Llama of the tests (forward, vocab-parallel loss,
   backward, CP gradient all-reduce, AdamW step): the same figures over its 4 ranks; per decoder
   layer with and without activation checkpointing (1 and 2 layers).
3. One 8B-like decoder layer at TP8 x CP4 (``xla_layer_memory.py``, ``--s-big``): XLA:CPU's
   temp memory per layer beside docs/choosing.md's activation formula (rank 0 only).

For rank 1's graph (rank 0's for the step): the XLA:CPU compile time
(``nxd_cp.compat.torch_xla.warm_up_cache`` compiles without executing) and the compiled peak
memory of the rank (``Total bytes used`` of XLA's buffer assignment, from
``XLA_FLAGS=--xla_dump_to``). Each measurement runs in its own process (XLA_FLAGS is read at
start-up). ``--baseline REV ...`` measures the same for older revisions of ``nxd_cp`` (default:
7de2d56, the first rank-independent attention graph, and 206cd90, before it), exported with
``git archive`` into temporary folders, and prints them beside this checkout. Graphs above
``--compile-max`` instructions are only lowered, and ranks are lowered for the distinct-graph
count only while rank 1's graph has at most ``--distinct-max`` instructions ("skipped" in the
table: no figure is invented). A revision without ``parallel_state.explicit_rank`` (206cd90)
cannot lower another rank's step: "n/a".
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import xla_layer_memory  # noqa: E402
from common import ROOT, parser, print_table, write_json  # noqa: E402

TESTS = os.path.join(ROOT, "tests")  # the XLA-execution harness (xla_exec) and test models

HQ, HKV, D = 8, 2, 64
TP, CP = 2, 2
_INSTRUCTION = re.compile(r"\s+(ROOT )?%\S+ = ")
_OPCODE = re.compile(r"= (?:\([^)]*\)|\S+) ([\w\-]+)\(")  # shape (a tuple, too), opcode
COLLECTIVES = ("collective-permute", "all-gather", "reduce-scatter", "all-reduce", "all-to-all")


class _LegacyXla:
    """The torch-xla calls of ``nxd_cp.compat.torch_xla``, for revisions without it
    (``--baseline``)."""

    @staticmethod
    def reset_collective_token(device) -> None:
        import torch_xla
        torch_xla._XLAC._set_all_reduce_token(str(device), None)

    @staticmethod
    def tensors_hlo(tensors) -> str:
        import torch_xla
        return torch_xla._XLAC._get_xla_tensors_hlo(list(tensors))

    @staticmethod
    def warm_up_cache(tensors) -> None:
        import torch_xla
        torch_xla._XLAC._xla_warm_up_cache(list(tensors), [])


def _xla():
    """nxd_cp's door to torch-xla's private calls (``_LegacyXla`` in older revisions)."""
    try:
        from nxd_cp.compat import torch_xla as xla_compat
    except ImportError:
        return _LegacyXla
    return xla_compat


def _attention_tensors(cp: int, s_local: int, rank: int):
    """Rank ``rank``'s attention fwd + bwd outputs (lazy XLA tensors)."""
    import torch
    import torch_xla

    from nxd_cp.attention import context_parallel_attention
    from nxd_cp.comm.base import GroupSpec  # (this name resolves in every baseline revision too)

    dev = torch_xla.device()
    _xla().reset_collective_token(dev)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HQ, s_local, D, generator=g).to(dev).requires_grad_()
    k, v = (torch.randn(1, HKV, s_local, D, generator=g).to(dev).requires_grad_()
            for _ in range(2))
    out = context_parallel_attention(q, k, v, comm_type="p2p",
                                     group=GroupSpec.explicit([list(range(cp))], rank))
    out.backward(torch.ones_like(out))
    return [out, q.grad, k.grad, v.grad]


def _step_tensors(rank: int, int32: bool = False, ckpt=None, layers: int = 2):
    """Global rank ``rank``'s TP2 x CP2 training step of the tests' tiny Llama (the batch in
    int64 as tokenizers give it, or cast to int32 first; ``layers`` decoder layers, ``ckpt``
    its ``activation_checkpoint_config``)."""
    import torch
    import torch_xla

    from nxd_cp import parallel_state as ps
    from nxd_cp.models import transform
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank
    from nxd_cp.training.grads import allreduce_context_parallel_gradients
    try:
        from nxd_cp.training.optim import AdamW
    except ImportError:  # older revisions: torch's (f64 scalars on XLA)
        AdamW = torch.optim.AdamW
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    from test_models import make_batch, make_config, make_model, model_class

    dev = torch_xla.device()
    _xla().reset_collective_token(dev)
    with ps.explicit_rank(TP * CP, rank, TP, CP):
        config = "p2p"  # older revisions: transform took the comm type itself
        if hasattr(ps, "set_training_config"):  # now: the active config transform reads
            from nxd_cp.testing import activate_config
            config = activate_config("p2p")
        if ckpt is not None:
            config = dict(config, activation_checkpoint_config=ckpt)
        if layers != 2:
            cfg = make_config("llama")
            cfg.num_hidden_layers = layers
            torch.manual_seed(1)
            model = model_class("llama")(cfg)
        else:
            model = make_model("llama")
        model = transform(model, config, vocab_parallel_logits=True).to(dev)
        opt = AdamW(model.parameters(), lr=1e-3, eps=1e-6)
        batch = {k: (v.to(torch.int32) if int32 else v).to(dev) for k, v in
                 get_batch_on_this_context_parallel_rank(make_batch(100)).items()}
        loss = model(**batch).loss
        loss.backward()
        allreduce_context_parallel_gradients(model)
        opt.step()
    return [loss.detach()] + [p for p in model.parameters()]


def _normalise(hlo: str) -> str:
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    from xla_exec import normalise_hlo
    return normalise_hlo(hlo)


def _figures(hlo: str) -> dict:
    lines = [line for line in hlo.splitlines() if _INSTRUCTION.match(line)]
    ops = [m.group(1) for m in (_OPCODE.search(line) for line in lines) if m]
    s64 = [line for line in lines if "s64[" in line]
    # s64 compute: what is left once the int64 inputs and their one convert each are set aside.
    entry = [line for line in s64 if re.search(r"= s64\[[\d,]*\]\S* parameter\(|"
                                               r"= s32\[[\d,]*\]\S* convert\(s64", line)]
    return dict(instructions=len(lines), dots=ops.count("dot"),
                collectives={c: ops.count(c) for c in COLLECTIVES if ops.count(c)},
                f64=sum(1 for line in lines if "f64[" in line), s64=len(s64),
                s64_compute=len(s64) - len(entry))


def worker(kind: str, cp: int, s_local: int, compile_max: int, distinct_max: int,
           dump: str) -> dict:
    """One graph (``kind`` "attention" or "step"), in a process whose XLA_FLAGS dump to
    ``dump``."""
    if kind.startswith("big"):  # the 8B-like layer (xla_layer_memory.py)
        return xla_layer_memory.worker(kind, s_local, dump, _figures)
    if kind.startswith("layers"):  # "layers<L>" / "layers<L>ckpt": int32 batch, L layers
        world, first = TP * CP, 0
        ckpt, n_layers = "full" if kind.endswith("ckpt") else None, int(kind[6:7])
        lower = lambda r: _step_tensors(r, True, ckpt, n_layers)  # noqa: E731
    elif kind in ("step", "step32"):
        from nxd_cp import parallel_state as ps
        if not hasattr(ps, "explicit_rank"):
            return dict(kind=kind, na="no parallel_state.explicit_rank in this revision")
        world, first = TP * CP, 0
        lower = lambda r: _step_tensors(r, int32=kind == "step32")  # noqa: E731
    else:
        world, lower, first = cp, lambda r: _attention_tensors(cp, s_local, r), 1 % cp
    t0 = time.perf_counter()
    tensors = lower(first)
    hlo = _xla().tensors_hlo(tensors)
    row = dict(kind=kind, cp=cp, s_local=s_local, lower_s=round(time.perf_counter() - t0, 2),
               compile_s=None, peak_bytes=None, distinct=None, **_figures(hlo))
    if row["instructions"] <= compile_max:
        t0 = time.perf_counter()
        _xla().warm_up_cache(tensors)
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        dumped = glob.glob(os.path.join(dump, "*buffer-assignment.txt"))
        totals = [int(m.group(1)) for path in dumped
                  for m in [re.search(r"Total bytes used: (\d+)", open(path).read())] if m]
        row["peak_bytes"] = max(totals) if totals else None
    if row["instructions"] <= distinct_max:
        graphs = {_normalise(hlo)}
        for r in range(world):
            if r != first:
                graphs.add(_normalise(_xla().tensors_hlo(lower(r))))
        row["distinct"] = len(graphs)
        row["ranks"] = world
    return row


def _measure(code_dir: str, kind: str, cp: int, s_local: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="nxd_cp_xla_dump_") as dump:
        env = dict(os.environ, PYTHONPATH=code_dir, PJRT_DEVICE="CPU", XLA_ALWAYS_ALLREDUCE="1",
                   XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker",
               json.dumps([kind, cp, s_local, args.compile_max, args.distinct_max, dump])]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code_dir)
        if res.returncode:  # negative: killed by that signal (-9: out of memory)
            return dict(kind=kind, cp=cp, s_local=s_local, returncode=res.returncode,
                        error=res.stderr.strip().splitlines()[-3:])
        return json.loads(res.stdout.strip().splitlines()[-1])


def _baseline_tree(rev: str) -> str:
    folder = tempfile.mkdtemp(prefix="nxd_cp_baseline_")
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "nxd_cp"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def _value(row: dict, key: str) -> str:
    if row is None or "error" in row:
        return "error"
    if "na" in row:
        return "n/a"
    v = row.get(key)
    if v is None:
        return "skipped"
    if key == "peak_bytes":
        return f"{v / 2**20:,.0f}"
    if key == "collectives":
        return ", ".join(f"{n} {k}" for k, n in v.items()) or "-"
    if key == "distinct":
        return f"{v} of {row['ranks']}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _cells(rows: dict, names, key: str) -> str:
    return " / ".join(_value(rows[n], key) for n in names)


KEYS = (("instructions", "HLO instructions"), ("dots", "dots"),
        ("distinct", "distinct graphs"), ("compile_s", "compile s"), ("peak_bytes", "peak MiB"),
        ("f64", "f64 instr."))


def _per_step(rows: dict, name: str, cps, s: int) -> str:
    """Instructions added per ring step from the smallest to the largest cp measured."""
    lo, hi = rows[name].get(("attention", cps[0], s)), rows[name].get(("attention", cps[-1], s))
    if not lo or not hi or "instructions" not in lo or "instructions" not in hi or lo is hi:
        return "-"  # also with a single cp
    return f"{(hi['instructions'] - lo['instructions']) / (cps[-1] - cps[0]):,.0f}"


def report(rows: dict, names, args) -> None:
    order = " / ".join(names)
    table = []
    for cp in args.cp:
        for s in args.s_local:
            per = {n: rows[n][("attention", cp, s)] for n in names}
            table.append([cp, s] + [_cells(per, names, k) for k, _ in KEYS]
                         + [_value(per[names[0]], "collectives")])
    slope = "; ".join(f"S_local={s}: " + " / ".join(_per_step(rows, n, args.cp, s)
                                                    for n in names) for s in args.s_local)
    print_table(
        "One layer's CP attention, fwd + bwd, as lowered by torch-xla (ring, causal zigzag)",
        ["cp", "S_local"] + [f"{label} ({order})" for _, label in KEYS]
        + [f"collectives ({names[0]})"], table,
        note=f"8 query / 2 KV heads, D = 64, B = 1, fp32; rank 1's graph. '{names[0]}' is this "
             f"checkout. Instructions per ring step (cp {args.cp[0]} -> {args.cp[-1]}, "
             f"{order}): {slope}. Compile time is XLA:CPU (`_xla_warm_up_cache`, no "
             f"execution) on this shared 2-core machine; peak MiB is the `Total bytes used` of "
             f"XLA's buffer assignment. 'skipped': graphs above {args.compile_max:,} "
             f"instructions are not compiled, above {args.distinct_max:,} not lowered for "
             f"every rank (time on 2 cores).")
    if args.s_long:
        long_names = [n for n in names[:2] if ("attention", args.cp_long, args.s_long[0])
                      in rows[n]]
        per = [(s, {n: rows[n][("attention", args.cp_long, s)] for n in long_names})
               for s in args.s_long]
        print_table(
            f"Long sequences: one layer's CP attention at cp={args.cp_long}, fwd + bwd",
            ["S_local"] + [f"{label} ({' / '.join(long_names)})"
                           for _, label in KEYS + (("s64", "s64 instr."),)],
            [[s] + [_cells(r, long_names, k) for k, _ in KEYS + (("s64", ""),)]
             for s, r in per],
            note="As above. Above S_local = 2 x XLA_BLOCK (4,096) every product is one loop "
                 "over Q tiles inside the graph (`attention/tile_loop.py`, the loop "
                 "`comm/xla_loop.py`): the graph no longer grows with the sequence. aae3bf0 "
                 "built the loops with torch-xla's scan (s64 trip counters and slice indices, "
                 "inputs multiplied by 1, a condition reading the whole loop state).")
    steps = [(n, rows[n][("step", TP * CP, 0)]) for n in names]
    if ("step32", TP * CP, 0) in rows[names[0]]:
        steps.insert(1, (f"{names[0]}, int32 batch", rows[names[0]][("step32", TP * CP, 0)]))
    step = [[n] + [_value(r, k) for k, _ in KEYS + (("s64", ""), ("s64_compute", ""))]
            for n, r in steps]
    print_table("One TP2 x CP2 training step of a tiny Llama, as lowered by torch-xla",
                ["revision"] + [label for _, label in KEYS]
                + ["s64 instr.", "s64 beyond the int64 inputs"], step,
                note="Hidden 64, 2 layers, 4 heads (2 KV), vocabulary 256, sequence 256, batch 2; "
                     "forward, vocab-parallel loss, backward, CP gradient all-reduce, AdamW "
                     "(`nxd_cp.training.optim.AdamW` where the revision has it, else torch's); "
                     "rank 0's graph; distinct graphs over the 4 ranks. The batch (token ids, "
                     "labels, positions, mask) enters as int64 (HF's convention): 4 s64 parameters "
                     "and, in this checkout, one convert each to s32 at the model's entry; 's64 "
                     "beyond' counts every other s64 instruction (index arithmetic, torch's cross "
                     "entropy and embedding backward in older revisions). Cast the batch to int32 "
                     "and the graph has none ('int32 batch').")


def report_layers(rows: dict) -> None:
    """Whole step per decoder layer, with and without activation checkpointing."""
    table = []
    for ckpt in ("", "ckpt"):
        one, two = (rows.get((f"layers{n}{ckpt}", TP * CP, 0)) for n in (1, 2))
        if not one or not two or "instructions" not in one or "instructions" not in two:
            continue
        peak = [r.get("peak_bytes") for r in (one, two)]
        per_kib = f"{(peak[1] - peak[0]) / 1024:,.1f}" if None not in peak else "skipped"
        table.append(["full" if ckpt else "none", f"{one['instructions']:,}",
                      f"{two['instructions']:,}", f"{two['instructions'] - one['instructions']:,}",
                      _value(one, "peak_bytes"), _value(two, "peak_bytes"), per_kib])
    print_table("One TP2 x CP2 training step per decoder layer, with activation checkpointing",
                ["activation_checkpoint_config", "instructions, 1 layer", "2 layers",
                 "per layer", "peak MiB, 1 layer", "2 layers", "peak KiB per layer"], table,
                note="The tiny Llama of the step table (hidden 64, 4 / 2 heads, D 16, MLP 128, "
                     "sequence 256, batch 2: 256 tokens per rank, fp32), int32 batch; rank 0's "
                     "graph; per layer = 2 layers - 1 layer. Peak: XLA:CPU's buffer assignment "
                     "(`Total bytes used`), activations with weights, gradients and optimizer "
                     "state.")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--s-local", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--s-long", type=int, nargs="*", default=[8192, 16384, 32768],
                   help="longer S_local, measured at --cp-long for this checkout and the "
                        "first baseline only (older ones unroll too many tiles to lower)")
    p.add_argument("--cp-long", type=int, default=8)
    p.add_argument("--baseline", nargs="*", default=["aae3bf0", "7de2d56", "206cd90"],
                   help="git revisions to compare (none: only this checkout)")
    p.add_argument("--compile-max", type=int, default=9000,
                   help="compile (time, peak memory) only graphs of at most this many "
                        "instructions (XLA:CPU took > 14 GiB for 15,000)")
    p.add_argument("--distinct-max", type=int, default=16000,
                   help="lower every rank only for graphs of at most this many instructions")
    p.add_argument("--s-big", type=int, default=8192, help="S_local of the 8B-like layer "
                   "(TP8 x CP4, xla_layer_memory.py); 0: skip it")
    p.add_argument("--worker", help=argparse_hidden())
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    if args.quick:
        args.cp, args.s_local, args.baseline, args.s_long, args.s_big = [2, 4], [256], [], [8192], 0
    trees = {"new": ROOT}
    for rev in args.baseline:
        trees[rev] = _baseline_tree(rev)
    rows = {name: {} for name in trees}
    jobs = [("attention", cp, s) for cp in args.cp for s in args.s_local] + [("step", TP * CP, 0)]
    long_jobs = [("attention", args.cp_long, s) for s in args.s_long]
    int32_job = ("step32", TP * CP, 0)
    layer_jobs = [(f"layers{n}{c}", TP * CP, 0) for c in ("", "ckpt") for n in (1, 2)]
    layer_jobs += [(k, xla_layer_memory.CP8, args.s_big) for k in xla_layer_memory.KINDS
                   if args.s_big]
    for key in jobs + long_jobs + [int32_job] + layer_jobs:
        # Long sequences: this checkout and the first baseline; int32 batch, layers: this one.
        subset = 1 if key in [int32_job] + layer_jobs else 2 if key in long_jobs else None
        for name, tree in list(trees.items())[:subset]:
            rows[name][key] = _measure(tree, *key, args)
            print(name, rows[name][key], flush=True)
    report(rows, list(trees), args)
    report_layers(rows["new"])
    xla_layer_memory.report({k[0]: r for k, r in rows["new"].items()}, args.s_big, print_table)
    write_json(args.json, {"rows": {n: list(r.values()) for n, r in rows.items()}})


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
