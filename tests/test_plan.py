"""The planner (nxd_cp.plan): its memory formulas against measurement, and its search.

Validation (one 4-rank gloo world, tests/cases.py): for each configuration a tiny bf16 model
(Llama with GQA 8/2, Mistral with 1 KV head and tied embeddings, Qwen2 with qkv bias, Qwen3
with q/k norms) is transformed on real ranks, and the bytes autograd saves in one forward
(``count_saved_bytes``; with PP the forward of this rank's stage, one microbatch), the
parameter and gradient bytes and AdamW's state after one step (``optimizer_state_bytes``) are
compared with ``activation_bytes`` / ``parameter_bytes`` / ``gradient_bytes`` /
``optimizer_bytes`` (ZeRO-1 through ``initialize_parallel_optimizer``, FSDP2 through
``nxd_cp.fully_shard``). ``-s`` prints the table, measured/predicted per rank.

The search tests (no ranks): Llama-3.1-8B at 32K fits one trn1.32xlarge; Llama-3.1-70B at 32K
on 16 nodes takes PP and is compared with NxD's TP32 x CP2 x PP8; the step-time model against
AWS's published trn1 throughputs; the CLI's JSON.
"""
import pytest
import torch
from cases import CaseRunner, case_result, wanted_cases

from nxd_cp.plan import (activation_bytes, gradient_bytes, optimizer_bytes, parameter_bytes)
from nxd_cp.testing import run_ranks

BASE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
TINY = {
    "llama": dict(BASE, model_type="llama"),
    "mistral": dict(BASE, model_type="mistral", num_key_value_heads=1, sliding_window=48,
                    tie_word_embeddings=True),
    "qwen2": dict(BASE, model_type="qwen2"),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=16),
}
SEQ = 128

# key -> (arch, tp, cp, pp, options)
CONFIGS = {
    "llama-tp1cp1": ("llama", 1, 1, 1, {}),
    "llama-tp2cp1": ("llama", 2, 1, 1, {}),
    "llama-tp4cp1-sp": ("llama", 4, 1, 1, {"sp": True}),
    "llama-tp1cp2-p2p": ("llama", 1, 2, 1, {}),
    "llama-tp2cp2-p2p": ("llama", 2, 2, 1, {}),
    "llama-tp2cp2-all_gather": ("llama", 2, 2, 1, {"comm": "all_gather"}),
    "llama-tp2cp2-a2a": ("llama", 2, 2, 1, {"comm": "a2a"}),
    "llama-tp1cp4-a2a+p2p": ("llama", 1, 4, 1, {"comm": "a2a+p2p"}),
    "llama-tp1cp4-p2p-batch2": ("llama", 1, 4, 1, {"batch": 2}),
    "llama-tp2cp2-sp": ("llama", 2, 2, 1, {"sp": True}),
    "llama-tp2cp2-ckpt": ("llama", 2, 2, 1, {"ckpt": True}),
    "llama-tp2cp2-sp-ckpt": ("llama", 2, 2, 1, {"sp": True, "ckpt": True}),
    "llama-tp2cp2-vp": ("llama", 2, 2, 1, {"vp": True}),
    "llama-tp4cp1-sp-ckpt-vp": ("llama", 4, 1, 1, {"sp": True, "ckpt": True, "vp": True}),
    "llama-tp2cp2-packed": ("llama", 2, 2, 1, {"packed": True}),
    "llama-tp1cp2pp2": ("llama", 1, 2, 2, {}),
    "llama-tp2cp1pp2-vp": ("llama", 2, 1, 2, {"vp": True}),
    "llama-tp2cp1pp2-sp-ckpt": ("llama", 2, 1, 2, {"sp": True, "ckpt": True}),
    "mistral-tp2cp2-p2p": ("mistral", 2, 2, 1, {}),
    "mistral-tp4cp1-all_gather": ("mistral", 4, 1, 1, {"comm": "all_gather"}),
    "mistral-tp1cp4-a2a-ckpt": ("mistral", 1, 4, 1, {"comm": "a2a", "ckpt": True}),
    "qwen2-tp2cp2-p2p": ("qwen2", 2, 2, 1, {}),
    "qwen3-tp2cp2-p2p": ("qwen3", 2, 2, 1, {}),
    "qwen3-tp1cp4-vp": ("qwen3", 1, 4, 1, {"vp": True}),
    "qwen3-tp2cp2-a2a-sp-ckpt": ("qwen3", 2, 2, 1, {"comm": "a2a", "sp": True, "ckpt": True}),
    "llama-tp2cp2-fp32": ("llama", 2, 2, 1, {"dtype": "fp32"}),
    "llama-tp2cp2-zero1": ("llama", 2, 2, 1, {"shard": "zero1"}),
    "llama-tp1cp4-zero1": ("llama", 1, 4, 1, {"shard": "zero1"}),
    "mistral-tp2cp2-fsdp": ("mistral", 2, 2, 1, {"shard": "fsdp"}),
    "llama-tp1cp2-fsdp": ("llama", 1, 2, 1, {"shard": "fsdp"}),
}
KEYS = list(CONFIGS)


