"""The context-parallel config: how K/V travel and how the sequence is laid out over CP ranks.

A job has one ``ContextParallelConfig``, given once: ``neuronx_distributed_config(...,
context_parallel_config={...})`` validates it and makes it the *active* config of parallel
state (with the job's ``sequence_parallel`` flag). Everything that depends on it reads that one
value when it runs, so the data and the model cannot disagree on the layout:

| reader                                         | reads                                  |
|------------------------------------------------|----------------------------------------|
| ``get_batch_on_this_context_parallel_rank``    | ``load_balance`` (how the batch is cut) |
| a model from ``transform``, ``ContextParallelAttention`` | ``comm_type``, ``load_balance`` |
| ``context_parallel_attention`` (arguments None) | ``comm_type``, ``load_balance``        |

``COMM_TYPES`` and ``LOAD_BALANCES`` are defined here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from nxd_cp import parallel_state as ps
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
    returns (or NxD's own, which has none: defaults), its ``"context_parallel_config"`` dict, a
    ``ContextParallelConfig``, or None (the active one)."""
    if config is None:
        return get_context_parallel_config()
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


def get_context_parallel_config() -> ContextParallelConfig:
    """The active CP config: the one of the last ``neuronx_distributed_config`` call, or the
    defaults (``p2p``, ``zigzag``) when parallel state was initialised without it."""
    cfg = ps.get_training_config()
    return cfg.context_parallel_config if cfg is not None else ContextParallelConfig()


def sequence_parallel_enabled() -> bool:
    """The active config's ``sequence_parallel`` flag (False without a config)."""
    cfg = ps.get_training_config()
    return bool(cfg is not None and cfg.sequence_parallel)


def require_active(config: ContextParallelConfig, what: str) -> None:
    """``RuntimeError`` unless ``config`` is the active CP config (``what`` was built with it)."""
    active = get_context_parallel_config()
    if config != active:
        raise RuntimeError(
            f"{what} was built with {config} but the active config is {active}: batches are "
            "sharded with the active one (get_batch_on_this_context_parallel_rank). Call "
            "neuronx_distributed_config(...) with the config of the model, or build it anew")
