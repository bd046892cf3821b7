"""Alias of ``nxd_cp.training.loss``, kept at this documented path: import from either."""
from nxd_cp.training.loss import *  # noqa: F401,F403
