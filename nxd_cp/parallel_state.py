"""Parallel state with NxD's names: TP, CP, DP, DP x CP and PP groups of this rank.

Whether NeuronX Distributed (NxD) is in charge is decided by ``topology.nxd.decide`` (from the
environment) when the groups are built, and kept: ``nxd_in_charge()`` is the one predicate and
reads no environment variable after that. NxD in charge: every getter reads NxD's live state
(nothing copied; a re-initialisation by NxD's own ``neuronx_distributed_config`` is seen); DP x
CP is NxD's expert-data-parallel group (where NxD's optimizer reduces gradients), checked to be
the union of each CP group's DP groups. Otherwise nxd_cp builds its own groups with
``new_group`` from ``topology.layout`` (NxD's layout).

Every group is also a ``GroupSpec`` (members, index, XLA replica groups), what the CP algorithms
take; ``explicit_rank`` gives one rank of a world that does not run (XLA lowering). Groups
inherit the world group's timeout (or ``initialize_model_parallel(timeout=...)``). Read once,
when the groups are built: ``LOCAL_WORLD_SIZE`` (NxD's layout), ``NXD_CP_RANK_AS_TENSOR=1``
(``GroupSpec.rank_as_tensor``: ranks as device data on gloo too, the XLA form) and what
``topology.nxd.decide`` reads. The active training config (``neuronx_distributed_config``)
is kept here too, with its readers ``get_context_parallel_config`` and
``sequence_parallel_enabled``: module-level mutable state of nxd_cp is this module's and the
opt-in registries' (kernels, architectures, modules, the byte tally).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch.distributed as dist

from nxd_cp.compat.nxd import platform_target
from nxd_cp.config import ContextParallelConfig
from nxd_cp.topology.groups import GroupSpec
from nxd_cp.topology.layout import ParallelLayout, rank_ring_pairs, ring_pairs
from nxd_cp.topology.nxd import NXD_GROUP_GETTERS, NxDDecision, decide, nxd_group_spec
from nxd_cp.topology.process_groups import new_group_timeout, world_timeout
from nxd_cp.topology import subgroups

_KINDS = ("tensor", "context", "data", "data_context", "pipeline")
RANK_AS_TENSOR_ENV = "NXD_CP_RANK_AS_TENSOR"


@dataclass
class _State:
    layout: ParallelLayout
    specs: Dict[str, GroupSpec]
    backend: str  # "nxd_cp" (own groups) or "explicit" (explicit_rank, no process groups)
    rank: int
    owned_groups: List[Any] = field(default_factory=list)


@dataclass(frozen=True)
class _NxDState:
    """What was decided about NxD when its groups were built (or first seen live)."""
    decision: NxDDecision
    rank_as_tensor: bool


_STATE: Optional[_State] = None  # nxd_cp's own groups or explicit_rank; None when NxD rules
_NXD_SPECS: Dict[str, Tuple[Any, Any, GroupSpec]] = {}  # kind -> (NxD group, NxD mesh, spec)
_NXD: Optional[_NxDState] = None  # kept from initialisation (or the first live NxD seen)
_CONFIG: Any = None  # the NeuronxDistributedConfig of the last neuronx_distributed_config call


# --- the decision ---------------------------------------------------------------------------
def _rank_as_tensor() -> bool:
    return os.environ.get(RANK_AS_TENSOR_ENV, "0") == "1"


def _nxd_state() -> _NxDState:
    """The kept decision, or (before any initialisation) one taken now and kept only if NxD
    turns out to be live (initialised by NxD's own code)."""
    global _NXD
    if _NXD is not None:
        return _NXD
    state = _NxDState(decide(), _rank_as_tensor())
    nps = state.decision.module
    if nps is not None and nps.model_parallel_is_initialized():
        _NXD = state
    return state


def nxd_in_charge() -> bool:
    """True when NxD's parallel state, layers and cross entropy are the ones used
    (``topology.nxd`` has the rule; decided when the groups are built, logged when NxD is not
    taken); False inside ``explicit_rank`` and with nxd_cp's own groups."""
    return _STATE is None and _nxd_state().decision.in_charge


def _nxd_live():
    """NxD's parallel_state when it is in charge and initialised, else None."""
    if _STATE is not None:
        return None
    nps = _nxd_state().decision.module
    return nps if nps is not None and nps.model_parallel_is_initialized() else None


# --- initialisation -------------------------------------------------------------------------
def _layout(world, tp, cp, pp, lnc_size) -> ParallelLayout:
    local = os.environ.get("LOCAL_WORLD_SIZE")  # read when the groups are built
    return ParallelLayout(world, tp, cp, pp, platform=platform_target(), lnc_size=lnc_size,
                          local_world_size=int(local) if local else None)


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1,
                              context_parallel_size: int = 1,
                              expert_model_parallel_size: int = 1,
                              skip_collective_init: bool = False,
                              lnc_size: int = 1,
                              mesh_only: bool = False,
                              timeout: Optional[datetime.timedelta] = None):
    """Build the groups of this rank (NxD's signature, plus ``timeout``). Every rank of the world
    must call it, with the same sizes. With ``mesh_only=True`` returns NxD's ``ParallelGroups``
    (rank lists) and builds nothing.

    timeout: of every group's collectives; None: the world group's (``init_process_group``'s).
    Raises ``RuntimeError`` when torch.distributed is not initialised or the state already is,
    ``ValueError`` for sizes NxD refuses (see ``topology.layout``), ``NotImplementedError`` for
    expert parallelism.
    """
    global _STATE, _NXD
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group() (torchrun sets the "
                           "environment) before initialize_model_parallel()")
    if expert_model_parallel_size != 1:
        raise NotImplementedError(f"expert_model_parallel_size={expert_model_parallel_size} is "
                                  "not supported by nxd_cp (use 1)")
    if timeout is not None and not isinstance(timeout, datetime.timedelta):
        raise ValueError(f"timeout={timeout!r} must be a datetime.timedelta or None")
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = _layout(world, tensor_model_parallel_size, context_parallel_size,
                     pipeline_model_parallel_size, lnc_size)
    if mesh_only:
        return layout.mesh()
    if model_parallel_is_initialized():
        raise RuntimeError("model parallel state is already initialized; call "
                           "destroy_model_parallel() first")
    timeout = timeout or world_timeout()
    nxd = _NxDState(decide(), _rank_as_tensor())
    nps = nxd.decision.module
    if nps is not None:
        _NXD = nxd
        with new_group_timeout(timeout):
            nps.initialize_model_parallel(
                tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
                context_parallel_size=layout.cp, skip_collective_init=skip_collective_init,
                lnc_size=lnc_size)
        get_group_spec("data_context")  # fail early if NxD's DP x CP is not the union
        return None
    specs, owned = {}, []
    for kind, groups in layout.groups().items():
        mine = None
        # new_group is collective over the world: every rank creates every group, in order.
        for g in groups:
            pg = dist.new_group(ranks=g, timeout=timeout)
            owned.append(pg)
            if rank in g:
                mine = pg
        specs[kind] = GroupSpec.explicit(groups, rank, mine, nxd.rank_as_tensor)
    _STATE = _State(layout, specs, "nxd_cp", rank, owned)
    return None


