"""The XLA graph of one layer's CP attention (fwd + bwd): size, collectives, ranks, compile, memory.

For each cp and S_local: the HLO that torch-xla (on CPU) lowers for rank 1 of a ring (p2p,
causal zigzag, 8 query / 2 KV heads, D = 64, B = 1, fp32): instructions and dots, collectives by
kind, the number of distinct graphs over all ranks (after normalising instruction names and
source metadata: what ``neuron_parallel_compile`` would compile), the XLA:CPU compile time
(``torch_xla._XLAC._xla_warm_up_cache`` compiles without executing) and the compiled peak
memory of a rank (``Total bytes used`` of XLA's buffer assignment, from
``XLA_FLAGS=--xla_dump_to``). Each measurement runs in its own process (XLA_FLAGS is read at
start-up). ``--baseline REV`` measures the same for an older revision of ``nxd_cp`` (default:
206cd90, before the rank-independent graph), exported with ``git archive`` into a temporary
folder, and prints both side by side. Large graphs are only lowered, not compiled, above
``--compile-max`` instructions, and their distinct-graph count is only taken up to
``--distinct-max-cp`` (both printed as "skipped" so no figure is invented).
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

from common import ROOT, parser, print_table, write_json  # noqa: E402

HQ, HKV, D = 8, 2, 64


def _normalise(hlo: str) -> str:
    hlo = re.sub(r", metadata=\{[^}]*\}", "", hlo)
    hlo = re.sub(r"%[\w.\-]+", "%x", hlo)
    return re.sub(r"HloModule [\w.\-]+", "HloModule m", hlo)


def _lower(cp: int, s_local: int, rank: int):
    """(tensors, hlo text) of rank ``rank``'s attention fwd + bwd."""
    import torch
    import torch_xla
    from nxd_cp.attention import context_parallel_attention
    from nxd_cp.comm.base import GroupSpec

    dev = torch_xla.device()
    torch_xla._XLAC._set_all_reduce_token(str(dev), None)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HQ, s_local, D, generator=g).to(dev).requires_grad_()
    k, v = (torch.randn(1, HKV, s_local, D, generator=g).to(dev).requires_grad_()
            for _ in range(2))
    out = context_parallel_attention(q, k, v, comm_type="p2p",
                                     group=GroupSpec.explicit([list(range(cp))], rank))
    out.backward(torch.ones_like(out))
    tensors = [out, q.grad, k.grad, v.grad]
    return tensors, torch_xla._XLAC._get_xla_tensors_hlo(tensors)


def worker(cp: int, s_local: int, compile_max: int, distinct_max_cp: int, dump: str) -> dict:
    """One configuration, in a process whose XLA_FLAGS dump to ``dump``."""
    import torch_xla

    t0 = time.perf_counter()
    tensors, hlo = _lower(cp, s_local, 1 % cp)
    lower_s = time.perf_counter() - t0
    lines = [l for l in hlo.splitlines() if re.match(r"\s+(ROOT )?%\S+ = ", l)]
    ops = [re.search(r"= \S+ ([\w\-]+)\(", l) for l in lines]
    ops = [m.group(1) for m in ops if m]
    collectives = {c: ops.count(c) for c in ("collective-permute", "all-gather", "reduce-scatter",
                                             "all-reduce", "all-to-all") if ops.count(c)}
    row = dict(cp=cp, s_local=s_local, instructions=len(lines), dots=ops.count("dot"),
               collectives=collectives, lower_s=round(lower_s, 2),
               f64="f64[" in hlo, compile_s=None, peak_bytes=None, distinct=None)
    if len(lines) <= compile_max:
        t0 = time.perf_counter()
        torch_xla._XLAC._xla_warm_up_cache(tensors, [])
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        totals = []
        for path in glob.glob(os.path.join(dump, "*buffer-assignment.txt")):
            m = re.search(r"Total bytes used: (\d+)", open(path).read())
            if m:
                totals.append(int(m.group(1)))
        row["peak_bytes"] = max(totals) if totals else None
    if cp <= distinct_max_cp:
        graphs = {_normalise(hlo)}
        graphs |= {_normalise(_lower(cp, s_local, r)[1]) for r in range(cp) if r != 1 % cp}
        row["distinct"] = len(graphs)
    return row


