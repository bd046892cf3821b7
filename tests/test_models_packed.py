"""Packed rows through ``transform``ed Llama / Mistral vs the unmodified model run per document.

Batches are built with transformers' own ``DataCollatorWithFlattening`` (one call per row:
``input_ids``, ``labels`` with -100 at every document start, ``position_ids`` restarting at 0;
optionally ``seq_idx`` or ``cu_seq_lens_q``), two rows of 256 tokens with different documents:
one-token documents, documents shorter than a chunk, a document that spans every CP rank, and a
row ending in padding (``attention_mask`` 0, or with the ``position_ids`` format, which has no
mask, a document of its own). The three input formats are cycled over the cases.

Reference (nobody here wrote it): the unmodified transformers model in fp32 run on rank 0 on
each document *separately* (no packing), the documents' mean losses combined token-weighted and
their gradients summed accordingly. (transformers' SDPA on a packed row is not a reference.)
The CP model gets ``get_batch_on_this_context_parallel_rank`` of the packed batch.

One 4-rank spawn runs TP2xCP2 and TP1xCP4 (each case its own test, tests/cases.py); zigzag,
per_document (and contiguous once); p2p and
all_gather; Mistral with a sliding window (48) shorter than its documents. Tolerances: loss 1e-5
relative on every rank, every parameter's gradient 1e-4 norm-wise relative (the fp32 standard).
"""
import pytest
import torch
from cases import CaseRunner, case_result, wanted_cases
from test_models import make_model, rel

from nxd_cp.testing import run_ranks

SEQ = 256
# Document lengths per row; row 1 ends in PAD padding tokens.
ROWS = ([1, 7, 150, 1, 1, 30, 66], [90, 10, 140])
PAD = 16
FORMATS = ("position_ids", "seq_idx", "cu_seq_lens")


def documents(seed=5):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(1, 256, (n,), generator=g) for n in row] for row in ROWS]


def packed_batch(docs, fmt):
    """The packed batch [2, SEQ] as DataCollatorWithFlattening builds it (row by row)."""
    from transformers import DataCollatorWithFlattening

    collator = DataCollatorWithFlattening(return_seq_idx=fmt == "seq_idx",
                                          return_flash_attn_kwargs=fmt == "cu_seq_lens",
                                          return_position_ids=fmt != "cu_seq_lens")
    rows = [collator([{"input_ids": d.tolist()} for d in row]) for row in docs]
    pad = SEQ - rows[1]["input_ids"].shape[1]
    assert pad == PAD and rows[0]["input_ids"].shape[1] == SEQ
    tail = {"input_ids": torch.zeros(1, pad, dtype=torch.long),
            "labels": torch.full((1, pad), -100), "position_ids": torch.arange(pad)[None],
            "seq_idx": torch.full((1, pad), len(docs[1]), dtype=torch.int32)}
    batch = {}
    for key in ("input_ids", "labels", "position_ids", "seq_idx"):
        if key in rows[0]:
            batch[key] = torch.cat([rows[0][key], torch.cat([rows[1][key], tail[key]], 1)])
    if fmt != "position_ids":
        # transformers' rule (and nxd_cp's): documents come from restarting position_ids only
        # without an attention_mask; there the padding is a document of its own (labels -100)
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[1, SEQ - pad:] = 0
        batch["attention_mask"] = mask
    if fmt == "cu_seq_lens":  # over the flattened batch; the padding is a document of its own
        # (no position_ids: the data function makes them restart at every document)
        lengths = [n for row in ROWS for n in row] + [pad]
        batch["cu_seq_lens_q"] = torch.cumsum(torch.tensor([0] + lengths), 0).int()
        batch["cu_seq_lens_k"] = batch["cu_seq_lens_q"].clone()
        batch["max_length_q"] = batch["max_length_k"] = max(lengths)
    return batch


