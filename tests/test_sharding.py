"""Sequence layouts: chunk ownership, positions, round trips and divisibility errors."""
import pytest
import torch

from nxd_cp.sequence.layout import (chunk_ranges, reorder_gathered, sequence_positions,
                             shard_sequence)


def test_zigzag_positions_of_each_rank():
    # 16 tokens, cp=4: 8 chunks of 2; rank r holds chunks r and 7-r.
    assert sequence_positions(16, 0, 4).tolist() == [0, 1, 14, 15]
    assert sequence_positions(16, 1, 4).tolist() == [2, 3, 12, 13]
    assert sequence_positions(16, 3, 4).tolist() == [6, 7, 8, 9]
    assert sequence_positions(16, 2, 4, "contiguous").tolist() == [8, 9, 10, 11]
    assert chunk_ranges(16, 1, 4) == [(2, 4), (12, 14)]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_shards_partition_the_sequence_and_round_trip(layout, cp):
    x = torch.randn(2, 3, 24, 5)
    shards = [shard_sequence(x, 2, r, cp, layout) for r in range(cp)]
    positions = torch.cat([sequence_positions(24, r, cp, layout) for r in range(cp)])
    assert sorted(positions.tolist()) == list(range(24))  # every token exactly once
    for r, s in enumerate(shards):
        assert torch.equal(s, x[:, :, sequence_positions(24, r, cp, layout)])
    gathered = torch.cat(shards, dim=2)  # what an all-gather returns, rank order
    assert torch.equal(reorder_gathered(gathered, 2, cp, layout), x)


def test_bad_lengths_and_ranks():
    with pytest.raises(ValueError, match=r"sequence length 20 is not divisible by "
                                         r"2\*context_parallel_size=8 \(zigzag\)"):
        shard_sequence(torch.randn(20), 0, 0, 4)
    with pytest.raises(ValueError, match=r"sequence length 6 is not divisible by "
                                         r"context_parallel_size=4 \(contiguous\)"):
        sequence_positions(6, 0, 4, "contiguous")
    with pytest.raises(ValueError, match=r"cp_rank=4 is outside \[0, cp_size=4\)"):
        sequence_positions(16, 4, 4)
    with pytest.raises(ValueError, match="load_balance='ring' must be one of"):
        sequence_positions(16, 0, 4, "ring")
