"""Sequence layouts of context parallelism: which tokens each CP rank holds, and the
divisibility rules of the sequence (``check_sequence_length`` for the layouts,
``check_sequence_split`` for sequence parallelism): every check of a sequence length calls one
of these.

``zigzag`` (load-balanced for causal masks; TransformerEngine's DualChunkSwap): the sequence is
cut into ``2*cp`` equal chunks and CP rank ``r`` holds chunks ``r`` and ``2*cp-1-r``, in that
order. ``contiguous``: ``cp`` equal chunks, rank ``r`` holds chunk ``r`` (what NxD's
``get_batch_on_this_context_parallel_rank`` does; unbalanced under a causal mask).

A rank's shard is the concatenation of its chunks along the sequence dim, so its tokens'
global positions are increasing (``sequence_positions``).

``per_document`` (packed rows; TransformerEngine's THD + CP and PyTorch's per-document
head-tail balancer, without their padding): every document of a row is cut into ``2*cp``
contiguous *pieces* (slots ``0 .. 2cp-1``) and CP rank ``r`` holds the pieces of slots ``r`` and
``2cp-1-r`` of every document. A document of length ``L = 2cp*q + m`` gives ``q`` tokens to
each slot and one more to ``m`` slots, chosen round-robin with a counter that runs on over the
documents of the row, so every slot holds exactly ``S / 2cp`` tokens (no padding, documents
shorter than ``2cp`` included). The shard is [slot ``r`` of every document, in order | slot
``2cp-1-r`` of every document]: two parts of ``S / 2cp`` tokens, like zigzag's two chunks; a
row that is one document is exactly its zigzag shard. The layout needs the document index of
every token (``seq_idx`` ``[B, S]``: a document is a run of equal ids); without it, the row is one
document (zigzag). At ``cp == 1`` the shard is the row.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from nxd_cp.config import LOAD_BALANCES

_TWO_PARTS = ("zigzag", "per_document")  # 2*cp chunks (slots), two per rank


def check_load_balance(load_balance: str) -> None:
    if load_balance not in LOAD_BALANCES:
        raise ValueError(f"load_balance={load_balance!r} must be one of {LOAD_BALANCES}")


def num_chunks(cp_size: int, load_balance: str) -> int:
    """How many equal chunks the full sequence is cut into."""
    check_load_balance(load_balance)
    return 2 * cp_size if load_balance in _TWO_PARTS else cp_size


def check_sequence_length(seq_len: int, cp_size: int, load_balance: str,
                          what: str = "sequence length") -> None:
    """``ValueError`` unless ``seq_len`` splits into the layout's equal chunks; the message
    starts with ``what``."""
    n = num_chunks(cp_size, load_balance)
    if seq_len % n:
        rule = ("2*context_parallel_size" if load_balance in _TWO_PARTS
                else "context_parallel_size")
        raise ValueError(f"{what} {seq_len} is not divisible by {rule}={n} ({load_balance})")


def check_sequence_split(local_len: int, tp: int) -> None:
    """Sequence parallelism: ``ValueError`` unless the local sequence ``S/cp`` splits over the
    ``tp`` ranks of the TP group (each holds ``S/(cp*tp)`` tokens between the TP regions)."""
    if local_len % tp:
        raise ValueError(f"sequence_parallel=True: the local sequence length S/cp={local_len} is "
                         f"not divisible by tensor_model_parallel_size={tp}")


def rank_chunks(cp_rank: int, cp_size: int, load_balance: str = "zigzag") -> List[int]:
    """Indices of the global chunks CP rank ``cp_rank`` holds, in shard order
    (``per_document``: those of a row that is one document, as zigzag)."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} is outside [0, cp_size={cp_size})")
    check_load_balance(load_balance)
    if load_balance in _TWO_PARTS:
        return [cp_rank, 2 * cp_size - 1 - cp_rank]
    return [cp_rank]


def chunk_ranges(seq_len: int, cp_rank: int, cp_size: int,
                 load_balance: str = "zigzag") -> List[Tuple[int, int]]:
    """Global ``[start, end)`` of each chunk of the rank's shard, in shard order."""
    check_sequence_length(seq_len, cp_size, load_balance)
    c = seq_len // num_chunks(cp_size, load_balance)
    return [(i * c, (i + 1) * c) for i in rank_chunks(cp_rank, cp_size, load_balance)]


