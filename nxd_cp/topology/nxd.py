"""Whether NeuronX Distributed (NxD) is in charge: decided from the process's environment.

NxD is in charge when its ``parallel_state`` (with CP) is importable, ``NXD_CP_DISABLE_NXD`` is
not ``1``, and NxD can build groups here: torch.distributed's backend is ``xla``, or
``NXD_CPU_MODE`` > 0 (NxD's own rule: gloo groups on CPU; without it NxD deadlocks off device),
or, before torch.distributed is up, ``PJRT_DEVICE=NEURON``. ``decide()`` reads the environment
once per call and returns the verdict with its reason; ``parallel_state`` calls it when the
groups are built and keeps the answer (``parallel_state.nxd_in_charge()`` is the one predicate).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch.distributed as dist

from nxd_cp.compat import nxd as nxd_compat
from nxd_cp.topology.groups import GroupSpec
from nxd_cp.topology.layout import union_groups

logger = logging.getLogger("nxd_cp")
_LOGGED: set = set()

DISABLE_ENV = "NXD_CP_DISABLE_NXD"


def log_once(msg: str, level: int = logging.WARNING) -> None:
    """Log ``msg`` the first time it comes up in the process."""
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        logger.log(level, msg)


def cpu_mode(environ: Mapping[str, str]) -> bool:
    """NxD's CPU mode (``NXD_CPU_MODE`` > 0, NxD's own rule): NxD builds gloo groups."""
    try:
        return int(environ.get("NXD_CPU_MODE", "0")) > 0
    except ValueError:
        return False


@dataclass(frozen=True)
class NxDDecision:
    """NxD's parallel_state module when NxD is in charge (else None), and why."""

    module: Optional[Any]
    reason: str

    @property
    def in_charge(self) -> bool:
        return self.module is not None


def decide(environ: Optional[Mapping[str, str]] = None) -> NxDDecision:
    """The verdict for this process now (module docstring); logs why NxD is not taken."""
    env = os.environ if environ is None else environ
    nps = nxd_compat.parallel_state_module()
    if nps is None:
        log_once(f"nxd_cp: using its own groups and layers: {nxd_compat.import_error()}",
                 logging.INFO)
        return NxDDecision(None, nxd_compat.import_error())
    if env.get(DISABLE_ENV) == "1":
        reason = f"{DISABLE_ENV}=1"
        log_once(f"nxd_cp: NeuronX Distributed is importable but not used: {reason}",
                 logging.INFO)
        return NxDDecision(None, reason)
    if cpu_mode(env):
        return NxDDecision(nps, "NXD_CPU_MODE > 0: NxD builds gloo groups")
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        if backend == "xla":
            return NxDDecision(nps, "torch.distributed backend 'xla'")
        reason = (f"NeuronX Distributed is importable but the torch.distributed backend is "
                  f"{backend!r} and NXD_CPU_MODE is not 1: NxD cannot build groups here (it "
                  "would deadlock), so nxd_cp uses its own groups and layers. Set "
                  "NXD_CPU_MODE=1 to run NxD's code on CPU (gloo).")
        log_once(f"nxd_cp: {reason}")
        return NxDDecision(None, reason)
    if env.get("PJRT_DEVICE", "").upper() == "NEURON":
        return NxDDecision(nps, "PJRT_DEVICE=NEURON")
    return NxDDecision(None, "torch.distributed is not initialised and PJRT_DEVICE is not "
                             "NEURON")


# nxd_cp's group kind -> NxD's getter of that group (DP x CP: NxD's expert-data-parallel group)
NXD_GROUP_GETTERS = {"tensor": "get_tensor_model_parallel_group",
                     "context": "get_context_model_parallel_group",
                     "data": "get_data_parallel_group",
                     "pipeline": "get_pipeline_model_parallel_group",
                     "data_context": "get_expert_data_parallel_group"}


def nxd_group_spec(nps: Any, kind: str, global_rank: int, rank_as_tensor: bool) -> GroupSpec:
    """The ``GroupSpec`` of NxD's live group ``kind``. ``RuntimeError`` when NxD's
    expert-data-parallel groups (where its optimizer reduces) are not its DP x CP groups."""
    getter = getattr(nps, NXD_GROUP_GETTERS[kind])
    pg, mesh = getter(), getter(as_list=True)
    if kind == "data_context":
        union = union_groups(nps.get_context_model_parallel_replica_groups(),
                             nps.get_data_parallel_replica_groups())
        if sorted(map(sorted, mesh)) != sorted(union):
            raise RuntimeError(f"NxD's expert-data-parallel groups {mesh} are not its DP x CP "
                               f"groups {union} on this layout: NxD's optimizer would reduce "
                               "gradients over the wrong ranks; nxd_cp does not support it")
    return GroupSpec.explicit(mesh, global_rank, pg, rank_as_tensor)
