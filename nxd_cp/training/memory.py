"""Bytes that autograd keeps for backward: the activation memory figure of a training step.

``count_saved_bytes()`` is the memory counterpart of ``nxd_cp.count_bytes()``: a context
manager whose tally holds the bytes of every tensor saved for backward while the block runs.
A storage is counted once, whole (a saved view keeps its whole base alive; two saved views of
one storage cost it once); the storages of ``exclude`` (parameters: not activations) are not
counted. Tensors without a storage (XLA) are counted by their own size.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Sequence

import torch


class SavedBytesTally:
    """Bytes saved for backward, filled while ``count_saved_bytes()`` is active."""

    def __init__(self, exclude: Sequence[torch.Tensor] = ()):
        self._exclude = {_storage_key(p)[0] for p in exclude}
        self._sizes: Dict[object, int] = {}

    @property
    def total(self) -> int:
        return sum(self._sizes.values())

    def add(self, t: torch.Tensor) -> None:
        key, nbytes = _storage_key(t)
        if key not in self._exclude:
            self._sizes[key] = nbytes


def _storage_key(t: torch.Tensor):
    """(identity, bytes) of the memory ``t`` keeps alive."""
    try:
        storage = t.untyped_storage()
        return ("storage", storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # no storage, e.g. XLA tensors
        return ("tensor", id(t)), t.numel() * t.element_size()


@contextlib.contextmanager
def count_saved_bytes(exclude: Sequence[torch.Tensor] = ()) -> Iterator[SavedBytesTally]:
    """Tally what autograd saves for backward in the block; ``exclude``: e.g. parameters."""
    tally = SavedBytesTally(exclude)

    def pack(t: torch.Tensor) -> torch.Tensor:
        tally.add(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield tally
