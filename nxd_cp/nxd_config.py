"""``neuronx_distributed_config(...)``: NxD's training config, with context parallelism.

Same signature and returned dict as NxD's
``neuronx_distributed.trainer.neuronx_distributed_config`` (so NxD's
``initialize_parallel_model`` / ``initialize_parallel_optimizer`` accept the dict when NxD is
installed), plus ``context_parallel_config`` (``comm_type``, ``load_balance``), which the
returned dict carries under the key ``"context_parallel_config"``.

Differences from NxD, on purpose:

- Everything is validated up front and every error names the key, its value and the rule.
  Unknown keys of the dict configs this module interprets (``context_parallel_config``,
  ``optimizer_config``, ``mixed_precision_config``, ``model_init_config``) are a ``ValueError``
  instead of being ignored; missing keys get NxD's defaults, without NxD's warnings.
- The caller's dicts are copied, never updated in place.
- Parallel state is initialised through ``nxd_cp.parallel_state`` (which delegates to NxD when
  NxD is in charge), and the validated config becomes parallel state's *active* config
  (``nxd_cp.config``): the data function, the attention and ``transform`` read it. Calling again
  with the same sizes replaces the active config; different sizes are an error.
- Pipeline parallelism runs on both paths: NxD's ``NxDPPModel`` when NxD is in charge,
  ``torch.distributed.pipelining`` on the fallback (``pipeline_config``: ``num_microbatches``,
  ``schedule``; ``nxd_cp.pipeline``).
- Features that need NxD's wrappers (LoRA, head padding, meta-device init) raise
  ``NotImplementedError`` on the torch.distributed fallback instead of being silently
  dropped. ``expert_parallel_size > 1`` and ``lnc_size != 1`` are refused everywhere for
  now: ``nxd_cp.parallel_state`` does not forward them to NxD.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional

import torch.distributed as dist

from nxd_cp import parallel_state
from nxd_cp.config import ContextParallelConfig, check_a2a_size
from nxd_cp.topology import subgroups
from nxd_cp.nxd_subconfigs import (  # noqa: F401
    MixedPrecisionConfig,
    ModelInitConfig,
    OptimizerConfig,
    _check_activation_checkpoint,
    _check_bool,
    _check_positive_int,
    _fields_from_dict,
    _shallow_dict,
    pipeline_settings,
)

logger = logging.getLogger(__name__)

# The keys of NxD's returned config dict, in NxD's order.
NXD_CONFIG_KEYS = (
    "tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size",
    "context_parallel_size", "pipeline_config", "optimizer_config",
    "activation_checkpoint_config", "pad_model", "sequence_parallel", "model_init_config",
    "lora_config", "mixed_precision_config", "lnc_size",
)


# --- the whole config ------------------------------------------------------------------------
@dataclass(frozen=True)
class NeuronxDistributedConfig:
    """The validated training config; ``to_dict()`` gives NxD's config dict (plus CP)."""

    tensor_parallel_size: int = 1
    """TP degree: ranks that split each layer's weights (contiguous ranks)."""

    pipeline_parallel_size: int = 1
    """PP degree: ranks that split the layers into stages (NxD only)."""

    expert_parallel_size: int = 1
    """EP degree for MoE experts (NxD only; not forwarded by nxd_cp yet)."""

    context_parallel_size: int = 1
    """CP degree: ranks that split each sequence (ranks TP apart)."""

    pipeline_config: Optional[Dict[str, Any]] = None
    """Keyword arguments of NxD's ``NxDPPModel``; required (a dict) when PP > 1."""

    optimizer_config: OptimizerConfig = field(default_factory=OptimizerConfig)
    """See ``OptimizerConfig``."""

    activation_checkpoint_config: Any = None
    """None, ``"full"`` or the module class(es) whose forward is recomputed in backward."""

    pad_model: bool = False
    """Pad attention heads up to a multiple of TP (NxD only)."""

    sequence_parallel: bool = False
    """Megatron-style sequence parallelism inside TP regions (NxD only)."""

    model_init_config: ModelInitConfig = field(default_factory=ModelInitConfig)
    """See ``ModelInitConfig``."""

    lora_config: Any = None
    """An NxD ``LoraConfig`` to wrap the model with LoRA adapters (NxD only)."""

    mixed_precision_config: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    """See ``MixedPrecisionConfig``."""

    lnc_size: int = 1
    """Logical NeuronCore size (1 on trn1; nxd_cp supports only 1 for now)."""

    context_parallel_config: ContextParallelConfig = field(
        default_factory=ContextParallelConfig)
    """See ``ContextParallelConfig``."""

    def __post_init__(self) -> None:
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size",
                    "context_parallel_size", "lnc_size"):
            _check_positive_int(key, getattr(self, key))
        _check_bool("pad_model", self.pad_model)
        _check_bool("sequence_parallel", self.sequence_parallel)
        _check_activation_checkpoint(self.activation_checkpoint_config)
        if self.pipeline_config is not None and not isinstance(self.pipeline_config, Mapping):
            raise ValueError(f"pipeline_config={self.pipeline_config!r} is invalid: it must be "
                             "a dict or None")
        if self.pipeline_parallel_size > 1 and self.pipeline_config is None:
            raise ValueError(f"pipeline_config=None is invalid with pipeline_parallel_size="
                             f"{self.pipeline_parallel_size}: NxD needs a dict of NxDPPModel "
                             "arguments when pipeline_parallel_size > 1")
        self._check_mixed_precision()

    def _check_mixed_precision(self) -> None:
        if self.optimizer_config.zero_one_enabled:
            return
        for f in fields(self.mixed_precision_config):
            if getattr(self.mixed_precision_config, f.name):
                raise ValueError(f"mixed_precision_config['{f.name}']=True is invalid with "
                                 "optimizer_config['zero_one_enabled']=False: it needs the "
                                 "ZeRO-1 optimizer")

    @property
    def model_parallel_size(self) -> int:
        """tp * cp * pp: the ranks of one data-parallel replica."""
        return self.tensor_parallel_size * self.context_parallel_size * self.pipeline_parallel_size

    def to_dict(self) -> Dict[str, Any]:
        """NxD's config dict (same keys, NxD's order) plus ``"context_parallel_config"``.

        Sub-configs become plain dicts; ``pipeline_config`` is a copy (NxD updates it in
        place), ``lora_config`` and ``activation_checkpoint_config`` are passed as given.
        """
        out = {key: getattr(self, key) for key in NXD_CONFIG_KEYS}
        for key in ("optimizer_config", "model_init_config", "mixed_precision_config"):
            out[key] = _shallow_dict(out[key])
        if self.pipeline_config is not None:
            out["pipeline_config"] = dict(self.pipeline_config)
        out["context_parallel_config"] = _shallow_dict(self.context_parallel_config)
        return out


