"""Train a (tiny by default) Llama with tensor x context parallelism under torchrun.

    torchrun --nproc_per_node 4 examples/train_llama_cp.py --tensor_parallel_size 2 \
        --context_parallel_size 2 --seq_len 4096 --steps 10 --check

The same script runs on CPU (gloo), CUDA (NCCL) and XLA / Trainium (``--device xla``). From a
Hugging Face checkpoint directory and local files of text (``--model_name_or_path DIR --dataset
FILES``: tokenized with DIR's tokenizer, ``--save_hf OUT`` exports the trained model), or, for
smoke runs, a JSON transformers config (a tiny Llama by default) randomly initialised and a text
file read as bytes (vocabulary 256; by default the project's own docs). Nothing is downloaded.
Data and model I/O: ``examples/data.py``; ``--loss_log FILE`` records every logged step.

Every rank of a CP group reads the same full-sequence batch (chosen by DP rank) and keeps its
shard (``get_batch_on_this_context_parallel_rank``). With ``--check`` rank 0 also runs the
unmodified transformers model on its first batch and compares loss and every parameter's
gradient, then prints a summary table ending in ``PASS parity <err>`` or ``FAIL ...`` (exit 1).

``--packed`` packs documents (the dataset's, or the byte text's paragraphs) back to back into each
row with transformers' ``DataCollatorWithFlattening`` (``position_ids`` restarting at every
document, ``-100`` labels at document starts); attention stays inside each document, and
``--check`` then compares with the unmodified model run on every document separately. Use it
with ``--load_balance per_document`` (documents split head-tail over the CP ranks).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List

import torch
import torch.distributed as dist

import nxd_cp
from nxd_cp import parallel_state as ps
from data import (LossLog, byte_corpus, dataset_corpus, export, get_batch,  # examples/
                  load_model, load_tokenizer)
from train_args import parse_args  # examples/, beside this script

LOSS_TOL = 1e-5  # fp32 relative loss error vs the unmodified model (the project's fp32 standard)
GRAD_TOL = 1e-4  # fp32 relative gradient error, worst parameter


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
    args = parse_args(argv, __doc__.split("\n\n")[0])
    device = init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    config = nxd_cp.neuronx_distributed_config(  # given once; transform binds it into the model
        tensor_parallel_size=args.tensor_parallel_size,
        context_parallel_size=args.context_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        pipeline_config={"num_microbatches": args.num_microbatches,
                         "schedule": args.pipeline_schedule},
        sequence_parallel=args.sequence_parallel,
        # every decoder layer recomputed in backward, on every device (applied by transform)
        activation_checkpoint_config="full" if args.gradient_checkpointing else None,
        context_parallel_config={"comm_type": args.cp_comm_type, "a2a_size": args.a2a_size,
                                 "load_balance": args.load_balance},
        # --zero1: the optimizer wrapper reduces, clips and steps; else this loop does
        optimizer_config={"zero_one_enabled": args.zero1, "max_grad_norm": args.max_grad_norm
                          or 1.0, "grad_clipping": args.zero1 and args.max_grad_norm > 0})
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_size()
    tp, cp, pp = args.tensor_parallel_size, args.context_parallel_size, args.pipeline_parallel_size

    torch.manual_seed(args.seed)  # the same full weights on every rank
    model, reference = load_model(args, config, reference=args.check and rank == 0)
    model = model.to(device)
    if model.config.tie_word_embeddings and pp == 1:  # a pipelined model ties over stages
        model.tie_weights()  # moving to an XLA device unties shared parameters
    # torch's AdamW; on XLA its update lowers without f64 scalars (docs/trn1.md)
    optimizer = (nxd_cp.initialize_parallel_optimizer(config, nxd_cp.training.optim.AdamW,
                                                      model, lr=args.lr) if args.zero1 else
                 nxd_cp.training.optim.AdamW(model.parameters(), lr=args.lr))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))
    start_step = resume(args, model, optimizer, scheduler, rank)
    corpus = (dataset_corpus(args.dataset, load_tokenizer(args.model_name_or_path),
                             args.text_field, args.text_unit, args.dataset_cache)
              if args.dataset else byte_corpus(args.data))
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[train] world={world} tp={tp} cp={cp} pp={pp} dp={dp} comm={args.cp_comm_type} "
              f"layout={args.load_balance} seq_len={args.seq_len} batch/dp={args.batch_size} "
              f"device={args.device} params/rank={n_params:,} data={len(corpus.tokens):,} "
              f"tokens in {corpus.documents:,} documents",
              flush=True)

    progress = None
    if rank == 0 and sys.stderr.isatty():
        from tqdm import tqdm
        progress = tqdm(total=args.steps, desc="train", unit="step")
    losses: List[float] = []
    summary = {"world": world, "tp": tp, "cp": cp, "pp": pp, "dp": dp, "comm": args.cp_comm_type,
               "seq_len": args.seq_len, "compiles": []}
    tokens_per_step = args.batch_size * args.seq_len * dp
    start = time.perf_counter()
    summary["losses"] = {}
    log = LossLog(args.loss_log if rank == 0 else None, resume=start_step > 1)
    for step in range(start_step, args.steps + 1):
        full = get_batch(corpus, step, dp_rank, args.batch_size, args.seq_len, args.seed,
                         args.packed, dp)
        documents = full.pop("documents", None)
        batch = {k: v.to(device) for k, v in
                 nxd_cp.get_batch_on_this_context_parallel_rank(full, config=model).items()}
        first = step == start_step
        with nxd_cp.count_bytes() as sent, nxd_cp.count_saved_bytes(model.parameters()) as saved:
            loss = train_step(model, batch, dp, pp, reduce=not args.zero1)
        if first:
            if documents is not None:
                summary["documents_per_row"] = [len(row) for row in documents]
            summary["saved_bytes"] = saved.total
            summary["sent_bytes"] = sent.total
            if args.check and step == 1:
                dp_batches = [get_batch(corpus, step, d, args.batch_size, args.seq_len,
                                        args.seed, args.packed, dp) for d in range(dp)]
                summary.update(check_parity(model, loss, reference, dp_batches, rank,
                                            reduce=args.zero1 and pp == 1))
        if args.max_grad_norm > 0 and not args.zero1:  # after the check: unclipped gradients
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
            log.write(step=step, loss=value, lr=scheduler.get_last_lr()[0], seconds=elapsed,
                      tokens=tokens_per_step * (step - start_step + 1))
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
    log.close()
    if args.save_hf:
        export(model, args.save_hf, args.model_name_or_path)
        if rank == 0:
            print(f"[train] exported {args.save_hf}", flush=True)
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


def train_step(model, batch, dp: int, pp: int, reduce: bool = True) -> torch.Tensor:
    """Forward, backward and (``reduce``) the step's one gradient reduction; returns the loss."""
    if pp > 1:  # this rank's stage: microbatches through the pipeline, gradients reduced
        return model.run_train(**batch)
    loss = model(**batch).loss
    loss.backward()
    if not reduce:  # --zero1: the optimizer's step reduces (run_train did, when pipelined)
        return loss
    # one call: the CP (DP x CP) reduction, and with SP the norms' sum over TP, once
    if dp > 1:
        nxd_cp.allreduce_data_context_parallel_gradients(model)
    else:
        nxd_cp.allreduce_context_parallel_gradients(model)
    return loss


def check_parity(model, loss, reference, dp_batches, rank, reduce=False) -> Dict[str, float]:
    """Rank 0: its loss and the reduced gradients of step 1 vs the unmodified model (``reduce``:
    the gradients are not reduced yet; compared reduced, then put back for the optimizer)."""
    local = [(p, p.grad.clone()) for p in model.parameters() if reduce and p.grad is not None]
    if reduce:
        nxd_cp.allreduce_data_context_parallel_gradients(model)
    grads = nxd_cp.models.full_gradients(model)  # collective: every rank takes part
    if reduce:
        for p, g in local:
            p.grad.copy_(g)
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
        rows = [("ranks (tp x cp x pp x dp)", f"{world} ({summary['tp']} x {summary['cp']} x "
                                              f"{summary['pp']} x {summary['dp']}), "
                                              f"comm {summary['comm']}"),
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
