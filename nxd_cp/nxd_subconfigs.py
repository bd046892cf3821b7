"""Validators and NxD's pass-through sub-configs of ``neuronx_distributed_config``.

``OptimizerConfig``, ``MixedPrecisionConfig`` and ``ModelInitConfig`` mirror NxD's dicts of the
same names (validated here, consumed by NxD's wrappers); ``nxd_cp.config`` builds the whole
config from them and holds the CP config itself.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Mapping, Optional

import torch.nn as nn


# --- small validators ------------------------------------------------------------------------
def _shallow_dict(obj) -> Dict[str, Any]:
    """A dataclass as a dict of its field values, uncopied (``asdict`` would deep-copy a
    callable such as ``param_init_fn``)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _check_positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key}={value!r} is invalid: it must be an integer >= 1")


def _check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is invalid: it must be True or False")


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is invalid: it must be one of {list(choices)}")


def _fields_from_dict(cls, name: str, given: Optional[Mapping[str, Any]],
                      defaults: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Keyword arguments for dataclass ``cls`` from the user's dict ``given`` named ``name``.

    ``None`` means all defaults. Unknown keys are a ``ValueError`` listing the known ones;
    ``defaults`` overrides the dataclass defaults for keys the user left out.
    """
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise ValueError(f"{name}={given!r} is invalid: it must be a dict or None")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{name} has unknown key(s) {unknown}: the known keys are {known}")
    kwargs = {k: v for k, v in (defaults or {}).items() if k not in given}
    kwargs.update(given)
    return kwargs



@dataclass(frozen=True)
class OptimizerConfig:
    """NxD's ``optimizer_config``: consumed by NxD's ``initialize_parallel_optimizer``."""

    zero_one_enabled: bool = False
    """Shard optimizer states over DP (NxD's ZeRO-1 optimizer; NxD only)."""

    grad_clipping: bool = True
    """Clip the global gradient norm before the optimizer step."""

    max_grad_norm: float = 1.0
    """The norm gradients are clipped to when ``grad_clipping`` is on; > 0."""

    def __post_init__(self) -> None:
        _check_bool("optimizer_config['zero_one_enabled']", self.zero_one_enabled)
        _check_bool("optimizer_config['grad_clipping']", self.grad_clipping)
        norm = self.max_grad_norm
        if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm > 0:
            raise ValueError(f"optimizer_config['max_grad_norm']={norm!r} is invalid: it must "
                             "be a number > 0")


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """NxD's ``mixed_precision_config``. Every option needs ZeRO-1 (NxD's rule, checked early);
    by default each follows ``optimizer_config['zero_one_enabled']``."""

    use_master_weights: bool = False
    """Keep fp32 master copies of bf16 parameters in the optimizer."""

    use_fp32_grad_acc: bool = False
    """Accumulate gradients in fp32."""

    use_master_weights_in_ckpt: bool = False
    """Save the fp32 master weights in checkpoints."""

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_bool(f"mixed_precision_config['{f.name}']", getattr(self, f.name))


@dataclass(frozen=True)
class ModelInitConfig:
    """NxD's ``model_init_config``: how NxD's ``initialize_parallel_model`` builds the model."""

    sequential_move_factor: int = 11
    """How many processes move their model shard to the device at a time (host memory)."""

    meta_device_init: bool = False
    """Build the model on the meta device, then materialise it with ``param_init_fn`` (NxD
    only)."""

    param_init_fn: Optional[Callable] = None
    """Initialises a module's parameters after meta-device init; required with it."""

    def __post_init__(self) -> None:
        _check_positive_int("model_init_config['sequential_move_factor']",
                            self.sequential_move_factor)
        _check_bool("model_init_config['meta_device_init']", self.meta_device_init)
        if self.param_init_fn is not None and not callable(self.param_init_fn):
            raise ValueError(f"model_init_config['param_init_fn']={self.param_init_fn!r} is "
                             "invalid: it must be callable or None")
        if self.meta_device_init and self.param_init_fn is None:
            raise ValueError("model_init_config['meta_device_init']=True needs "
                             "model_init_config['param_init_fn'] (a callable), got None")


def _check_activation_checkpoint(value: Any) -> None:
    """None, "full", an nn.Module subclass or a list/tuple of them (NxD's accepted forms)."""
    if value is None or value == "full":
        return
    items = value if isinstance(value, (list, tuple)) else [value]
    ok = len(items) > 0 and all(inspect.isclass(c) and issubclass(c, nn.Module) for c in items)
    if not ok:
        raise ValueError(f"activation_checkpoint_config={value!r} is invalid: it must be None, "
                         "'full', a torch.nn.Module subclass or a non-empty list of them")


# --- pipeline_config on the fallback ---------------------------------------------------------
SCHEDULES = ("1F1B", "GPipe")
# NxDPPModel arguments that only steer NxD's tracer / runtime memory: nxd_cp builds the stages
# and their tracing itself (on both paths), so they are accepted without effect (named in
# docs/api.md). The ones that would change what a step computes or reduces (loss spec, ZeRO-1 /
# optimizer wrappers, cuts, interleaving) are set by nxd_cp and refused: a ValueError.
NXD_ONLY_KEYS = frozenset({
    "transformer_layer_cls", "input_names", "leaf_module_cls", "autowrap_functions",
    "autowrap_modules", "autowrap_obj_methods", "tracer_cls", "param_init_fn",
    "trace_file_path", "return_loss_on_cpu", "deallocate_pipeline_outputs", "auto_partition",
    "fuse_microbatches"})


@dataclass(frozen=True)
class PipelineSettings:
    """What the fallback reads from ``pipeline_config``.

    num_microbatches: the batch's rows are cut into this many equal microbatches (dim 0).
    schedule: ``"1F1B"`` (default; NxD's schedule) or ``"GPipe"``. The interleaved schedule
        (NxD's ``virtual_pipeline_size > 1``) is not offered on the fallback.
    """

    num_microbatches: int = 1
    schedule: str = "1F1B"


def pipeline_settings(pipeline_config: Optional[Mapping[str, Any]]) -> PipelineSettings:
    """Validate ``pipeline_config`` for the fallback; ``ValueError`` naming the key and rule."""
    cfg = dict(pipeline_config or {})
    m = cfg.pop("num_microbatches", 1)
    schedule = cfg.pop("schedule", None)
    vpp = cfg.pop("virtual_pipeline_size", 1)
    unknown = sorted(k for k in cfg if k not in NXD_ONLY_KEYS)
    if unknown:
        raise ValueError(f"pipeline_config keys {unknown} are not supported: nxd_cp takes "
                         f"num_microbatches, schedule {SCHEDULES} and NxD's tracer options "
                         "(accepted without effect); the loss, the gradient reduction and the "
                         "stage cuts are nxd_cp's")
    for key, value in (("num_microbatches", m), ("virtual_pipeline_size", vpp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"pipeline_config[{key!r}]={value!r} must be an integer >= 1")
    if vpp != 1:
        raise ValueError(f"pipeline_config['virtual_pipeline_size']={vpp} is not supported: "
                         "each rank holds one contiguous stage (no interleaved schedule); use 1")
    schedule = "1F1B" if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline_config['schedule']={schedule!r} must be one of {SCHEDULES}")
    return PipelineSettings(m, schedule)
