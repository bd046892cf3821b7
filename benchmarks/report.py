"""Assemble ``docs/performance.md`` and ``docs/performance.png`` from the benchmarks' JSON files.

``run_all.sh`` runs every benchmark with ``--json RESULTS/<name>.json``, writes the exact
command lines to ``RESULTS/commands.txt`` and the run time to ``RESULTS/seconds.txt``, then
calls this script. The headline table is computed from the JSON figures; the per-benchmark
tables are the ones the scripts printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import fmt_bytes, machine_stamp  # noqa: E402

SECTIONS = [  # (json name, title, what it measures)
    ("bench_memory", "Activation memory per rank",
     "Bytes saved for backward (`saved_tensors_hooks`, once per storage, parameters excluded) "
     "by one attention call and one whole tiny-Llama decoder layer, on real gloo ranks."),
    ("bench_comm", "Communication per rank",
     "Bytes each rank hands its transport per attention call (`nxd_cp.count_bytes()`, "
     "bandwidth-optimal volume of each collective), on real gloo ranks."),
    ("bench_load_balance", "Load balance",
     "Visible query-key pairs per rank under a causal mask, from the schedules the library runs."),
    ("bench_cpu_efficiency", "Compute efficiency on CPU",
     "One rank's whole schedule (the library's ring / all-gather with the other ranks' K/V fed "
     "locally by `benchmarks/feed.py`, no wire) vs full-sequence SDPA / cp, fwd+bwd fp32."),
    ("bench_e2e_cpu", "End to end on CPU",
     "Tiny-Llama training step (fwd, bwd, CP gradient all-reduce, AdamW) at TP2 x CP2 on 4 gloo "
     "ranks vs one rank."),
    ("bench_gpu", "GPU", "Local kernels in TFLOP/s and one rank's zigzag schedule vs full / cp "
     "on CUDA."),
    ("bench_packing_balance", "Packed documents: load balance",
     "Attention work (visible query-key pairs, causal inside each document) per CP rank for "
     "packed rows of log-normal documents: zigzag over the row vs the per-document head-tail "
     "layouts, nxd_cp's `per_document` measured on its own shard indices."),
    ("bench_xla_graph", "XLA graph",
     "One layer's CP attention (fwd + bwd) and one TP2 x CP2 training step as lowered by "
     "torch-xla: HLO size, collectives, distinct graphs over all ranks, f64, XLA:CPU compile "
     "time and compiled peak memory, beside earlier revisions; the temp memory per decoder "
     "layer of an 8B-like layer at TP8 x CP4 beside docs/choosing.md's activation formula."),
    ("bench_sequence_parallel", "Sequence parallelism inside TP",
     "Saved activations, TP collectives per decoder layer and CPU time per training step with "
     "`neuronx_distributed_config(sequence_parallel=True)` + `transform(model, config)` on vs "
     "off, on 4 gloo ranks with nxd_cp's fallback layers (NxD's own SP layers are verified for "
     "parity in tests/test_nxd_models.py; their collectives are NxD's and not counted here)."),
    ("bench_pipeline", "Pipeline parallelism with CP",
     "Each stage's XLA graph (one microbatch fwd + bwd, every TP x CP x PP rank lowered) and, "
     "on gloo ranks, the pipeline bubble of GPipe and 1F1B against (pp-1)/(m+pp-1) and the "
     "bytes sent between stages per step against 2·m·mb·S_local·H·e."),
    ("bench_convergence", "Convergence at cp = 1 and cp = 4",
     "A tiny Llama trained for a few hundred steps by `examples/train_llama_cp.py` from a "
     "Hugging Face checkpoint directory the script writes (sharded safetensors, a BPE tokenizer "
     "trained with `tokenizers` on the Python standard library), on the standard library's "
     "largest modules as long documents (`--dataset`, JSON lines): the same weights and batches "
     "at cp = 1 and cp = 4 (4 gloo ranks), plain and `--packed`; the loss curves and their "
     "largest difference."),
    ("bench_model_state", "Model state per rank: ZeRO-1 and FSDP2",
     "Bytes of parameters, gradients and optimizer state per rank (largest rank) for TP x CP x "
     "DP with none / ZeRO-1 / FSDP2 over DP x CP, tiny Llama fp32 with one AdamW step, on 8 "
     "gloo ranks, against docs/choosing.md's formula."),
]


def load(results: str, name: str) -> Optional[dict]:
    path = os.path.join(results, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Headline
# ---------------------------------------------------------------------------------------------
def headline(data: Dict[str, Optional[dict]]) -> List[List[str]]:
    """Rows: figure, target, result, met."""
    rows = []
    mem = data["bench_memory"]
    if mem:
        for what, label in (("attention", "attention call"), ("layer", "decoder layer")):
            rs = [r for r in mem["rows"] if r["what"] == what]
            cp1 = max(r["ratio"] for r in rs if r["cp"] == 1)
            worst = max(r["ratio"] for r in rs if r["cp"] > 1)
            ok = worst <= mem["target"] and cp1 <= mem["target"]
            rows.append([f"memory per rank, {label} (saved / (best cp=1 / cp))",
                         f"<= {mem['target']}",
                         f"cp>1: {worst:.3f}; cp=1: {cp1:.3f}", "yes" if ok else "partly"])
    comm = data["bench_comm"]
    if comm:
        dev = max(abs(r[f"{p}_vs_formula"] - 1) for r in comm["rows"] for p in ("fwd", "bwd"))
        rows.append(["communication vs our formula (fwd and bwd)", "±1%",
                     f"max deviation {dev:.2%}", "yes" if dev <= 0.01 else "NO"])
        kv = [r for r in comm["rows"] if r["comm"] in ("p2p", "all_gather")]  # K/V streams
        fwd = max(abs(r["fwd_vs_limit"] - 1) for r in kv)
        rows.append(["communication fwd vs limit (cp-1)/cp of gathered K/V", "±1%",
                     f"max deviation {fwd:.2%}", "yes" if fwd <= 0.01 else "NO"])
        for c in ("p2p", "all_gather"):
            b = [r["bwd_vs_limit"] for r in comm["rows"] if r["comm"] == c]
            rows.append([f"communication bwd vs limit (dK/dV fp32 only), {c}", "1.00",
                         f"{min(b):.3f}-{max(b):.3f}", "NO (by design, see below)"])
        rep = [r["vs_repeat_kv"] for r in kv]
        rows.append(["communication vs repeat-KV design", "Hkv/Hq = 0.25",
                     f"{min(rep):.4f}-{max(rep):.4f}", "yes" if max(rep) <= 0.2501 else "NO"])
    lb = data["bench_load_balance"]
    if lb:
        z = max(max(r["max_over_mean"], r["steps_max_over_mean"]) for r in lb["rows"]
                if r["layout"] == "zigzag")
        c = max(r["max_over_mean"] for r in lb["rows"] if r["layout"] == "contiguous")
        rows.append(["load balance zigzag max/mean (contiguous for contrast)", f"<= {lb['target']}",
                     f"{z:.4f} (contiguous up to {c:.3f})", "yes" if z <= lb["target"] else "NO"])
    pack = data.get("bench_packing_balance")
    if pack:
        worst = max(r["per_document_worst"] for r in pack["rows"])
        zz = max(r["zigzag_mean"] for r in pack["rows"])
        rows.append(["packed documents: per_document worst max/mean (zigzag mean for contrast)",
                     "<= 1.01", f"{worst:.4f} (zigzag up to {zz:.2f})",
                     "yes" if worst <= 1.01 else "NO"])
    eff = data["bench_cpu_efficiency"]
    if eff:
        for kernel, label in (("auto", "default kernel (CPU fused)"), ("torch", "pure torch")):
            for s in sorted({r["seq_len"] for r in eff["rows"] if r["kernel"] == kernel}):
                rs = [r for r in eff["rows"] if r["kernel"] == kernel and r["seq_len"] == s]
                vals = " / ".join(f"{r['ratio']:.2f}" for r in rs if r["comm"] == "p2p")
                ag = " / ".join(f"{r['ratio']:.2f}" for r in rs if r["comm"] == "all_gather")
                worst = min(r["ratio"] for r in rs)
                rows.append([f"CPU efficiency, {label}, S={s} (cp 2/4/8: p2p; all_gather)",
                             f">= {eff['target']}", f"{vals}; {ag}",
                             "yes" if worst >= eff["target"] else "NO"])
    e2e = data["bench_e2e_cpu"]
    if e2e:
        m = e2e["configs"]["TP2 x CP2"]
        if m.get("cpu_ratio") is not None:
            rows.append(["end to end TP2xCP2: CPU time/rank vs perfect scaling",
                         "1.00 (no target)", f"{m['cpu_ratio']:.3f}", "-"])
        if m.get("mem_ratio") is not None:
            rows.append(["end to end TP2xCP2: step memory/rank vs one rank at S/2",
                         "<= 1.00 (no target)", f"{m['mem_ratio']:.2f}", "-"])
    conv = data.get("bench_convergence")
    if conv:  # fp32 rounding grows with training: read cp=4 against the tp=2 control (no CP)
        ctrl = next((d for d in conv["diffs"] if "control" in d["b"]), None)  # not in --quick
        for d in conv["diffs"]:
            if d is ctrl:
                continue
            versus = ("" if ctrl is None else
                      f"; control {ctrl['tail_rel']:.1e}, {ctrl['max']:.1e}")
            rows.append([f"training loss {d['b']} vs {d['a']}, {conv['steps']} steps: mean of "
                         "the last sixth, relative difference (largest; tp=2 control)",
                         "<= 1e-2", f"{d['tail_rel']:.1e} (largest {d['max']:.1e} at step "
                         f"{d['at']}{versus})",
                         "yes" if d["tail_rel"] <= 1e-2 else "NO"])
    rows += xla_headline(data["bench_xla_graph"])
    gpu = data["bench_gpu"]
    if gpu is None or gpu.get("skipped"):
        rows.append(["GPU figures", "when a device is lent", "skipped: no CUDA device", "-"])
    else:
        worst = min(r["ratio"] for r in gpu["schedule"])
        rows.append([f"GPU zigzag schedule vs full/cp ({gpu['stamp'].get('gpu')})", ">= 0.85",
                     f"min {worst:.3f}", "yes" if worst >= 0.85 else "NO"])
    return rows


def xla_headline(xla: Optional[dict]) -> List[List[str]]:
    """Issue 14's targets from this checkout's rows of bench_xla_graph."""
    if not xla:
        return []
    rows = [r for r in xla["rows"]["new"] if "error" not in r and "na" not in r]
    att = {(r["cp"], r["s_local"]): r for r in rows if r["kind"] == "attention"}
    out = []
    at8 = [att[k]["instructions"] for k in att if k[0] == 8]
    if at8:
        out.append(["XLA attention fwd+bwd per layer at cp=8 (HLO instructions, any S_local)",
                    "<= 3,500", f"{max(at8):,}", "yes" if max(at8) <= 3500 else "NO"])
    distinct = [r["distinct"] for r in rows if r.get("distinct") is not None]
    if distinct:
        out.append(["XLA distinct graphs over the ranks (attention, TP2xCP2 step)", "1",
                    f"max {max(distinct)}", "yes" if max(distinct) == 1 else "NO"])
        f64 = max(r["f64"] for r in rows)
        out.append(["XLA f64 instructions (attention, TP2xCP2 step)", "0", str(f64),
                    "yes" if f64 == 0 else "NO"])
    s64 = [r["s64_compute"] for r in rows if r.get("s64_compute") is not None]
    if s64:
        out.append(["XLA s64 instructions beyond the int64 inputs (attention, TP2xCP2 step)",
                    "0", str(max(s64)), "yes" if max(s64) == 0 else "NO"])
    return out


def findings(data: Dict[str, Optional[dict]]) -> str:
    """Why the misses happen and what would close them (prose with the measured numbers)."""
    out = []
    mem, comm, eff, e2e = (data[k] for k in ("bench_memory", "bench_comm",
                                            "bench_cpu_efficiency", "bench_e2e_cpu"))
    if mem:
        over = [r for r in mem["rows"] if r["ratio"] > 1.10]
        if over:
            worst = max(over, key=lambda r: r["ratio"])
            out.append(
                f"- **Memory: {len(over)} rows above 1.10 (worst {worst['ratio']:.3f}, "
                f"{worst['what']} at cp = {worst['cp']}, {worst['comm']}).** Compare the saved "
                "bytes with the listing in section 1: every tensor saved beyond the local q, k, "
                "v, out and fp32 lse is an extra copy to remove.")
    if comm:
        out.append(
            "- **Communication, backward above the limit (by design).** The limit counts "
            "only dK/dV. Because only the local K/V are saved (memory 1/cp above), backward "
            "re-rotates (p2p) or re-gathers (all_gather) K/V: (cp-1)·2E·e more bytes; p2p's "
            "dK/dV also make cp hops, not cp-1 (the last brings them home). Keeping the received "
            "K/V would remove the first term at (cp-1)/cp of K/V per layer in memory; starting "
            "the backward rotation one rank ahead would turn the extra fp32 dK/dV hop into one "
            "more bf16 K/V hop (saves 2E·(4-e) bytes per call). Forward equals the limit and "
            "all counts equal our formula exactly.")
    if eff:
        misses = [r for r in eff["rows"] if r["kernel"] == "auto" and r["ratio"] < eff["target"]]
        torch_rows = [r for r in eff["rows"] if r["kernel"] == "torch"]
        if misses:
            txt = ", ".join(f"S={r['seq_len']} cp={r['cp']} {r['comm']} {r['ratio']:.2f}"
                            for r in misses)
            s_max = max(r["seq_len"] for r in eff["rows"] if r["kernel"] == "auto")
            big = [r["ratio"] for r in eff["rows"] if r["kernel"] == "auto"
                   and r["seq_len"] == s_max]
            out.append(
                f"- **CPU efficiency, default kernel: misses at {txt} "
                f"(target {eff['target']}).** These are the smallest blocks (S/(2cp) rows per "
                "chunk). Profiled (S=8K, cp=8), the fused kernel calls keep pace with the full "
                "sequence; the per-step work outside them (LSE merges, packing K/V, "
                "zero-filled accumulators, dK/dV adds) is ~6% of the rank's time, and ranks "
                "jitter by a few percent on this shared machine (the figure is the slower of "
                f"two ranks, medians of {min(r['reps'] for r in misses)}). At S={s_max} the "
                f"ratios are {min(big):.2f}-{max(big):.2f}. Merging inside the kernel (the "
                "fused op accumulating into `out` / `lse` in place) and reusing the "
                "accumulators across steps would remove most of that work.")
        if torch_rows:
            lo = min(r["ratio"] for r in torch_rows)
            hi = max(r["ratio"] for r in torch_rows)
            own = [r["ratio_vs_own_full"] for r in torch_rows]
            out.append(
                f"- **CPU efficiency, pure-torch kernel: {lo:.2f}-{hi:.2f} of SDPA.** The gap is "
                "the kernel (unfused matmul / exp / where per tile), not CP: against the same "
                f"kernel on the full sequence the schedules reach {min(own):.2f}-{max(own):.2f}. "
                "It is the XLA / reference path; on CPU the fused op is the default, on "
                "Trainium an NKI kernel registered with `register_kernel` closes it.")
    if e2e and e2e["configs"]["TP2 x CP2"].get("cpu_ratio") is not None:
        m = e2e["configs"]["TP2 x CP2"]
        out.append(
            f"- **End to end: CPU time per rank {m['cpu_ratio']:.2f} of perfect scaling.** The "
            "rest is what TP x CP adds on top of the attention: TP all-reduces of activations "
            "in forward and backward, CP K/V exchange and the gradient all-reduce, all on gloo "
            "over loopback (their CPU time counts), plus smaller kernels. 4 ranks share 2 cores "
            "here, so tokens/s of that run is not a speed-up figure.")
    out += xla_findings(data["bench_xla_graph"])
    return "\n".join(out)


def xla_findings(xla: Optional[dict]) -> List[str]:
    """Why the cp=8 attention graph is above ~3,500 instructions (the size target), where it is."""
    if not xla:
        return []
    att = {r["s_local"]: r["instructions"] for r in xla["rows"]["new"]
           if r["kind"] == "attention" and r["cp"] == 8 and "instructions" in r}
    over = {s: n for s, n in att.items() if n > 3500}
    if not over:
        return []
    lo, hi = min(over.values()), max(over.values())
    sizes = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
    below = [att[s] for s in att if s not in over]
    before = f"; {max(below):,} up to S_local {max(s for s in att if s not in over):,}" \
        if below else ""
    return [
        f"- **XLA attention graph at cp=8: {sizes} instructions at S_local "
        f"{min(over):,}-{max(over):,}{before}.** Above S_local = 2 x XLA_BLOCK every "
        "product is a loop over Q tiles inside the graph: constant in S_local, but each of the "
        "2cp kernel calls (cp forward, cp backward) carries its own loop body and slicing (~120 "
        "instructions). Sharing one body between the ring steps (the ring itself as a loop) "
        "would take it below the target; an NKI kernel registered for `\"xla\"` replaces the "
        "bodies."]


def sp_reading(sp: dict) -> str:
    """The reading of section 8 (sequence parallelism), with its measured numbers."""
    rows = {(r["tp"], r["cp"], r["sp"], r["grouped"]): r for r in sp["layers"]}
    layouts = sorted({(r["tp"], r["cp"]) for r in sp["layers"]}, key=lambda x: -x[1])

    def tp_bytes(r):
        return sum(v for part in ("fwd_bytes", "bwd_bytes") for k, v in r[part].items()
                   if k != "ring_shift")

    saved = ", ".join(
        f"{rows[(t, c, True, True)]['layer_saved'] / rows[(t, c, False, True)]['layer_saved']:.2f}x"
        f" at TP{t}xCP{c}" for t, c in layouts)
    megatron = " and ".join(f"{(34 / t) / (10 + 24 / t):.2f}x" for t, _ in layouts)
    t, c = layouts[0]
    grouped, ungrouped = rows[(t, c, False, True)], rows.get((t, c, False, False))
    on, off = tp_bytes(rows[(t, c, True, True)]), tp_bytes(grouped)
    e2e = sp["e2e"]
    ratio = e2e["True"] / e2e["False"]
    if abs(ratio - 1) <= 0.03:
        why = "within the few percent that steps jitter here"
    elif ratio > 1:
        why = ("communication on one host is cheap; at this tiny size the norms on 1/tp of the "
               "tokens do not pay for the extra copies")
    else:
        why = "the norms and residuals on 1/tp of the tokens pay for the extra collectives"
    return (
        "Reading: with SP the decoder layer saves 1/tp of everything (norm inputs and outputs; "
        "the projections' inputs are kept as their TP shard and all-gathered again in "
        f"backward): against SP off {saved}, the trend of Megatron's `sbh(10+24/t)` -> `sbh*34/t` "
        f"({megatron}). "
        + (f"Grouping the TP inputs (q/k/v, gate/up) cuts the backward of a layer "
           f"from {ungrouped['bwd_calls'].get('all_reduce', 0)} all-reduces to "
           f"{grouped['bwd_calls'].get('all_reduce', 0)} (TP{t}, "
           f"{fmt_bytes(ungrouped['bwd_bytes'].get('all_reduce', 0))} -> "
           f"{fmt_bytes(grouped['bwd_bytes'].get('all_reduce', 0))} sent). "
           if ungrouped is not None else "The TP inputs (q/k/v, gate/up) are grouped. ")
        + f"At TP{t}xCP{c} SP "
        f"sends {on / off - 1:+.0%} TP bytes against grouped TP without SP (the re-gathers of the "
        f"saved inputs), and its CPU time per step is {ratio:.2f}x the SP-off step on this "
        f"machine ({why}).")


def convergence_reading(conv: dict) -> str:
    d = {(x["a"], x["b"]): x for x in conv["diffs"]}
    cp = d[("cp=1", "cp=4")]
    ctrl, packed = d.get(("cp=1", "tp=2 (control)")), d.get(("cp=1 packed", "cp=4 packed"))
    runs = {r["label"]: r for r in conv["runs"]}
    if ctrl is None or packed is None:  # --quick: the plain pair only
        return (f"Reading (--quick, the plain pair only): cp = 4 vs cp = 1, largest difference "
                f"{cp['max']:.1e} at step {cp['at']}.")
    early = max((abs(a - b) for a, b, s in zip(runs["cp=1"]["losses"], runs["cp=4"]["losses"],
                                               runs["cp=1"]["steps"])
                 if cp["first"] is None or s < cp["first"]), default=0.0)
    return (f"Reading: the cp = 4 losses equal the cp = 1 losses within fp32 rounding "
            f"(≤ {early:.1e}, a few ulp) until step {cp['first']}; from there fp32 rounding "
            "differences, amplified by training, make single steps differ (largest "
            f"{cp['max']:.1e} at step {cp['at']}). The control without CP (tp = 2: the same "
            f"model, only the summation order of the TP matmuls changed) departs at step "
            f"{ctrl['first']} by as much (largest {ctrl['max']:.1e}): the departure is fp32 "
            "chaos of the training run, not context parallelism. Averaged over the last sixth of "
            f"the run the curves agree to {cp['tail_rel']:.1e} (control {ctrl['tail_rel']:.1e}; "
            f"packed {packed['tail_rel']:.1e}).")


READINGS = {"bench_sequence_parallel": sp_reading,  # prose computed from a section's JSON
            "bench_convergence": convergence_reading}


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------
def plot(data: Dict[str, Optional[dict]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    mem, eff, comm = data["bench_memory"], data["bench_cpu_efficiency"], data["bench_comm"]
    ax = axes[0]
    if mem:
        for what, color in (("attention", "tab:blue"), ("layer", "tab:orange")):
            rs = sorted((r for r in mem["rows"] if r["what"] == what and r["comm"] == "p2p"),
                        key=lambda r: r["cp"])
            cps = [r["cp"] for r in rs]
            label = "attention call" if what == "attention" else "decoder layer"
            ax.plot(cps, [r["saved"] / 2**20 for r in rs], "o-", color=color,
                    label=f"{label} (S={rs[0]['seq_len']})")
            ax.plot(cps, [r["limit"] / 2**20 for r in rs], "--", color=color, alpha=0.6,
                    label=f"{label}: limit best cp=1 / cp")
    ax.set(title="Activation memory per rank (saved for backward)", xlabel="cp",
           ylabel="MiB", xscale="log", yscale="log")
    ax2 = axes[1]
    if eff:
        colors = iter(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"])
        for s in sorted({r["seq_len"] for r in eff["rows"]}):
            rs = sorted((r for r in eff["rows"] if r["seq_len"] == s and r["kernel"] == "auto"
                         and r["comm"] == "p2p"), key=lambda r: r["cp"])
            full = eff["full_times"][str(s)]["sdpa"]
            color = next(colors)
            ax2.plot([1] + [r["cp"] for r in rs], [full] + [r["rank_time"] for r in rs], "o-",
                     color=color, label=f"S={s // 1024}K: one rank (cp=1: SDPA)")
            ax2.plot([1] + [r["cp"] for r in rs], [full] + [full / r["cp"] for r in rs], "--",
                     color=color, alpha=0.6, label=f"S={s // 1024}K: SDPA full / cp")
    ax2.set(title=f"Attention fwd+bwd time per rank (CPU, "
                  f"{eff['threads'] if eff else '?'} thread, {eff['clock'] if eff else ''} time)",
            xlabel="cp", ylabel="seconds", xscale="log", yscale="log")
    ax3 = axes[2]
    if comm:
        for c, color in (("p2p", "tab:blue"), ("all_gather", "tab:orange")):
            rs = sorted((r for r in comm["rows"] if r["comm"] == c), key=lambda r: r["cp"])
            cps = [r["cp"] for r in rs]
            ax3.plot(cps, [(r["fwd"] + r["bwd"]) / 2**20 for r in rs], "o-", color=color,
                     label=f"{c}: sent fwd+bwd")
            ax3.plot(cps, [(r["repeat_kv"]["fwd"] + r["repeat_kv"]["bwd"]) / 2**20 for r in rs],
                     ":", color=color, alpha=0.7, label=f"{c}: repeat-KV design")
        rs = sorted(comm["rows"], key=lambda r: r["cp"])
        ax3.plot(sorted({r["cp"] for r in rs}),
                 [(r["limit"]["fwd"] + r["limit"]["bwd"]) / 2**20 for r in rs
                  if r["comm"] == "p2p"],
                 "k--", alpha=0.6, label="limit (fwd K/V + bwd dK/dV)")
    ax3.set(title="Bytes sent per rank per attention call", xlabel="cp", ylabel="MiB",
            xscale="log", yscale="log")
    plain = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}")
    for a in axes:
        a.set_xscale("log", base=2)
        cps = sorted({round(x) for line in a.get_lines() for x in line.get_xdata()})
        a.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(cps))
        a.xaxis.set_major_formatter(plain)
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        a.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1, 2, 5)))
        a.yaxis.set_major_formatter(plain)
        a.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        a.grid(True, which="both", alpha=0.3)
        if a.get_lines():
            a.legend(fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
def markdown(data, commands: Dict[str, str], seconds: Optional[float], quick: bool,
             png_name: str) -> str:
    stamp = machine_stamp()
    gpu = data.get("bench_gpu") or {}
    lines = ["# Performance", "",
             "Generated by `benchmarks/run_all.sh" + (" --quick" if quick else "") + "` "
             "(`benchmarks/report.py`); do not edit by hand. The one home of every measured "
             "figure: each is printed beside its theoretical limit and the ratio.", "",
             "## Machine", "",
             f"- CPU: {stamp['cpu']}, {stamp['cores']} cores (shared with other jobs while this "
             "ran: CPU-time clocks below)",
             f"- torch {stamp['torch']}, Python {stamp['python']}",
             f"- date: {stamp['date']}"]
    if seconds is not None:
        lines.append(f"- this run took {seconds / 60:.1f} minutes")
    if gpu.get("stamp", {}).get("gpu"):
        g = gpu["stamp"]
        lines.append(f"- GPU: {g['gpu']}, CUDA {g['cuda']}, cuDNN {g['cudnn']}")
    else:
        lines.append("- GPU: none lent to this run (`bench_gpu.py` printed "
                     "\"skipped: no CUDA device\"; no GPU figures are claimed)")
    lines += ["", "Sizes are chosen so the whole run stays near 10 minutes on this 2-core "
              "machine; every figure except timings is a function of shapes only and scales "
              "exactly (bytes linear in S, ratios constant).", "",
              "## Headline", "",
              "| figure | target | result | met |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in headline(data)]
    text = findings(data)
    if text:
        lines += ["", "### Where a target is missed, why, and what would close it", "", text]
    lines += ["", f"![per-rank memory, time and communication vs cp]({png_name})", ""]
    for i, (name, title, what) in enumerate(SECTIONS, 1):
        lines += [f"## {i}. {title}", "", what, ""]
        if name in commands:
            lines += ["```", commands[name], "```", ""]
        d = data.get(name)
        if d is None:
            lines += ["(no result: the script failed or was not run)", ""]
        elif d.get("skipped"):
            lines += [f"skipped: {d['skipped']}", ""]
        else:
            lines += [d["tables"].replace("### ", "#### "), ""]
            if name in READINGS:
                lines += [READINGS[name](d), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", required=True, help="folder of the benchmarks' JSON files")
    p.add_argument("--out", required=True, help="folder for performance.md / performance.png")
    p.add_argument("--quick", action="store_true", help="the results come from --quick runs")
    args = p.parse_args()
    data = {name: load(args.results, name) for name, _, _ in SECTIONS}
    commands = {}
    path = os.path.join(args.results, "commands.txt")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                for name, _, _ in SECTIONS:
                    if f"benchmarks/{name}.py" in line:
                        commands[name] = line.strip()
    seconds = None
    path = os.path.join(args.results, "seconds.txt")
    if os.path.exists(path):
        with open(path) as f:
            seconds = float(f.read().strip())
    os.makedirs(args.out, exist_ok=True)
    plot(data, os.path.join(args.out, "performance.png"))
    with open(os.path.join(args.out, "performance.md"), "w") as f:
        f.write(markdown(data, commands, seconds, args.quick, "performance.png"))
    print(f"wrote {os.path.join(args.out, 'performance.md')} and performance.png")


if __name__ == "__main__":
    main()
