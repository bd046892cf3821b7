"""Train a (tiny by default) Llama with tensor x context parallelism under torchrun.

    torchrun --nproc_per_node 4 examples/train_llama_cp.py --tensor_parallel_size 2 \
        --context_parallel_size 2 --seq_len 4096 --steps 10 --check

The same script runs on CPU (gloo), CUDA (NCCL) and XLA / Trainium (``--device xla``). Data is a
local text file read as bytes (byte-level tokens, vocabulary 256), by default the project's own
docs; the model comes from a JSON transformers config (a tiny Llama by default). Nothing is
downloaded.

Every rank of a CP group reads the same full-sequence batch (chosen by DP rank) and keeps its
shard (``get_batch_on_this_context_parallel_rank``). With ``--check`` rank 0 also runs the
unmodified transformers model on its first batch and compares loss and every parameter's
gradient, then prints a summary table ending in ``PASS parity <err>`` or ``FAIL ...`` (exit 1).

``--packed`` packs documents (the data's paragraphs, split at blank lines) back to back into each
row with transformers' ``DataCollatorWithFlattening`` (``position_ids`` restarting at every
document, ``-100`` labels at document starts); attention stays inside each document, and
``--check`` then compares with the unmodified model run on every document separately. Use it
with ``--load_balance per_document`` (documents split head-tail over the CP ranks).
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import time
from typing import Dict, List

import torch
import torch.distributed as dist

import nxd_cp
from nxd_cp import parallel_state as ps

DEFAULT_CONFIG = dict(  # a tiny Llama 3.1-style model: GQA and llama3 RoPE scaling
    model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=352,
    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
    rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=131072,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=1024))
LOSS_TOL = 1e-5  # fp32 relative loss error vs the unmodified model (the project's fp32 standard)
GRAD_TOL = 1e-4  # fp32 relative gradient error, worst parameter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tensor_parallel_size", type=int, default=1)
    p.add_argument("--context_parallel_size", type=int, default=1)
    p.add_argument("--cp_comm_type", choices=["p2p", "all_gather"], default="p2p")
    p.add_argument("--load_balance", choices=["zigzag", "contiguous", "per_document"],
                   default="zigzag")
    p.add_argument("--packed", action="store_true",
                   help="pack whole documents (paragraphs) into each row; attention per document")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=1, help="sequences per DP rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", choices=["cpu", "cuda", "xla"], default="cpu")
    p.add_argument("--model_config", default=None,
                   help="JSON file of a transformers config (default: a tiny Llama)")
    p.add_argument("--data", default=None,
                   help="text file read as bytes (default: the project's docs/*.md)")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute each decoder layer in backward (large models)")
    p.add_argument("--vocab_parallel_logits", action="store_true",
                   help="keep logits split by vocabulary over TP; the loss is vocab-parallel")
    p.add_argument("--sequence_parallel", action="store_true",
                   help="sequence parallelism inside TP (norms / residuals on S/(cp*tp) tokens)")
    p.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="clip the global gradient norm to this after the reduction (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=1)
    p.add_argument("--check", action="store_true",
                   help="compare loss and gradients of step 1 with the unmodified model")
    p.add_argument("--summary_json", default=None, help="write the run's figures here")
    p.add_argument("--warmup_steps", type=int, default=0,
                   help="linear learning-rate warm-up (a scheduler saved in checkpoints)")
    p.add_argument("--save_dir", default=None,
                   help="directory of sharded checkpoints (nxd_cp.save_checkpoint)")
    p.add_argument("--save_every", type=int, default=0,
                   help="save every N steps (0: only after the last step) when --save_dir")
    p.add_argument("--resume", nargs="?", const="newest", default=None, metavar="TAG",
                   help="continue from the newest checkpoint in --save_dir (or from TAG); "
                        "starts from scratch when there is none")
    args = p.parse_args(argv)
    for name in ("tensor_parallel_size", "context_parallel_size", "seq_len", "batch_size",
                 "steps", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)} must be >= 1")
    for name in ("save_every", "warmup_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name}={getattr(args, name)} must be >= 0")
    if args.resume and not args.save_dir:
        p.error("--resume needs --save_dir (where the checkpoints are)")
    return args


# --- set-up -------------------------------------------------------------------------------------
def init_distributed(device: str) -> torch.device:
    """Join the torchrun world with the backend of ``device``; return this rank's device."""
    if device == "xla":
        import torch_xla
        import torch_xla.distributed.xla_backend  # noqa: F401 - registers the "xla" backend
        dist.init_process_group("xla", init_method="xla://")
        return torch_xla.device()
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def build_model(path, seq_len: int):
    from transformers import AutoConfig, AutoModelForCausalLM
    if path is None:
        spec = dict(DEFAULT_CONFIG)
    else:
        with open(path) as f:
            spec = json.load(f)
    spec["max_position_embeddings"] = max(spec.get("max_position_embeddings", 0), seq_len)
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    config.attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_tokens(path) -> torch.Tensor:
    """The bytes of ``path`` (default: the project's docs) as int64 token ids."""
    if path is None:
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
        paths = sorted(glob.glob(os.path.join(root, "docs", "*.md")) +
                       [os.path.join(root, "README.md")])
    else:
        paths = [path]
    data = b"".join(open(p, "rb").read() for p in paths)
    if not data:
        raise ValueError(f"--data {paths} holds no bytes")
    return torch.tensor(list(data), dtype=torch.int64)


