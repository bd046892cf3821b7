"""Alias of ``nxd_cp.sequence.packing``, kept at this documented path: import from either."""
from nxd_cp.sequence.packing import *  # noqa: F401,F403
