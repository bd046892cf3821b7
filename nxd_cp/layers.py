"""Alias of ``nxd_cp.tensor_parallel``'s layers, kept at this documented path: nxd_cp's TP
layers (``ColumnParallelLinear``, ``RowParallelLinear``, ``ParallelEmbedding``,
``ReplicatedKVLinear``), the factory that picks NxD's or these (``tensor_parallel_layers``) and
the vocab-parallel cross entropy."""
from nxd_cp.tensor_parallel.cross_entropy import (  # noqa: F401
    fallback_parallel_cross_entropy, parallel_cross_entropy)
from nxd_cp.tensor_parallel.factory import (TPLayers, is_column_parallel,  # noqa: F401
                                            is_parallel_embedding, is_row_parallel,
                                            tensor_parallel_layers)
from nxd_cp.tensor_parallel.kv_replication import ReplicatedKVLinear  # noqa: F401
from nxd_cp.tensor_parallel.layers import *  # noqa: F401,F403
