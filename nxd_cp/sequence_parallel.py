"""Alias kept at this documented path: sequence-parallel wiring
(``nxd_cp.tensor_parallel.sequence_parallel``) and its gradient reduction
(``allreduce_sequence_parallel_gradients``, in ``nxd_cp.training.grads``)."""
from nxd_cp.tensor_parallel.sequence_parallel import *  # noqa: F401,F403
from nxd_cp.training.grads import allreduce_sequence_parallel_gradients  # noqa: F401
