"""tests/cases.py, the one-test-per-case harness: a case that raises on some ranks after its
collectives fails alone, naming the case and those ranks, and the cases after it still run with
their collectives in step; only the wanted cases run."""
import pytest
from cases import CaseRunner, case_ids, case_result

from nxd_cp.testing import run_ranks


def _all_reduce(value):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)])
    dist.all_reduce(t)
    return t.item()


def _fails_on_rank_1():
    import torch.distributed as dist

    total = _all_reduce(1)  # the collective finishes on every rank, then rank 1 raises
    if dist.get_rank() == 1:
        raise RuntimeError("case failed on rank 1")
    return total


def world(rank, world_size, wanted):
    runner = CaseRunner(wanted)
    runner.run("before", _all_reduce, rank)
    runner.run("fails", _fails_on_rank_1)
    runner.run("after", _all_reduce, 10 * (rank + 1))
    runner.run("not_wanted", _all_reduce, 1)
    return runner.results


@pytest.fixture(scope="module")
def results():
    return run_ranks(world, 2, ["before", "fails", "after"], timeout=120)


def test_cases_around_a_failure_pass(results):
    assert case_result(results, "before") == [1.0, 1.0]  # 0 + 1
    assert case_result(results, "after") == [30.0, 30.0]  # 10 + 20: collectives in step


def test_failed_case_names_itself_and_its_ranks(results):
    with pytest.raises(pytest.fail.Exception) as info:
        case_result(results, "fails")
    msg = str(info.value)
    assert "case 'fails' raised on 1 of 2 ranks" in msg, msg
    assert "--- rank 1 ---" in msg and "case failed on rank 1" in msg, msg
    assert "--- rank 0 ---" not in msg, msg


def test_only_wanted_cases_run(results):
    assert case_ids(results) == ["after", "before", "fails"]
    with pytest.raises(pytest.fail.Exception, match="did not run on ranks"):
        case_result(results, "not_wanted")
