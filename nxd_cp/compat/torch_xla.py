"""torch-xla's private APIs nxd_cp uses, behind one door.

Tested on torch-xla 2.9 (``SUPPORTED``). torch-xla is optional: this module imports it only
when one of its functions is called, never at import (importing nxd_cp does not import
torch_xla). Outside the tested versions each function still tries; a missing private name
becomes a ``RuntimeError`` naming the installed torch-xla version and this module, never an
``AttributeError`` deep in a step.

- the HLO builder of ``comm.xla_loop.while_scan``: ``torch_xla.core.xla_builder``
  (``create_builder``, ``mkop``, ``Op``, ``create_placeholder_tensor`` ...);
- lowering traced tensors to an HLO module: ``_XLAC.lowering.LoweringContext``;
- the device data a traced graph reads: ``_XLAC._get_tensors_xla_device_data_node``, and the
  RNG seed's: ``_XLAC._get_seed_info_id``;
- running a built computation on tensors: ``_XLAC._xla_user_computation``;
- tests and benchmarks: the HLO text of traced tensors (``_XLAC._get_xla_tensors_hlo``), a
  fresh chain of collective tokens (``_XLAC._set_all_reduce_token``), compiling without
  executing (``_XLAC._xla_warm_up_cache``);
- activation checkpointing: ``torch_xla.utils.checkpoint.checkpoint`` (reentrant, what NxD's
  ``checkpoint_wrapper`` uses); compile counts: ``torch_xla.debug.metrics`` (``CompileTime``).
"""
from __future__ import annotations

import importlib
from typing import Any, List, Sequence, Tuple

import torch

SUPPORTED = ("2.9",)  # torch-xla major.minor versions these calls were tested on

# What comm.xla_loop reads from torch_xla.core.xla_builder.
_BUILDER_NAMES = ("create_placeholder_tensor", "computation_from_module_proto",
                  "create_builder", "create_computation", "mkparam", "mkop", "tensor_shape",
                  "Op", "Type")


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"{module} is needed here and not importable: the XLA path needs "
                           "torch-xla (on Trainium: torch-neuronx); install the 'xla' extra "
                           "or use a CPU/CUDA tensor") from e


def version() -> str:
    """The installed torch-xla version (imports torch-xla)."""
    return getattr(_import("torch_xla"), "__version__", "unknown")


def version_note() -> str:
    tested = ", ".join(SUPPORTED)
    return (f"torch-xla {version()} (nxd_cp.compat.torch_xla is tested on torch-xla "
            f"{tested}.x)")


def _missing(what: str, error: Exception) -> RuntimeError:
    return RuntimeError(f"{what} is not available in {version_note()}: {error}")


def _xlac(name: str) -> Any:
    """``torch_xla._XLAC.<name>``."""
    xlac = _import("torch_xla")._XLAC
    try:
        return getattr(xlac, name)
    except AttributeError as e:
        raise _missing(f"torch_xla._XLAC.{name}", e) from e


def xla_model() -> Any:
    """``torch_xla.core.xla_model`` (public: the collectives of ``comm.xla``)."""
    return _import("torch_xla.core.xla_model")


def builder() -> Any:
    """``torch_xla.core.xla_builder``, checked to hold every name ``comm.xla_loop`` uses."""
    xb = _import("torch_xla.core.xla_builder")
    for name in _BUILDER_NAMES:
        if not hasattr(xb, name):
            raise _missing(f"torch_xla.core.xla_builder.{name}", AttributeError(name))
    return xb


def placeholder_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A device-less XLA tensor of ``shape`` / ``dtype`` to trace a computation on."""
    return builder().create_placeholder_tensor(shape, dtype)


def lowering_context(name: str = "") -> Any:
    """A new ``LoweringContext`` (``build(tensors)``, ``hlo()``, ``hlo_text()``,
    ``tensor_parameter_id``, ``parameter_id_tensor_mapping``, ...)."""
    lowering = _xlac("lowering")
    try:
        cls = lowering.LoweringContext
    except AttributeError as e:
        raise _missing("torch_xla._XLAC.lowering.LoweringContext", e) from e
    return cls(name) if name else cls()


def device_data_ids(tensors: Sequence[torch.Tensor]) -> List[int]:
    """The ids of the device data the traced ``tensors`` read."""
    ids, _ = _xlac("_get_tensors_xla_device_data_node")(list(tensors))
    return list(ids)


def seed_info_id() -> int:
    """The id of the device data of the RNG seed (a traced graph reading it draws numbers)."""
    return _xlac("_get_seed_info_id")()


def user_computation(name: str, inputs: Sequence[torch.Tensor], computation: Any
                     ) -> Tuple[torch.Tensor, ...]:
    """The outputs of the built ``computation`` applied to ``inputs`` (lazy XLA tensors)."""
    return _xlac("_xla_user_computation")(name, list(inputs), computation)


def tensors_hlo(tensors: Sequence[torch.Tensor]) -> str:
    """The HLO text of the graph computing the traced ``tensors``."""
    return _xlac("_get_xla_tensors_hlo")(list(tensors))


def reset_collective_token(device: Any) -> None:
    """Start a fresh chain of collective tokens on ``device`` (one graph per rank)."""
    _xlac("_set_all_reduce_token")(str(device), None)


def warm_up_cache(tensors: Sequence[torch.Tensor]) -> None:
    """Compile the graph of ``tensors`` without executing it."""
    _xlac("_xla_warm_up_cache")(list(tensors), [])


def checkpoint(function: Any, *args: Any, preserve_rng_state: bool = True) -> Any:
    """``torch_xla.utils.checkpoint.checkpoint(function, *args, use_reentrant=True)``: recompute
    ``function`` in backward, behind an optimization barrier so XLA cannot merge the recompute
    with the forward (torch's own ``torch.utils.checkpoint`` fails on torch-xla 2.9: ``module
    'torch' has no attribute 'xla'``). Reentrant, as NxD's ``checkpoint_wrapper``: keyword
    arguments must be bound into ``function``; a bound method of a module also puts the module's
    parameters and buffers behind the barrier."""
    ckpt = _import("torch_xla.utils.checkpoint")
    try:
        fn = ckpt.checkpoint
    except AttributeError as e:
        raise _missing("torch_xla.utils.checkpoint.checkpoint", e) from e
    return fn(function, *args, use_reentrant=True, preserve_rng_state=preserve_rng_state)


def compile_count() -> int:
    """How many graphs torch-xla has compiled in this process (the ``CompileTime`` metric's
    sample count; 0 before the first)."""
    data = _import("torch_xla.debug.metrics").metric_data("CompileTime")
    return int(data[0]) if data else 0


def to_host(tensors: List[Any]) -> List[Any]:
    """XLA tensors copied to the CPU in one transfer (``xla_model._maybe_convert_to_cpu``, one
    sync for all of them), instead of one data-dependent read per use."""
    xm = xla_model()
    convert = getattr(xm, "_maybe_convert_to_cpu", None)
    if convert is None:
        return [t.cpu() for t in tensors]
    return list(convert(list(tensors)))


def transfers_from_device() -> int:
    """How many device-to-host transfers torch-xla has made in this process (the
    ``TransferFromDeviceTime`` metric's sample count)."""
    data = _import("torch_xla.debug.metrics").metric_data("TransferFromDeviceTime")
    return int(data[0]) if data else 0