def _hf_model(arch, dtype="bf16"):
    import transformers as tf

    d = {k: v for k, v in TINY[arch].items() if k != "model_type"}
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**d))
    return model.to(torch.bfloat16) if dtype == "bf16" else model


def _batch(rows, packed):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, BASE["vocab_size"], (rows, SEQ), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if packed:  # two documents per row: 40 and SEQ - 40 tokens
        pos = torch.cat([torch.arange(40), torch.arange(SEQ - 40)]).expand(rows, SEQ)
        seq_idx = (torch.arange(SEQ) >= 40).to(torch.int32).expand(rows, SEQ)
        batch.update(position_ids=pos.clone(), seq_idx=seq_idx.clone())
    return batch


def measure(arch, tp, cp, pp, opts):
    """Rank side: measured bytes of one configuration (module docstring)."""
    from nxd_cp import count_saved_bytes, neuronx_distributed_config, optimizer_state_bytes
    from nxd_cp import parallel_state as ps
    from nxd_cp.models import transform
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank

    import nxd_cp

    comm, shard = opts.get("comm", "p2p"), opts.get("shard", "none")
    cfg = neuronx_distributed_config(
        optimizer_config={"zero_one_enabled": True} if shard == "zero1" else None,
        # bf16 parameters without fp32 master weights (those need NxD's ZeRO-1 on device)
        mixed_precision_config={"use_master_weights": False} if shard == "zero1" else None,
        tensor_parallel_size=tp, context_parallel_size=cp, pipeline_parallel_size=pp,
        sequence_parallel=opts.get("sp", False),
        activation_checkpoint_config="full" if opts.get("ckpt") else None,
        pipeline_config={"num_microbatches": 1} if pp > 1 else None,
        context_parallel_config={"comm_type": comm,
                                 "a2a_size": 2 if comm == "a2a+p2p" else None})
    try:
        model = transform(_hf_model(arch, opts.get("dtype", "bf16")), cfg,
                          vocab_parallel_logits=opts.get("vp", False))
        if shard == "fsdp":
            model = nxd_cp.fully_shard(model)
        batch = get_batch_on_this_context_parallel_rank(
            _batch(opts.get("batch", 1), opts.get("packed", False)))
        params = list({id(p): p for p in model.parameters()}.values())
        with count_saved_bytes(exclude=params) as saved:
            if pp == 1:
                loss = model(**batch).loss
            else:
                loss = _stage_forward(model, batch)
        loss.backward()
        if shard == "zero1":
            opt = nxd_cp.initialize_parallel_optimizer(cfg, torch.optim.AdamW, params, lr=1e-3)
        else:
            opt = torch.optim.AdamW(params, lr=1e-3)
        opt.step()
        stage = ps.get_pipeline_model_parallel_rank() if pp > 1 else 0
        return {"stage": stage, "optimizer": optimizer_state_bytes(opt),
                # FSDP2 all-gathers the weights the matmuls save: not activations of the formula
                "activations": None if shard == "fsdp" else saved.total,
                "parameters": _local_bytes(params),
                "gradients": _local_bytes([p.grad for p in params if p.grad is not None]),
                "largest_parameter": max(_local_bytes([p]) for p in params)}
    finally:
        ps.destroy_model_parallel()