# --- environment checks ----------------------------------------------------------------------
def _check_supported(cfg: NeuronxDistributedConfig, with_nxd: bool) -> None:
    """NotImplementedError for what nxd_cp cannot run in this environment."""
    # nxd_cp.parallel_state.initialize_model_parallel forwards only tp, pp and cp to NxD.
    if cfg.expert_parallel_size > 1:
        raise NotImplementedError(
            f"expert_parallel_size={cfg.expert_parallel_size} is not supported: nxd_cp's "
            "parallel state does not build expert-parallel groups (use 1)")
    if cfg.lnc_size != 1:
        raise NotImplementedError(
            f"lnc_size={cfg.lnc_size} is not supported: nxd_cp's parallel state lays ranks out "
            "for lnc_size=1 (trn1) only")
    if with_nxd:
        return
    if cfg.pipeline_parallel_size > 1:
        pipeline_settings(cfg.pipeline_config)  # ValueError naming the key, up front
    needs_nxd = (  # (key, value, refused when, rule on the fallback)
        ("pad_model", cfg.pad_model, cfg.pad_model, "must be False"),
        ("lora_config", cfg.lora_config, cfg.lora_config is not None, "must be None"),
        # activation_checkpoint_config runs everywhere: nxd_cp.transform applies it.
        # ZeRO-1 runs on the fallback: nxd_cp.initialize_parallel_optimizer shards it over DP x CP
        # (torch's ZeroRedundancyOptimizer).
        ("model_init_config['meta_device_init']", cfg.model_init_config.meta_device_init,
         cfg.model_init_config.meta_device_init, "must be False"),
    )
    for key, value, refused, rule in needs_nxd:
        if refused:
            raise NotImplementedError(
                f"{key}={value!r} needs NeuronX Distributed, which is not installed: on the "
                f"torch.distributed fallback {key} {rule}")


