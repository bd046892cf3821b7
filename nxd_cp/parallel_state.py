"""Parallel state with NxD's names: TP, CP, DP, DP x CP and PP groups of this rank.

When a real ``neuronx_distributed`` with context parallelism is importable (Trainium), its
``parallel_state`` builds the groups and this module reads them back, so there is one source of
truth. Otherwise the groups are built here with ``torch.distributed.new_group`` from
``nxd_cp.layout`` (NxD's layout: ``arange(world).reshape(pp, dp, cp, tp)``). Either way every
group is also available as a ``GroupSpec`` (members, index, replica groups for XLA), which is
what the CP algorithms take.

This module holds the only mutable module state of nxd_cp.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import torch.distributed as dist

from nxd_cp.comm.base import GroupSpec
from nxd_cp.layout import ParallelLayout, ring_pairs

_KINDS = ("tensor", "context", "data", "data_context", "pipeline")


@dataclass
class _State:
    layout: ParallelLayout
    specs: Dict[str, GroupSpec]
    backend: str  # "nxd" or "nxd_cp"
    owned_groups: List[Any] = field(default_factory=list)


_STATE: Optional[_State] = None


def _nxd_parallel_state():
    """NxD's parallel_state module when a real NxD with CP support is importable, else None.

    PyPI's ``neuronx-distributed`` is a placeholder that raises on import, hence the broad
    except. ``NXD_CP_DISABLE_NXD=1`` forces nxd_cp's own groups.
    """
    if os.environ.get("NXD_CP_DISABLE_NXD") == "1":
        return None
    try:
        from neuronx_distributed.parallel_layers import parallel_state as nps
    except Exception:  # noqa: BLE001 - placeholder packages raise arbitrary errors
        return None
    return nps if hasattr(nps, "get_context_model_parallel_group") else None


def _union_groups(outer: List[List[int]], inner: List[List[int]]) -> List[List[int]]:
    """Groups that join, for each group of ``outer``, the ``inner`` groups of its members."""
    result = []
    for g in outer:
        members = sorted({r for m in g for ig in inner if m in ig for r in ig})
        if members not in result:
            result.append(members)
    return result


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1,
                              context_parallel_size: int = 1) -> None:
    """Build the groups of this rank. Every rank of the world must call it, with the same sizes.

    Raises ``RuntimeError`` when torch.distributed is not initialised or the state already is,
    ``ValueError`` when a size is < 1 or the world size is not divisible by tp * cp * pp.
    """
    global _STATE
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group() (torchrun sets the "
                           "environment) before initialize_model_parallel()")
    if _STATE is not None:
        raise RuntimeError("model parallel state is already initialized; call "
                           "destroy_model_parallel() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = ParallelLayout(world, tensor_model_parallel_size, context_parallel_size,
                            pipeline_model_parallel_size)
    nps = _nxd_parallel_state()
    if nps is not None:
        _STATE = _from_nxd(nps, layout, rank)
        return
    all_groups = {
        "tensor": layout.tensor_parallel_groups(),
        "context": layout.context_parallel_groups(),
        "data": layout.data_parallel_groups(),
        "data_context": layout.data_context_parallel_groups(),
        "pipeline": layout.pipeline_parallel_groups(),
    }
    specs, owned = {}, []
    for kind in _KINDS:
        mine = None
        # new_group is collective over the world: every rank creates every group, in order.
        for g in all_groups[kind]:
            pg = dist.new_group(ranks=g)
            owned.append(pg)
            if rank in g:
                mine = pg
        specs[kind] = GroupSpec.explicit(all_groups[kind], rank, mine)
    _STATE = _State(layout, specs, "nxd_cp", owned)


def _from_nxd(nps, layout: ParallelLayout, rank: int) -> _State:
    nps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp)
    getters = {"tensor": nps.get_tensor_model_parallel_group,
               "context": nps.get_context_model_parallel_group,
               "data": nps.get_data_parallel_group,
               "pipeline": nps.get_pipeline_model_parallel_group}
    specs = {k: GroupSpec.explicit(f(as_list=True), rank, f()) for k, f in getters.items()}
    # NxD has no DP x CP group: join the DP groups of the members of each CP group.
    dpcp = _union_groups(specs["context"].all_groups, specs["data"].all_groups)
    owned, mine = [], None
    for g in dpcp:
        pg = dist.new_group(ranks=g)
        owned.append(pg)
        if rank in g:
            mine = pg
    specs["data_context"] = GroupSpec.explicit(dpcp, rank, mine)
    return _State(layout, specs, "nxd", owned)


def model_parallel_is_initialized() -> bool:
    return _STATE is not None


def destroy_model_parallel() -> None:
    """Forget the groups (and destroy the ones nxd_cp created). Safe to call when not set."""
    global _STATE
    if _STATE is None:
        return
    if _STATE.backend == "nxd":
        nps = _nxd_parallel_state()
        if nps is not None:
            nps.destroy_model_parallel()
    if dist.is_initialized():
        for pg in _STATE.owned_groups:
            dist.destroy_process_group(pg)
    _STATE = None


def _state() -> _State:
    if _STATE is None:
        raise RuntimeError("model parallel state is not initialized: call "
                           "nxd_cp.parallel_state.initialize_model_parallel(...) first")
    return _STATE


def get_group_spec(kind: str) -> GroupSpec:
    """The ``GroupSpec`` of this rank for ``kind`` in tensor, context, data, data_context,
    pipeline."""
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r} must be one of {_KINDS}")
    return _state().specs[kind]


def resolve_group(group=None, kind: str = "context") -> GroupSpec:
    """A ``GroupSpec`` from what a public API received as ``group``.

    None: this rank's group of ``kind`` (default: CP). A ``GroupSpec``: itself. A
    torch.distributed ProcessGroup: the parallel-state spec with the same members if there is
    one, else a spec of that group alone (enough for torch.distributed; XLA needs every
    replica group, so on XLA pass None or a ``GroupSpec``).
    """
    if group is None:
        return get_group_spec(kind)
    if isinstance(group, GroupSpec):
        return group
    ranks = tuple(dist.get_process_group_ranks(group))
    if _STATE is not None:
        for spec in _STATE.specs.values():
            if spec.ranks == ranks:
                return GroupSpec(spec.ranks, spec.rank, spec.all_groups, group)
    return GroupSpec.explicit([ranks], dist.get_rank(), group)


def get_layout() -> ParallelLayout:
    return _state().layout


def _group(kind: str, as_list: bool):
    spec = get_group_spec(kind)
    return [list(g) for g in spec.all_groups] if as_list else spec.process_group


# --- context parallel ---------------------------------------------------------------------------
def get_context_model_parallel_group(as_list: bool = False):
    """This rank's CP ProcessGroup, or with ``as_list=True`` every CP group as rank lists."""
    return _group("context", as_list)


