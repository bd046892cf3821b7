"""``unshard_sequence``: the collective inverse of ``layout.shard_sequence``."""
from __future__ import annotations

from typing import Optional

import torch

from nxd_cp.comm import get_transport
from nxd_cp.comm.autograd import all_gather
from nxd_cp.parallel_state import resolve_group
from nxd_cp.sequence.layout import reorder_gathered


def unshard_sequence(local: torch.Tensor, dim: int, group=None,
                     load_balance: str = "zigzag",
                     seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """All-gather the shards of the CP group and return the full sequence in order.

    ``group``: a ``GroupSpec`` or None for the CP group of ``parallel_state``; ``seq_idx``
    ``[B, S]``: the full row's documents (``per_document``). Differentiable: the gradient of the
    full sequence is reduce-scattered back to the shards.
    """
    spec = resolve_group(group)
    transport = get_transport(spec, local.device)
    gathered = all_gather(local, dim, transport)
    return reorder_gathered(gathered, dim, spec.size, load_balance, seq_idx)
