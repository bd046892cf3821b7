"""Shared pieces of the benchmark scripts: arguments, tables, timing, byte counting, results.

Every script prints its tables as GitHub markdown (readable in a terminal, pasted verbatim into
``docs/performance.md`` by ``report.py``) and, with ``--json PATH``, writes its figures for the
report and the plot.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

from nxd_cp.testing import run_ranks as _run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser(description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the options every benchmark takes."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes that run in seconds (keeps the script working in tests)")
    p.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    return p


def run_ranks(fn: Callable, world_size: int, *args, timeout: float = 600, threads: int = 1):
    """``nxd_cp.testing.run_ranks`` with the benchmarks' longer default timeout."""
    return _run_ranks(fn, world_size, *args, timeout=timeout, threads=threads)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    """``1536`` -> ``'1.50 KiB'`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


_PRINTED: List[str] = []  # every table printed by this process, for write_json


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence],
                note: Optional[str] = None) -> None:
    """Print a markdown table under a ``###`` title, with an optional note after it."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    text = [f"### {title}", "", line(headers),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells]
    if note:
        text += ["", note]
    _PRINTED.append("\n".join(text))
    print("\n" + "\n".join(text), flush=True)


def write_json(path: Optional[str], data: dict) -> None:
    """Write ``data`` plus the markdown of every table printed so far (key ``tables``): the
    report takes the tables from here, not from stdout, where spawned ranks also print."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(data, tables="\n\n".join(_PRINTED)), f, indent=1)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_medians(fns: Dict[str, Callable[[], None]], reps: int, warmup: int = 1,
                        sync: Callable[[], None] = lambda: None,
                        clock: str = "wall") -> Dict[str, float]:
    """Median time (s) of each callable over ``reps`` interleaved rounds.

    Every round runs each callable once, in an order rotated from round to round, so slow
    drifts of a shared machine (other processes, frequency) hit all of them alike.
    ``sync`` is called before reading the clock (``torch.cuda.synchronize`` on a GPU).
    ``clock``: "wall", or "cpu" (CPU time of this process: with one compute thread on an
    oversubscribed machine it leaves out the time other jobs hold the core).
    """
    now = CLOCKS[clock]
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for _ in range(warmup):
        for n in names:
            fns[n]()
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = now()
            fns[n]()
            sync()
            times[n].append(now() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


@contextlib.contextmanager
def forced_kernel(kernel: str) -> Iterator[None]:
    """Run the block on the pure-torch reference kernel (``kernel="torch"``) or on the default
    registry (``"auto"``): ``dispatch.reference_kernel_only``."""
    # Imported here: bench_xla_graph imports this module with older revisions of nxd_cp.
    from nxd_cp.attention.dispatch import reference_kernel_only

    if kernel not in ("auto", "torch"):
        raise ValueError(f"kernel={kernel!r} must be 'auto' or 'torch'")
    with reference_kernel_only(kernel == "torch"):
        yield


# ---------------------------------------------------------------------------------------------
# Machine stamp
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_stamp(threads: Optional[int] = None) -> Dict[str, str]:
    """CPU model, cores, torch / Python versions and the date, for the report."""
    stamp = {"cpu": cpu_model(), "cores": str(os.cpu_count()), "torch": torch.__version__,
             "python": platform.python_version(),
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if threads is not None:
        stamp["threads"] = str(threads)
    return stamp
