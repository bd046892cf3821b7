"""Alias of ``nxd_cp.training.checkpoint``, kept at this documented path: import from either."""
from nxd_cp.training.checkpoint import *  # noqa: F401,F403
