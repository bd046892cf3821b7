"""Your own model under tensor x context parallelism: a small GPT in plain torch, made TP x CP.

    torchrun --nproc_per_node 4 examples/custom_model_cp.py --tensor_parallel_size 2 \
        --context_parallel_size 2 --steps 5 --check

Part 1 is a GPT written in plain torch (RoPE, GQA, pre-norm blocks): it knows nothing of
nxd_cp. Part 2 writes the distributed versions of its attention and MLP with nxd_cp's TP layers
and ``nxd_cp.ContextParallelAttention``, and registers them with ``nxd_cp.register_module``
(with hooks translating arguments and results); ``nxd_cp.parallelize(model)`` swaps every
instance and carries the weights over, sharded. Part 3 trains: every rank of a CP group gets
the same full batch and keeps its shard (``get_batch_on_this_context_parallel_rank``: shifted
labels, global ``position_ids``), the loss is ``context_parallel_cross_entropy`` (vocab-parallel
logits), gradients are summed over CP. With ``--check`` rank 0 also trains the plain model on
one process from the same weights and batches, compares loss at every step and every
parameter's gradient at the first, and prints ``PASS parity`` or ``FAIL ...`` (exit 1).
Runs on gloo (CPU) and NCCL (``--device cuda``). docs/custom_models.md walks through it.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import nxd_cp
from nxd_cp import parallel_state as ps
from nxd_cp.layers import (ColumnParallelLinear, ParallelEmbedding, ReplicatedKVLinear,
                           RowParallelLinear)

LOSS_TOL, GRAD_TOL = 1e-5, 1e-4  # fp32: the project's forward / gradient parity bounds


# ---------------------------------------------------------------------------------------------
# Part 1: a GPT in plain torch
# ---------------------------------------------------------------------------------------------
def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of x [B, H, S, D] at positions [B, S] (rotate-half convention)."""
    d = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    angles = positions[:, None, :, None].float() * inv_freq  # [B, 1, S, D/2]
    cos, sin = angles.cos().repeat(1, 1, 1, 2), angles.sin().repeat(1, 1, 1, 2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.dim, self.n_heads, self.n_kv_heads = dim, n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.q = nn.Linear(dim, n_heads * self.head_dim)
        self.k = nn.Linear(dim, n_kv_heads * self.head_dim)
        self.v = nn.Linear(dim, n_kv_heads * self.head_dim)
        self.proj = nn.Linear(n_heads * self.head_dim, dim)

    def forward(self, x, positions):  # x [B, S, dim], positions [B, S]
        b, s, _ = x.shape
        q, k, v = (lin(x).view(b, s, -1, self.head_dim).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(rope(q, positions), rope(k, positions), v,
                                             is_causal=True, enable_gqa=True)
        return self.proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.fc = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.out(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, n_heads, n_kv_heads)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, x, positions):
        x = x + self.attn(self.ln1(x), positions)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=1):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads, n_kv_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, positions):  # [B, S] -> logits [B, S, vocab]
        x = self.wte(ids)
        for block in self.blocks:
            x = block(x, positions)
        return self.lm_head(self.ln_f(x))


