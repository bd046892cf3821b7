"""Alias of ``nxd_cp.tensor_parallel.sequence_parallel``, kept at this documented path: import from either."""
from nxd_cp.tensor_parallel.sequence_parallel import *  # noqa: F401,F403
