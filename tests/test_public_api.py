"""The documented names that no other test exercises, each checked for what api.md says of it
(single process; exact: these functions move integers or describe layouts), and a guard that
every name api.md documents is named by some test."""
import pathlib
import re

import pytest
import torch

from nxd_cp import parallel_state as ps
from nxd_cp.comm.base import ByteTally, PendingTensor
from nxd_cp.models import supported_architectures
from nxd_cp.nn import HeadShared, parallelize
from nxd_cp.nxd_config import build_config
from nxd_cp.sequence.batch import check_padding_mask, drop_predictions_without_keys
from nxd_cp.sequence.layout import (
    check_load_balance,
    check_sequence_length,
    check_sequence_split,
    num_chunks,
    rank_chunks,
)
from nxd_cp.sequence.packing import positions_in_documents, prepare_packed_batch
from nxd_cp.tensor_parallel.factory import is_column_parallel, tensor_parallel_layers
from nxd_cp.training.memory import SavedBytesTally, count_saved_bytes

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sequence_rules():
    assert num_chunks(4, "zigzag") == 8 and num_chunks(4, "contiguous") == 4
    assert rank_chunks(1, 4, "zigzag") == [1, 6] and rank_chunks(1, 4, "contiguous") == [1]
    check_sequence_length(16, 4, "zigzag")
    with pytest.raises(ValueError, match=r"sequence length 12 is not divisible by "
                                         r"2\*context_parallel_size=8 \(zigzag\)"):
        check_sequence_length(12, 4, "zigzag")
    check_sequence_split(8, 4)
    with pytest.raises(ValueError, match="S/cp=6 is not divisible by tensor_model_parallel"):
        check_sequence_split(6, 4)
    with pytest.raises(ValueError, match="load_balance='ring' must be one of"):
        check_load_balance("ring")
    check_padding_mask(torch.ones(2, 8))
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        check_padding_mask(torch.ones(2, 1, 8, 8))


def test_packing_helpers():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert positions_in_documents(ids).tolist() == [[0, 1, 2, 0, 1, 0]]
    # labels already shifted (the batch function shifts first): token i carries i + 1's id
    full = {"input_ids": torch.arange(6)[None] + 10, "labels": torch.arange(6)[None] + 11}
    out = prepare_packed_batch(full, ids)
    assert out["seq_idx"].tolist() == [[0, 0, 0, 1, 1, 2]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert out["labels"].tolist() == [[11, 12, -100, 14, -100, 16]]  # none across documents


def test_left_padding_drops_the_predictions_that_see_no_key():
    labels = torch.tensor([[-100, 7, 8, 9, -100], [3, 4, 5, 6, -100]])  # already shifted
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 1]])
    out, dropped = drop_predictions_without_keys(labels, mask, None)
    assert dropped == 1 and out.tolist() == [[-100, -100, 8, 9, -100], [3, 4, 5, 6, -100]]
    # packed: the second document's first token sees only itself, a pad key
    docs = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]])
    out, dropped = drop_predictions_without_keys(labels, mask, docs)
    assert dropped == 2 and out[1].tolist() == [3, 4, 5, -100, -100]


def test_data_before_config_is_a_clear_error():
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank

    ps.destroy_model_parallel()  # the public reset: no groups, no active config
    with pytest.raises(RuntimeError, match="not initialized: call .*initialize_model_parallel"):
        get_batch_on_this_context_parallel_rank({"input_ids": torch.arange(8)[None]})


def test_parallel_state_without_a_world():
    with ps.explicit_rank(4, 3, tensor_model_parallel_size=2, context_parallel_size=2):
        layout = ps.get_layout()
        assert (layout.tp, layout.cp, layout.dp) == (2, 2, 1)
        spec = ps.resolve_group(None)
        assert spec.ranks == (1, 3) and spec.rank == 1 and ps.resolve_group(spec) is spec
        assert ps.resolve_group(None, kind="tensor").ranks == (2, 3)
    cfg = build_config(context_parallel_config={"comm_type": "all_gather"})
    ps.set_training_config(cfg)
    try:
        assert ps.get_context_parallel_config().comm_type == "all_gather"
    finally:
        ps.set_training_config(None)
    assert ps.get_context_parallel_config().comm_type == "p2p"


def test_layer_factory_and_predicates():
    with ps.explicit_rank(2, 0, tensor_model_parallel_size=2):
        layers = tensor_parallel_layers(use_nxd=False)
        col = layers.ColumnParallelLinear(8, 6, gather_output=False)
        assert is_column_parallel(col) and col.weight.shape == (3, 8)
        assert not is_column_parallel(torch.nn.Linear(8, 6))
    with ps.explicit_rank(1, 0):
        norm = torch.nn.LayerNorm(4)
        shared = HeadShared(norm)
        assert dict(shared.named_parameters()).keys() == {"weight", "bias"}
        x = torch.randn(3, 4)
        assert torch.equal(shared(x), norm(x))  # forward unchanged (gradients summed over TP)
        with pytest.raises(ValueError, match="no module of Sequential has a registered class"):
            parallelize(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_architectures_and_tallies():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "GPTNeoXForCausalLM", "Qwen2ForCausalLM",
            "Qwen3ForCausalLM"} <= set(supported_architectures())
    tally = ByteTally()
    tally.add("all_gather", 96)
    tally.add("all_gather", 32)
    assert tally.total == 128 and tally.calls["all_gather"] == 2
    x = torch.randn(4, 5, requires_grad=True)
    with count_saved_bytes() as saved:
        (x.exp() * 2).sum().backward()
    assert isinstance(saved, SavedBytesTally) and saved.total == 4 * 5 * 4  # exp's output
    t = torch.arange(3)
    assert PendingTensor(t).wait() is t


def test_every_documented_name_is_named_by_a_test():
    api = (ROOT / "docs" / "api.md").read_text()
    names = set(re.findall(r"^#+ `([A-Za-z_][A-Za-z0-9_]*)", api, re.M))
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    missing = sorted(n for n in names if not re.search(r"\b" + re.escape(n) + r"\b", tests))
    assert not missing, f"documented in api.md but named by no test: {missing}"
