"""get_batch_on_this_context_parallel_rank: shift first, then shard (pure, no processes).

Every check is exact: the function only moves integers.
"""
import pytest
import torch

from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank as get_batch
from nxd_cp.sequence.batch import shift_labels
from nxd_cp.sequence.layout import reorder_gathered, sequence_positions

B, S = 2, 16


def _batch():
    ids = torch.arange(B * S).view(B, S) + 100
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 11:] = 0
    return {"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100),
            "attention_mask": mask, "sample_weight": torch.tensor([1.0, 2.0])}


def test_shift_labels():
    labels = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(shift_labels(labels), torch.tensor([[2, 3, 4, -100]]))


@pytest.mark.parametrize("load_balance", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_shards_reassemble_to_the_shifted_batch(cp, load_balance):
    full = _batch()
    config = {"load_balance": load_balance}  # explicit: no active config is read
    shards = [get_batch(full, cp_rank=r, cp_size=cp, config=config) for r in range(cp)]
    for key, want in (("input_ids", full["input_ids"]), ("attention_mask", full["attention_mask"]),
                      ("labels", shift_labels(full["labels"])),
                      ("position_ids", torch.arange(S).expand(B, S))):
        got = reorder_gathered(torch.cat([s[key] for s in shards], 1), 1, cp, load_balance)
        assert torch.equal(got, want), key
    for r, shard in enumerate(shards):
        assert shard["input_ids"].shape == (B, S // cp)
        # position_ids are the global positions of the rank's tokens (RoPE needs them).
        assert torch.equal(shard["position_ids"][0], sequence_positions(S, r, cp, load_balance))
        assert torch.equal(shard["sample_weight"], full["sample_weight"])  # not a sequence


def test_given_position_ids_are_sharded_not_replaced():
    full = _batch() | {"position_ids": torch.arange(S).unsqueeze(0) + 7}
    shard = get_batch(full, cp_rank=1, cp_size=2)
    assert torch.equal(shard["position_ids"], (sequence_positions(S, 1, 2) + 7).unsqueeze(0))


def test_labels_are_shifted_at_cp_1_too():
    full = _batch()
    shard = get_batch(full, cp_rank=0, cp_size=1)
    assert torch.equal(shard["labels"], shift_labels(full["labels"]))
    assert torch.equal(full["labels"], _batch()["labels"])  # the input is not modified


def test_errors():
    with pytest.raises(ValueError, match=r"sequence length 16 is not divisible by "
                       r"2\*context_parallel_size=6 \(zigzag\)"):
        get_batch(_batch(), cp_rank=0, cp_size=3)
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        get_batch(_batch() | {"attention_mask": torch.ones(B, 1, S, S)}, cp_rank=0, cp_size=2)


def test_batch_already_on_xla_is_read_in_one_transfer():
    """A packed batch already on an XLA device: the checks, documents and layout read values,
    so the batch is copied to the host once (it took 6 data-dependent reads, each a graph
    sync), and the shards go back to the device. Exact: integers only."""
    torch_xla = pytest.importorskip("torch_xla")
    from nxd_cp.compat.torch_xla import transfers_from_device

    dev = torch_xla.device()
    ids = torch.randint(1, 50, (2, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(10), torch.arange(22)]).expand(2, 32)  # two documents
    host = {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}
    # device data, no pending graph (no sync here: it would run every live graph of the
    # process, other tests' lowered collectives included)
    on_device = {k: v.to(dev) for k, v in host.items()}
    before = transfers_from_device()
    shard = get_batch(on_device, cp_rank=1, cp_size=2, config={"load_balance": "per_document"})
    assert transfers_from_device() - before == 1
    want = get_batch(host, cp_rank=1, cp_size=2, config={"load_balance": "per_document"})
    assert set(shard) == set(want)
    for key, value in shard.items():
        assert value.device.type == "xla" and torch.equal(value.cpu(), want[key]), key