def reference(arch, docs):
    """Rank 0: the unmodified model on every document alone; loss and gradients of the
    token-weighted mean over all documents."""
    model = make_model(arch)
    counts = [len(d) - 1 for row in docs for d in row]
    total = sum(counts)
    loss = 0.0
    for d, n in zip((d for row in docs for d in row), counts):
        if n == 0:  # a one-token document predicts nothing
            continue
        loss = loss + model(input_ids=d[None], labels=d[None]).loss * (n / total)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def run_case(arch, comm, layout, fmt, docs, ref, drop_documents=False):
    import torch.distributed as dist

    from nxd_cp.models import full_gradients, transform
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank
    from nxd_cp.testing import activate_config
    from nxd_cp.training.grads import allreduce_context_parallel_gradients

    model = transform(make_model(arch), activate_config(
        comm, layout, a2a_size=2 if comm == "a2a+p2p" else None))
    batch = get_batch_on_this_context_parallel_rank(packed_batch(docs, fmt))
    if drop_documents:  # negative control: attention across documents
        batch.pop("seq_idx")
    out = model(**batch)
    out.loss.backward()
    allreduce_context_parallel_gradients(model)
    grads = full_gradients(model)
    res = {"loss": out.loss.item(), "keys": sorted(batch)}
    if dist.get_rank() == 0:
        ref_loss, ref_grads = ref
        res["loss_err"] = abs(res["loss"] - ref_loss) / abs(ref_loss)
        res["grad_err"] = {n: rel(grads[n], g) for n, g in ref_grads.items()}
    return res


PLANS = {
    (2, 2): [(a, c, lb) for a in ("llama", "mistral") for c in ("p2p", "all_gather")
             for lb in ("zigzag", "per_document")],
    (1, 4): [("llama", "p2p", "per_document"), ("mistral", "all_gather", "per_document"),
             ("llama", "all_gather", "zigzag"), ("mistral", "p2p", "contiguous"),
             # all-to-all: Ulysses over 4, and a2a in pairs with the ring across
             ("llama", "a2a", "per_document"), ("mistral", "a2a+p2p", "per_document"),
             ("llama", "a2a+p2p", "zigzag")],
}


def case_keys():
    """(tp, cp, arch, comm, layout, format, key) of every case, the formats cycled in order."""
    out, n = [], 0
    for (tp, cp), cases in PLANS.items():
        for arch, comm, layout in cases:
            fmt = FORMATS[n % len(FORMATS)]
            n += 1
            key = f"tp{tp}cp{cp}-{arch}-{comm}-{layout}-{fmt}"
            out.append((tp, cp, arch, comm, layout, fmt, key))
    return out


KEYS = [c[-1] for c in case_keys()]


def world(rank, world_size, wanted=None):
    import torch.distributed as dist

    from nxd_cp import parallel_state as ps

    docs = documents()
    refs = {}

    def ref(arch):  # rank 0 only, no collectives: computed once per architecture needed
        if dist.get_rank() == 0 and arch not in refs:
            refs[arch] = reference(arch, docs)
        return refs.get(arch)

    runner = CaseRunner(wanted)
    for (tp, cp) in PLANS:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        for tp_, cp_, arch, comm, layout, fmt, key in case_keys():
            if (tp_, cp_) == (tp, cp) and runner.wants(key):
                runner.run(key, lambda: run_case(arch, comm, layout, fmt, docs, ref(arch)))
        if (tp, cp) == (2, 2) and runner.wants("control"):
            runner.run("control", lambda: run_case("llama", "p2p", "zigzag", "seq_idx", docs,
                                                   ref("llama"), drop_documents=True))
        ps.destroy_model_parallel()
    return runner.results


@pytest.fixture(scope="module")
def results(request):
    return run_ranks(world, 4, wanted_cases(request, "results"), timeout=400)


def test_case_list():
    assert len(KEYS) == len(set(KEYS)) == sum(len(c) for c in PLANS.values())


@pytest.mark.parametrize("case", KEYS)
def test_packed_training_matches_per_document_reference(results, case):
    per_rank = case_result(results, case)
    res0 = per_rank[0]
    assert "seq_idx" in res0["keys"] and "cu_seq_lens_q" not in res0["keys"], res0["keys"]
    losses = {r["loss"] for r in per_rank}
    assert len(losses) == 1, (case, losses)  # the global loss on every rank
    worst = max(res0["grad_err"], key=res0["grad_err"].get)
    print(f"{case:50s} loss {res0['loss_err']:.1e} grad {res0['grad_err'][worst]:.1e}")
    # fp32; only summation order differs (measured ~1e-7 loss, ~1e-6 gradients)
    assert res0["loss_err"] <= 1e-5, (case, res0["loss_err"])
    assert res0["grad_err"][worst] <= 1e-4, (case, worst, res0["grad_err"][worst])


@pytest.mark.parametrize("case", ["control"])
def test_without_seq_idx_documents_mix(results, case):
    """Negative control: without seq_idx the same batch attends across documents."""
    control = max(case_result(results, case)[0]["grad_err"].values())
    print("without seq_idx: worst gradient error", control)
    assert control > 1e-2, control
