"""Alias of ``nxd_cp.sequence.layout`` (and ``unshard_sequence`` from
``nxd_cp.sequence.unshard``), kept at this documented path."""
from nxd_cp.sequence.layout import *  # noqa: F401,F403
from nxd_cp.sequence.unshard import unshard_sequence  # noqa: F401
