"""Model state per rank under TP x CP x DP: parameters, gradients and AdamW state, with no
sharding, ZeRO-1 over DP x CP and FSDP2 over DP x CP, against the formula.

One world of 8 gloo ranks runs TP2xCP2xDP2, TP1xCP2xDP4 and TP4xCP2xDP1 (``--quick``: the
first only). Model: the demo's tiny Llama 3.1-style config (hidden 128, 8/2 heads, MLP 352,
2 layers, vocab 256; ``examples/train_llama_cp.py``) in fp32 after ``nxd_cp.transform``; one
training step (sequence 256) with ``nxd_cp.optim.AdamW`` through
``nxd_cp.initialize_parallel_optimizer`` (none, ZeRO-1) or ``nxd_cp.fully_shard`` + AdamW.

Measured on every rank (bytes of the local tensors; DTensors: their local shard): parameters,
gradients, optimizer state (``nxd_cp.optimizer_state_bytes``: exp_avg, exp_avg_sq and a 4-byte
step per parameter); the table shows the largest rank. Formula, with ``P`` the bytes of this
rank's TP shard of the parameters (what TP alone leaves; CP and DP replicate it) and
``n = dp * cp``:

| sharding | parameters | gradients | optimizer state (AdamW) |
|---|---|---|---|
| none   | P   | P   | 2P (+ steps)   |
| ZeRO-1 | P   | P   | 2P / n         |
| FSDP2  | P/n | P/n | 2P / n         |

ZeRO-1 shards whole parameters (balanced by size), FSDP2 pads dim 0 to a multiple of n: both
are within a few per cent of the formula here (the "vs formula" column is measured / formula
for the optimizer state, or for all three with FSDP2).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import fmt_bytes, parser, print_table, run_ranks, write_json  # noqa: E402

CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
              rope_theta=500000.0)
LAYOUTS = ((2, 2), (1, 2), (4, 2))  # (tp, cp); dp = 8 / (tp * cp); DP x CP groups all differ
MODES = ("none", "zero1", "fsdp")
SEQ = 256


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size()
               for t in tensors if t is not None)


def measure(tp: int, cp: int, mode: str) -> dict:
    """One training step of the tiny Llama under (tp, cp, mode); this rank's bytes."""
    import torch
    import transformers as tf

    import nxd_cp
    from nxd_cp import parallel_state as ps

    lay = ps.get_layout() if ps.model_parallel_is_initialized() else None
    if lay is None or (lay.tp, lay.cp) != (tp, cp):
        ps.destroy_model_parallel()
    cfg = nxd_cp.neuronx_distributed_config(
        tensor_parallel_size=tp, context_parallel_size=cp,
        optimizer_config={"zero_one_enabled": mode == "zero1", "grad_clipping": True})
    torch.manual_seed(0)
    model = nxd_cp.transform(tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG)), cfg)
    unique = lambda m: list({id(p): p for p in m.parameters()}.values())  # noqa: E731
    tp_bytes = _local_bytes(unique(model))
    if mode == "fsdp":
        model = nxd_cp.fully_shard(model)
        opt = nxd_cp.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = nxd_cp.initialize_parallel_optimizer(cfg, nxd_cp.optim.AdamW, model.parameters(),
                                                   lr=1e-3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 256, (1, SEQ), generator=g)
    batch = nxd_cp.get_batch_on_this_context_parallel_rank(
        {"input_ids": ids, "labels": ids.clone()})
    model(**batch).loss.backward()
    if mode == "fsdp":
        nxd_cp.clip_grad_norm(model, 1.0)
    opt.step()
    params = unique(model)
    return {"tp": tp, "cp": cp, "dp": ps.get_data_parallel_size(), "mode": mode,
            "tp_bytes": tp_bytes, "n_params": len(params),
            "param_bytes": _local_bytes(params),
            "grad_bytes": _local_bytes([p.grad for p in params]),
            "state_bytes": nxd_cp.optimizer_state_bytes(opt)}


def formula(row: dict) -> dict:
    """The formula's bytes for ``row``'s layout and mode (module docstring)."""
    p, n = row["tp_bytes"], row["dp"] * row["cp"]
    steps = 4 * row["n_params"]  # AdamW's step counts, one fp32 scalar per parameter
    if row["mode"] == "none":
        return {"param_bytes": p, "grad_bytes": p, "state_bytes": 2 * p + steps}
    if row["mode"] == "zero1":
        return {"param_bytes": p, "grad_bytes": p, "state_bytes": (2 * p + steps) / n}
    return {"param_bytes": p / n, "grad_bytes": p / n, "state_bytes": 2 * p / n}


def world(rank, world_size, layouts):
    return [measure(tp, cp, mode) for tp, cp in layouts for mode in MODES]


def main():
    args = parser(__doc__.split("\n")[0]).parse_args()
    layouts = LAYOUTS[:1] if args.quick else LAYOUTS
    per_rank = run_ranks(world, 8, layouts)
    rows, data = [], []
    for i, r0 in enumerate(per_rank[0]):
        worst = {k: max(r[i][k] for r in per_rank)
                 for k in ("param_bytes", "grad_bytes", "state_bytes")}
        row = dict(r0, **worst)
        want = formula(row)
        keys = ("state_bytes",) if row["mode"] != "fsdp" else tuple(want)
        ratio = max(row[k] / want[k] for k in keys)
        data.append(dict(row, formula=want, ratio=ratio))
        total = row["param_bytes"] + row["grad_bytes"] + row["state_bytes"]
        rows.append((f"TP{row['tp']}xCP{row['cp']}xDP{row['dp']}", row["mode"],
                     fmt_bytes(row["param_bytes"]), fmt_bytes(row["grad_bytes"]),
                     fmt_bytes(row["state_bytes"]), fmt_bytes(total), f"{ratio:.3f}"))
    print_table("Model state per rank (largest rank), tiny Llama fp32, AdamW",
                ("layout", "sharding", "parameters", "gradients", "optimizer state",
                 "total", "vs formula"), rows,
                note="P = this rank's TP shard of the parameters, n = dp*cp. Formula: none "
                     "P + P + 2P; ZeRO-1 P + P + 2P/n; FSDP2 P/n + P/n + 2P/n. 'vs formula': "
                     "measured / formula (optimizer state; FSDP2: the largest of the three).")
    write_json(args.json, {"rows": data})


if __name__ == "__main__":
    main()
