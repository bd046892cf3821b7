"""Alias of ``nxd_cp.training.memory``, kept at this documented path: import from either."""
from nxd_cp.training.memory import *  # noqa: F401,F403