@contextlib.contextmanager
def explicit_rank(world_size: int, rank: int, tensor_model_parallel_size: int = 1,
                  context_parallel_size: int = 1, pipeline_model_parallel_size: int = 1):
    """Parallel state of one global rank of a world that does not run: every group as a
    GroupSpec with process_group=None (for lowering XLA graphs per rank in one process,
    without torch.distributed). Restores the previous state (and active config) on exit."""
    global _STATE, _CONFIG
    layout = _layout(world_size, tensor_model_parallel_size, context_parallel_size,
                     pipeline_model_parallel_size, 1)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} must be an integer in [0, world_size={world_size})")
    specs = {k: GroupSpec.explicit(g, rank, None) for k, g in layout.groups().items()}
    previous, _STATE = (_STATE, _CONFIG), _State(layout, specs, "explicit", rank)
    try:
        yield
    finally:
        _STATE, _CONFIG = previous


def model_parallel_is_initialized() -> bool:  # NxD's name
    return _STATE is not None or _nxd_live() is not None


def destroy_model_parallel() -> None:
    """Forget the groups (destroying those nxd_cp created; NxD's through NxD) and the active
    config. Safe when unset."""
    global _STATE, _CONFIG, _NXD
    _NXD_SPECS.clear()
    subgroups.clear()
    _CONFIG = None
    if _STATE is None:
        nps = _nxd_live()
        _NXD = None
        if nps is not None:
            nps.destroy_model_parallel()
        return
    if dist.is_initialized():
        for pg in _STATE.owned_groups:
            dist.destroy_process_group(pg)
    _STATE = None


