"""Convergence: the same training run at cp = 1 and cp = 4 (and with packed documents), one figure.

A tiny Llama (written here as a Hugging Face checkpoint directory: sharded safetensors, config
and a byte-level BPE tokenizer trained with ``tokenizers``) is trained from that directory by
``examples/train_llama_cp.py`` under torchrun on gloo ranks, on a corpus nobody here wrote: the
largest top-level modules of the Python standard library, one long document per file (JSON
lines, read and tokenized by ``datasets``). Every run starts from the same weights and sees the
same batches (dp = 1: the run's chunks in the same seeded order), so the cp = 4 curve should lie
on the cp = 1 curve up to fp32 rounding; the figure shows both and their largest difference.
The packed runs (``--packed --load_balance per_document`` at cp = 4, ``--packed`` at cp = 1)
pack whole documents (cut into ``seq_len`` pieces) with per-document attention. The control,
tp = 2 without CP, is the same computation with another (TP) summation order: fp32 rounding
differences of ~1e-7 are amplified by training after some tens of steps whatever reorders the
sums, so the cp = 4 difference is to be read against the control's.

Writes ``--png`` (default ``docs/convergence.png``) and prints the table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, parser, print_table, write_json  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "examples"))
from data import read_loss_log  # noqa: E402  examples/data.py

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
MODEL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
# (label, processes, extra arguments of the example); cp=1 first: the reference curves
RUNS = [("cp=1", 1, []),
        ("cp=4", 4, ["--context_parallel_size", "4"]),
        ("tp=2 (control)", 2, ["--tensor_parallel_size", "2"]),
        ("cp=1 packed", 1, ["--packed"]),
        ("cp=4 packed", 4, ["--context_parallel_size", "4", "--packed",
                            "--load_balance", "per_document"])]
PAIRS = [("cp=1", "cp=4"), ("cp=1", "tp=2 (control)"), ("cp=1 packed", "cp=4 packed")]


def stdlib_documents(n_files: int):
    """(name, text) of the ``n_files`` largest top-level modules of the standard library."""
    root = os.path.dirname(os.__file__)
    names = sorted((f for f in os.listdir(root) if f.endswith(".py")),
                   key=lambda f: (-os.path.getsize(os.path.join(root, f)), f))[:n_files]
    return [(f, open(os.path.join(root, f), encoding="utf-8", errors="replace").read())
            for f in names]


def write_checkpoint(folder: str, texts, vocab_size: int, seed: int = 0) -> None:
    """A randomly initialised tiny Llama in sharded safetensors plus its BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **MODEL))
    model.save_pretrained(folder, max_shard_size="200KB")


def train(label, nproc, extra, ckpt, dataset, work, args) -> dict:
    """One run of the example; its loss log and wall time."""
    log = os.path.join(work, "".join(c for c in label if c.isalnum()) + ".csv")
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, "examples", "train_llama_cp.py"), "--model_name_or_path", ckpt,
           "--dataset", dataset, "--dataset_cache", os.path.join(work, "cache"),
           "--seq_len", str(args.seq_len), "--steps", str(args.steps), "--lr", str(args.lr),
           "--warmup_steps", str(args.steps // 10), "--loss_log", log, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = read_loss_log(log)
    return dict(label=label, nproc=nproc, seconds=time.perf_counter() - start,
                command=" ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c
                                 for c in cmd[:4]) + " ... " + " ".join(extra),
                steps=[int(r["step"]) for r in records], losses=[r["loss"] for r in records])


