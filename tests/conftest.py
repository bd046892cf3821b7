"""Test environment: XLA on CPU when torch-xla is present, one intra-op thread per process."""
import inspect
import multiprocessing.process
import os
from pathlib import Path

import pytest

# Must be set before torch_xla is imported anywhere in the test process.
os.environ.setdefault("PJRT_DEVICE", "CPU")
# xm.all_reduce short-circuits on a one-device world; lowering tests need the real op.
os.environ.setdefault("XLA_ALWAYS_ALLREDUCE", "1")

# The XLA device must exist before the autograd engine first runs a backward in this process:
# the engine sizes its per-device queues then, and a later XLA backward fails
# ("device_ready_queues_" internal assert, or an abort). Training scripts create their XLA
# device before any backward, as examples/train_llama_cp.py does.
try:
    import torch_xla
except ImportError:
    pass
else:
    torch_xla.device()


# ---------------------------------------------------------------------------------------------
# Tiers (markers registered in pytest.ini; docs/verification.md "Running the tests")
# ---------------------------------------------------------------------------------------------
TESTS = Path(__file__).resolve().parent
# A test is `gloo` when its function, or a fixture it uses defined under tests/, calls one of
# these: real gloo ranks (nxd_cp.testing.run_ranks) or the torchrun example.
GLOO_CALLS = ("run_ranks(", "run_example(", "TORCHRUN")
# Modules whose every test spawns processes (the benchmark scripts run gloo ranks).
GLOO_MODULES = {"test_benchmarks"}
# xla_exec: lowered by torch-xla here, executed by JAX's XLA:CPU in one process per rank.
XLA_EXEC_PREFIX = "test_xla_exec"
TIERS = {"unit", "gloo", "xla_exec"}
# Tests that take more than ~60 s on 2 CPU cores (with the world their fixture spawns): a node
# id prefix ("module.py", "module.py::test_name"), or "module.py@fixture" for every test of the
# module that uses that fixture (its world); measured, see docs/verification.md.
SLOW = (
    # XLA tile-loop kernel executed on the XLA:CPU device: 48 s of the fast tier's 97 s with
    # the machine's load average at 10
    "test_kernels.py::test_tile_loop_kernel_on_xla_matches_sdpa",
    # Not 60 s, but XLA:CPU executions that dominate the fast tier under load (10-26 s each
    # with a load average of 11): kept out of it so that it stays under 2 minutes.
    "test_kernels.py::test_pure_torch_kernel_on_xla_matches_cpu",
    "test_tiles.py::test_padded_tile_loop_matches_the_pure_torch_kernel_on_xla",
    "test_nxd_models.py",  # its 4- and 8-rank worlds: 74-113 s each
    "test_xla_exec_attention.py",  # the cp 4 worlds: 79 and 89 s (compilation)
    "test_xla_exec_models.py@run",  # 84 s
    "test_models.py@eight",  # 8 ranks on 2 cores: 33-99 s with the load
    "test_sequence_parallel.py@eight",  # 51-57 s
    "test_pipeline.py@four",  # 13 cases in one 4-rank world
    "test_pipeline.py@eight",  # 8 ranks on 2 cores
    "test_attention_a2a.py",  # two 4-rank worlds of many cases: ~75 s each
    "test_xla_exec_a2a.py",  # three lowered and executed worlds: ~90 s
    "test_example_data.py",  # torchrun runs of the example from a checkpoint directory
    "test_fsdp_checkpoint.py",  # two worlds (4 and 2 ranks): 38-128 s
)


def _sources(item):
    """Source of the test function and of the fixtures it uses that are defined in tests/."""
    funcs = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        funcs += [d.func for d in defs]
    out = []
    for f in funcs:
        try:
            if f is not None and Path(inspect.getsourcefile(f)).resolve().parent == TESTS:
                out.append(inspect.getsource(f))
        except (TypeError, OSError):
            pass
    return "\n".join(out)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = getattr(item, "module", None)
        name = module.__name__.rsplit(".", 1)[-1] if module else ""
        nodeid = item.nodeid.removeprefix("tests/")
        worlds = {f"{nodeid.split('::')[0]}@{f}" for f in getattr(item, "fixturenames", ())}
        given = {m.name for m in item.iter_markers()}
        marks = set()
        if given & TIERS:
            pass  # the module or test names its tier itself (pytestmark)
        elif name.startswith(XLA_EXEC_PREFIX):
            marks.add("xla_exec")
        elif name in GLOO_MODULES or any(c in _sources(item) for c in GLOO_CALLS):
            marks.add("gloo")
        else:
            marks.add("unit")
        if name.startswith("test_nxd") or getattr(module, "NXD_RANKS", None) is not None:
            marks.add("nxd")
        if any(nodeid.startswith(s) or s in worlds for s in SLOW):
            marks.add("slow")
        for m in sorted(marks - given):
            item.add_marker(m)


@pytest.fixture(autouse=True)
def _unit_tests_spawn_no_ranks(request, monkeypatch):
    """A test of the `unit` tier that starts a process (a rank) fails: mark it (GLOO_CALLS)."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(self):
        raise AssertionError(f"{request.node.nodeid} is in the `unit` tier but starts a process "
                             "(ranks): add what it calls to GLOO_CALLS in tests/conftest.py")
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
