"""What nxd_cp's TP layers share: the TP group of a layer, NxD's parameter attributes and the
tp-independent initialisation of a shard (the full weight initialised, this rank's chunk kept).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.comm import get_transport


def mark_parallel(p: nn.Parameter, dim: int, tp: int) -> None:
    p.tensor_model_parallel = True
    p.partition_dim = dim
    p.partition_stride = 1
    p.num_partitions = tp


def divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what}={n} is not divisible by tensor_model_parallel_size={tp}")
    return n // tp


def default_linear_init(w: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's default


def init_shard(param: nn.Parameter, full_shape, dim: int, rank: int, tp: int,
                init_method: Callable) -> Optional[torch.Tensor]:
    """Initialise the full (master) weight with ``init_method`` and keep chunk ``rank`` of it, so
    the model does not depend on tp (NxD's CPU initialisation does the same). Returns the
    master weight (None on the meta device): NxD's ``keep_master_weight`` keeps it."""
    if param.device.type == "meta":
        return None
    master = torch.empty(full_shape, dtype=param.dtype)
    init_method(master)
    with torch.no_grad():
        param.copy_(master.chunk(tp, dim=dim)[rank])
    return master


class TPLayer(nn.Module):
    """A module whose parameters are split over the TP group ``group`` (None: parallel
    state's); ``sequence_regather`` is set by ``transform``'s wiring when the layer's input is
    a sequence-parallel all-gather it may save only a shard of (``sequence_parallel``)."""

    sequence_regather = None

    def __init__(self, group):
        super().__init__()
        self._tp = ps.resolve_group(group, kind="tensor")

    @property
    def tensor_parallel_size(self) -> int:
        return self._tp.size

    def _transport(self, x: torch.Tensor):
        return get_transport(self._tp, x.device)
