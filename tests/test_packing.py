"""Packed rows, single process: input formats, the per_document layout, errors (exact checks).

Batches come from transformers' ``DataCollatorWithFlattening``; the data function takes
``cp_rank`` / ``cp_size``; the attention errors are raised before any collective (explicit
``GroupSpec``). Everything checked here moves integers only, so every check is exact.
"""
import pytest
import torch

from nxd_cp import parallel_state as ps
from nxd_cp.attention import context_parallel_attention
from nxd_cp.attention.documents import PackedDocuments
from nxd_cp.attention.parts import WHOLE, RankIndex, Selection
from nxd_cp.topology.groups import GroupSpec
from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank as get_batch
from nxd_cp.sequence.packing import document_ids
from nxd_cp.sequence.layout import (document_index, document_slots, reorder_gathered,
                             shard_sequence)
from nxd_cp.testing import activate_config

LENGTHS = [3, 1, 9, 1, 2, 16]  # 32 tokens: one-token documents, documents < 2cp, a long one


def flattened(lengths=LENGTHS, **collator_args):
    from transformers import DataCollatorWithFlattening

    g = torch.Generator().manual_seed(0)
    features = [{"input_ids": torch.randint(1, 99, (n,), generator=g).tolist()} for n in lengths]
    return DataCollatorWithFlattening(**collator_args)(features)


