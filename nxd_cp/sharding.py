"""Alias of ``nxd_cp.sequence.layout``, kept at this documented path: import from either."""
from nxd_cp.sequence.layout import *  # noqa: F401,F403
