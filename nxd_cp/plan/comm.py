"""Communication per step and a step-time estimate: pure functions (bytes, seconds).

Bytes are those each rank sends, in ``nxd_cp.count_bytes``' convention (docs/choosing.md,
"Communication per layer" and "Which comm type"). The step time is a roofline: FLOPs at a
stated fraction of the published peak, plus the communication that is not hidden, times the
pipeline bubble. It ranks layouts; it is not a measurement (none was taken on Trainium).

Hardware (``INSTANCES``), per rank (one NeuronCore / logical core / GPU), with sources:

* trn1 chip: 2 NeuronCore-v2, 190 BF16 TFLOPS, 32 GiB HBM; trn1.32xlarge: 16 chips = 32
  ranks, EFA 800 Gbps; trn1n.32xlarge: EFA 1,600 Gbps (AWS Neuron docs, "Trainium
  Architecture" and "Trn1/Trn1n Architecture"; docs/REFERENCES "Planner anchors").
* trn2 chip: 667 BF16 TFLOPS (dense), 96 GiB HBM; trn2.48xlarge: 16 chips, EFAv3 3,200 Gbps
  (AWS Neuron docs, "Trainium2 Architecture"); 4 ranks per chip at the default LNC=2.
* p5.48xlarge: 8 H100 SXM, 989 dense BF16 TFLOPS, 80 GB HBM3, NVLink 900 GB/s per GPU, EFA
  3,200 Gbps (NVIDIA H100 datasheet; AWS EC2 P5 page).
* intra-node links of trn1/trn2 (NeuronLink-v2: 384 GB/s per chip; NeuronLink-v3: 1,280 GB/s
  per chip; AWS Neuron docs): recalled, not in the project's references; verify.
* cpu: no published figure; nominal values for dry runs only.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

from nxd_cp.plan.memory import GIB, model_dims, parameter_count

GB = 1e9
# Fraction of the peak FLOPs a step achieves (its compute part). 0.4 reproduces AWS's published
# trn1 throughputs (Neuron 2.24, no CP) within 25 %: Llama-3.1-8B TP32 x DP32 at 8K on 32 nodes,
# 47.95 seq/s; Llama-3.1-70B TP32 x PP8 x DP4, 7.94 seq/s (tests/test_plan.py).
EFFICIENCY = 0.4
INSTANCES: Dict[str, Dict[str, float]] = {
    # ranks per node, BF16 FLOP/s per rank, device memory per rank (bytes), intra-node link
    # bytes/s per rank, inter-node (EFA) bytes/s per node; sources in the module docstring
    "trn1.32xlarge": dict(ranks=32, flops=95e12, memory=16 * GIB, intra=192 * GB,
                          inter=800e9 / 8, platform="trn1"),
    "trn1n.32xlarge": dict(ranks=32, flops=95e12, memory=16 * GIB, intra=192 * GB,
                           inter=1600e9 / 8, platform="trn1"),
    "trn2.48xlarge": dict(ranks=64, flops=667e12 / 4, memory=24 * GIB, intra=320 * GB,
                          inter=3200e9 / 8, platform="trn2"),
    "p5.48xlarge": dict(ranks=8, flops=989e12, memory=80 * 10 ** 9, intra=900 * GB,
                        inter=3200e9 / 8, platform="gpu"),
    "cpu": dict(ranks=16, flops=0.1e12, memory=8 * GIB, intra=10 * GB, inter=1.25 * GB,
                platform="cpu"),
}


def instance(name: str) -> Dict[str, float]:
    """The figures of instance ``name`` (``INSTANCES``); ``ValueError`` for an unknown one."""
    if name not in INSTANCES:
        raise ValueError(f"instance={name!r} is not one the planner knows: {sorted(INSTANCES)}")
    return INSTANCES[name]


def cp_bytes_per_layer(hf_config: Any, tp: int, cp: int, tokens: int, comm_type: str = "p2p",
                       dtype_bytes: int = 2, a2a_size: Optional[int] = None) -> float:
    """Bytes one rank sends for CP attention per decoder layer per step (forward + backward),
    ``tokens`` = this rank's tokens (``micro_batch · seq_len / cp``)."""
    if cp == 1:
        return 0.0
    m = model_dims(hf_config)
    hkv, hq, d, e = max(1, m["hkv"] // tp), m["hq"] // tp, m["d"], dtype_bytes
    kv, dkv = 2 * tokens * hkv * d * e, 2 * tokens * hkv * d * 4
    if comm_type == "p2p":
        return (cp - 1) * 2 * kv + cp * dkv
    if comm_type == "all_gather":
        return (cp - 1) * 2 * kv + (cp - 1) * dkv
    g = cp if comm_type == "a2a" else int(a2a_size or 1)
    rep = math.lcm(hkv, g)
    a2a = 2 * (g - 1) / g * tokens * (2 * hq * d + 2 * rep * d) * e    # fwd + bwd, 4 a2a each
    if comm_type == "a2a":
        return a2a
    ring = cp // g
    return a2a + (ring - 1) * 2 * kv + ring * dkv if ring > 1 else a2a


def tp_bytes_per_layer(hf_config: Any, tp: int, tokens: int, sequence_parallel: bool = False,
                       dtype_bytes: int = 2) -> float:
    """Bytes one rank sends for TP per decoder layer per step: 4 all-reduces of
    ``[tokens, h]`` (``8·(tp−1)/tp·n·h·e``), or with SP ``10·(tp−1)/tp·n·h·e``."""
    h = model_dims(hf_config)["h"]
    k = 10 if sequence_parallel else 8
    return k * (tp - 1) / tp * tokens * h * dtype_bytes


def step_flops(hf_config: Any, seq_len: int, global_batch: int,
               checkpointing: bool = False) -> float:
    """FLOPs of one training step of the whole model: ``6·N·tokens`` plus causal attention
    ``6·L·hq·D·S²`` per sequence (forward 2 matmuls, half the scores, backward 2×); with
    checkpointing one more forward (``× 4/3``)."""
    m = model_dims(hf_config)
    dense = 6 * parameter_count(hf_config) * seq_len * global_batch
    attn = 6 * m["L"] * m["hq"] * m["d"] * seq_len ** 2 * global_batch
    return (dense + attn) * (4 / 3 if checkpointing else 1)


def step_time(hf_config: Any, inst: str, nodes: int, tp: int, cp: int, pp: int, dp: int,
              seq_len: int, global_batch: int, num_microbatches: int = 1,
              comm_type: str = "p2p", sequence_parallel: bool = False,
              checkpointing: bool = False, dtype_bytes: int = 2, grad_bytes: int = 2,
              a2a_size: Optional[int] = None, efficiency: float = EFFICIENCY) -> Dict[str, float]:
    """Seconds of one step and its parts: ``compute`` (FLOPs per rank at ``efficiency`` of
    the peak), ``tp``/``cp``/``pp``/``dp`` communication (bytes / bandwidth: intra-node link
    when the group fits in a node, else EFA shared by the node's ranks), ``bubble`` factor
    ``(m + pp − 1) / m``. TP, PP and DP are counted as not overlapped; the CP ring hides
    behind the attention compute (only the excess counts). ``step_time_s`` is the total."""
    hw = instance(inst)
    world = nodes * int(hw["ranks"])
    m = model_dims(hf_config)
    layers = math.ceil(m["L"] / pp)
    micro = global_batch // dp // num_microbatches
    tokens = micro * seq_len // cp                          # per rank per microbatch
    compute = step_flops(hf_config, seq_len, global_batch, checkpointing) / world / (
        hw["flops"] * efficiency)
    attn_compute = compute * _attention_share(m, hf_config, seq_len)

    def bw(group_span: int) -> float:
        return hw["intra"] if group_span <= hw["ranks"] else hw["inter"] / hw["ranks"]

    mb = num_microbatches * layers
    t_tp = mb * tp_bytes_per_layer(hf_config, tp, tokens, sequence_parallel, dtype_bytes) / bw(tp)
    t_cp = mb * cp_bytes_per_layer(hf_config, tp, cp, tokens, comm_type, dtype_bytes,
                                   a2a_size) / bw(tp * cp)
    t_pp = 0.0 if pp == 1 else num_microbatches * 2 * tokens * m["h"] * dtype_bytes / (
        tp if sequence_parallel else 1) / bw(world)
    n = dp * cp
    state = parameter_count(hf_config, tp, pp) * grad_bytes
    t_dp = 0.0 if n == 1 else 2 * (n - 1) / n * state / bw(world // pp if pp > 1 else world)
    bubble = (num_microbatches + pp - 1) / num_microbatches
    total = (compute + t_tp + max(0.0, t_cp - attn_compute)) * bubble + t_pp + t_dp
    return {"compute": compute, "tp": t_tp, "cp": t_cp, "pp": t_pp, "dp": t_dp,
            "bubble": bubble, "step_time_s": total}


def _attention_share(m: Dict[str, Any], hf_config: Any, seq_len: int) -> float:
    dense = 6 * parameter_count(hf_config) * seq_len
    attn = 6 * m["L"] * m["hq"] * m["d"] * seq_len ** 2
    return attn / (dense + attn)
