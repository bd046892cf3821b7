"""Alias of ``nxd_cp.sequence.batch``, kept at this documented path: import from either."""
from nxd_cp.sequence.batch import *  # noqa: F401,F403