def _local_bytes(tensors):
    """Bytes of these tensors on this rank (FSDP2's DTensors: the local shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()
               for t in tensors)


def _stage_forward(model, batch):
    """This rank's stage alone, one microbatch (no send/recv): the first stage from the
    tokens, the others from a random hidden input; the last stage adds the model's loss."""
    from nxd_cp.models.pipelined import ENGINE_ATTR

    engine = model.__dict__[ENGINE_ATTR]
    stage = engine.stage_module
    x = batch["input_ids"]
    if not stage.is_first:
        hidden, dtype, _, out_seq = engine._shapes(x.shape[1])
        x = torch.randn(x.shape[0], out_seq, hidden, dtype=dtype, requires_grad=True)
    out = stage(x, batch["position_ids"])
    if not stage.is_last:
        return out.float().sum()
    count = (batch["labels"] != -100).sum()
    return model.loss_function(out, batch["labels"], num_items_in_batch=count)


def predict(arch, tp, cp, pp, opts, stage):
    """The planner's figures for one configuration and stage (bytes)."""
    cfg = TINY[arch]
    e = 4 if opts.get("dtype") == "fp32" else 2
    kw = dict(tp=tp, pp=pp, stage=stage, sharding=opts.get("shard", "none"), dp_cp=4 // (tp * pp))
    return {"activations": activation_bytes(
                cfg, tp=tp, cp=cp, seq_len=SEQ, micro_batch=opts.get("batch", 1), dtype_bytes=e,
                sequence_parallel=opts.get("sp", False), checkpointing=opts.get("ckpt", False),
                vocab_parallel_logits=opts.get("vp", False), pp=pp, num_microbatches=1,
                comm_type=opts.get("comm", "p2p"), stage=stage,
                a2a_size=2 if opts.get("comm") == "a2a+p2p" else None),
            "parameters": parameter_bytes(cfg, dtype_bytes=e, **kw),
            "gradients": gradient_bytes(cfg, dtype_bytes=e, **kw),
            # torch's AdamW: two moments in the parameters' dtype + a 4-byte step per tensor
            "optimizer": optimizer_bytes(cfg, bytes_per_parameter=2 * e, per_tensor_bytes=4,
                                         **kw)}


def four_rank_world(rank, world, wanted=None):
    runner = CaseRunner(wanted)
    for key, (arch, tp, cp, pp, opts) in CONFIGS.items():
        runner.run(key, measure, arch, tp, cp, pp, opts)
    return runner.results


@pytest.fixture(scope="module")
def four(request):
    return run_ranks(four_rank_world, 4, wanted_cases(request, "four"), timeout=600)


@pytest.mark.gloo  # about 45 s for the 30 cases on 2 cores: not "slow"
@pytest.mark.parametrize("case", KEYS)
def test_memory_formulas_match_measurement(four, case):
    arch, tp, cp, pp, opts = CONFIGS[case]
    per_rank = case_result(four, case)
    for rank, got in enumerate(per_rank):
        want = predict(arch, tp, cp, pp, opts, got["stage"])
        if got["activations"] is None:
            del want["activations"]
        row = " ".join(f"{k} {got[k]}/{want[k]:.0f}" for k in want)
        print(f"{case} rank {rank} stage {got['stage']}: measured/predicted {row}")
        for key, value in want.items():
            measured = got[key]
            if key == "optimizer" and opts.get("shard") == "zero1":
                # ZeRO-1 balances whole parameters: a rank's share is the average (predicted)
                # give or take one parameter's state (2 moments, bf16: 2 bytes per parameter
                # byte); the average over the ranks is checked below.
                assert abs(measured - value) <= 2 * got["largest_parameter"] + 4, (case, rank)
                continue
            # 5 %: the bound. The formulas count shapes, so the residual is what they
            # leave out (the loss scalar, 4 bytes); FSDP2 pads dim 0 to a multiple of dp*cp.
            assert abs(measured - value) <= 0.05 * value, (case, rank, key, measured, value)
    if opts.get("shard") == "zero1":
        mean = sum(r["optimizer"] for r in per_rank) / len(per_rank)
        want = predict(arch, tp, cp, pp, opts, 0)["optimizer"]
        assert abs(mean - want) <= 0.05 * want, (case, mean, want)  # 5 %: the bound


# ---------------------------------------------------------------------------------------------
# The search (pure functions: no ranks)
# ---------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_llama_8b_32k_fits_one_trn1():
    from nxd_cp.plan import load_config, search
    from nxd_cp.plan.comm import INSTANCES

    plans = search(load_config("Llama-3.1-8B"), 32768, "trn1.32xlarge", 1)
    assert plans, "no layout of Llama-3.1-8B at 32K fits one trn1.32xlarge"
    best = plans[0]
    assert best.tp * best.cp * best.pp * best.dp == 32
    # Fits: the predicted total (reserve included) is within the 16 GiB of a NeuronCore.
    assert best.memory_per_core_bytes <= INSTANCES["trn1.32xlarge"]["memory"]
    assert best.memory["reserve"] > 0  # the transient reserve is part of the total
    rates = [p.sequences_per_s for p in plans]
    assert rates == sorted(rates, reverse=True)  # fastest first


@pytest.mark.unit
def test_llama_70b_32k_16_nodes_uses_pp_and_compares_with_nxd_layout():
    from nxd_cp.plan import load_config, search

    plans = search(load_config("Llama-3.1-70B"), 32768, "trn1.32xlarge", 16, global_batch=32)
    assert plans and plans[0].pp > 1, [(p.tp, p.cp, p.pp) for p in plans[:5]]
    nxd = [p for p in plans if (p.tp, p.cp, p.pp) == (32, 2, 8)]
    assert nxd, "NxD's TP32 x CP2 x PP8 does not fit by the planner's figures"
    ref, best = nxd[0], plans[0]
    print(f"best TP{best.tp} x CP{best.cp} x PP{best.pp} x DP{best.dp} {best.comm_type}: "
          f"{best.step_time_s:.1f} s, bubble {best.time['bubble']:.2f}, TP comm "
          f"{best.time['tp']:.1f} s; NxD's TP32 x CP2 x PP8: {ref.step_time_s:.1f} s, bubble "
          f"{ref.time['bubble']:.2f}, TP comm {ref.time['tp']:.1f} s (rank "
          f"{plans.index(ref) + 1} of {len(plans)})")
    assert best.step_time_s <= ref.step_time_s  # same global batch: step time ranks them


@pytest.mark.unit
def test_rules_and_errors():
    from nxd_cp.plan import load_config, search
    from nxd_cp.plan.search import comm_options, valid_tp

    cfg = load_config("Llama-3.1-8B")
    dims = {"hq": 32, "hkv": 8, "f": 14336, "V": 128256}
    assert [t for t in (1, 2, 4, 8, 16, 32) if valid_tp(dims, t, 32)] == [1, 2, 4, 8, 16, 32]
    assert not valid_tp(dict(dims, hkv=6), 4, 32)  # 6 KV heads: neither split nor replicated
    assert ("a2a", None) not in comm_options(dims, 32, 2, 32)  # 1 query head per TP rank
    for p in search(cfg, 32768, "trn1.32xlarge", 1, fitting_only=False):
        assert 32768 % (2 * p.cp) == 0  # zigzag
        assert p.tp != 4 or (p.cp == 1 and p.dp % 8 == 0)  # NxD's trn1 TP=4 layout
    with pytest.raises(ValueError, match="seq_len=1000 must be divisible by 2\\*cp=16"):
        activation_bytes(cfg, cp=8, seq_len=1000)
    with pytest.raises(ValueError, match="instance='trn9'"):
        search(cfg, 4096, "trn9")
    with pytest.raises(ValueError, match="model='nope'"):
        load_config("nope")


@pytest.mark.unit
def test_cli_json_and_shipped_models(capsys):
    import json

    from nxd_cp.plan.__main__ import main
    from nxd_cp.plan.catalog import shipped_models

    assert shipped_models() == ["Llama-3.1-70B", "Llama-3.1-8B", "Mistral-7B-v0.1",
                                "Qwen2.5-7B", "Qwen3-8B"]
    assert main(["--model", "Qwen3-8B", "--seq-len", "8192", "--json", "--top", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2
    for key in ("tp", "cp", "pp", "dp", "comm_type", "memory_per_core_bytes", "step_time_s"):
        assert key in rows[0]
    assert main(["--model", "Llama-3.1-8B", "--seq-len", "32768"]) == 0
    out = capsys.readouterr().out
    assert "neuronx_distributed_config(" in out and "scripts/run_trn1.sh --tp" in out


@pytest.mark.unit
def test_step_time_against_published_trn1_throughput():
    """AWS's published trn1 throughputs (Neuron 2.24, no CP; /work/shared/REFERENCES.md,
    "Planner anchors") against ``step_time`` with ``comm.EFFICIENCY``. Assumed (not published
    with the figures): 32 nodes, a global batch of 1,024 sequences, SP and checkpointing on,
    70B with 256 microbatches."""
    from nxd_cp.plan import load_config, step_flops, step_time

    cases = [("Llama-3.1-8B", 32, 1, 32, 1, 47.95), ("Llama-3.1-70B", 32, 8, 4, 256, 7.94)]
    for name, tp, pp, dp, m, published in cases:
        cfg = load_config(name)
        t = step_time(cfg, "trn1.32xlarge", 32, tp, 1, pp, dp, 8192, 1024, m, "p2p", True, True)
        predicted = 1024 / t["step_time_s"]
        print(f"{name}: predicted {predicted:.2f} seq/s, published {published} seq/s "
              f"(compute {t['compute']:.1f} s, TP {t['tp']:.1f} s, bubble {t['bubble']:.2f})")
        # 25 %: a roofline with one efficiency constant for two models and layouts, against
        # throughputs whose batch and microbatches were not published with them.
        assert abs(predicted - published) <= 0.25 * published, (name, predicted, published)
    assert step_flops(load_config("Llama-3.1-8B"), 8192, 1) > 6 * 8.03e9 * 8192  # + attention


@pytest.mark.unit
def test_pure_functions_and_their_rules():
    from nxd_cp.plan import (INSTANCES, Plan, cp_bytes_per_layer, in_flight_microbatches,
                             launcher_command, layer_bytes_per_token, load_config, logits_bytes,
                             memory_per_core, model_dims, nxd_config_call, parameter_count,
                             recompute_bytes, search, tp_bytes_per_layer)

    cfg = load_config("Llama-3.1-8B")
    dims = model_dims(cfg)
    assert (dims["h"], dims["L"], dims["hq"], dims["hkv"], dims["d"]) == (4096, 32, 32, 8, 128)
    # choosing.md's published count: 8,030,261,248 parameters (exact)
    assert parameter_count(cfg) == 8_030_261_248
    # the measured per-layer figure at TP8 (attention out and o_proj input share a storage):
    # 2*(4h + 4h + 4) + (2*(2*4096 + 2*1024) + 4*32)/8 + 4*2*14336/8 (exact)
    assert layer_bytes_per_token(cfg, 8) == 65544 + (2 * (8192 + 2048) + 128) / 8 + 14336
    assert in_flight_microbatches(8, 32, stage=0) == 8 and in_flight_microbatches(8, 4) == 4
    assert recompute_bytes(cfg, 8, 4, 32768, checkpointing=False) == 0
    assert logits_bytes(cfg, 8, 4, 32768, vocab_parallel_logits=True) == 6 * 128256 / 8 * 8192
    # choosing.md's CP and TP bytes per layer at TP8 x CP4, 32K: 56 MiB p2p, 448 MiB TP
    assert cp_bytes_per_layer(cfg, 8, 4, 8192, "p2p") == 56 * 2 ** 20
    assert tp_bytes_per_layer(cfg, 8, 8192) == 448 * 2 ** 20
    parts = memory_per_core(cfg, tp=8, cp=4, pp=1, dp=1, seq_len=32768, micro_batch=1,
                            num_microbatches=1, comm_type="p2p", a2a_size=None,
                            sequence_parallel=True, checkpointing=True,
                            vocab_parallel_logits=True, sharding="none")
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    plan = search(cfg, 32768, "trn1.32xlarge", 1)[0]
    assert isinstance(plan, Plan) and plan.to_dict()["tp"] == plan.tp
    assert f"tensor_parallel_size={plan.tp}" in nxd_config_call(plan)
    assert f"--cp {plan.cp}" in launcher_command(plan, 32768, 1, 32)
    assert INSTANCES["trn1.32xlarge"]["ranks"] == 32
    with pytest.raises(ValueError, match="model_type='gpt_neox'"):
        model_dims({"model_type": "gpt_neox"})
    with pytest.raises(ValueError, match="sharding='zero3'"):
        parameter_bytes(cfg, sharding="zero3")
