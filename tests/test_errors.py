"""Clear errors (issue 15, item 4) for inputs that used to fail deep inside or silently.

Single process: the data function takes ``cp_rank`` / ``cp_size``; the attention checks run
before any collective (an explicit ``GroupSpec``, no process group needed).
"""
import warnings

import pytest
import torch

from nxd_cp.attention import context_parallel_attention
from nxd_cp.topology.groups import GroupSpec
from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank as get_batch

GROUP2 = GroupSpec.explicit([[0, 1]], 0)


def _batch(b=2, s=16):
    ids = torch.randint(0, 100, (b, s))
    return {"input_ids": ids, "labels": ids.clone()}


def test_one_dimensional_input_ids():
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq, \.\.\.\] \(at least "
                       r"2-D\), got shape \(16,\): add the batch dimension"):
        get_batch({"input_ids": torch.arange(16)}, cp_rank=0, cp_size=2)


def test_labels_shorter_than_input_ids():
    batch = _batch() | {"labels": torch.zeros(2, 15, dtype=torch.long)}
    with pytest.raises(ValueError, match="labels has sequence length 15 .* but input_ids has "
                       "16"):
        get_batch(batch, cp_rank=0, cp_size=2)


def test_other_entries_with_another_length_are_still_passed_through():
    batch = _batch() | {"doc_lengths": torch.tensor([[16, 0, 0], [10, 6, 0]])}
    shard = get_batch(batch, cp_rank=1, cp_size=2)
    assert torch.equal(shard["doc_lengths"], batch["doc_lengths"])
    assert shard["input_ids"].shape == (2, 8)


def test_empty_sequence_in_data_function():
    with pytest.raises(ValueError, match="input_ids has sequence length 0"):
        get_batch(_batch(s=0), cp_rank=0, cp_size=2)


def _qkv(s=8, dtype=torch.float32):
    return [torch.randn(1, h, s, 4, dtype=dtype) for h in (2, 1, 1)]


def test_empty_local_sequence_in_attention():
    with pytest.raises(ValueError, match=r"q has an empty local sequence \(S_local=0"):
        context_parallel_attention(*_qkv(s=0), group=GROUP2)


def test_group_given_as_a_string():
    with pytest.raises(ValueError, match="group='context' must be None .* not a string"):
        context_parallel_attention(*_qkv(), group="context")


def test_float64_is_announced_and_keeps_its_dtype():
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.warns(UserWarning, match="float64 inputs with float32 partial results"):
        out = context_parallel_attention(q, k, v, group=GroupSpec.explicit([[0]], 0))
    assert out.dtype == torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32: no warning
        context_parallel_attention(*_qkv(), group=GroupSpec.explicit([[0]], 0))