def get_context_model_parallel_rank() -> int:
    return get_group_spec("context").rank


def get_context_model_parallel_size() -> int:
    return get_group_spec("context").size


def get_context_model_parallel_replica_groups() -> List[List[int]]:
    return _group("context", True)


def get_context_model_parallel_src_tgt_pairs() -> List[List[int]]:
    """Source -> target global-rank pairs of the CP ring (+1 direction), all CP groups, as
    ``xm.collective_permute`` takes them."""
    return ring_pairs(get_context_model_parallel_replica_groups(), 1)


# --- tensor parallel ----------------------------------------------------------------------------
def get_tensor_model_parallel_group(as_list: bool = False):
    return _group("tensor", as_list)


def get_tensor_model_parallel_rank() -> int:
    return get_group_spec("tensor").rank


def get_tensor_model_parallel_size() -> int:
    return get_group_spec("tensor").size


def get_tensor_model_parallel_replica_groups() -> List[List[int]]:
    return _group("tensor", True)


# --- data parallel (excludes CP, as in NxD) ------------------------------------------------------
def get_data_parallel_group(as_list: bool = False):
    return _group("data", as_list)


def get_data_parallel_rank() -> int:
    return get_group_spec("data").rank


def get_data_parallel_size() -> int:
    return get_group_spec("data").size


def get_data_parallel_replica_groups() -> List[List[int]]:
    return _group("data", True)


# --- data x context parallel (gradient reduction of a CP model) ---------------------------------
def get_data_context_parallel_group(as_list: bool = False):
    return _group("data_context", as_list)


def get_data_context_parallel_rank() -> int:
    return get_group_spec("data_context").rank


def get_data_context_parallel_size() -> int:
    return get_group_spec("data_context").size


# --- pipeline parallel --------------------------------------------------------------------------
def get_pipeline_model_parallel_group(as_list: bool = False):
    return _group("pipeline", as_list)


def get_pipeline_model_parallel_rank() -> int:
    return get_group_spec("pipeline").rank


def get_pipeline_model_parallel_size() -> int:
    return get_group_spec("pipeline").size


# --- one rank of a world that does not run (lowering per rank in one process) ------------------
@contextlib.contextmanager
def explicit_rank(world_size: int, rank: int, tensor_model_parallel_size: int = 1,
                  context_parallel_size: int = 1,
                  pipeline_model_parallel_size: int = 1) -> Iterator[None]:
    """Parallel state of one global rank of a world that does not run: every group as a
    GroupSpec with process_group=None (for lowering XLA graphs per rank in one process,
    without torch.distributed). Restores the previous state on exit."""
    global _STATE
    layout = ParallelLayout(world_size, tensor_model_parallel_size, context_parallel_size,
                            pipeline_model_parallel_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    groups = {"tensor": layout.tensor_parallel_groups(),
              "context": layout.context_parallel_groups(),
              "data": layout.data_parallel_groups(),
              "data_context": layout.data_context_parallel_groups(),
              "pipeline": layout.pipeline_parallel_groups()}
    previous = _STATE
    _STATE = _State(layout, {k: GroupSpec.explicit(groups[k], rank) for k in _KINDS}, "explicit")
    try:
        yield
    finally:
        _STATE = previous
