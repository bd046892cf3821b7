"""Bad input fails on every rank with a clear error; odd-but-valid input gives the right numbers.

One 4-rank world (TP2 x CP2, then TP1 x CP4) runs every case (tests/cases.py: one test per
case). Inputs users really pass by mistake: an id or label out of the vocabulary, float or -100
ids, num_items_in_batch=0, an empty batch, TP ranks handed different lengths. Each must raise a
``ValueError`` on *every* rank (none blocks in a collective, none aborts). Valid inputs that
used to go silently wrong must match the unmodified transformers model: sequence parallelism
with the README's one gradient call, left padding (with the one prediction that sees no key
dropped, as the reference's labels say), positions that jump under an attention mask (one
document, as in transformers), fp32 weights under bf16 autocast.

Tolerances: fp32 loss 1e-5 relative, gradients 1e-4 norm-wise relative (the fp32 standard);
bf16 autocast loss 2.5e-2 relative (TransformerEngine's bf16 bound).
"""
import logging

import pytest
import torch
from cases import CaseRunner, case_result, wanted_cases
from test_models import BATCH, SEQ, make_batch, make_model, rel

from nxd_cp.testing import run_ranks

pytestmark = [pytest.mark.gloo]
VOCAB = 256
RAISES = ("vocab_id_tp2", "vocab_id_one_rank", "vocab_id_cp4", "vocab_label",
          "vocab_label_vocab_parallel", "minus_one_label_vocab_parallel", "float_ids",
          "minus_100_ids", "num_items_zero", "empty_batch", "tp_lengths_differ")
EXACT = ("sp_one_call", "left_padding", "position_jump")
KEYS = RAISES + EXACT + ("autocast_bf16", "clipping_warning")


def _outcome(fn):
    try:
        fn()
        return ("ok", None)
    except Exception as e:  # noqa: BLE001 - compared in the parent
        return (type(e).__name__, str(e))


def _model(sp=False, vocab_parallel=False):
    import nxd_cp
    from nxd_cp.testing import activate_config

    return nxd_cp.transform(make_model("llama"), activate_config(sequence_parallel=sp),
                            vocab_parallel_logits=vocab_parallel)


def _shard(batch, model=None):
    import nxd_cp
    return nxd_cp.get_batch_on_this_context_parallel_rank(batch, config=model)


def _raising_cases(runner):
    """TP2 x CP2 (parallel state initialised by the caller)."""
    import torch.distributed as dist

    def with_id(value, pos=(1, 200)):
        batch = make_batch(1)
        batch["input_ids"][pos] = value
        return batch

    model = _model()
    runner.run("vocab_id_tp2", lambda: _outcome(
        lambda: model(**_shard(with_id(VOCAB), model))))
    # the data function cannot see it (no vocabulary given): only the rank holding token 200
    # of row 1 does, in the model; the other three must raise too, not block
    runner.run("vocab_id_one_rank", lambda: _outcome(lambda: model(**_shard(with_id(VOCAB)))))
    bad_label = make_batch(1)
    bad_label["labels"][0, 17] = VOCAB
    runner.run("vocab_label", lambda: _outcome(lambda: model(**_shard(bad_label))))
    floats = {**make_batch(1), "input_ids": make_batch(1)["input_ids"].float()}
    runner.run("float_ids", lambda: _outcome(lambda: model(**_shard(floats))))
    runner.run("minus_100_ids", lambda: _outcome(lambda: model(**_shard(with_id(-100, (0, 3))))))
    runner.run("num_items_zero", lambda: _outcome(
        lambda: model(**_shard(make_batch(1)), num_items_in_batch=0)))
    empty = {k: v[:0] for k, v in make_batch(1).items()}
    runner.run("empty_batch", lambda: _outcome(lambda: model(**_shard(empty))))
    # TP rank 1 of every CP rank gets half the tokens: gloo would abort on the size mismatch

    def different_lengths():
        shard = _shard(make_batch(1))
        if dist.get_rank() % 2:
            shard = {k: v[:, :SEQ // 4] if torch.is_tensor(v) and v.dim() == 2 else v
                     for k, v in shard.items()}
        model(**shard)
    runner.run("tp_lengths_differ", lambda: _outcome(different_lengths))
    vp = _model(vocab_parallel=True)
    for key, value in (("vocab_label_vocab_parallel", VOCAB),
                       ("minus_one_label_vocab_parallel", -1)):
        batch = make_batch(2)
        batch["labels"][1, 5] = value
        runner.run(key, lambda b=batch: _outcome(lambda: vp(**_shard(b))))


def _reference(batch, **kwargs):
    ref = make_model("llama")
    loss = ref(**batch, **kwargs).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in ref.named_parameters()}


