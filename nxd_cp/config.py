"""The context-parallel config: how K/V travel and how the sequence is laid out over CP ranks.

Pure data and its validation (no process state). A job gives it once, to
``neuronx_distributed_config(..., context_parallel_config={...})``, which makes it the *active*
config (``parallel_state.get_context_parallel_config()``); ``transform`` and
``ContextParallelAttention`` bind it into the model when they build it, and the batch function
shards with the model's config or, by default, the active one. ``COMM_TYPES`` and
``LOAD_BALANCES`` are defined here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from nxd_cp.nxd_subconfigs import _check_choice, _fields_from_dict, _shallow_dict

COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")
LOAD_BALANCES = ("zigzag", "contiguous", "per_document")


@dataclass(frozen=True)
class ContextParallelConfig:
    """How context-parallel attention exchanges K/V and lays the sequence out over CP ranks."""

    comm_type: str = "p2p"
    """K/V exchange: ``"p2p"`` passes K/V blocks around the CP ring (cp-1 steps, overlappable
    with compute, memory of one extra block); ``"all_gather"`` gathers the whole K/V sequence
    at once (one collective, memory of the full K/V) and reduce-scatters dK/dV; ``"a2a"``
    (Ulysses) exchanges heads for sequence with all-to-alls (q, k, v in, the output back) and
    attends the whole sequence for ``H/cp`` heads; ``"a2a+p2p"`` does the all-to-all inside
    groups of ``a2a_size`` contiguous CP ranks (a node) and the ring across the groups."""

    load_balance: str = "zigzag"
    """Sequence layout: ``"zigzag"`` cuts the sequence into 2*cp chunks and gives CP rank r the
    chunks r and 2*cp-1-r, so every rank does the same causal work (sequence length must be
    divisible by 2*cp); ``"contiguous"`` gives rank r the r-th of cp equal chunks (NxD's
    layout; the last rank does most of the causal work); ``"per_document"`` (packed rows) splits
    every document head-tail over the ranks, the balanced layout for packed documents."""

    a2a_size: Optional[int] = None
    """``"a2a+p2p"`` only (required there): the size of the all-to-all groups, contiguous CP
    ranks; it must divide ``context_parallel_size`` (1: the ring alone, cp: ``"a2a"``)."""

    def __post_init__(self) -> None:
        _check_choice("context_parallel_config['comm_type']", self.comm_type, COMM_TYPES)
        _check_choice("context_parallel_config['load_balance']", self.load_balance,
                      LOAD_BALANCES)
        check_a2a_size(self.comm_type, self.a2a_size)

    @classmethod
    def from_dict(cls, config: Optional[Mapping[str, Any]]) -> "ContextParallelConfig":
        """Build from a ``context_parallel_config`` dict (None: defaults; unknown keys raise)."""
        return cls(**_fields_from_dict(cls, "context_parallel_config", config))

    def to_dict(self) -> dict:
        return _shallow_dict(self)


def check_a2a_size(comm_type: str, a2a_size: Optional[int], cp: Optional[int] = None) -> None:
    """``ValueError`` unless ``a2a_size`` fits ``comm_type`` (and divides ``cp`` when given)."""
    if comm_type != "a2a+p2p":
        if a2a_size is not None:
            raise ValueError(f"a2a_size={a2a_size!r} is only for comm_type='a2a+p2p' (got "
                             f"comm_type={comm_type!r}): leave it None")
        return
    if isinstance(a2a_size, bool) or not isinstance(a2a_size, int) or a2a_size < 1:
        raise ValueError(f"a2a_size={a2a_size!r} is invalid with comm_type='a2a+p2p': it must "
                         "be an integer >= 1, the size of the all-to-all groups")
    if cp is not None and cp % a2a_size:
        raise ValueError(f"a2a_size={a2a_size} does not divide context_parallel_size={cp}: "
                         "the all-to-all groups split every CP group evenly")


ConfigLike = Union[None, ContextParallelConfig, Mapping[str, Any]]


def context_parallel_config_of(config: ConfigLike) -> ContextParallelConfig:
    """The ``ContextParallelConfig`` a user handed over: the dict ``neuronx_distributed_config``
    returns (or NxD's own, which has none: defaults), its ``"context_parallel_config"`` dict or
    a ``ContextParallelConfig``. (None, "the active config", is resolved by the callers through
    ``parallel_state.get_context_parallel_config()``.)"""
    if isinstance(config, ContextParallelConfig):
        return config
    if isinstance(config, Mapping):
        if "context_parallel_config" in config or "context_parallel_size" in config:
            return ContextParallelConfig.from_dict(config.get("context_parallel_config"))
        return ContextParallelConfig.from_dict(config)
    raise ValueError(f"config={config!r} is invalid: it must be None, a ContextParallelConfig, "
                     "the dict returned by nxd_cp.neuronx_distributed_config or its "
                     "'context_parallel_config' dict (set comm_type / load_balance with "
                     "neuronx_distributed_config(context_parallel_config={...}))")
