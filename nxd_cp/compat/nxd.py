"""NeuronX Distributed (NxD) and torch-neuronx, behind one door.

Tested on NxD 0.18.0 (Neuron SDK 2.28, ``SUPPORTED``), whose source runs here on gloo in its
CPU mode. Every import of ``neuronx_distributed`` / ``torch_neuronx`` in nxd_cp is in this
module; each is optional: without NxD the functions return None (and ``import_error`` says
why), and nxd_cp runs its own fallback.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Optional, Tuple

SUPPORTED = ("0.18",)  # NxD versions (major.minor) tested
_LAYERS = "neuronx_distributed.parallel_layers.layers"


@functools.lru_cache(maxsize=None)
def _parallel_state() -> Tuple[Optional[Any], str]:
    """(NxD's parallel_state module with CP, or None; why not). PyPI's
    ``neuronx-distributed`` is a placeholder that raises on import, hence the broad except."""
    try:
        from neuronx_distributed.parallel_layers import parallel_state as nps
    except Exception as e:  # noqa: BLE001
        return None, f"NeuronX Distributed is not importable ({type(e).__name__}: {e})"
    if not hasattr(nps, "get_context_model_parallel_group"):
        return None, ("NeuronX Distributed is importable but has no context parallelism "
                      f"(get_context_model_parallel_group); nxd_cp is tested on {SUPPORTED}")
    return nps, "NeuronX Distributed with context parallelism is importable"


def parallel_state_module() -> Optional[Any]:
    """NxD's ``parallel_layers.parallel_state`` when a real NxD with CP is importable."""
    return _parallel_state()[0]


def import_error() -> str:
    """Why ``parallel_state_module()`` is None (or that it is not)."""
    return _parallel_state()[1]


def layer_class(name: str, imported_only: bool = False) -> Optional[type]:
    """NxD's layer class ``name`` (``ColumnParallelLinear``, ``RowParallelLinear``,
    ``ParallelEmbedding``); with ``imported_only`` only if NxD's layers are already imported
    (an ``isinstance`` check must not import NxD). None without NxD."""
    if imported_only:
        module = sys.modules.get(_LAYERS)
        return getattr(module, name, None) if module is not None else None
    if parallel_state_module() is None:
        return None
    from neuronx_distributed.parallel_layers import layers
    return getattr(layers, name)


def parallel_cross_entropy():
    """NxD's ``parallel_layers.loss_functions.parallel_cross_entropy``."""
    from neuronx_distributed.parallel_layers.loss_functions import parallel_cross_entropy as ce
    return ce


def is_nxd_optimizer(obj: Any) -> bool:
    """True for NxD's optimizer wrapper (``trainer.optimizer.NxDOptimizer``) or a subclass,
    without importing NxD."""
    return any(c.__name__ == "NxDOptimizer" for c in type(obj).__mro__)


def nxd_optimizer_config(obj: Any) -> dict:
    """The config dict an ``NxDOptimizer`` was built with (``{}`` if it has none)."""
    return getattr(obj, "nxd_config", None) or {}


def platform_target() -> Optional[str]:
    """torch-neuronx's platform target (NxD's layout depends on it), None off Neuron."""
    try:
        from torch_neuronx.utils import get_platform_target
        return get_platform_target()
    except Exception:  # noqa: BLE001 - absent off Neuron
        return None


def pipeline_model(module: Any, **kwargs: Any) -> Any:
    """NxD's ``NxDPPModel(module, **kwargs)`` built for nxd_cp's pipelined models
    (``pipeline.nxd_engine``): traced and partitioned at construction (``pipeline_cuts`` and
    ``input_names`` given), gradients all-reduced by NxD over DP x CP
    (``use_optimizer_wrapper=False``, no ZeRO-1), the loss returned on the last stage only
    (nxd_cp broadcasts it). Public constructor arguments only.
    """
    from neuronx_distributed.pipeline import NxDPPModel
    return NxDPPModel(module, output_loss_value_spec=True, return_mb_loss=False,
                      broadcast_and_average_loss=False, use_zero1_optimizer=False,
                      use_optimizer_wrapper=False, use_model_wrapper=False,
                      return_loss_on_cpu=False, tracer_cls="torch", **kwargs)
