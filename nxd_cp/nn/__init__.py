"""Building blocks for your own model under TP x CP.

* ``ContextParallelAttention``: CP attention as a module (``[B, H, S_local, D]`` in and out).
* ``HeadShared``: a per-head module with parameters shared by all heads (q/k norms) under TP.
* ``register_module`` / ``parallelize``: replace a model's modules by distributed ones you wrote
  (SageMaker's ``tp_register_with_module`` idea); ``nxd_cp.transform`` applies the same
  registrations to Hugging Face models.

The TP layers themselves are ``nxd_cp.layers`` (``ColumnParallelLinear``, ``RowParallelLinear``,
``ParallelEmbedding``, ``ReplicatedKVLinear``).
"""
from nxd_cp.nn.attention import ContextParallelAttention
from nxd_cp.nn.registry import (
                                ModuleRegistration,
                                parallelize,
                                register_module,
                                registered_modules,
                                unregister_module,
)
from nxd_cp.tensor_parallel.head_shared import HeadShared

__all__ = ["ContextParallelAttention", "HeadShared", "register_module", "unregister_module",
           "registered_modules", "ModuleRegistration", "parallelize"]
