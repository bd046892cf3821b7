"""Collective transports: one interface (``base.Transport``), two implementations.

``get_transport(group, device)`` picks the XLA transport for XLA tensors and torch.distributed
otherwise. ``count_bytes()`` tallies what this rank sends while a block runs (benchmarks).
"""
from __future__ import annotations

import torch

from nxd_cp.comm.base import ByteTally, GroupSpec, PendingTensor, Transport, count_bytes
from nxd_cp.comm.torch_dist import TorchDistTransport
from nxd_cp.comm.xla import XlaTransport  # imports torch-xla only when it traces a collective


def get_transport(group: GroupSpec, device: torch.device) -> Transport:
    """The transport for ``group`` on the device of the tensors it will move."""
    if not isinstance(group, GroupSpec):
        raise TypeError(f"group must be a GroupSpec, got {type(group).__name__}")
    if torch.device(device).type == "xla":
        return XlaTransport(group)
    return TorchDistTransport(group)


__all__ = ["ByteTally", "GroupSpec", "PendingTensor", "Transport", "count_bytes",
           "get_transport"]