def get_batch(tokens: torch.Tensor, step: int, dp_rank: int, batch_size: int, seq_len: int,
              seed: int, packed: bool = False) -> Dict[str, torch.Tensor]:
    """The full-sequence batch ``[B, S]`` of one DP rank at one step (same on its CP ranks).

    packed: each row holds whole documents from a random one on, the last cut at the row's end,
    as ``DataCollatorWithFlattening`` builds them; the batch also holds ``"documents"`` (per
    row, the documents' token tensors) for the per-document reference.
    """
    if len(tokens) <= seq_len:  # a short file is repeated
        tokens = tokens.repeat(seq_len // len(tokens) + 2)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + dp_rank)
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=g)
    if packed:
        return pack_documents(tokens, starts.tolist(), seq_len)
    ids = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
    return {"input_ids": ids, "labels": ids.clone()}


def pack_documents(tokens: torch.Tensor, starts: List[int], seq_len: int) -> Dict[str, object]:
    """Rows of the documents (paragraphs: split after every blank line) from the one holding
    each start on, packed by transformers' ``DataCollatorWithFlattening``."""
    from transformers import DataCollatorWithFlattening

    blank = ((tokens[:-1] == 10) & (tokens[1:] == 10)).nonzero().flatten() + 2
    bounds = torch.cat([torch.tensor([0]), blank, torch.tensor([len(tokens)])]).unique()
    rows, documents = [], []
    for start in starts:
        d = int(torch.searchsorted(bounds, start, right=True)) - 1
        docs, total = [], 0
        while total < seq_len:
            a, b = int(bounds[d % (len(bounds) - 1)]), int(bounds[d % (len(bounds) - 1) + 1])
            docs.append(tokens[a:min(b, a + seq_len - total)])
            total += len(docs[-1])
            d += 1
        rows.append(DataCollatorWithFlattening()([{"input_ids": x.tolist()} for x in docs]))
        documents.append(docs)
    batch = {k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids")}
    return dict(batch, documents=documents)


# --- measurement --------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def reference_loss(model, batch):
    """The unmodified model's loss of one batch; packed: of every document alone (no packing),
    the documents' losses combined token-weighted."""
    if "documents" not in batch:
        return model(**batch).loss
    docs = [d for row in batch["documents"] for d in row if len(d) > 1]
    total = sum(len(d) - 1 for d in docs)
    return sum(model(input_ids=d[None], labels=d[None]).loss * ((len(d) - 1) / total)
               for d in docs)


def reference_step(model, batches):
    """The unmodified model on one process: the loss of ``batches[0]`` and the gradients
    averaged over ``batches`` (one per DP rank: what DP x CP gradient reduction gives)."""
    model.zero_grad(set_to_none=True)
    losses = [reference_loss(model, b) for b in batches]
    (sum(losses) / len(batches)).backward()
    return losses[0].detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def sync(device: torch.device) -> None:
    if device.type == "xla":
        import torch_xla
        torch_xla.sync()


def compile_count() -> int:
    import torch_xla.debug.metrics as met
    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


# --- training -----------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    device = init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    config = nxd_cp.neuronx_distributed_config(  # given once; transform binds it into the model
        tensor_parallel_size=args.tensor_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        # every decoder layer recomputed in backward, on every device (applied by transform)
        activation_checkpoint_config="full" if args.gradient_checkpointing else None,
        context_parallel_config={"comm_type": args.cp_comm_type,
                                 "load_balance": args.load_balance})
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_size()
    tp, cp = args.tensor_parallel_size, args.context_parallel_size

    torch.manual_seed(args.seed)  # the same full weights on every rank
    model = build_model(args.model_config, args.seq_len)
    reference = copy.deepcopy(model) if args.check and rank == 0 else None
    model = nxd_cp.transform(model, config,
                             vocab_parallel_logits=args.vocab_parallel_logits).to(device)
    if model.config.tie_word_embeddings:
        model.tie_weights()  # moving to an XLA device unties shared parameters
    # torch's AdamW; on XLA its update lowers without f64 scalars (docs/trn1.md)
    optimizer = nxd_cp.training.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))
    start_step = resume(args, model, optimizer, scheduler, rank)
    tokens = load_tokens(args.data)
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[train] world={world} tp={tp} cp={cp} dp={dp} comm={args.cp_comm_type} "
              f"layout={args.load_balance} seq_len={args.seq_len} batch/dp={args.batch_size} "
              f"device={args.device} params/rank={n_params:,} data={len(tokens):,} bytes",
              flush=True)

    progress = None
    if rank == 0 and sys.stderr.isatty():
        from tqdm import tqdm
        progress = tqdm(total=args.steps, desc="train", unit="step")
    losses: List[float] = []
    summary = {"world": world, "tp": tp, "cp": cp, "dp": dp, "comm": args.cp_comm_type,
               "seq_len": args.seq_len, "compiles": []}
    tokens_per_step = args.batch_size * args.seq_len * dp
    start = time.perf_counter()
    summary["losses"] = {}
    for step in range(start_step, args.steps + 1):
        full = get_batch(tokens, step, dp_rank, args.batch_size, args.seq_len, args.seed,
                         args.packed)
        documents = full.pop("documents", None)
        batch = {k: v.to(device) for k, v in
                 nxd_cp.get_batch_on_this_context_parallel_rank(full, config=model).items()}
        first = step == start_step
        with nxd_cp.count_bytes() as sent, nxd_cp.count_saved_bytes(model.parameters()) as saved:
            loss = model(**batch).loss
        with nxd_cp.count_bytes() as sent_bwd:
            loss.backward()
            # one call: the CP (DP x CP) reduction, and with SP the norms' sum over TP, once
            if dp > 1:
                nxd_cp.allreduce_data_context_parallel_gradients(model)
            else:
                nxd_cp.allreduce_context_parallel_gradients(model)
        if first:
            if documents is not None:
                summary["documents_per_row"] = [len(row) for row in documents]
            summary["saved_bytes"] = saved.total
            summary["sent_bytes"] = sent.total + sent_bwd.total
            if args.check and step == 1:
                dp_batches = [get_batch(tokens, step, d, args.batch_size, args.seq_len,
                                        args.seed, args.packed) for d in range(dp)]
                summary.update(check_parity(model, loss, reference, dp_batches, rank))
        if args.max_grad_norm > 0:  # after the parity check: it compares unclipped gradients
            nxd_cp.clip_grad_norm(model, args.max_grad_norm)  # TP shards counted once
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)  # one graph per step on XLA
        if args.device == "xla":
            summary["compiles"].append(compile_count())
        if step % args.log_every == 0 or step == args.steps or first:
            value = loss.item()  # the only host read of the step, at log points
            losses.append(value)
            summary["losses"][step] = value
            elapsed = time.perf_counter() - start
            if rank == 0:
                line = (f"[train] step {step}/{args.steps} loss {value:.4f} "
                        f"tokens/s {tokens_per_step * (step - start_step + 1) / elapsed:,.0f} "
                        f"elapsed {elapsed:.1f}s")
                if progress:
                    progress.set_postfix_str(line[8:])
                else:
                    print(line, flush=True)
        if args.save_dir and ((args.save_every and step % args.save_every == 0)
                              or step == args.steps):
            # step: the last finished step; the data position is the next step's batch index
            nxd_cp.save_checkpoint(args.save_dir, f"step_{step:06d}", model=model,
                                   optimizer=optimizer, scheduler=scheduler,
                                   step=step, data_position=step + 1)
            if rank == 0:
                print(f"[train] saved {args.save_dir}/step_{step:06d}", flush=True)
        if progress:
            progress.update(1)
    if progress:
        progress.close()
    elapsed = time.perf_counter() - start
    if not losses:
        raise SystemExit(f"nothing to do: the checkpoint is at step {start_step - 1} and "
                         f"--steps={args.steps}")
    summary.update(first_loss=losses[0], last_loss=losses[-1], seconds=elapsed,
                   tokens_per_s=tokens_per_step * (args.steps - start_step + 1) / elapsed)
    return report(summary, args, rank, world)