# ---------------------------------------------------------------------------------------------
# Part 2: distributed replacements, registered with nxd_cp
# ---------------------------------------------------------------------------------------------
class ParallelSelfAttention(nn.Module):
    """TP x CP attention: this rank's heads (H/tp; one replicated KV head when n_kv_heads < tp)
    and tokens. Same parameter names as CausalSelfAttention (weights are carried over by name).
    Hugging Face-style signature on purpose, to show the hooks:
    forward(hidden_states [B, S_local, dim], *, position_ids [B, S_local]) -> (out, None)."""

    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        tp = ps.get_tensor_model_parallel_size()
        self.head_dim = hd = dim // n_heads
        self.q = ColumnParallelLinear(dim, n_heads * hd, gather_output=False)
        if n_kv_heads % tp == 0:
            self.k = ColumnParallelLinear(dim, n_kv_heads * hd, gather_output=False)
            self.v = ColumnParallelLinear(dim, n_kv_heads * hd, gather_output=False)
        else:
            self.k = ReplicatedKVLinear(dim, n_kv_heads, hd, bias=True)
            self.v = ReplicatedKVLinear(dim, n_kv_heads, hd, bias=True)
        self.proj = RowParallelLinear(n_heads * hd, dim, input_is_parallel=True)
        # comm type and layout: the active config when built (neuronx_distributed_config), bound
        self.attention = nxd_cp.ContextParallelAttention(causal=True)

    def forward(self, hidden_states, *, position_ids):
        b, s, _ = hidden_states.shape
        q, k, v = (lin(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        out = self.attention(rope(q, position_ids), rope(k, position_ids), v)
        return self.proj(out.transpose(1, 2).reshape(b, s, -1)), None


class ParallelMLP(nn.Module):
    """fc split by output features, out by input features: one all-reduce over TP."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc = ColumnParallelLinear(dim, hidden, gather_output=False)
        self.out = RowParallelLinear(hidden, dim, input_is_parallel=True)

    def forward(self, x):
        return self.out(F.gelu(self.fc(x)))


def register_parallel_modules() -> None:
    nxd_cp.register_module(
        CausalSelfAttention, ParallelSelfAttention,
        init_hook=lambda m: ((m.dim, m.n_heads, m.n_kv_heads), {}),
        forward_hook=lambda x, positions: ((x,), {"position_ids": positions}),
        return_hook=lambda output: output[0])
    nxd_cp.register_module(MLP, ParallelMLP, init_hook=lambda m: ((m.dim, m.hidden), {}))
    nxd_cp.register_module(
        nn.Embedding, ParallelEmbedding,
        init_hook=lambda m: ((m.num_embeddings, m.embedding_dim), {}))
    # The only nn.Linear left once attention and MLP are replaced: the lm_head, vocab-parallel.
    nxd_cp.register_module(
        nn.Linear, ColumnParallelLinear,
        init_hook=lambda m: ((m.in_features, m.out_features),
                             {"bias": m.bias is not None, "gather_output": False}))


def unregister_parallel_modules() -> None:
    for cls in (CausalSelfAttention, MLP, nn.Embedding, nn.Linear):
        nxd_cp.nn.unregister_module(cls)


# ---------------------------------------------------------------------------------------------
# Part 3: training, and parity with the plain model on one process
# ---------------------------------------------------------------------------------------------
def make_batch(step, batch, seq, vocab, device):
    """Learnable sequences: each row counts up (mod vocab) from a random start."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    ids = (start + torch.arange(seq)) % vocab
    noise = torch.rand(batch, seq, generator=g) < 0.1  # some unpredictable tokens
    ids = torch.where(noise, torch.randint(0, vocab, (batch, seq), generator=g), ids)
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def rel(a, b):
    d, n = (a.double() - b.double()).norm().item(), b.double().norm().item()
    return d / n if n else d


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tensor_parallel_size", type=int, default=2)
    p.add_argument("--context_parallel_size", type=int, default=2)
    p.add_argument("--cp_comm_type", default="p2p", choices=("p2p", "all_gather"))
    p.add_argument("--load_balance", default="zigzag", choices=("zigzag", "contiguous"))
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--check", action="store_true", help="parity with the plain model (rank 0)")
    p.add_argument("--summary_json", default=None)
    args = p.parse_args(argv)
    for name in ("tensor_parallel_size", "context_parallel_size", "seq_len", "batch_size",
                 "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)} must be >= 1")
    return args


def train(args) -> dict:
    """Train the TP x CP GPT on this rank (parallel state initialised); returns a summary."""
    device = torch.device(args.device)
    nxd_cp.neuronx_distributed_config(  # parallel state and the active CP config, once
        tensor_parallel_size=args.tensor_parallel_size,
        context_parallel_size=args.context_parallel_size,
        context_parallel_config={"comm_type": args.cp_comm_type,
                                 "load_balance": args.load_balance})
    torch.manual_seed(0)
    model = GPT().to(device)
    ref = GPT().to(device) if args.check and dist.get_rank() == 0 else None
    if ref is not None:
        ref.load_state_dict(model.state_dict())
    register_parallel_modules()
    try:
        nxd_cp.parallelize(model)
    finally:
        unregister_parallel_modules()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=1e-6)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=args.lr, eps=1e-6) if ref else None
    losses, ref_losses, grad_err = [], [], None
    for step in range(args.steps):
        full = make_batch(step, args.batch_size, args.seq_len, 256, device)
        mine = nxd_cp.get_batch_on_this_context_parallel_rank(full)  # the config's layout
        logits = model(mine["input_ids"], mine["position_ids"])  # [B, S_local, V/tp]
        loss = nxd_cp.context_parallel_cross_entropy(logits, mine["labels"],
                                                     vocab_parallel=True)
        opt.zero_grad()
        loss.backward()
        nxd_cp.allreduce_context_parallel_gradients(model)  # sum over CP
        losses.append(loss.item())
        grads = nxd_cp.models.full_gradients(model) if args.check and step == 0 else None
        opt.step()
        if ref is not None:
            ids = full["input_ids"]
            positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
            ref_logits = ref(ids, positions)
            ref_loss = F.cross_entropy(ref_logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            ref_opt.zero_grad()
            ref_loss.backward()
            ref_losses.append(ref_loss.item())
            if step == 0:
                grad_err = max(rel(grads[n], p.grad) for n, p in ref.named_parameters())
            ref_opt.step()
    summary = {"losses": losses, "first_loss": losses[0], "last_loss": losses[-1]}
    if ref is not None:
        summary["ref_losses"] = ref_losses
        summary["loss_rel_err"] = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        summary["grad_rel_err"] = grad_err
        summary["param_rel_err"] = max(
            rel(t, ref.state_dict()[n])
            for n, t in nxd_cp.full_state_dict(model).items())
    elif args.check:
        nxd_cp.full_state_dict(model)  # collective over TP: every rank joins
    return summary


def report(args, s) -> bool:
    """Print the summary table; True unless --check found a parity failure."""
    print(f"| TP x CP | {args.tensor_parallel_size} x {args.context_parallel_size} "
          f"({args.cp_comm_type}, {args.load_balance}) |")
    print(f"| loss first -> last step | {s['first_loss']:.4f} -> {s['last_loss']:.4f} |")
    if "loss_rel_err" not in s:
        return True
    print(f"| loss rel err (every step) | {s['loss_rel_err']:.1e} |")
    print(f"| gradient rel err (worst parameter, step 1) | {s['grad_rel_err']:.1e} |")
    print(f"| parameters after {args.steps} steps, rel err | {s['param_rel_err']:.1e} |")
    # After several AdamW steps the updates differ only through ~1e-6 gradient differences.
    ok = (s["loss_rel_err"] <= LOSS_TOL and s["grad_rel_err"] <= GRAD_TOL
          and s["param_rel_err"] <= GRAD_TOL)
    print(f"PASS parity {max(s['loss_rel_err'], s['grad_rel_err']):.1e}" if ok else
          f"FAIL parity: loss {s['loss_rel_err']:.1e} (<= {LOSS_TOL}), gradient "
          f"{s['grad_rel_err']:.1e} (<= {GRAD_TOL}), parameters {s['param_rel_err']:.1e}")
    return ok


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    summary = train(args)
    ok = report(args, summary) if dist.get_rank() == 0 else True
    if args.summary_json and dist.get_rank() == 0:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f)
    if not ok:
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