def set_training_config(config) -> None:
    """Make ``config`` (a validated ``nxd_config.NeuronxDistributedConfig``) the active one, as
    ``neuronx_distributed_config`` does; read through ``nxd_cp.config``."""
    global _CONFIG
    _CONFIG = config


def get_training_config():
    """The active ``NeuronxDistributedConfig``, or None when none was set."""
    return _CONFIG


def get_context_parallel_config() -> ContextParallelConfig:
    """The active CP config: the one of the last ``neuronx_distributed_config`` call, or the
    defaults (``p2p``, ``zigzag``) when parallel state was initialised without it. Read where a
    config is bound (``transform``, ``ContextParallelAttention``) or defaulted (the batch
    function), never per attention call."""
    return _CONFIG.context_parallel_config if _CONFIG is not None else ContextParallelConfig()


def sequence_parallel_enabled() -> bool:
    """The active config's ``sequence_parallel`` flag (False without a config)."""
    return bool(_CONFIG is not None and _CONFIG.sequence_parallel)


# --- GroupSpecs -----------------------------------------------------------------------------
def _not_initialized() -> RuntimeError:
    return RuntimeError("model parallel state is not initialized: call "
                        "nxd_cp.parallel_state.initialize_model_parallel(...) first")

def get_group_spec(kind: str) -> GroupSpec:
    """This rank's ``GroupSpec`` of ``kind``: tensor, context, data, data_context, pipeline."""
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r} must be one of {_KINDS}")
    if _STATE is not None:
        return _STATE.specs[kind]
    nps = _nxd_live()
    if nps is None:
        raise _not_initialized()
    getter = getattr(nps, NXD_GROUP_GETTERS[kind])
    pg, mesh = getter(), getter(as_list=True)
    cached = _NXD_SPECS.get(kind)
    if cached is None or cached[0] is not pg or cached[1] is not mesh:  # NxD re-initialised
        spec = nxd_group_spec(nps, kind, dist.get_rank(), _nxd_state().rank_as_tensor)
        cached = _NXD_SPECS[kind] = (pg, mesh, spec)
    return cached[2]


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
    if model_parallel_is_initialized():
        for k in _KINDS:
            spec = get_group_spec(k)
            if spec.ranks == ranks:
                return GroupSpec(spec.ranks, spec.rank, spec.all_groups, group,
                                 spec.rank_as_tensor)
    return GroupSpec.explicit([ranks], dist.get_rank(), group)


def get_layout() -> ParallelLayout:
    """The layout (sizes and groups); with NxD in charge, built from NxD's live sizes."""
    if _STATE is not None:
        return _STATE.layout
    if _nxd_live() is None:
        raise _not_initialized()
    return _layout(dist.get_world_size(), get_tensor_model_parallel_size(),
                   get_context_model_parallel_size(), get_pipeline_model_parallel_size(), 1)


def _delegate(nxd_name: str, kind: str, what: str, *args):
    """NxD's getter ``nxd_name`` when NxD is in charge, else ``what`` of nxd_cp's spec."""
    if _STATE is None:
        nps = _nxd_live()
        if nps is None:
            raise _not_initialized()
        return getattr(nps, nxd_name)(*args)
    spec = _STATE.specs[kind]
    if what == "group":
        return [list(g) for g in spec.all_groups] if args and args[0] else spec.process_group
    if what == "groups":
        return [list(g) for g in spec.all_groups]
    return spec.rank if what == "rank" else spec.size