def _check_world(cfg: NeuronxDistributedConfig) -> None:
    world = dist.get_world_size()
    if world % cfg.model_parallel_size:
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel_size("
            f"{cfg.tensor_parallel_size}) * context_parallel_size({cfg.context_parallel_size}) "
            f"* pipeline_parallel_size({cfg.pipeline_parallel_size}) = "
            f"{cfg.model_parallel_size}")


def _initialize_parallel_state(cfg: NeuronxDistributedConfig) -> None:
    """Initialise parallel state, or check that the existing one has the same sizes."""
    want = (cfg.tensor_parallel_size, cfg.context_parallel_size, cfg.pipeline_parallel_size)
    if parallel_state.model_parallel_is_initialized():
        lay = parallel_state.get_layout()
        have = (lay.tp, lay.cp, lay.pp)
        if have != want:
            raise RuntimeError(
                "model parallel state is already initialized with tensor_parallel_size="
                f"{have[0]}, context_parallel_size={have[1]}, pipeline_parallel_size={have[2]}; "
                f"this config asks for tensor_parallel_size={want[0]}, context_parallel_size="
                f"{want[1]}, pipeline_parallel_size={want[2]}: call "
                "nxd_cp.parallel_state.destroy_model_parallel() first")
        return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=want[0],
                                             pipeline_model_parallel_size=want[2],
                                             context_parallel_size=want[1])


# --- the public entry point ------------------------------------------------------------------
def build_config(
    tensor_parallel_size=1, pipeline_parallel_size=1, expert_parallel_size=1,
    context_parallel_size=1, pipeline_config=None, optimizer_config=None,
    activation_checkpoint_config=None, pad_model=False, sequence_parallel=False,
    model_init_config=None, lora_config=None, mixed_precision_config=None,
    sequential_move_factor=11, lnc_size=1, context_parallel_config=None,
) -> NeuronxDistributedConfig:
    """Validate the arguments of ``neuronx_distributed_config`` into the dataclass, filling
    NxD's defaults; touches no process state."""
    optim = OptimizerConfig(**_fields_from_dict(OptimizerConfig, "optimizer_config",
                                                optimizer_config))
    # NxD's defaults: every mixed-precision option follows ZeRO-1, and model_init_config's
    # sequential_move_factor follows the top-level argument.
    zero1 = optim.zero_one_enabled
    mixed = MixedPrecisionConfig(**_fields_from_dict(
        MixedPrecisionConfig, "mixed_precision_config", mixed_precision_config,
        {"use_master_weights": zero1, "use_fp32_grad_acc": zero1}))
    _check_positive_int("sequential_move_factor", sequential_move_factor)
    init = ModelInitConfig(**_fields_from_dict(
        ModelInitConfig, "model_init_config", model_init_config,
        {"sequential_move_factor": sequential_move_factor}))
    return NeuronxDistributedConfig(
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        expert_parallel_size=expert_parallel_size,
        context_parallel_size=context_parallel_size,
        pipeline_config=copy.copy(pipeline_config),
        optimizer_config=optim,
        activation_checkpoint_config=activation_checkpoint_config,
        pad_model=pad_model,
        sequence_parallel=sequence_parallel,
        model_init_config=init,
        lora_config=lora_config,
        mixed_precision_config=mixed,
        lnc_size=lnc_size,
        context_parallel_config=ContextParallelConfig.from_dict(context_parallel_config),
    )


