"""Sequence layouts of context parallelism: which tokens each CP rank holds.

``zigzag`` (load-balanced for causal masks; TransformerEngine's DualChunkSwap): the sequence is
cut into ``2*cp`` equal chunks and CP rank ``r`` holds chunks ``r`` and ``2*cp-1-r``, in that
order. ``contiguous``: ``cp`` equal chunks, rank ``r`` holds chunk ``r`` (what NxD's
``get_batch_on_this_context_parallel_rank`` does; unbalanced under a causal mask).

A rank's shard is the concatenation of its chunks along the sequence dim, so its tokens'
global positions are increasing (``sequence_positions``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from nxd_cp.comm import get_transport
from nxd_cp.comm.autograd import all_gather
from nxd_cp.config import LOAD_BALANCES
from nxd_cp.parallel_state import resolve_group


def check_load_balance(load_balance: str) -> None:
    if load_balance not in LOAD_BALANCES:
        raise ValueError(f"load_balance={load_balance!r} must be one of {LOAD_BALANCES}")


def num_chunks(cp_size: int, load_balance: str) -> int:
    """How many equal chunks the full sequence is cut into."""
    check_load_balance(load_balance)
    return 2 * cp_size if load_balance == "zigzag" else cp_size


def check_sequence_length(seq_len: int, cp_size: int, load_balance: str,
                          what: str = "sequence length") -> None:
    """``ValueError`` unless ``seq_len`` splits into the layout's equal chunks; the message
    starts with ``what``."""
    n = num_chunks(cp_size, load_balance)
    if seq_len % n:
        rule = "2*context_parallel_size" if load_balance == "zigzag" else "context_parallel_size"
        raise ValueError(f"{what} {seq_len} is not divisible by {rule}={n} ({load_balance})")


def rank_chunks(cp_rank: int, cp_size: int, load_balance: str = "zigzag") -> List[int]:
    """Indices of the global chunks CP rank ``cp_rank`` holds, in shard order."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} is outside [0, cp_size={cp_size})")
    check_load_balance(load_balance)
    if load_balance == "zigzag":
        return [cp_rank, 2 * cp_size - 1 - cp_rank]
    return [cp_rank]


def chunk_ranges(seq_len: int, cp_rank: int, cp_size: int,
                 load_balance: str = "zigzag") -> List[Tuple[int, int]]:
    """Global ``[start, end)`` of each chunk of the rank's shard, in shard order."""
    check_sequence_length(seq_len, cp_size, load_balance)
    c = seq_len // num_chunks(cp_size, load_balance)
    return [(i * c, (i + 1) * c) for i in rank_chunks(cp_rank, cp_size, load_balance)]


def sequence_positions(seq_len: int, cp_rank: int, cp_size: int, load_balance: str = "zigzag",
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """Global positions ``[S_local]`` (int64) of the tokens of the rank's shard."""
    return torch.cat([torch.arange(a, b, device=device)
                      for a, b in chunk_ranges(seq_len, cp_rank, cp_size, load_balance)])


def shard_sequence(x: torch.Tensor, dim: int, cp_rank: int, cp_size: int,
                   load_balance: str = "zigzag") -> torch.Tensor:
    """This rank's shard of ``x`` along ``dim`` (the full sequence) in the given layout.

    ``x`` is ``[..., S, ...]`` with S at ``dim``; the result has ``S / cp_size`` there.
    """
    seq_len = x.shape[dim]
    ranges = chunk_ranges(seq_len, cp_rank, cp_size, load_balance)
    return torch.cat([x.narrow(dim, a, b - a) for a, b in ranges], dim=dim)


def reorder_gathered(x: torch.Tensor, dim: int, cp_size: int,
                     load_balance: str = "zigzag") -> torch.Tensor:
    """Turn the concatenation of all ranks' shards (rank order) into sequence order."""
    n = num_chunks(cp_size, load_balance)
    if load_balance == "contiguous":
        return x
    check_sequence_length(x.shape[dim], cp_size, load_balance)
    chunks = x.chunk(n, dim=dim)  # gathered order: rank0's two chunks, rank1's, ...
    order = [None] * n
    for r in range(cp_size):
        for j, g in enumerate(rank_chunks(r, cp_size, load_balance)):
            order[g] = chunks[2 * r + j]
    return torch.cat(order, dim=dim)


def unshard_sequence(local: torch.Tensor, dim: int, group=None,
                     load_balance: str = "zigzag") -> torch.Tensor:
    """All-gather the shards of the CP group and return the full sequence in order.

    ``group``: a ``GroupSpec`` or None for the CP group of ``parallel_state``. Differentiable:
    the gradient of the full sequence is reduce-scattered back to the shards.
    """
    spec = resolve_group(group)
    transport = get_transport(spec, local.device)
    gathered = all_gather(local, dim, transport)
    return reorder_gathered(gathered, dim, spec.size, load_balance)