def resume(args, model, optimizer, scheduler, rank) -> int:
    """Load the checkpoint ``--resume`` names (if any); return the first step to run."""
    if not args.resume or not nxd_cp.has_checkpoint(args.save_dir):
        return 1
    tag = None if args.resume == "newest" else args.resume
    nxd_cp.load_checkpoint(args.save_dir, tag, model=model, optimizer=optimizer,
                           scheduler=scheduler)
    meta = nxd_cp.checkpoint_metadata(args.save_dir, tag)
    if args.check and meta["step"] > 0:
        raise SystemExit("--check compares step 1 with the unmodified model: it cannot be "
                         f"combined with resuming from step {meta['step']}")
    if rank == 0:
        print(f"[train] resumed from {args.save_dir}/{meta['tag']} (step {meta['step']})",
              flush=True)
    return meta["data_position"]


def check_parity(model, loss, reference, dp_batches, rank) -> Dict[str, float]:
    """Rank 0: its loss and the reduced gradients of step 1 vs the unmodified model."""
    grads = nxd_cp.models.full_gradients(model)  # collective: every rank takes part
    if rank != 0:
        return {}
    ref_loss, ref_grads = reference_step(reference, dp_batches)
    return {"loss_rel_err": rel_err(loss.detach().cpu(), ref_loss),
            "grad_rel_err": max(rel_err(grads[n].cpu(), g) for n, g in ref_grads.items())}


