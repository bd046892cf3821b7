"""Execute torch-xla's per-rank HLO for real: one JAX (XLA:CPU) process per rank, gloo collectives.

torch-xla on CPU cannot run multi-device collectives (its CPU client runs devices as threads
of one process and its collectives abort; it has no gloo). JAX's XLA:CPU client can, across
processes. So the module torch-xla would hand to a PJRT plugin (on trn1: the Neuron plugin) is
lowered here, in the torch-xla process, and executed by JAX, each rank in its own process:

1. ``lower_world(step, world_size, tp, cp, pp)`` calls ``step(rank)`` for every global rank
   under ``nxd_cp.parallel_state.explicit_rank(...)`` (the parallel state of that rank of a
   world that does not run). ``step`` builds its inputs on the XLA device and returns
   ``{name: xla_tensor}``. ``LoweringContext.build`` turns those outputs into one
   HloModuleProto; its parameters (every device tensor the graph reads: inputs, weights, and
   scalars torch-xla turns into parameters) come from ``parameter_id_tensor_mapping()``.
2. ``execute(modules)`` writes each module and its inputs to a temporary directory, starts one
   process per rank running this file (``python xla_exec.py RANK WORLD PORT DIR``): it joins
   ``jax.distributed`` on loopback, compiles the module for ``num_replicas=world`` with replica
   r on process r's CPU device, feeds its inputs, runs it and saves the outputs. A process
   that fails, or a world that does not finish within ``timeout`` seconds, fails the call with
   every process's output (a hang is a failure, never a stuck CI).

``execute`` takes one ``Lowered`` per rank, or a single ``Lowered`` (one module run by every
rank, e.g. a rank-independent graph) with ``inputs=`` giving each rank's parameters. Mixing
modules and inputs of different ranks is how a negative control is built.

Pitfalls (see docs/troubleshooting.md): the XLA device must exist before any CPU backward
(tests/conftest.py); ``XLA_ALWAYS_ALLREDUCE=1`` or a 1-device all-reduce lowers to nothing;
JAX runs a module with ``jax_enable_x64`` only where it has a 64-bit type (s64 token ids).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

_BF16 = "bfloat16"  # numpy has no bfloat16: stored as uint16 bits, dtype name beside them


@dataclass
class Lowered:
    """One rank's module: HloModuleProto bytes, its parameters in order, its output names;
    ``hlo_text`` the proto in text form, ``text`` the HLO text (``normalise_hlo`` compares it
    across ranks)."""

    hlo: bytes
    inputs: List[np.ndarray]
    names: List[str]
    hlo_text: str = ""
    text: str = ""

    @property
    def needs_x64(self) -> bool:
        """Whether the module has 64-bit parameters or values (JAX then needs x64)."""
        return bool(re.search(r"\b[fsu]64\[", self.text)) if self.text else True


def normalise_hlo(text: str) -> str:
    """HLO text without instruction / computation names and source metadata: two ranks lower
    the same graph iff their normalised texts are equal."""
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    text = re.sub(r"%[\w.\-]+", "%x", text)
    text = re.sub(r"\b[A-Za-z_][\w\-]*\.\d+\b", "x", text)
    return re.sub(r"HloModule [\w.\-]+", "HloModule m", text)


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    return t.numpy()


def _dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def lower_world(step: Callable[[int], Dict[str, "object"]], world_size: int,
                tensor_model_parallel_size: int = 1, context_parallel_size: int = 1,
                pipeline_model_parallel_size: int = 1) -> List[Lowered]:
    """Lower ``step(rank)`` for every global rank; returns one ``Lowered`` per rank.

    ``step`` runs under ``explicit_rank`` for that rank and returns ``{name: tensor}`` of XLA
    tensors (outputs, gradients, updated parameters ...). It must create its own XLA inputs.
    """
    import torch_xla

    from nxd_cp import parallel_state as ps
    from nxd_cp.compat import torch_xla as xla_compat

    dev = str(torch_xla.device())
    modules = []
    for rank in range(world_size):
        # Each rank's graph starts a fresh chain of collective tokens.
        xla_compat.reset_collective_token(dev)
        with ps.explicit_rank(world_size, rank, tensor_model_parallel_size,
                              context_parallel_size, pipeline_model_parallel_size):
            outputs = step(rank)
        names = list(outputs)
        ctx = xla_compat.lowering_context()
        ctx.build([outputs[n] for n in names])
        params = ctx.parameter_id_tensor_mapping()
        if sorted(params) != list(range(len(params))):
            raise RuntimeError(f"rank {rank}: parameter ids {sorted(params)} are not 0..n-1")
        text = xla_compat.tensors_hlo([outputs[n] for n in names])
        modules.append(Lowered(ctx.hlo(), [_to_numpy(params[i]) for i in range(len(params))],
                               names, ctx.hlo_text(), text))
        for n in names:  # bf16 outputs come back as uint16 bits
            if _dtype_name(outputs[n]) == _BF16:
                modules[-1].names[names.index(n)] = n + ":" + _BF16
    return modules


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(directory: str, modules: Sequence[Lowered], inputs: Sequence[List[np.ndarray]]):
    paths = {}
    for r, m in enumerate(modules):
        key = id(m)
        if key not in paths:  # a module shared by every rank is written once
            paths[key] = os.path.join(directory, f"module{len(paths)}.pb")
            with open(paths[key], "wb") as f:
                f.write(m.hlo)
        np.savez(os.path.join(directory, f"inputs{r}.npz"),
                 **{f"p{i}": a for i, a in enumerate(inputs[r])})
        with open(os.path.join(directory, f"rank{r}.json"), "w") as f:
            json.dump({"module": paths[key], "names": m.names, "x64": m.needs_x64}, f)


def execute(modules: Union[Lowered, Sequence[Lowered]], world_size: Optional[int] = None,
            inputs: Optional[Sequence[List[np.ndarray]]] = None,
            timeout: float = 300.0) -> List[Dict[str, np.ndarray]]:
    """Run the modules, rank r on process r; returns each rank's ``{name: array}``.

    ``modules``: one ``Lowered`` per rank, or a single one run by all ``world_size`` ranks.
    ``inputs``: each rank's parameters (default: the ones lowered with its module); they must
    match the module's parameter shapes. bf16 outputs come back as float32.
    Raises ``RuntimeError`` with every process's output when one fails or ``timeout`` passes.
    """
    if isinstance(modules, Lowered):
        if world_size is None:
            raise ValueError("world_size is required when one module is run by every rank")
        modules = [modules] * world_size
    modules = list(modules)
    if world_size is not None and world_size != len(modules):
        raise ValueError(f"world_size={world_size} but {len(modules)} modules were given")
    world = len(modules)
    inputs = [m.inputs for m in modules] if inputs is None else list(inputs)
    if len(inputs) != world:
        raise ValueError(f"inputs has {len(inputs)} entries, the world has {world} ranks")
    for r, (m, xs) in enumerate(zip(modules, inputs)):
        got = [(a.shape, a.dtype.name) for a in xs]
        want = [(a.shape, a.dtype.name) for a in m.inputs]
        if got != want:
            raise ValueError(f"rank {r}: inputs {got} do not match the module's parameters "
                             f"{want}")
    with tempfile.TemporaryDirectory(prefix="nxd_cp_xla_exec_") as d:
        _write(d, modules, inputs)
        _run_processes(d, world, timeout)
        results = []
        for r in range(world):
            with np.load(os.path.join(d, f"outputs{r}.npz")) as z:
                results.append(_decode(z, modules[r].names))
    return results


def _decode(z, names: List[str]) -> Dict[str, np.ndarray]:
    out = {}
    for i, name in enumerate(names):
        a = z[f"o{i}"]
        if name.endswith(":" + _BF16):
            name = name[:-len(_BF16) - 1]
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a
    return out


def _run_processes(directory: str, world: int, timeout: float) -> None:
    port = free_port()
    env = dict(os.environ)
    # One XLA:CPU thread pool thread per process: the ranks share a small machine.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    env.pop("PJRT_DEVICE", None)
    procs, logs = [], []
    for r in range(world):
        log = open(os.path.join(directory, f"log{r}.txt"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(r), str(world), str(port),
             directory], stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True))
    deadline = time.monotonic() + timeout
    failure = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if bad:
                failure = f"rank(s) {bad} exited with {[procs[r].returncode for r in bad]}"
                break
            if time.monotonic() > deadline:
                failure = f"timeout: not finished after {timeout:.0f} s (hang?)"
                break
            time.sleep(0.2)
        else:
            bad = [r for r, p in enumerate(procs) if p.returncode != 0]
            if bad:
                failure = f"rank(s) {bad} exited with {[procs[r].returncode for r in bad]}"
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    if failure:
        texts = []
        for r, log in enumerate(logs):
            log.seek(0)
            texts.append(f"--- rank {r} ---\n" + log.read()[-6000:])
        raise RuntimeError(f"XLA execution failed: {failure}\n" + "\n".join(texts))
    for log in logs:
        log.close()


# ---------------------------------------------------------------------------------------------
# The per-rank process: JAX only (no torch), started by _run_processes.
# ---------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, directory: str) -> None:
    import jax

    with open(os.path.join(directory, f"rank{rank}.json")) as f:
        spec = json.load(f)
    # Without x64 JAX would turn 64-bit inputs (token ids: s64) into 32-bit ones; graphs
    # without any 64-bit type run with it off.
    jax.config.update("jax_enable_x64", spec["x64"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=world,
                               process_id=rank, initialization_timeout=120)
    from jax._src import xla_bridge
    from jax._src.lib import _jax, xla_client

    with open(spec["module"], "rb") as f:
        computation = xla_client.XlaComputation(f.read())
    devices = sorted(jax.devices(), key=lambda dv: dv.id)  # replica r = process r's device
    if len(devices) != world or jax.local_devices() != [devices[rank]]:
        raise RuntimeError(f"expected one CPU device per process, got {devices} "
                           f"(local {jax.local_devices()})")
    options = xla_client.CompileOptions()
    build = options.executable_build_options
    build.num_replicas, build.num_partitions = world, 1
    build.device_assignment = xla_client.DeviceAssignment.create(
        np.array([[dv.id] for dv in devices]))
    start = time.monotonic()
    executable = xla_bridge.get_backend("cpu").compile_and_load(
        _jax.mlir.xla_computation_to_mlir_module(computation),
        xla_client.DeviceList(tuple(devices)), options)
    compiled = time.monotonic() - start
    with np.load(os.path.join(directory, f"inputs{rank}.npz")) as z:
        args = [jax.device_put(z[f"p{i}"], devices[rank]) for i in range(len(z.files))]
    # Gloo builds each communicator at its first collective and waits only 30 s for the peers:
    # start executing together, whatever each process's compile time on a busy machine.
    from jax._src import distributed
    distributed.global_state.client.wait_at_barrier("compiled", 600_000)
    results = executable.execute_sharded(args).disassemble_into_single_device_arrays()
    outputs = {}
    for i, (arr,) in enumerate(results):
        a = np.asarray(arr)
        outputs[f"o{i}"] = a.view(np.uint16) if a.dtype.name == _BF16 else a
    if len(outputs) != len(spec["names"]):
        raise RuntimeError(f"module returned {len(outputs)} outputs, expected "
                           f"{len(spec['names'])}")
    np.savez(os.path.join(directory, f"outputs{rank}.npz"), **outputs)
    print(f"rank {rank}: compiled in {compiled:.1f} s, ran in "
          f"{time.monotonic() - start - compiled:.1f} s", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
