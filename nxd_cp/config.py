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

COMM_TYPES = ("p2p", "all_gather")
LOAD_BALANCES = ("zigzag", "contiguous", "per_document")


@dataclass(frozen=True)
class ContextParallelConfig:
    """How context-parallel attention exchanges K/V and lays the sequence out over CP ranks."""

    comm_type: str = "p2p"
    """K/V exchange: ``"p2p"`` passes K/V blocks around the CP ring (cp-1 steps, overlappable
    with compute, memory of one extra block); ``"all_gather"`` gathers the whole K/V sequence
    at once (one collective, memory of the full K/V) and reduce-scatters dK/dV."""

    load_balance: str = "zigzag"
    """Sequence layout: ``"zigzag"`` cuts the sequence into 2*cp chunks and gives CP rank r the
    chunks r and 2*cp-1-r, so every rank does the same causal work (sequence length must be
    divisible by 2*cp); ``"contiguous"`` gives rank r the r-th of cp equal chunks (NxD's
    layout; the last rank does most of the causal work); ``"per_document"`` (packed rows) splits
    every document head-tail over the ranks, the balanced layout for packed documents."""

    def __post_init__(self) -> None:
        _check_choice("context_parallel_config['comm_type']", self.comm_type, COMM_TYPES)
        _check_choice("context_parallel_config['load_balance']", self.load_balance,
                      LOAD_BALANCES)

    @classmethod
    def from_dict(cls, config: Optional[Mapping[str, Any]]) -> "ContextParallelConfig":
        """Build from a ``context_parallel_config`` dict (None: defaults; unknown keys raise)."""
        return cls(**_fields_from_dict(cls, "context_parallel_config", config))

    def to_dict(self) -> dict:
        return _shallow_dict(self)


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
