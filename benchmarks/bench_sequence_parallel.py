"""Sequence parallelism inside TP: saved activations, TP collectives and CPU time, SP on vs off.

One world of 4 gloo ranks runs TP2xCP2 and TP4xCP1 in turn (rank 0 reports; every rank of a
layout has the same shapes). Model: the demo's tiny Llama 3.1-style config (hidden 128, 8/2
heads, MLP 352, 2 layers, vocab 256; ``examples/train_llama_cp.py``) after
``nxd_cp.transform`` (``sequence_parallel`` from the active config), p2p CP attention.

* Saved for backward (``nxd_cp.count_saved_bytes``, parameters excluded, bf16): decoder layer 1
  called on this rank's hidden states (``[1, S/cp, H]``, or ``[1, S/(cp*tp), H]`` with SP), and
  the whole model's forward on its batch. Beside: Megatron's per-layer estimate with
  ``s = S/cp`` local tokens, ``b = 1``, 2-byte activations, attention scores excluded:
  ``sbh(10 + 24/t)`` without SP, ``sbh*34/t`` with SP (Korthikanti et al. 2022; GPT layer with
  4h GELU MLP and dropout masks, so only the trend compares).
* Collectives of decoder layer 1 (``nxd_cp.count_bytes``: calls and bytes this rank sends,
  forward and backward), SP on / off; the TP inputs are grouped (q/k/v and gate/up share one
  communication). ``ring_shift`` is the CP attention's K/V exchange, everything else is TP.
* CPU time per training step (forward, backward, gradient reductions, AdamW) of the demo
  configuration (TP2xCP2, S = 8192), SP off and on alternating in one run: median per rank.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import fmt_bytes, parser, print_table, run_ranks, write_json  # noqa: E402

CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=131072,
              rope_theta=500000.0)
LAYOUTS = ((2, 2), (4, 1))


def build(sp, dtype):
    import torch
    import transformers as tf

    from nxd_cp.models import transform
    from nxd_cp.testing import activate_config

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG)).to(dtype)
    return transform(model, activate_config("p2p", sequence_parallel=sp))


def batch(seq_len, seed=0):
    import torch

    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, seq_len), generator=g)
    return get_batch_on_this_context_parallel_rank({"input_ids": ids, "labels": ids.clone()})


def layer_figures(seq_len, sp):
    """Saved bytes and collectives of decoder layer 1, saved bytes of the whole model."""
    import torch

    import nxd_cp
    from nxd_cp import parallel_state as ps

    tp, r = ps.get_tensor_model_parallel_size(), ps.get_tensor_model_parallel_rank()
    model = build(sp, torch.bfloat16)
    b = batch(seq_len)
    positions = b["position_ids"]
    full = torch.randn(1, positions.shape[1], CONFIG["hidden_size"], dtype=torch.bfloat16)
    hidden = (full.chunk(tp, 1)[r] if sp else full).clone().requires_grad_()
    cos_sin = model.model.rotary_emb(full, positions)
    layer = model.model.layers[1]
    params = list(model.parameters())
    with nxd_cp.count_saved_bytes(exclude=params) as saved, nxd_cp.count_bytes() as fwd:
        out = layer(hidden, attention_mask=None, position_ids=positions,
                    position_embeddings=cos_sin)
    with nxd_cp.count_bytes() as bwd:
        out.backward(torch.ones_like(out))
    with nxd_cp.count_saved_bytes(exclude=params) as whole:
        model(**b)
    return dict(layer_saved=saved.total, model_saved=whole.total,
                fwd_calls=dict(fwd.calls), fwd_bytes=dict(fwd.bytes),
                bwd_calls=dict(bwd.calls), bwd_bytes=dict(bwd.bytes))


def step_times(seq_len, steps):
    """Median CPU seconds of one training step, SP off and on alternating (fp32)."""
    import torch

    import nxd_cp
    from nxd_cp.testing import activate_config

    models = {sp: build(sp, torch.float32) for sp in (False, True)}
    opts = {sp: torch.optim.AdamW(m.parameters(), lr=1e-3) for sp, m in models.items()}
    b = batch(seq_len)
    times = {False: [], True: []}
    for i in range(steps + 1):
        for sp in (False, True):
            activate_config("p2p", sequence_parallel=sp)  # the config each model was built for
            start = time.process_time()
            models[sp](**b).loss.backward()
            nxd_cp.allreduce_sequence_parallel_gradients(models[sp])
            nxd_cp.allreduce_context_parallel_gradients(models[sp])
            opts[sp].step()
            opts[sp].zero_grad(set_to_none=True)
            if i:  # the first step warms up
                times[sp].append(time.process_time() - start)
    return {sp: statistics.median(t) for sp, t in times.items()}


def measure(rank, world, seq_len, e2e_seq, steps):
    from nxd_cp import parallel_state as ps

    out = {"layers": [], "e2e": None}
    for tp, cp in LAYOUTS:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        for sp in (False, True):
            out["layers"].append(dict(tp=tp, cp=cp, sp=sp, grouped=True,
                                      **layer_figures(seq_len, sp)))
        if (tp, cp) == (2, 2):
            out["e2e"] = step_times(e2e_seq, steps)
        ps.destroy_model_parallel()
    return out


def _prims(calls, sizes):
    return ", ".join(f"{k} {calls[k]}x {fmt_bytes(sizes[k])}" for k in sorted(calls)) or "-"


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    seq_len, e2e_seq, steps = (256, 256, 1) if args.quick else (8192, 8192, 3)
    res = run_ranks(measure, 4, seq_len, e2e_seq, steps)[0]
    h = CONFIG["hidden_size"]
    mem_rows, comm_rows = [], []
    for r in res["layers"]:
        s, t = seq_len // r["cp"], r["tp"]
        if r["grouped"]:
            megatron = s * h * 2 * (34 / t if r["sp"] else 10 + 24 / t)
            mem_rows.append([f"TP{t}xCP{r['cp']}", "on" if r["sp"] else "off",
                             fmt_bytes(r["layer_saved"]), fmt_bytes(megatron),
                             f"{r['layer_saved'] / megatron:.2f}", fmt_bytes(r["model_saved"])])
        tp_calls = lambda c: sum(v for k, v in c.items() if k != "ring_shift")  # noqa: E731
        comm_rows.append([f"TP{t}xCP{r['cp']}", "on" if r["sp"] else "off",
                          "yes" if r["grouped"] else "no",
                          tp_calls(r["fwd_calls"]), _prims(r["fwd_calls"], r["fwd_bytes"]),
                          tp_calls(r["bwd_calls"]), _prims(r["bwd_calls"], r["bwd_bytes"])])
    print_table(f"Saved for backward per rank, SP off / on (tiny Llama, S={seq_len}, bf16)",
                ["layout", "SP", "decoder layer", "Megatron estimate",
                 "ratio", "whole model"], mem_rows,
                note="Megatron estimate: sbh(10+24/t) without SP, sbh*34/t with SP, for a GPT "
                     "layer (4h GELU MLP, dropout masks, MHA); "
                     "this Llama has GQA (2 KV heads) and a gated 2.75h MLP, no dropout.")
    print_table(f"Collectives of one decoder layer per rank (S={seq_len}, bf16)",
                ["layout", "SP", "grouped", "TP fwd", "forward", "TP bwd", "backward"],
                comm_rows, note="ring_shift: CP K/V exchange (not TP). Bytes: what this rank "
                                "sends (nxd_cp.count_bytes).")
    e2e = res["e2e"]
    print_table(f"CPU time per training step per rank, demo config (TP2xCP2, S={e2e_seq}, fp32)",
                ["SP off (s)", "SP on (s)", "on / off"],
                [[f"{e2e[False]:.3f}", f"{e2e[True]:.3f}", f"{e2e[True] / e2e[False]:.3f}"]],
                note=f"process CPU time, median of {steps} steps after one warm-up, SP off / on "
                     "alternating in one run on 4 ranks.")
    write_json(args.json, res | {"e2e": {str(k): v for k, v in e2e.items()}})


if __name__ == "__main__":
    main()