def _compare(model, batch, ref_batch, sp_calls=0):
    """(loss error, worst gradient error) of ``model`` on ``batch`` vs the unmodified model on
    ``ref_batch`` (on every rank), after the README's single gradient call (then ``sp_calls``
    calls of allreduce_sequence_parallel_gradients, which must change nothing)."""
    import nxd_cp
    from nxd_cp.models import full_gradients

    loss = model(**_shard(batch, model)).loss
    loss.backward()
    nxd_cp.allreduce_context_parallel_gradients(model)
    for _ in range(sp_calls):
        nxd_cp.allreduce_sequence_parallel_gradients(model)
    grads = full_gradients(model, rank0_only=False)
    want_loss, want = _reference(ref_batch)
    return abs(loss.item() - want_loss) / want_loss, max(rel(grads[n], g) for n, g in want.items())


def _exact_cases(runner):
    runner.run("sp_one_call", lambda: _compare(_model(sp=True), make_batch(3), make_batch(3),
                                               sp_calls=2))
    left = make_batch(4)
    left["attention_mask"][0, :20] = 0  # left padding of row 0
    left["input_ids"][0, :20] = 0
    left["labels"][0, :20] = -100
    ref_left = {k: v.clone() for k, v in left.items()}
    ref_left["labels"][0, 20] = -100  # predicted by pad position 19, which sees no key
    runner.run("left_padding", lambda: _compare(_model(), left, ref_left))
    jump = make_batch(5)
    jump["position_ids"] = torch.cat([torch.arange(SEQ // 2), torch.arange(300, 300 + SEQ // 2)]
                                     ).expand(BATCH, SEQ)
    runner.run("position_jump", lambda: _compare(_model(), jump, jump))


def _autocast_case():
    model = _model()
    batch = make_batch(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**_shard(batch, model)).loss
        ref = make_model("llama")(**batch).loss
    loss.backward()
    return abs(loss.item() - ref.item()) / ref.item()


def _clipping_warning():
    import nxd_cp
    from nxd_cp import nxd_config

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("nxd_cp").addHandler(handler)
    try:
        nxd_config._WARNED_CLIPPING.clear()
        nxd_cp.neuronx_distributed_config(tensor_parallel_size=2, context_parallel_size=2)
    finally:
        logging.getLogger("nxd_cp").removeHandler(handler)
    return [r.getMessage() for r in records if "grad_clipping" in r.getMessage()]


def world(rank, world_size, wanted):
    from nxd_cp import parallel_state as ps

    runner = CaseRunner(wanted)
    ps.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    _raising_cases(runner)
    _exact_cases(runner)
    runner.run("autocast_bf16", _autocast_case)
    runner.run("clipping_warning", _clipping_warning)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=4)
    model = _model()
    batch = make_batch(7)
    batch["input_ids"][0, 250] = VOCAB + 3  # on one CP rank only: it raised IndexError, the
    runner.run("vocab_id_cp4", lambda: _outcome(lambda: model(**_shard(batch))))  # others hung
    return runner.results


@pytest.fixture(scope="module")
def results(request):
    return run_ranks(world, 4, wanted_cases(request, "results"), timeout=600)


EXPECTED = {
    "vocab_id_tp2": "input_ids must be in [0, vocab_size=256): got 256 at row 1, position 200",
    "vocab_id_one_rank": "input_ids must be in [0, vocab_size=256)",
    "vocab_id_cp4": "input_ids must be in [0, vocab_size=256)",
    "vocab_label": "labels must be in [0, vocab_size=256) or ignore_index=-100",
    "vocab_label_vocab_parallel": "labels must be in [0, vocab_size=256) or ignore_index=-100",
    "minus_one_label_vocab_parallel": "got -1",
    "float_ids": "input_ids must be an integer tensor (token ids), got dtype torch.float32",
    "minus_100_ids": "-100 marks ignored *labels*",
    "num_items_zero": "num_items_in_batch=0 must be >= 1",
    "empty_batch": "batch size 0",
    "tp_lengths_differ": "were given different local shapes [B, S_local]",
}


@pytest.mark.parametrize("case", RAISES)
def test_bad_input_raises_on_every_rank(results, case):
    outcomes = case_result(results, case)
    for rank, (kind, msg) in enumerate(outcomes):
        assert kind == "ValueError", (rank, kind, msg)
    # the ranks that saw the value name it; every rank names the rule or the failing ranks
    named = [msg for _, msg in outcomes if EXPECTED[case] in msg]
    assert named, outcomes
    for _, msg in outcomes:
        assert EXPECTED[case] in msg or "invalid model inputs on ranks" in msg, msg


@pytest.mark.parametrize("case", EXACT)
def test_valid_input_matches_transformers(results, case):
    for loss_err, grad_err in case_result(results, case):
        assert loss_err <= 1e-5, loss_err  # fp32 forward
        assert grad_err <= 1e-4, grad_err  # fp32 gradients, norm-wise


def test_bf16_autocast_runs_within_bf16_bound(results):
    for err in case_result(results, "autocast_bf16"):
        assert err <= 2.5e-2, err  # TransformerEngine's bf16 tolerance


def test_fallback_says_it_does_not_clip(results):
    warned = case_result(results, "clipping_warning")
    assert len(warned[0]) == 1 and "call nxd_cp.clip_grad_norm" in warned[0][0], warned[0]
    assert all(w == [] for w in warned[1:])  # rank 0 only
