"""``benchmarks/bench_xla_graph.py``'s whole-step table per decoder layer (with and without
activation checkpointing): the rows it reports, and the step it lowers (lowering only)."""
import contextlib
import io
import os
import re
import sys

import pytest

pytestmark = [pytest.mark.unit]

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _bench():
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import bench_xla_graph
    return bench_xla_graph


def test_report_layers_gives_the_per_layer_difference():
    b = _bench()
    row = lambda n, peak: dict(instructions=n, peak_bytes=peak)  # noqa: E731
    rows = {("layers1", 4, 0): row(2235, 2289260), ("layers2", 4, 0): row(3850, 3718380),
            ("layers1ckpt", 4, 0): row(2656, 2238344), ("layers2ckpt", 4, 0): row(4692, 2966248)}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        b.report_layers(rows)
    text = out.getvalue()
    assert "1,615" in text and "2,036" in text  # instructions per layer
    assert "1,395.6" in text and "710.8" in text  # peak KiB per layer (exact arithmetic)


def test_checkpointed_step_lowers_with_the_recompute():
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    pytest.importorskip("torch_xla")
    from nxd_cp.compat.torch_xla import tensors_hlo

    b = _bench()
    counts = {}
    for ckpt in (None, "full"):
        text = tensors_hlo(b._step_tensors(0, True, ckpt, 1))
        counts[ckpt] = sum(1 for ln in text.splitlines() if re.match(r"\s+(ROOT )?%\S+ = ", ln))
        assert ("opt-barrier(" in text) == (ckpt is not None)
    assert counts["full"] > counts[None], counts  # the layer's forward again in backward


def test_8b_layer_formula_and_per_layer_temp():
    """The 8B-like layer's formula is docs/choosing.md's (TP8, n = 8192, fp32: 1,048.2 MiB
    without checkpointing, 128 MiB with) and the table takes 2 layers - 1 layer of the temp."""
    _bench()
    import xla_layer_memory as m
    from common import print_table

    assert m.formula_bytes(False, 8192) == 134_168 * 8192  # layer(8) = 134,168 B per token
    assert m.formula_bytes(True, 8192) == 128 * 2**20  # e*h*n
    temp = lambda t: dict(instructions=1000, buffers={"preallocated-temp": t})  # noqa: E731
    rows = {"big1": temp(3 * 2**30), "big2": temp(3 * 2**30 + m.formula_bytes(False, 8192))}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        m.report(rows, 8192, print_table)
    text = out.getvalue()
    assert re.search(r"\| none .*\| 1,048\.2 +\| \+0\.0 +\| 1\.00 +\|", text), text  # = formula
    assert "| full" not in text  # no checkpointed rows given: no row invented
