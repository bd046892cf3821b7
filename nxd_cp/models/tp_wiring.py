"""``transform``'s tensor-parallel wiring phase: the communication between TP layers.

Run once, after the TP modules are in place (``new``: path -> module) and before the first
forward. nxd_cp's own layers: the column projections that read one input (q/k/v, gate/up) share
one collective per attention / MLP (``share_tp_input``), SP or not. NxD's layers (SP only;
which are SP: ``sequence_parallel.layer_options``): ``gather_tp_input`` before the attention
and the lm_head, whose columns are not SP; every SP layer of NxD's runs sequence-first
(``run_sequence_first``). With SP the first decoder layer's input is split over TP and the
names of the parameters whose gradients are summed over TP are returned.
"""
from __future__ import annotations

from typing import Dict, List

from torch import nn

from nxd_cp.models.registry import ArchitectureSpec
from nxd_cp.pipeline.split import is_absent
from nxd_cp.tensor_parallel import layers as own
from nxd_cp.tensor_parallel import sequence_parallel as sp
from nxd_cp.tensor_parallel.factory import is_row_parallel
from nxd_cp.tensor_parallel.kv_replication import ReplicatedKVLinear
from nxd_cp.tensor_parallel.partition import get_path


def _input_groups(spec: ArchitectureSpec, new: Dict[str, nn.Module], layer: int
                  ) -> Dict[str, List[nn.Module]]:
    """parent path -> the new column / KV layers of decoder layer ``layer`` reading its input
    (modules replaced through ``nxd_cp.register_module`` wire themselves and are left out)."""
    parents: Dict[str, List[nn.Module]] = {}
    for p in spec.column + spec.kv:
        path = f"{spec.base}.{spec.layers}.{layer}.{p}"
        if path in new:
            parents.setdefault(path.rpartition(".")[0], []).append(new[path])
    return parents


def _wire_inputs(model: nn.Module, spec: ArchitectureSpec, new: Dict[str, nn.Module],
                 sequence_parallel: bool) -> None:
    for i in range(len(get_path(model, f"{spec.base}.{spec.layers}"))):
        for parent, cols in _input_groups(spec, new, i).items():
            sp_cols = [getattr(c, "sequence_parallel_enabled", False) for c in cols]
            if any(sp_cols):  # NxD's SP columns all-gather their input themselves
                if not all(sp_cols):
                    raise RuntimeError(f"{parent}: the column layers that read its input must "
                                       "all be sequence-parallel or none")
                continue
            if all(isinstance(c, (own.ColumnParallelLinear, ReplicatedKVLinear)) for c in cols):
                sp.share_tp_input(get_path(model, parent), cols, sequence_parallel)
            elif sequence_parallel:
                sp.gather_tp_input(get_path(model, parent))


def _sequence_parallel_parameters(model: nn.Module, new: Dict[str, nn.Module]) -> List[str]:
    """Names of the parameters used on sequence-sharded activations: those outside the TP
    modules (norms) and the biases of row layers (added after the reduce-scatter)."""
    names = []
    for name, _ in model.named_parameters():
        owner = next((path for path in new if name.startswith(path + ".")), None)
        if owner is None or (is_row_parallel(new[owner]) and name == owner + ".bias"):
            names.append(name)
    return names


def wire_tensor_parallel(model: nn.Module, spec: ArchitectureSpec, new: Dict[str, nn.Module],
                         sequence_parallel: bool) -> List[str]:
    """Wire the TP communication of ``model`` (module docstring); returns the names of its
    sequence-parallel parameters (empty without SP)."""
    _wire_inputs(model, spec, new, sequence_parallel)
    if not sequence_parallel:
        return []
    for m in new.values():
        if getattr(m, "sequence_parallel_enabled", False) and not isinstance(
                m, (own.ColumnParallelLinear, own.RowParallelLinear)):
            sp.run_sequence_first(m)
    first = get_path(model, f"{spec.base}.{spec.layers}")[0]
    if not is_absent(first):  # on the first pipeline stage
        sp.scatter_tp_sequence(first)
    lm_head = new.get(spec.lm_head)  # None on pipeline stages other than the last
    if lm_head is not None and not getattr(lm_head, "sequence_parallel_enabled", False):
        sp.gather_tp_input(lm_head)
    names = _sequence_parallel_parameters(model, new)
    chosen = set(names)
    sp.mark_sequence_parallel(p for n, p in model.named_parameters() if n in chosen)
    return names
