"""``parallel_state.explicit_rank``: one rank of a world that does not run (no
torch.distributed)."""
import pytest

from nxd_cp import parallel_state as ps


def test_explicit_rank_gives_that_ranks_groups_and_restores():
    assert not ps.model_parallel_is_initialized()
    with ps.explicit_rank(8, 5, tensor_model_parallel_size=2, context_parallel_size=2):
        # NxD's layout arange(8).reshape(dp=2, cp=2, tp=2): rank 5 = dp 1, cp 0, tp 1
        assert ps.get_tensor_model_parallel_group(as_list=True) == [[0, 1], [2, 3], [4, 5],
                                                                    [6, 7]]
        assert ps.get_context_model_parallel_group(as_list=True)[2] == [4, 6]
        assert (ps.get_context_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                ps.get_data_parallel_rank()) == (0, 1, 1)
        assert ps.get_context_model_parallel_group() is None  # no ProcessGroup
        with ps.explicit_rank(4, 2, context_parallel_size=4):  # nests
            assert ps.get_context_model_parallel_rank() == 2
        assert ps.get_context_model_parallel_size() == 2
    assert not ps.model_parallel_is_initialized()
    with pytest.raises(ValueError, match=r"rank=4 must be an integer in \[0, world_size=4\)"):
        with ps.explicit_rank(4, 4):
            pass
