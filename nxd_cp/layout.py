"""Alias of ``nxd_cp.topology.layout``, kept at this documented path: import from either."""
from nxd_cp.topology.layout import *  # noqa: F401,F403