def plot(runs, diffs, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.3]})
    styles = {"cp=1": ("C0", "-", 2.5), "cp=4": ("C1", "--", 1.2),
              "tp=2 (control)": ("0.5", ":", 1.0),
              "cp=1 packed": ("C2", "-", 2.5), "cp=4 packed": ("C3", "--", 1.2)}
    for r in runs.values():
        color, ls, lw = styles[r["label"]]
        top.plot(r["steps"], r["losses"], color=color, ls=ls, lw=lw, label=r["label"])
    top.set_ylabel("training loss")
    top.set_title(title, fontsize=10)
    top.legend()
    top.grid(alpha=0.3)
    for (a, b), d in diffs.items():
        bottom.semilogy(d["steps"], [max(x, 1e-9) for x in d["abs"]], label=f"|{b} - {a}|, max "
                        f"{d['max']:.2e} at step {d['at']}", color=styles[b][0])
    bottom.set_xlabel("step")
    bottom.set_ylabel("|difference| (0 drawn at 1e-9)")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--files", type=int, default=40, help="standard-library modules (documents)")
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--png", default=None,
                   help="the figure (default: docs/convergence.png; --quick: beside --json)")
    p.add_argument("--write_checkpoint", metavar="DIR", default=None,
                   help="only write the tiny checkpoint directory (weights, config, tokenizer) "
                        "to DIR and exit: a model to try the example's --model_name_or_path on")
    args = p.parse_args()
    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint,
                         [t for _, t in stdlib_documents(args.files)], args.vocab_size)
        print(f"wrote {args.write_checkpoint}")
        return
    runs_wanted, pairs = RUNS, PAIRS
    if args.quick:  # the smoke test: the plain pair only (each run is a torchrun launch)
        args.steps, args.files, args.seq_len = 6, 6, 64
        runs_wanted, pairs = RUNS[:2], PAIRS[:1]
    png = args.png or (os.path.join(ROOT, "docs", "convergence.png") if not args.quick else
                       os.path.join(os.path.dirname(os.path.abspath(args.json or ".")),
                                    "convergence.png"))
    with tempfile.TemporaryDirectory(prefix="nxd_cp_convergence_") as work:
        docs = stdlib_documents(args.files)
        ckpt, dataset = os.path.join(work, "ckpt"), os.path.join(work, "stdlib.jsonl")
        write_checkpoint(ckpt, [t for _, t in docs], args.vocab_size)
        with open(dataset, "w") as f:
            for name, text in docs:
                f.write(json.dumps({"file": name, "text": text}) + "\n")
        runs = {label: train(label, n, extra, ckpt, dataset, work, args)
                for label, n, extra in runs_wanted}
    tail = max(1, args.steps // 6)  # the last steps, averaged: where the curves end
    diffs = {}
    for a, b in pairs:
        ra, rb = runs[a], runs[b]
        if ra["steps"] != rb["steps"]:
            raise AssertionError(f"{a} and {b} logged different steps")
        d = [abs(x - y) for x, y in zip(ra["losses"], rb["losses"])]
        i = max(range(len(d)), key=d.__getitem__)
        mean_a, mean_b = (sum(r["losses"][-tail:]) / tail for r in (ra, rb))
        diffs[(a, b)] = dict(steps=ra["steps"], abs=d, max=d[i], at=ra["steps"][i],
                             rel=d[i] / abs(ra["losses"][i]),
                             first=next((s for s, x in zip(ra["steps"], d) if x > 1e-5), None),
                             tail_rel=abs(mean_b - mean_a) / abs(mean_a))
    n_tokens = args.steps * args.seq_len
    title = (f"tiny Llama (hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, "
             f"vocab {args.vocab_size}) on {args.files} stdlib modules, S={args.seq_len}, "
             f"{args.steps} steps, fp32, gloo")
    plot(runs, diffs, png, title)
    step = max(1, args.steps // 6)
    marks = sorted({1, *range(step, args.steps + 1, step), args.steps})
    labels = [label for label, _, _ in runs_wanted]
    blank = [""] * len(labels)
    rows = []
    for s in marks:
        i = runs["cp=1"]["steps"].index(s)
        rows.append([s] + [f"{runs[label]['losses'][i]:.4f}" for label in labels] +
                    [f"{diffs[pair]['abs'][i]:.1e}" for pair in pairs])
    rows.append(["largest difference"] + blank +
                [f"{diffs[pair]['max']:.1e} (step {diffs[pair]['at']})" for pair in pairs])
    rows.append(["first step > 1e-5"] + blank +
                [str(diffs[pair]["first"] or "-") for pair in pairs])
    rows.append([f"mean of the last {tail} steps"] +
                [f"{sum(runs[label]['losses'][-tail:]) / tail:.4f}" for label in labels] +
                [f"{diffs[pair]['tail_rel']:.1e} (relative)" for pair in pairs])
    rows.append(["wall time"] + [f"{runs[label]['seconds']:.0f} s" for label in labels] +
                [""] * len(pairs))
    print_table(f"Training loss at cp = 1 and cp = 4 (same weights, same batches; "
                f"{n_tokens:,} tokens per run)",
                ["step", *labels, *[f"difference {b} vs {a}" for a, b in pairs]], rows,
                note=f"![loss curves at cp = 1 and cp = 4]({os.path.basename(png)})")
    write_json(args.json, dict(
        steps=args.steps, seq_len=args.seq_len, files=args.files, vocab_size=args.vocab_size,
        model=MODEL, png=png, runs=list(runs.values()),
        diffs=[dict(a=a, b=b, **{k: d[k] for k in ("max", "at", "rel", "first", "tail_rel")})
               for (a, b), d in diffs.items()]))
    print(f"\nwrote {png}")


if __name__ == "__main__":
    main()
