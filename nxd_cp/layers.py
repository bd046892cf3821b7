"""Alias of ``nxd_cp.tensor_parallel.layers``, kept at this documented path: import from either."""
from nxd_cp.tensor_parallel.layers import *  # noqa: F401,F403
