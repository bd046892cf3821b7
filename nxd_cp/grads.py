"""Alias of ``nxd_cp.training.grads``, kept at this documented path: import from either."""
from nxd_cp.training.grads import *  # noqa: F401,F403
