"""Test your CP setup on CPU: run a function on N real gloo ranks and collect what each returns.

Public (as ``torch.testing`` is for PyTorch): nxd_cp's tests and benchmarks use it, and so can
yours, to check a TP x CP model against its single-process version on one machine::

    from nxd_cp.testing import run_ranks

    def scenario(rank, world_size, seq_len):      # module level: spawn pickles it by name
        nxd_cp.neuronx_distributed_config(tensor_parallel_size=2, context_parallel_size=2)
        ...
        return loss.item()

    losses = run_ranks(scenario, 4, 8192, timeout=300)

``visible_keys`` is the full-sequence mask (causal, sliding window) of a float64 SDPA reference.
``activate_config`` makes a CP config the active one for the current sizes without a process
group too (single-process tests, XLA lowering under ``parallel_state.explicit_rank``).

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes that join one gloo
process group on a free loopback port, call ``fn(rank, world_size, *args)`` and send back its
(picklable) return value. An exception on any rank fails the call with that rank's traceback; a
scenario that does not finish within ``timeout`` seconds is a failure that prints every rank's
Python stack (faulthandler on SIGUSR1) and kills the processes, never a stuck CI.

``fn`` must be a module-level function of an importable module (spawn pickles it by name).
``sys_path`` / ``env`` are prepended to ``sys.path`` / set in the ranks only (the NxD tests make
NeuronX Distributed importable there and nowhere else); ``pg_timeout`` (seconds) is the world
group's timeout.
"""
from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from nxd_cp import parallel_state as ps
from nxd_cp.nxd_config import build_config, neuronx_distributed_config


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, args, results, stack_dir, threads, options):
    stack_file = open(os.path.join(stack_dir, f"rank{rank}.txt"), "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    try:
        sys.path[:0] = options.get("sys_path") or []
        os.environ.update(options.get("env") or {})
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          GLOO_SOCKET_IFNAME="lo")
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        kwargs = {}
        if options.get("pg_timeout"):
            import datetime
            kwargs["timeout"] = datetime.timedelta(seconds=options["pg_timeout"])
        dist.init_process_group("gloo", rank=rank, world_size=world_size, **kwargs)
        try:
            out = fn(rank, world_size, *args)
            # Rank 0 hosts the world's key-value store: no rank leaves (and takes the store
            # with it) while another still runs, e.g. waits in a host-side agreement check.
            dist.barrier()
        finally:
            ps.destroy_model_parallel()
            dist.destroy_process_group()
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240,
              threads: int = 1, sys_path: Optional[List[str]] = None,
              env: Optional[Dict[str, str]] = None,
              pg_timeout: Optional[float] = None) -> List[Any]:
    """Return ``[fn(0, world_size, *args), ..., fn(world_size-1, ...)]`` run on real ranks.

    timeout: seconds for the whole scenario (then every rank's stack is printed, the processes
    are killed and ``TimeoutError`` raised); threads: intra-op threads per rank; sys_path /
    env: prepended to ``sys.path`` / set in the ranks only; pg_timeout: the world group's
    timeout in seconds. An exception on any rank raises ``AssertionError`` with every failed
    rank's traceback.
    """
    options = {"sys_path": sys_path, "env": env, "pg_timeout": pg_timeout}
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="nxd_cp_ranks_") as stack_dir:
        procs = [ctx.Process(target=_child, daemon=True,
                             args=(fn, r, world_size, port, args, results, stack_dir, threads,
                                   options))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        outs, errors = {}, {}
        deadline = time.monotonic() + timeout
        try:
            while len(outs) + len(errors) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(_hung_report(procs, stack_dir, timeout, outs, errors))
                try:
                    rank, status, payload = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs)
                            if not p.is_alive() and p.exitcode not in (0, None)
                            and r not in outs and r not in errors]
                    if dead:
                        # Give the queue a moment: a rank that raised has put its traceback.
                        time.sleep(0.5)
                        while not results.empty():
                            rank, status, payload = results.get()
                            (outs if status == "ok" else errors)[rank] = payload
                        for r in dead:
                            errors.setdefault(r, f"process exited with code {procs[r].exitcode}")
                    continue
                (outs if status == "ok" else errors)[rank] = payload
                if errors:
                    # One failed rank usually leaves the others blocked in a collective.
                    time.sleep(2.0)
                    while not results.empty():
                        rank, status, payload = results.get()
                        (outs if status == "ok" else errors)[rank] = payload
                    break
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)
    if errors:
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"{len(errors)} of {world_size} ranks failed:\n{report}")
    return [outs[r] for r in range(world_size)]


def _hung_report(procs, stack_dir, timeout, outs, errors) -> str:
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGUSR1)
    time.sleep(1.0)
    parts = [f"scenario did not finish within {timeout:.0f}s; finished ranks: {sorted(outs)}, "
             f"failed ranks: {sorted(errors)}"]
    for r in range(len(procs)):
        path = os.path.join(stack_dir, f"rank{r}.txt")
        if not os.path.exists(path):  # a loaded machine may not have started the rank yet
            parts.append(f"--- rank {r} stack ---\n(not started)")
            continue
        with open(path) as f:
            parts.append(f"--- rank {r} stack ---\n{f.read().strip() or '(finished)'}")
    return "\n".join(parts)


def activate_config(comm_type: str = "p2p", load_balance: str = "zigzag",
                    sequence_parallel: bool = False,
                    a2a_size: Optional[int] = None) -> Dict[str, Any]:
    """Make ``(comm_type, load_balance, sequence_parallel)`` (and ``a2a_size`` for
    ``"a2a+p2p"``) the active config for the sizes of
    the current parallel state (1s when there is none), as ``neuronx_distributed_config`` does
    in a training script; returns the config dict (what ``nxd_cp.transform`` takes). With a
    torch.distributed world it *is* ``neuronx_distributed_config``; without one (a single
    process, ``explicit_rank``) the validated config is set directly."""
    lay = ps.get_layout() if ps.model_parallel_is_initialized() else None
    kwargs = dict(tensor_parallel_size=lay.tp if lay else 1,
                  context_parallel_size=lay.cp if lay else 1,
                  sequence_parallel=sequence_parallel,
                  context_parallel_config={"comm_type": comm_type,
                                           "load_balance": load_balance,
                                           "a2a_size": a2a_size})
    if dist.is_available() and dist.is_initialized() and lay is not None:
        return neuronx_distributed_config(**kwargs)
    cfg = build_config(**kwargs)
    ps.set_training_config(cfg)
    return cfg.to_dict()


def visible_keys(seq_len: int, causal: bool = True, window: Optional[int] = None) -> torch.Tensor:
    """Bool ``[S, S]``, True where key ``j`` is visible to query ``i`` on the full sequence
    (``j <= i`` when causal, ``i - j < window`` with a sliding window): the mask of a float64
    SDPA reference for CP attention."""
    i = torch.arange(seq_len)
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool)
    if causal:
        allowed &= i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    return allowed