def _measure(code_dir: str, cp: int, s_local: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="nxd_cp_xla_dump_") as dump:
        env = dict(os.environ, PYTHONPATH=code_dir, PJRT_DEVICE="CPU",
                   XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker",
               json.dumps([cp, s_local, args.compile_max, args.distinct_max_cp, dump])]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code_dir)
        if res.returncode:
            return dict(cp=cp, s_local=s_local, error=res.stderr.strip().splitlines()[-1:])
        return json.loads(res.stdout.strip().splitlines()[-1])


def _baseline_tree(rev: str) -> str:
    folder = tempfile.mkdtemp(prefix="nxd_cp_baseline_")
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "nxd_cp"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def _cell(row: dict, key: str) -> str:
    if row is None or "error" in row:
        return "error"
    v = row.get(key)
    if v is None:
        return "skipped"
    if key == "peak_bytes":
        return f"{v / 2**20:,.0f}"
    if key == "collectives":
        return ", ".join(f"{n} {k}" for k, n in v.items())
    return f"{v:,}" if isinstance(v, int) else str(v)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--s-local", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--baseline", default="206cd90", help="git revision to compare ('' = none)")
    p.add_argument("--compile-max", type=int, default=12000,
                   help="compile (time, peak memory) only graphs of at most this many instructions")
    p.add_argument("--distinct-max-cp", type=int, default=8,
                   help="lower every rank (distinct graphs) only up to this cp")
    p.add_argument("--worker", help=argparse_hidden())
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    if args.quick:
        args.cp, args.s_local, args.compile_max, args.distinct_max_cp = [2, 4], [256], 4000, 4
    trees = {"new": ROOT}
    if args.baseline:
        trees[args.baseline] = _baseline_tree(args.baseline)
    rows = {name: {} for name in trees}
    for cp in args.cp:
        for s in args.s_local:
            for name, tree in trees.items():
                rows[name][(cp, s)] = _measure(tree, cp, s, args)
                print(name, rows[name][(cp, s)], flush=True)
    names = list(trees)
    headers = ["cp", "S_local"]
    for key, label in (("instructions", "HLO instructions"), ("dots", "dots"),
                       ("distinct", "distinct graphs"), ("compile_s", "compile s"),
                       ("peak_bytes", "peak MiB")):
        headers += [f"{label} ({n})" for n in names]
    headers += ["collectives (new)"]
    table = []
    for cp in args.cp:
        for s in args.s_local:
            r = [cp, s]
            for key in ("instructions", "dots", "distinct", "compile_s", "peak_bytes"):
                r += [_cell(rows[n][(cp, s)], key) for n in names]
            r.append(_cell(rows["new"][(cp, s)], "collectives"))
            table.append(r)
    print_table(
        "One layer's CP attention, fwd + bwd, as lowered by torch-xla (ring, causal zigzag)",
        headers, table,
        note=f"8 query / 2 KV heads, D = 64, B = 1, fp32; rank 1's graph. 'new' is this "
             f"checkout, {args.baseline or '-'} the baseline revision. Compile time is XLA:CPU "
             f"(`_xla_warm_up_cache`, no execution) on this shared 2-core machine; peak MiB is "
             f"the `Total bytes used` of XLA's buffer assignment. 'skipped': graphs above "
             f"{args.compile_max:,} instructions are not compiled and cp > "
             f"{args.distinct_max_cp} does not lower every rank (time on 2 cores).")
    write_json(args.json, {"rows": {n: [dict(v) for v in r.values()] for n, r in rows.items()}})


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
