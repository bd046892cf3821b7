"""Which TP layers a model is built from, decided once: NxD's own or nxd_cp's.

``tensor_parallel_layers(use_nxd=None)`` returns a ``TPLayers`` whose ``ColumnParallelLinear``,
``RowParallelLinear`` and ``ParallelEmbedding`` build NeuronX Distributed's layers when NxD is
in charge (``parallel_state.nxd_in_charge()``, asked once, here) and nxd_cp's otherwise
(``tensor_parallel.layers``); ``transform`` asks it once per model. Built by NxD, a
``ParallelEmbedding`` gets back the ``padding_idx`` NxD drops when it is 0 (NxD tests
``if padding_idx and ...``), so the pad row gets no gradient, as in ``nn.Embedding``.

``is_column_parallel`` / ``is_row_parallel`` / ``is_parallel_embedding`` recognise either
family's layers (without importing NxD).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.compat import nxd as nxd_compat
from nxd_cp.tensor_parallel import layers as own


def _restore_padding_idx(layer: nn.Module, padding_idx: Optional[int]) -> nn.Module:
    """Give NxD's ParallelEmbedding the ``padding_idx`` it drops when it is 0 (local index on
    the TP rank holding that row; NxD's forward passes ``self.padding_idx`` to F.embedding)."""
    if padding_idx is None or getattr(layer, "padding_idx", None) is not None:
        return layer
    if layer.shard_across_embedding:
        layer.padding_idx = padding_idx
    elif layer.start_index <= padding_idx < layer.end_index:
        layer.padding_idx = padding_idx - layer.start_index
    return layer


def _nxd_embedding(cls: type) -> Callable[..., nn.Module]:
    def build(*args, **kwargs) -> nn.Module:
        bound = inspect.signature(cls).bind_partial(*args, **kwargs).arguments
        return _restore_padding_idx(cls(*args, **kwargs), bound.get("padding_idx"))
    return build


@dataclass(frozen=True)
class TPLayers:
    """The layer constructors a model is built from (NxD's signatures in both cases)."""

    use_nxd: bool
    ColumnParallelLinear: Callable[..., nn.Module]
    RowParallelLinear: Callable[..., nn.Module]
    ParallelEmbedding: Callable[..., nn.Module]


def tensor_parallel_layers(use_nxd: Optional[bool] = None) -> TPLayers:
    """NxD's layers if ``use_nxd`` (None: ``parallel_state.nxd_in_charge()``), else nxd_cp's.
    ``RuntimeError`` when NxD's are asked for and NxD is not importable."""
    if use_nxd is None:
        use_nxd = ps.nxd_in_charge()
    if not use_nxd:
        return TPLayers(False, own.ColumnParallelLinear, own.RowParallelLinear,
                        own.ParallelEmbedding)
    classes = [nxd_compat.layer_class(n) for n in
               ("ColumnParallelLinear", "RowParallelLinear", "ParallelEmbedding")]
    if None in classes:
        raise RuntimeError(f"tensor_parallel_layers(use_nxd=True): {nxd_compat.import_error()}")
    column, row, embedding = classes
    return TPLayers(True, column, row, _nxd_embedding(embedding))


def _is(module: nn.Module, name: str) -> bool:
    theirs = nxd_compat.layer_class(name, imported_only=True)
    return isinstance(module, getattr(own, name)) or (
        theirs is not None and isinstance(module, theirs))


def is_column_parallel(module: nn.Module) -> bool:
    return _is(module, "ColumnParallelLinear")


def is_row_parallel(module: nn.Module) -> bool:
    return _is(module, "RowParallelLinear")


def is_parallel_embedding(module: nn.Module) -> bool:
    return _is(module, "ParallelEmbedding")


def is_nxd_layer(module: nn.Module) -> bool:
    """True for a layer of NxD's (not nxd_cp's)."""
    return any(_is(module, n) and not isinstance(module, getattr(own, n))
               for n in ("ColumnParallelLinear", "RowParallelLinear", "ParallelEmbedding"))
