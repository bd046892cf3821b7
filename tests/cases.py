"""Many cases in one spawned world, one pytest test per case.

Spawning a gloo world costs more than most cases on 2 cores (imports), so a test module runs
all its cases in one world (a module-scoped fixture) and pytest reports each case as its own
test (``@pytest.mark.parametrize("case", KEYS)``): a failure names its case, and ``-k`` selects
one.

Rank side::

    def world(rank, world_size, wanted):
        runner = CaseRunner(wanted)
        runner.run("tp2cp2-llama-p2p", run_case, "llama", "p2p")   # catches its exception
        return runner.results

Test side::

    @pytest.fixture(scope="module")
    def four(request):
        return run_ranks(world, 4, wanted_cases(request, "four"), timeout=400)

    @pytest.mark.parametrize("case", KEYS)
    def test_training(four, case):
        per_rank = case_result(four, case)      # fails naming the case and each rank's traceback

A case's exception is caught on its rank; then every rank waits for the others at the end of
the case (on a group of its own, so the cases' collectives stay untouched) before the next case
starts. A case that fails after its collectives finished (the usual way: a check, a reference
computed on rank 0, or an error every rank raises at the same point) leaves the other cases
unaffected. A case that fails on some ranks before a collective the others are in leaves those
blocked: ``run_ranks``' timeout then fails the world with every rank's stack, never a stuck CI.

Only the cases the selected tests need run (``wanted_cases``): ``-k`` on one case spawns the
world once and runs that case alone.
"""
import traceback

import pytest

OK, ERROR = "ok", "error"


class CaseRunner:
    """Runs named cases on this rank, catching each one's exception (see the module doc)."""

    def __init__(self, wanted=None):
        import torch.distributed as dist

        self.wanted = None if wanted is None else set(wanted)
        self.results = {}
        # Status exchange only, apart from every group the cases use.
        self._group = dist.new_group(backend="gloo")

    def wants(self, key):
        return self.wanted is None or key in self.wanted

    def run(self, key, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` as case ``key`` (skipped when not wanted); returns its value
        or None when it raised or was skipped."""
        import torch.distributed as dist

        if key in self.results:
            raise ValueError(f"case {key!r} run twice")
        if not self.wants(key):
            return None
        try:
            value = fn(*args, **kwargs)
            self.results[key] = (OK, value)
        except Exception:  # noqa: BLE001 - reported by the case's own test
            value = None
            self.results[key] = (ERROR, traceback.format_exc())
        # Every rank finishes this case before any starts the next one.
        statuses = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(statuses, self.results[key][0], group=self._group)
        return value


def wanted_cases(request, fixture_name, param="case"):
    """Case ids the selected tests of this module need from the world of ``fixture_name``:
    the ``param`` values of the selected tests that use that fixture, or None (every case)
    when one of them is not parametrized by ``param``."""
    keys = set()
    for item in request.session.items:
        if (getattr(item, "module", None) is not request.module
                or fixture_name not in getattr(item, "fixturenames", ())):
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is None or param not in callspec.params:
            return None
        keys.add(callspec.params[param])
    return sorted(keys)


def case_result(results, key):
    """Every rank's value of case ``key`` (a list indexed by rank); fails the calling test with
    the case's name and the traceback of each rank where it raised."""
    missing = [rank for rank, r in enumerate(results) if key not in r]
    if missing:
        pytest.fail(f"case {key!r} did not run on ranks {missing}", pytrace=False)
    errors = {rank: r[key][1] for rank, r in enumerate(results) if r[key][0] != OK}
    if errors:
        report = "\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(errors.items()))
        pytest.fail(f"case {key!r} raised on {len(errors)} of {len(results)} ranks:\n{report}",
                    pytrace=False)
    return [r[key][1] for r in results]


def case_ids(results):
    """The ids of the cases every rank ran (to check a world ran all it was asked)."""
    return sorted(set.intersection(*(set(r) for r in results)))
