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