def report(summary, args, rank, world) -> int:
    """Rank 0 prints the table; every rank returns the same exit code."""
    mine = {k: summary.get(k) for k in ("saved_bytes", "sent_bytes")}
    per_rank = [mine] * world
    objects_ok = world > 1 and args.device != "xla"  # XLA's backend moves tensors only
    if objects_ok:
        dist.all_gather_object(per_rank, mine)
    status = 0
    if rank == 0:
        rows = [("ranks (tp x cp x dp)", f"{world} ({summary['tp']} x {summary['cp']} x "
                                         f"{summary['dp']}), comm {summary['comm']}"),
                ("sequence length", f"{summary['seq_len']:,} tokens, "
                                    f"{summary['seq_len'] // summary['cp']:,} per CP rank"),
                *([("packed documents per row (step 1)",
                    " ".join(map(str, summary["documents_per_row"])))]
                  if "documents_per_row" in summary else []),
                ("loss first -> last step", f"{summary['first_loss']:.4f} -> "
                                            f"{summary['last_loss']:.4f}"),
                ("saved for backward / rank (MiB)",
                 " ".join(f"{r['saved_bytes'] / 2**20:.1f}" for r in per_rank)),
                ("sent per step / rank (MiB)",
                 " ".join(f"{r['sent_bytes'] / 2**20:.1f}" for r in per_rank)),
                ("tokens/s (all ranks)", f"{summary['tokens_per_s']:,.0f}"),
                ("wall time", f"{summary['seconds']:.1f} s")]
        if args.check:
            rows += [("loss rel. error vs unmodified", f"{summary['loss_rel_err']:.2e} "
                                                       f"(tol {LOSS_TOL:.0e})"),
                     ("grad rel. error (worst param)", f"{summary['grad_rel_err']:.2e} "
                                                       f"(tol {GRAD_TOL:.0e})")]
        width = max(len(k) for k, _ in rows)
        print("\n| " + "figure".ljust(width) + " | value |")
        print("|-" + "-" * width + "-|-------|")
        for k, v in rows:
            print(f"| {k.ljust(width)} | {v} |")
        if args.check:
            ok = summary["loss_rel_err"] <= LOSS_TOL and summary["grad_rel_err"] <= GRAD_TOL
            status = 0 if ok else 1
            print(f"{'PASS' if ok else 'FAIL'} parity {summary['loss_rel_err']:.2e} "
                  f"(loss tol {LOSS_TOL:.0e}; worst gradient {summary['grad_rel_err']:.2e}, "
                  f"tol {GRAD_TOL:.0e})", flush=True)
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump(dict(summary, per_rank=per_rank), f, indent=1)
    code = [status]
    if objects_ok:
        dist.broadcast_object_list(code, src=0)  # every rank exits with rank 0's verdict
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return int(code[0])


if __name__ == "__main__":
    sys.exit(main())
