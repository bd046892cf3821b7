"""``bench_xla_graph.py``'s 8B-like decoder layer: XLA:CPU temp memory per layer beside
docs/choosing.md's activation formula.

Llama-3.1-8B's layer shape (hidden 4096, 32 query / 8 KV heads, D = 128, MLP 14336; vocabulary
256 so that the head stays small) at TP8 x CP4: per TP rank 4 query heads, 1 KV head, MLP
1792. Global rank 0's forward, loss (vocab-parallel), backward and CP gradient all-reduce, fp32,
batch 1, ``S_local`` tokens per rank, int32 batch, with 1 and with 2 decoder layers, lowered by
torch-xla and compiled by XLA:CPU (``warm_up_cache``: no execution). The graph's outputs are the
loss and the gradients (no optimizer step: the figure is activations, not optimizer state).

Temp = the ``preallocated-temp`` allocation of XLA's buffer assignment (the arena every
intermediate lives in, sized by its heap simulation), apart from the parameters (weights,
batch) and the outputs (gradients); per layer = 2 layers - 1 layer.
"""
from __future__ import annotations

import glob
import os
import re

TP8, CP8 = 8, 4  # the 8B layout of docs/choosing.md (TP8 x CP4)
H, HQ, HKV, D, F = 4096, 32, 8, 128, 14336
E = 4  # fp32 bytes per element (XLA:CPU runs bf16 dots in f32: bf16 is not measured)
KINDS = ("big1", "big2", "big1ckpt", "big2ckpt")


def formula_bytes(ckpt: bool, s_local: int) -> int:
    """docs/choosing.md's activation bytes per layer at ``n = s_local`` tokens per rank:
    ``layer(tp) * n`` (fp32), or ``e*h*n`` with checkpointing (each layer's input)."""
    if ckpt:
        return E * H * s_local
    layer = (2 * (4 * H + 2 * E * H + 4) + (E * (3 * H + 2 * HKV * D) + 4 * HQ) // TP8
             + 4 * E * F // TP8)
    return layer * s_local


def _tensors(layers: int, ckpt: bool, s_local: int):
    import torch
    import torch_xla
    import transformers as tf

    from nxd_cp import parallel_state as ps
    from nxd_cp.compat import torch_xla as xla_compat
    from nxd_cp.models import transform
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank
    from nxd_cp.testing import activate_config
    from nxd_cp.training.grads import allreduce_context_parallel_gradients

    dev = torch_xla.device()
    xla_compat.reset_collective_token(dev)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=H, intermediate_size=F,
                         num_hidden_layers=layers, num_attention_heads=HQ,
                         num_key_value_heads=HKV, head_dim=D, pad_token_id=0,
                         max_position_embeddings=s_local * CP8)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in model.state_dict().items()}
    with ps.explicit_rank(TP8 * CP8, 0, TP8, CP8):
        config = dict(activate_config("p2p"), activation_checkpoint_config="full" if ckpt else None)
        model = transform(model, config, state_dict=weights, vocab_parallel_logits=True).to(dev)
        del weights
        ids = torch.randint(1, 256, (1, s_local * CP8), generator=g, dtype=torch.int32)
        full = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        batch = {k: v.to(torch.int32).to(dev)
                 for k, v in get_batch_on_this_context_parallel_rank(full).items()}
        loss = model(**batch).loss
        loss.backward()
        allreduce_context_parallel_gradients(model)
    return [loss.detach()] + [p.grad for p in model.parameters()]


def buffer_bytes(dump: str) -> dict:
    """Total and per kind (parameter, maybe-live-out, preallocated-temp) bytes of the largest
    buffer assignment XLA dumped into ``dump``."""
    best = None
    for path in glob.glob(os.path.join(dump, "*buffer-assignment.txt")):
        text = open(path).read()
        total = re.search(r"Total bytes used: (\d+)", text)
        if not total:
            continue
        row = {"total": int(total.group(1))}
        for kind in ("parameter", "maybe-live-out", "preallocated-temp"):
            row[kind] = sum(int(m.group(1)) for m in re.finditer(
                rf"^allocation \d+: size (\d+), {kind}", text, re.M))
        if best is None or row["total"] > best["total"]:
            best = row
    return best or {}


def worker(kind: str, s_local: int, dump: str, count) -> dict:
    """One row: ``kind`` in ``KINDS`` (``big<layers>[ckpt]``); ``count`` -> HLO figures."""
    import time

    from nxd_cp.compat import torch_xla as xla_compat

    t0 = time.perf_counter()
    tensors = _tensors(int(kind[3]), kind.endswith("ckpt"), s_local)
    row = dict(kind=kind, cp=CP8, s_local=s_local, lower_s=round(time.perf_counter() - t0, 2),
               **count(xla_compat.tensors_hlo(tensors)))
    t0 = time.perf_counter()
    xla_compat.warm_up_cache(tensors)
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return dict(row, buffers=buffer_bytes(dump))


def report(rows: dict, s_local: int, print_table) -> None:
    """The per-layer table (``rows``: ``kind`` -> row) beside the formula."""
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    table = []
    for ckpt in ("", "ckpt"):
        one, two = rows.get(f"big1{ckpt}"), rows.get(f"big2{ckpt}")
        if not one or not two or not one.get("buffers") or not two.get("buffers"):
            continue
        temp = [r["buffers"]["preallocated-temp"] for r in (one, two)]
        per, formula = temp[1] - temp[0], formula_bytes(bool(ckpt), s_local)
        table.append(["full" if ckpt else "none",
                      f"{two['instructions'] - one['instructions']:,}", mib(temp[0]),
                      mib(temp[1]), mib(per), mib(formula), f"{(per - formula) / 2**20:+,.1f}",
                      f"{per / formula:.2f}"])
    if not table:
        return
    print_table(
        f"One 8B-like decoder layer per rank at TP8 x CP4, S_local {s_local:,}: XLA:CPU temp "
        "memory vs docs/choosing.md",
        ["activation_checkpoint_config", "instructions per layer", "temp MiB, 1 layer", "2 layers",
         "temp MiB per layer", "formula MiB", "measured - formula MiB", "measured / formula"],
        table,
        note="Llama-3.1-8B's layer (hidden 4096, 32 / 8 heads, D 128, MLP 14336; per TP rank 4 "
             "query heads, 1 KV head, MLP 1792), vocabulary 256, fp32, batch 1, int32 batch, "
             "p2p zigzag; global rank 0's forward, vocab-parallel loss, backward and CP gradient "
             "all-reduce (outputs: loss and gradients, no optimizer). Temp: the "
             "`preallocated-temp` allocation of XLA:CPU's buffer assignment (weights and "
             "gradients are parameters and outputs, not in it); per layer = 2 layers - 1 layer. "
             "Formula: `layer(tp)·n` with e = 4 (none), `e·h·n` (full; the one layer being "
             "recomputed is in the 1-layer figure, not per layer). The formula is linear in "
             "S_local, XLA's temp is not: it also holds weight-sized transients (at S_local 256: "
             "208 MiB per layer with or without checkpointing, twice the layer's 104 MiB of fp32 "
             "weights on this rank), so measure at the S_local of interest.")
