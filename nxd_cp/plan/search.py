"""Enumerate layouts, keep the valid ones that fit, rank them by estimated step time.

A layout is TP × CP × PP × DP (NxD's order: TP innermost, PP outermost), the CP comm type, SP,
activation checkpointing, vocab-parallel logits, optimizer-state sharding and microbatches.
Valid: the rules of ``nxd_cp.models.registry.check_sizes`` (heads, KV heads, MLP and
vocabulary divisible by tp), TP inside a node, ``seq_len % (2·cp) == 0``, SP needs
``(seq_len / cp) % tp == 0``, ``a2a`` needs ``(hq/tp) % cp == 0`` (``a2a+p2p``: ``% a2a_size``),
NxD's trn1 TP=4 layout refuses cp > 1 and needs ``dp % (ranks per node / 4) == 0``
(``nxd_cp.topology.layout``), ``pp ≤ L``, ``dp`` divides the global batch. Fits: the
memory per rank (``memory_per_core``) is at most the device memory minus ``reserve`` bytes.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

from nxd_cp.plan import memory as mem
from nxd_cp.plan.comm import EFFICIENCY, instance, step_time

PRECISIONS = {  # bytes per parameter: (parameters, gradients, optimizer state)
    "bf16": (2, 2, 4),    # XLA_DOWNCAST_BF16=1 / a bf16 model: bf16 AdamW moments
    "mixed": (2, 4, 12),  # bf16 parameters, fp32 gradients, fp32 master weights + moments
}
DEFAULT_RESERVE = 2 * mem.GIB  # compiler scratch, communication buffers: stated, not measured


@dataclass
class Plan:
    """One layout and its predictions (bytes per rank, seconds per step)."""

    tp: int
    cp: int
    pp: int
    dp: int
    comm_type: str
    a2a_size: Optional[int]
    sequence_parallel: bool
    checkpointing: bool
    vocab_parallel_logits: bool
    sharding: str
    num_microbatches: int
    micro_batch: int
    memory_per_core_bytes: float
    memory: Dict[str, float]
    step_time_s: float
    sequences_per_s: float
    time: Dict[str, float]
    fits: bool

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_tp(dims: Dict[str, Any], tp: int, ranks_per_node: int) -> bool:
    """TP rules: heads, KV heads (split or replicated), MLP and vocabulary, TP in a node."""
    hq, hkv = dims["hq"], dims["hkv"]
    return (tp <= ranks_per_node and ranks_per_node % tp == 0 and hq % tp == 0
            and (hkv % tp == 0 or tp % hkv == 0) and dims["f"] % tp == 0
            and dims["V"] % tp == 0)


def comm_options(dims: Dict[str, Any], tp: int, cp: int, ranks_per_node: int):
    """(comm_type, a2a_size) pairs valid for this tp and cp."""
    if cp == 1:
        return [("p2p", None)]
    out = [("p2p", None), ("all_gather", None)]
    heads = dims["hq"] // tp
    if heads % cp == 0:
        out.append(("a2a", None))
    sizes = [g for g in _divisors(cp) if 1 < g < cp and heads % g == 0
             and tp * g <= ranks_per_node]
    if sizes:
        out.append(("a2a+p2p", max(sizes)))
    return out


def memory_per_core(hf_config: Any, *, tp: int, cp: int, pp: int, dp: int, seq_len: int,
                    micro_batch: int, num_microbatches: int, comm_type: str,
                    a2a_size: Optional[int], sequence_parallel: bool, checkpointing: bool,
                    vocab_parallel_logits: bool, sharding: str, precision: str = "bf16",
                    reserve: float = DEFAULT_RESERVE) -> Dict[str, float]:
    """Bytes per rank by part (``parameters``, ``gradients``, ``optimizer``, ``activations``,
    ``recompute``, ``logits``, ``reserve``) and their ``total`` (largest stage's)."""
    p, g, o = PRECISIONS[precision]
    n = dp * cp
    act = dict(tp=tp, cp=cp, seq_len=seq_len, micro_batch=micro_batch,
               sequence_parallel=sequence_parallel)
    parts = {
        "parameters": mem.parameter_bytes(hf_config, tp, pp, None, p, sharding, n),
        "gradients": mem.gradient_bytes(hf_config, tp, pp, None, g, sharding, n),
        "optimizer": mem.optimizer_bytes(hf_config, tp, pp, None, o, sharding, n),
        "activations": mem.activation_bytes(
            hf_config, checkpointing=checkpointing, vocab_parallel_logits=vocab_parallel_logits,
            pp=pp, num_microbatches=num_microbatches, comm_type=comm_type, a2a_size=a2a_size,
            **act),
        "recompute": mem.recompute_bytes(hf_config, checkpointing=checkpointing, **act),
        "logits": mem.logits_bytes(hf_config, tp, cp, seq_len, micro_batch,
                                   vocab_parallel_logits=vocab_parallel_logits),
        "reserve": reserve,
    }
    parts["total"] = sum(parts.values())
    return parts


def search(hf_config: Any, seq_len: int, inst: str = "trn1.32xlarge", nodes: int = 1,
           global_batch: Optional[int] = None, precision: str = "bf16",
           reserve: float = DEFAULT_RESERVE, fitting_only: bool = True,
           efficiency: float = EFFICIENCY) -> List[Plan]:
    """Every valid layout (module docstring) for ``nodes`` instances of ``inst``, fastest
    first (sequences per second: the step time when ``global_batch`` is fixed; then memory);
    only those that fit unless ``fitting_only=False``. ``global_batch``: sequences per step
    (default: one sequence per DP rank, so the layouts' batches differ); ``efficiency``: of
    the peak FLOPs (``comm.EFFICIENCY``)."""
    hw = instance(inst)
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes={nodes!r} must be an integer >= 1")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {sorted(PRECISIONS)}")
    dims = mem.model_dims(hf_config)
    rpn, world = int(hw["ranks"]), nodes * int(hw["ranks"])
    plans: List[Plan] = []
    for tp in (t for t in _divisors(rpn) if valid_tp(dims, t, rpn)):
        for cp in _divisors(world // tp):
            if seq_len % (2 * cp) or (hw["platform"] == "trn1" and tp == 4 and cp > 1):
                continue
            for pp in (q for q in _divisors(world // (tp * cp)) if q <= dims["L"]):
                dp = world // (tp * cp * pp)
                batch = global_batch or dp
                trn1_tp4 = hw["platform"] == "trn1" and tp == 4 and dp % (rpn // 4)
                if batch % dp or trn1_tp4:  # NxD's trn1 TP=4 layout: dp % (ranks/4) == 0
                    continue
                plans += _options(hf_config, dims, hw, inst, nodes, seq_len, batch, precision,
                                  reserve, tp, cp, pp, dp, rpn, efficiency)
    if fitting_only:
        plans = [p for p in plans if p.fits]
    return sorted(plans, key=lambda p: (-p.sequences_per_s, p.memory_per_core_bytes))


def distinct_layouts(plans: List[Plan]) -> List[Plan]:
    """The first (best) plan of each TP × CP × PP × DP layout, in the order given."""
    seen, out = set(), []
    for p in plans:
        if (p.tp, p.cp, p.pp, p.dp) not in seen:
            seen.add((p.tp, p.cp, p.pp, p.dp))
            out.append(p)
    return out


def _options(hf_config, dims, hw, inst, nodes, seq_len, batch, precision, reserve,
             tp, cp, pp, dp, rpn, efficiency) -> List[Plan]:
    """Every variant (comm type, microbatches, SP, checkpointing, sharding) of one
    TP × CP × PP × DP layout, with its memory and step time."""
    rows = batch // dp
    ms = [m for m in _divisors(rows) if pp == 1 and m == 1 or pp > 1 and m >= pp or m == rows]
    sps = (False, True) if tp > 1 and (seq_len // cp) % tp == 0 else (False,)
    shardings = ("none", "zero1") if dp * cp > 1 else ("none",)
    if hw["platform"] in ("gpu", "cpu") and dp * cp > 1:
        shardings += ("fsdp",)
    out = []
    for (comm, g), m, sp, ckpt, sharding in itertools.product(
            comm_options(dims, tp, cp, rpn), sorted(set(ms)), sps, (False, True), shardings):
        vp = tp > 1  # vocab-parallel logits: never more memory, no extra time in this model
        kw = dict(tp=tp, cp=cp, pp=pp, dp=dp, seq_len=seq_len, micro_batch=rows // m,
                  num_microbatches=m, comm_type=comm, a2a_size=g, sequence_parallel=sp,
                  checkpointing=ckpt, vocab_parallel_logits=vp, sharding=sharding)
        memory = memory_per_core(hf_config, precision=precision, reserve=reserve, **kw)
        t = step_time(hf_config, inst, nodes, tp, cp, pp, dp, seq_len, batch, m, comm, sp,
                      ckpt, 2, PRECISIONS[precision][1], g, efficiency)
        out.append(Plan(tp, cp, pp, dp, comm, g, sp, ckpt, vp, sharding, m, rows // m,
                        memory["total"], memory, t["step_time_s"], batch / t["step_time_s"], t,
                        memory["total"] <= hw["memory"]))
    return out


def nxd_config_call(plan: Plan) -> str:
    """The ``neuronx_distributed_config(...)`` call of ``plan`` (Python source)."""
    args = [f"tensor_parallel_size={plan.tp}", f"context_parallel_size={plan.cp}",
            f"pipeline_parallel_size={plan.pp}"]
    if plan.pp > 1:
        args.append(f"pipeline_config={{'num_microbatches': {plan.num_microbatches}}}")
    if plan.sequence_parallel:
        args.append("sequence_parallel=True")
    if plan.checkpointing:
        args.append("activation_checkpoint_config='full'")
    if plan.sharding == "zero1":
        args.append("optimizer_config={'zero_one_enabled': True}")
    cpc = f"'comm_type': '{plan.comm_type}'"
    if plan.a2a_size:
        cpc += f", 'a2a_size': {plan.a2a_size}"
    args.append(f"context_parallel_config={{{cpc}}}")
    return "neuronx_distributed_config(\n    " + ",\n    ".join(args) + ")"


def launcher_command(plan: Plan, seq_len: int, nodes: int, ranks_per_node: int,
                     model_config: str = "MODEL_CONFIG", precision: str = "bf16") -> str:
    """The ``scripts/run_trn1.sh`` command of ``plan`` (per node; NODE_RANK / MASTER_ADDR
    as the script's --help says for several nodes), with a ``#`` note for each choice the
    launcher cannot express (it always passes ``--gradient_checkpointing
    --vocab_parallel_logits``; its example takes ``--cp_comm_type`` p2p or all_gather only and
    refuses ``--zero1`` with pp > 1)."""
    cmd = (f"scripts/run_trn1.sh --tp {plan.tp} --cp {plan.cp} --pp {plan.pp} "
           f"--cp-comm-type {plan.comm_type} --seq-len {seq_len} "
           f"--batch-size {plan.micro_batch * plan.num_microbatches} "
           f"--microbatches {plan.num_microbatches} --precision {precision} "
           f"--nproc-per-node {ranks_per_node} --nnodes {nodes} --model-config {model_config}")
    if nodes > 1:
        cmd += " --node-rank $NODE_RANK --master-addr $MASTER_ADDR"
    extra = (["--sequence_parallel"] if plan.sequence_parallel else []) + (
        ["--zero1"] if plan.sharding == "zero1" else [])
    if extra:
        cmd += " -- " + " ".join(extra)
    notes = []
    if plan.comm_type not in ("p2p", "all_gather"):
        notes.append(f"# comm_type {plan.comm_type!r} is not a --cp_comm_type of "
                     "examples/train_llama_cp.py: use the config call above in your script")
    if plan.sharding == "zero1" and plan.pp > 1:
        notes.append("# the example refuses --zero1 with pp > 1 (the library accepts it)")
    if not plan.checkpointing:
        notes.append("# the launcher also checkpoints every layer (slower; less memory)")
    return "\n".join([cmd] + notes)