def neuronx_distributed_config(
    tensor_parallel_size=1, pipeline_parallel_size=1, expert_parallel_size=1,
    context_parallel_size=1, pipeline_config=None, optimizer_config=None,
    activation_checkpoint_config=None, pad_model=False, sequence_parallel=False,
    model_init_config=None, lora_config=None, mixed_precision_config=None,
    sequential_move_factor=11, lnc_size=1, context_parallel_config=None,
) -> Dict[str, Any]:
    """NxD's ``neuronx_distributed_config`` with context parallelism; returns NxD's config dict.

    Arguments are NxD's (same names, defaults and meaning; see ``NeuronxDistributedConfig``)
    plus ``context_parallel_config``, a dict with ``comm_type`` (``"p2p"`` | ``"all_gather"`` |
    ``"a2a"`` | ``"a2a+p2p"``, default ``"p2p"``), ``load_balance`` (``"zigzag"`` |
    ``"contiguous"`` | ``"per_document"``, default ``"zigzag"``) and ``a2a_size`` (``"a2a+p2p"``
    only: the all-to-all group size, dividing cp; its sub-groups are created here).

    When torch.distributed is initialised, checks that the world size is divisible by
    tp * cp * pp, initialises ``nxd_cp.parallel_state`` (NxD's too, when installed) unless it
    already is with the same sizes, and makes this config the active one
    (``parallel_state.get_context_parallel_config()``: ``transform`` and
    ``ContextParallelAttention`` bind it when they build, the batch function shards with it by
    default). When it is not initialised, process state is left alone, as NxD does.

    Returns a dict with NxD's keys (``tensor_parallel_size``, ..., ``context_parallel_size``,
    ..., ``lnc_size``) plus ``"context_parallel_config"``: ``{"comm_type", "load_balance",
    "a2a_size"}``.

    Raises ``ValueError`` for an invalid value or unknown key (the message names the key, the
    value and the rule), ``NotImplementedError`` for a feature nxd_cp cannot run here, and
    ``RuntimeError`` when parallel state exists with different sizes.
    """
    # locals() holds exactly the arguments at this point: they go to build_config unchanged.
    cfg = build_config(**locals())
    _check_supported(cfg, parallel_state.nxd_in_charge())
    result = cfg.to_dict()
    if dist.is_available() and dist.is_initialized():
        _check_world(cfg)
        _initialize_parallel_state(cfg)
        _build_context_subgroups(cfg)
        previous = parallel_state.get_training_config()
        parallel_state.set_training_config(cfg)
        if dist.get_rank() == 0 and previous != cfg:
            logger.info("nxd_cp config%s: %s", " (replaces the previous one)" if previous
                        else "", result)
        _warn_unapplied_clipping(cfg)
    return result


def _build_context_subgroups(cfg: NeuronxDistributedConfig) -> None:
    """``a2a+p2p``: check ``a2a_size`` against cp and create the sub-groups now, on every rank
    at once (``topology.subgroups``: a collective of the whole world, which the first attention
    call of a pipelined model could not be)."""
    cp_cfg = cfg.context_parallel_config
    check_a2a_size(cp_cfg.comm_type, cp_cfg.a2a_size, cfg.context_parallel_size)
    if cp_cfg.comm_type == "a2a+p2p" and cfg.context_parallel_size > 1:
        subgroups.context_subgroups(parallel_state.get_group_spec("context"), cp_cfg.a2a_size)


def _warn_unapplied_clipping(cfg: NeuronxDistributedConfig) -> None:
    """``optimizer_config['grad_clipping']`` is applied by NxD's optimizer wrapper; on the
    fallback nothing applies it: say so (once, rank 0) rather than silently not clip."""
    if (cfg.optimizer_config.grad_clipping and not parallel_state.nxd_in_charge()
            and dist.get_rank() == 0 and not _WARNED_CLIPPING):
        _WARNED_CLIPPING.append(True)
        logger.warning(
            "nxd_cp: optimizer_config['grad_clipping']=True (max_grad_norm=%s, NxD's default) "
            "is applied by NxD's optimizer wrapper, which is not in charge here: on the "
            "torch.distributed fallback only nxd_cp.initialize_parallel_optimizer's step applies "
            "it. With another optimizer, call nxd_cp.clip_grad_norm(model, max_norm) after the "
            "gradient reduction, or pass optimizer_config={'grad_clipping': False} to silence "
            "this",
            cfg.optimizer_config.max_grad_norm)


_WARNED_CLIPPING: list = []
