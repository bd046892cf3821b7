"""Alias of ``nxd_cp.tensor_parallel``'s layers, kept at this documented path: nxd_cp's TP
layers (``ColumnParallelLinear``, ``RowParallelLinear``, ``ParallelEmbedding``,
``ReplicatedKVLinear``), the factory that picks NxD's or these (``tensor_parallel_layers``) and
the vocab-parallel cross entropy."""
from nxd_cp.tensor_parallel.cross_entropy import (fallback_parallel_cross_entropy,
                                                  parallel_cross_entropy)
from nxd_cp.tensor_parallel.factory import (TPLayers, is_column_parallel, is_parallel_embedding,
                                            is_row_parallel, tensor_parallel_layers)
from nxd_cp.tensor_parallel.kv_replication import ReplicatedKVLinear
from nxd_cp.tensor_parallel.layers import (ColumnParallelLinear, FallbackColumnParallelLinear,
                                           FallbackParallelEmbedding, FallbackRowParallelLinear,
                                           ParallelEmbedding, RowParallelLinear)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "ParallelEmbedding",
           "FallbackColumnParallelLinear", "FallbackRowParallelLinear",
           "FallbackParallelEmbedding", "ReplicatedKVLinear", "TPLayers",
           "tensor_parallel_layers", "is_column_parallel", "is_row_parallel",
           "is_parallel_embedding", "parallel_cross_entropy", "fallback_parallel_cross_entropy"]