def ids_of(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


@pytest.mark.parametrize("fmt", [{}, {"return_seq_idx": True},
                                 {"return_flash_attn_kwargs": True, "return_position_ids": False}])
def test_collator_formats_give_the_same_documents(fmt):
    batch = flattened(**fmt)
    assert torch.equal(document_ids(batch, 1, 32), ids_of(LENGTHS).int())


@pytest.mark.parametrize("load_balance", ["zigzag", "contiguous", "per_document"])
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_packed_shards_reassemble(cp, load_balance):
    full = flattened(return_seq_idx=True, return_flash_attn_kwargs=True)
    ids = ids_of(LENGTHS)
    config = {"load_balance": load_balance}  # explicit: no active config is read
    shards = [get_batch(full, cp_rank=r, cp_size=cp, config=config) for r in range(cp)]
    want_labels = full["input_ids"].roll(-1, 1)
    want_labels[ids.roll(-1, 1) != ids] = -100  # no token predicts the next document
    want_labels[:, -1] = -100
    for key, want in (("input_ids", full["input_ids"]), ("seq_idx", ids.int()),
                      ("position_ids", full["position_ids"]), ("labels", want_labels)):
        got = reorder_gathered(torch.cat([s[key] for s in shards], 1), 1, cp, load_balance,
                               seq_idx=ids)
        assert torch.equal(got, want), key
    for s in shards:  # the flattened-batch keys describe the full row only
        assert not {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q"} & set(s)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_per_document_layout(cp):
    """Every slot S/2cp tokens; each document's pieces contiguous, in slot order; rank r holds
    slots r and 2cp-1-r; causal work within 5% of the mean on this mix (a few tokens a slot
    at cp 8), where zigzag over the row is off by more."""
    lengths = [1, 1, 3, 70, 5, 2, 130, 1, 43]  # 256 tokens
    ids = ids_of(lengths)
    n = 2 * cp
    slots = document_slots(ids, cp)[0]
    assert torch.equal(torch.bincount(slots, minlength=n), torch.full((n,), 256 // n))
    for d in range(len(lengths)):
        s = slots[ids[0] == d]
        assert bool((s[1:] >= s[:-1]).all()), d  # pieces in slot order = contiguous pieces
    t = torch.tensor(lengths)
    pos = torch.arange(256) - torch.repeat_interleave(torch.cumsum(t, 0) - t, t)
    work, zigzag = [], []
    for r in range(cp):
        index = document_index(ids, r, cp)[0]
        assert set(slots[index].tolist()) == {r, n - 1 - r}
        work.append(int((pos[index] + 1).sum()))
        zigzag.append(int((shard_sequence(pos[None], 1, r, cp, "zigzag") + 1).sum()))
    balance = max(work) / (sum(work) / cp)
    assert balance < 1.05 and balance < max(zigzag) / (sum(zigzag) / cp), (work, zigzag)
    one = torch.zeros(1, 64, dtype=torch.long)  # one document: exactly zigzag
    x = torch.arange(64)[None]
    assert all(torch.equal(shard_sequence(x, 1, r, cp, "per_document", seq_idx=one),
                           shard_sequence(x, 1, r, cp, "zigzag")) for r in range(cp) if 64 % n == 0)


def test_classify_skips_and_fuses_from_document_ranges():
    """Host-side block classes of PackedDocuments on a hand-made table (cp 2, zigzag)."""
    docs = PackedDocuments(torch.zeros(1, 8, dtype=torch.int32), per_document=False)
    # rank 0: chunks 0 (docs 0..0) and 3 (docs 2..3); rank 1: chunks 1 (0..1) and 2 (1..2)
    docs._ranges = [[[(0, 0)], [(2, 3)]], [[(0, 1)], [(1, 2)]]]
    rank1 = RankIndex(1)
    one, two, whole = Selection((0,)), Selection((1,)), WHOLE  # the calls' static selections
    assert docs.classify(1, one, one, rank1, 2) is True      # chunk 1 vs chunk 0: doc 0 shared
    assert docs.classify(1, two, one, rank1, 2) is None      # chunk 2 (docs 1..2) vs chunk 0
    assert docs.classify(0, whole, whole, rank1, 2) is True  # the local block
    docs._ranges[1][0] = [(1, 1)]
    assert docs.classify(1, one, one, rank1, 2) is None      # docs {1} vs {0}: nothing shared
    docs._ranges[1][0] = [(0, 0)]
    assert docs.classify(1, one, one, rank1, 2) is False     # one document on both sides
    assert PackedDocuments(torch.zeros(1, 8), False).classify(0, one, one, rank1, 2) is True


# --- errors ------------------------------------------------------------------------------------
def _full(**extra):
    ids = torch.arange(16)[None]
    return {"input_ids": ids, "labels": ids.clone(), **extra}


def test_data_errors():
    ps.destroy_model_parallel()  # public reset: no groups, no active config (the defaults)
    with pytest.raises(ValueError, match=r"seq_idx must be non-decreasing along each row .* "
                       r"row 0 goes from 1 at token 7 to 0 at token 8"):
        get_batch(_full(seq_idx=torch.tensor([[0] * 4 + [1] * 4 + [0] * 8])), cp_rank=0,
                  cp_size=2)
    with pytest.raises(ValueError, match=r"cu_seq_lens_q must run from 0 to batch\*seq = "
                       r"1\*16 = 16 \(the document boundaries must match the sequence length\), "
                       r"got 0 \.\. 15"):
        get_batch(_full(cu_seq_lens_q=torch.tensor([0, 5, 15])), cp_rank=0, cp_size=2)
    with pytest.raises(ValueError, match="cu_seq_lens_q must be strictly increasing"):
        get_batch(_full(cu_seq_lens_q=torch.tensor([0, 5, 5, 16])), cp_rank=0, cp_size=2)
    two_rows = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    with pytest.raises(ValueError, match="no boundary at token 8 .* a document cannot span "
                       "two rows"):
        get_batch(two_rows | {"cu_seq_lens_q": torch.tensor([0, 4, 12, 16])}, cp_rank=0,
                  cp_size=2)
    with pytest.raises(ValueError, match="cu_seq_lens_k and cu_seq_lens_q describe different "
                       "documents: they disagree first at token 5 of row 0"):
        get_batch(_full(cu_seq_lens_q=torch.tensor([0, 5, 16]),
                        cu_seq_lens_k=torch.tensor([0, 6, 16])), cp_rank=0, cp_size=2)
    with pytest.raises(ValueError, match=r"seq_idx must be an integer tensor \[batch, seq\] = "
                       r"\(1, 16\), got torch.float32"):
        get_batch(_full(seq_idx=torch.zeros(1, 16)), cp_rank=0, cp_size=2)
    with pytest.raises(ValueError, match="position_ids must increase by 1 inside every "
                       "document .* row 0 has 3 then 5 at tokens 3, 4 of document 0"):
        get_batch(_full(seq_idx=torch.zeros(1, 16, dtype=torch.long),
                        position_ids=torch.tensor([[0, 1, 2, 3] + list(range(5, 17))])),
                  cp_rank=0, cp_size=2)
    with pytest.raises(ValueError, match=r"sequence length 16 is not divisible by "
                       r"2\*context_parallel_size=32 \(per_document\)"):
        activate_config(load_balance="per_document")
        get_batch(_full(seq_idx=torch.zeros(1, 16, dtype=torch.long)), cp_rank=0, cp_size=16)


def test_attention_errors():
    q, k, v = (torch.randn(1, h, 8, 4) for h in (2, 1, 1))
    group = GroupSpec.explicit([[0, 1]], 0)
    with pytest.raises(ValueError, match=r"seq_idx must be an integer tensor \[B, S_local\] = "
                       r"\(1, 8\) \(this rank's tokens\), got torch.int64 \(1, 7\)"):
        context_parallel_attention(q, k, v, group=group, seq_idx=torch.zeros(1, 7,
                                                                            dtype=torch.long))
    with pytest.raises(ValueError, match="position_ids are required with seq_idx, "
                       "load_balance='per_document' and window_size"):
        context_parallel_attention(q, k, v, group=group, load_balance="per_document",
                                   window_size=3, seq_idx=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_idx must be non-decreasing along the sequence"):
        context_parallel_attention(q, k, v, group=GroupSpec.explicit([[0]], 0),
                                   seq_idx=torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]]))