def document_slots(seq_idx: torch.Tensor, cp_size: int) -> torch.Tensor:
    """``per_document``: the slot (``0 .. 2cp-1``) of every token, int64 ``[B, S]``.

    ``seq_idx`` ``[B, S]``: document index of every token (a document is a run of equal ids).
    Slot ``j`` of a document is its ``j``-th contiguous piece (see the module docstring).
    """
    n = 2 * cp_size
    check_sequence_length(seq_idx.shape[1], cp_size, "per_document")
    rows = []
    for ids in seq_idx.cpu():
        lengths = torch.unique_consecutive(ids, return_counts=True)[1]
        base, extra = lengths // n, lengths % n
        counter = (torch.cumsum(extra, 0) - extra) % n  # round-robin slot of the first extra
        slots = torch.arange(n)
        sizes = base[:, None] + ((slots[None, :] - counter[:, None]) % n < extra[:, None]).long()
        rows.append(torch.repeat_interleave(slots.repeat(len(lengths)), sizes.reshape(-1)))
    return torch.stack(rows).to(seq_idx.device)


def document_index(seq_idx: torch.Tensor, cp_rank: int, cp_size: int) -> torch.Tensor:
    """``per_document``: indices ``[B, S/cp]`` (int64) of the rank's tokens in the full row,
    in shard order (slot ``r`` then slot ``2cp-1-r``, each in sequence order)."""
    rank_chunks(cp_rank, cp_size, "per_document")  # validates the rank
    b, s = seq_idx.shape
    if cp_size == 1:
        return torch.arange(s, device=seq_idx.device).expand(b, s)
    n = 2 * cp_size
    order = torch.argsort(document_slots(seq_idx, cp_size), dim=1, stable=True)
    order = order.view(b, n, s // n)  # every slot holds exactly S / 2cp tokens
    return torch.cat([order[:, cp_rank], order[:, n - 1 - cp_rank]], dim=1)


def _take_tokens(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``x[b, ..., index[b, i], ...]`` along ``dim`` (> 0; dim 0 is the batch)."""
    if dim % x.dim() == 0:
        raise ValueError("per_document sharding needs the batch at dim 0 and the sequence at "
                         f"another dim, got dim={dim}")
    moved = x.movedim(dim, 1)
    if moved.shape[0] != index.shape[0]:
        moved = moved.expand(index.shape[0], *moved.shape[1:])
    rows = torch.arange(index.shape[0], device=x.device)[:, None]
    return moved[rows, index.to(x.device)].movedim(1, dim)


def _needs_documents(load_balance: str, seq_idx: Optional[torch.Tensor], cp_size: int) -> bool:
    check_load_balance(load_balance)
    return load_balance == "per_document" and seq_idx is not None and cp_size > 1


def sequence_positions(seq_len: int, cp_rank: int, cp_size: int, load_balance: str = "zigzag",
                       device: Optional[torch.device] = None,
                       seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Global positions (int64) of the tokens of the rank's shard: ``[S_local]``, or
    ``[B, S_local]`` for ``per_document`` with ``seq_idx`` ``[B, S]``."""
    if _needs_documents(load_balance, seq_idx, cp_size):
        return document_index(seq_idx, cp_rank, cp_size).to(device)
    return torch.cat([torch.arange(a, b, device=device)
                      for a, b in chunk_ranges(seq_len, cp_rank, cp_size, load_balance)])


def shard_sequence(x: torch.Tensor, dim: int, cp_rank: int, cp_size: int,
                   load_balance: str = "zigzag",
                   seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's shard of ``x`` along ``dim`` (the full sequence) in the given layout.

    ``x`` is ``[..., S, ...]`` with S at ``dim``; the result has ``S / cp_size`` there.
    ``per_document`` reads the documents from ``seq_idx`` ``[B, S]`` (``x`` then has the batch
    at dim 0); without it the row is one document (zigzag).
    """
    if _needs_documents(load_balance, seq_idx, cp_size):
        return _take_tokens(x, dim, document_index(seq_idx, cp_rank, cp_size))
    seq_len = x.shape[dim]
    ranges = chunk_ranges(seq_len, cp_rank, cp_size, load_balance)
    return torch.cat([x.narrow(dim, a, b - a) for a, b in ranges], dim=dim)


def reorder_gathered(x: torch.Tensor, dim: int, cp_size: int,
                     load_balance: str = "zigzag",
                     seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Turn the concatenation of all ranks' shards (rank order) into sequence order."""
    n = num_chunks(cp_size, load_balance)
    if _needs_documents(load_balance, seq_idx, cp_size):
        gathered = torch.cat([document_index(seq_idx, r, cp_size) for r in range(cp_size)], 1)
        return _take_tokens(x, dim, torch.argsort(gathered, dim=1))
    if load_balance == "contiguous":
        return x
    check_sequence_length(x.shape[dim], cp_size, load_balance)
    chunks = x.chunk(n, dim=dim)  # gathered order: rank0's two chunks, rank1's, ...
    order = [None] * n
    for r in range(cp_size):
        for j, g in enumerate(rank_chunks(r, cp_size, load_balance)):
            order[g] = chunks[2 * r + j]
    return torch.cat(order, dim=dim)