# --- context parallel -----------------------------------------------------------------------
def get_context_model_parallel_group(as_list: bool = False):
    """This rank's CP ProcessGroup (``as_list=True``: every CP group as rank lists)."""
    return _delegate("get_context_model_parallel_group", "context", "group", as_list)


def get_context_model_parallel_rank() -> int:
    return _delegate("get_context_model_parallel_rank", "context", "rank")


def get_context_model_parallel_size() -> int:
    return _delegate("get_context_model_parallel_size", "context", "size")


def get_context_model_parallel_replica_groups() -> List[List[int]]:
    return _delegate("get_context_model_parallel_replica_groups", "context", "groups")


def get_context_model_parallel_src_tgt_pairs() -> List[Tuple[int, int]]:
    """NxD's meaning: the +1 ring pairs of *this rank's* CP group, sorted ``(src, tgt)``
    tuples (``[(0, 2), (2, 0)]`` for TP2xCP2 rank 0; ``[(r, r)]`` when cp == 1)."""
    if _STATE is None:
        return _delegate("get_context_model_parallel_src_tgt_pairs", "context", "")
    return rank_ring_pairs(get_context_model_parallel_replica_groups(), _STATE.rank)


def get_context_model_parallel_ring_pairs(direction: int = 1) -> List[List[int]]:
    """Source -> target pairs of a one-step ring shift in *every* CP group, as
    ``xm.collective_permute`` takes them (the XLA transport's pairs)."""
    return ring_pairs(get_context_model_parallel_replica_groups(), direction)


# --- tensor parallel ------------------------------------------------------------------------
def get_tensor_model_parallel_group(as_list: bool = False):
    return _delegate("get_tensor_model_parallel_group", "tensor", "group", as_list)


def get_tensor_model_parallel_rank() -> int:
    return _delegate("get_tensor_model_parallel_rank", "tensor", "rank")


def get_tensor_model_parallel_size() -> int:
    return _delegate("get_tensor_model_parallel_size", "tensor", "size")


def get_tensor_model_parallel_replica_groups() -> List[List[int]]:
    return _delegate("get_tensor_model_parallel_replica_groups", "tensor", "groups")


# --- data parallel (excludes CP, as in NxD) -------------------------------------------------
def get_data_parallel_group(as_list: bool = False):
    return _delegate("get_data_parallel_group", "data", "group", as_list)


def get_data_parallel_rank() -> int:
    return _delegate("get_data_parallel_rank", "data", "rank")


def get_data_parallel_size() -> int:
    return _delegate("get_data_parallel_size", "data", "size")


def get_data_parallel_replica_groups() -> List[List[int]]:
    return _delegate("get_data_parallel_replica_groups", "data", "groups")


# --- data x context parallel (gradient reduction; NxD's expert-data-parallel group) -------
def get_data_context_parallel_group(as_list: bool = False):
    if _STATE is None:
        get_group_spec("data_context")  # checks NxD's group is the DP x CP union
    return _delegate("get_expert_data_parallel_group", "data_context", "group", as_list)


def get_data_context_parallel_rank() -> int:
    return get_group_spec("data_context").rank


def get_data_context_parallel_size() -> int:
    return get_group_spec("data_context").size


# --- pipeline parallel ----------------------------------------------------------------------
def get_pipeline_model_parallel_group(as_list: bool = False):
    return _delegate("get_pipeline_model_parallel_group", "pipeline", "group", as_list)


def get_pipeline_model_parallel_rank() -> int:
    return _delegate("get_pipeline_model_parallel_rank", "pipeline", "rank")


def get_pipeline_model_parallel_size() -> int:
    return _delegate("get_pipeline_model_parallel_size", "pipeline", "size")


def get_pipeline_model_parallel_replica_groups() -> List[List[int]]:
    return _delegate("get_pipeline_model_parallel_replica_groups", "pipeline", "groups")
