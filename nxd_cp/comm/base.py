"""The transport interface the CP algorithms are written against, and a byte tally.

A transport moves tensors inside one group of ranks (a ``topology.groups.GroupSpec``).
Algorithms call only these methods; a transport knows nothing about attention.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from nxd_cp.topology.groups import GroupSpec


def rank_tensor(ranks: Sequence[int], rank: int, device: Union[str, torch.device]
                ) -> torch.Tensor:
    """``rank`` (this rank's index in the group ``ranks``) as an int32 tensor ``[1]`` on
    ``device``: device data (a graph input on XLA, like NxD's ``SPMDRank``), created once per
    (group, rank, device) and reused every step (the key is normalised: a list of ranks, a
    numpy int or the device as a string hit the same entry). One tensor per group: where a
    rank's TP and CP indices are equal they must still be two graph inputs, or that rank's
    graph would read one parameter where the others read two."""
    return _rank_tensor(tuple(int(r) for r in ranks), int(rank), torch.device(device))


@functools.lru_cache(maxsize=256)
def _rank_tensor(ranks: Tuple[int, ...], rank: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([rank], dtype=torch.int32).to(device)


class PendingTensor:
    """Result of an asynchronous collective: ``wait()`` returns the received tensor."""

    def __init__(self, tensor: torch.Tensor, works: Optional[List[Any]] = None):
        self._tensor = tensor
        self._works = works or []

    def wait(self) -> torch.Tensor:
        for w in self._works:
            w.wait()
        self._works = []
        return self._tensor


class Transport(ABC):
    """Collectives inside one group. Every method is called by all ranks of the group.

    Shapes: ``all_gather`` concatenates the ranks' tensors along ``dim`` in group order;
    ``reduce_scatter`` sums over the group and returns chunk ``rank`` of ``dim`` (size must
    divide); ``all_to_all`` cuts ``split_dim`` into ``size`` chunks, sends chunk ``j`` to group
    index ``j`` and concatenates what it receives along ``concat_dim`` in group order;
    ``ring_shift_start`` sends to group index ``rank + direction`` and receives from
    ``rank - direction`` (mod size).
    """

    def __init__(self, group: GroupSpec):
        self.group = group

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def rank(self) -> int:
        return self.group.rank

    @abstractmethod
    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor: ...

    @abstractmethod
    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor: ...

    @abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def all_to_all(self, x: torch.Tensor, split_dim: int, concat_dim: int) -> torch.Tensor: ...

    @abstractmethod
    def ring_shift_start(self, x: torch.Tensor, direction: int = 1) -> PendingTensor:
        """Start a ring shift; the caller can compute while it travels, then ``wait()``."""

    def rank_value(self, device: torch.device) -> Union[int, torch.Tensor]:
        """This rank's group index as the algorithms consume it: a Python int (the fastest
        form on torch.distributed), or an int32 tensor ``[1]`` on ``device`` where every rank
        must trace the same graph (XLA). ``GroupSpec.rank_as_tensor`` forces the tensor form
        here too, so the rank-independent schedule runs (and is tested) on gloo."""
        if self.group.rank_as_tensor:
            return rank_tensor(self.group.ranks, self.rank, device)
        return self.rank

    # Helpers shared by the implementations.
    def _check_direction(self, direction: int) -> None:
        if direction not in (1, -1):
            raise ValueError(f"direction={direction!r} must be +1 or -1")

    def _check_divisible(self, x: torch.Tensor, dim: int, what: str) -> None:
        if x.shape[dim] % self.size:
            raise ValueError(f"{what}: size {x.shape[dim]} of dim {dim} is not divisible by "
                             f"the group size {self.size}")


# ---------------------------------------------------------------------------------------------
# Byte tally (benchmarks): bytes this rank sends, by primitive, using the bandwidth-optimal
# algorithm's volume (ring all-gather sends (n-1) local chunks, reduce-scatter (n-1)/n of its
# input, all-reduce 2(n-1)/n, all-to-all the (n-1)/n of its input that leaves the rank, a ring
# shift the whole tensor). A figure of the algorithm, not of
# a particular backend's implementation, so it is the same on gloo, NCCL and XLA.
# ---------------------------------------------------------------------------------------------
# Active tallies of the process. Process-wide, not per thread or context: autograd runs device
# backward on its own worker threads, where a ContextVar set by the caller is not visible.
_ACTIVE: List["ByteTally"] = []
_LOCK = threading.Lock()


class ByteTally:
    """Bytes sent per primitive and call counts, filled while ``count_bytes()`` is active."""

    def __init__(self) -> None:
        self.bytes: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def add(self, primitive: str, nbytes: int) -> None:
        """Add one call (the caller holds the tally lock)."""
        self.bytes[primitive] += int(nbytes)
        self.calls[primitive] += 1


@contextlib.contextmanager
def count_bytes() -> Iterator[ByteTally]:
    """Tally the bytes every transport call of this process sends while the block runs, on any
    thread (autograd's backward worker threads included). Nested or concurrent blocks each
    count every call made while they are active."""
    tally = ByteTally()
    with _LOCK:
        _ACTIVE.append(tally)
    try:
        yield tally
    finally:
        with _LOCK:
            _ACTIVE.remove(tally)


def record(primitive: str, x: torch.Tensor, n: int) -> None:
    """Record the bytes one rank sends for ``primitive`` on tensor ``x`` in a group of ``n``."""
    if not _ACTIVE or n == 1:
        return
    nbytes = x.numel() * x.element_size()
    factor = {"all_gather": n - 1, "reduce_scatter": (n - 1) / n, "all_reduce": 2 * (n - 1) / n,
              "all_to_all": (n - 1) / n, "ring_shift": 1}[primitive]
    with _LOCK:
        for tally in _ACTIVE:
            tally.add(primitive, round(nbytes * factor))
