"""Alias of ``nxd_cp.training.optim``, kept at this documented path: import from either."""
from nxd_cp.training.optim import *  # noqa: F401,F403
