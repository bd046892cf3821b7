"""transformers' conventions nxd_cp relies on that are not a documented interface, behind one
door. Tested on transformers 4.57 (``SUPPORTED``).

* a model's rotary modules: class name ends with ``RotaryEmbedding``, built as
  ``cls(config=, device=)``, with a ``rope_type`` attribute and a ``rope_init_fn``;
* length-dependent rope types (``modeling_rope_utils.dynamic_rope_update``): types containing
  ``dynamic``, and ``longrope``;
* transformers' own gradient checkpointing is on: a module with ``gradient_checkpointing=True``
  and a ``_gradient_checkpointing_func`` (``GradientCheckpointingLayer``).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import nn

SUPPORTED = ("4.57",)
_ROTARY_SUFFIX = "RotaryEmbedding"


def version_note() -> str:
    """The installed transformers version and the tested ones (transformers is imported only
    here, when asked: nxd_cp works without it)."""
    import transformers
    return (f"transformers {transformers.__version__} (nxd_cp.compat.transformers is tested on "
            f"{', '.join(SUPPORTED)}.x)")


def rotary_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(path, module)`` of every rotary-embedding module of ``model``."""
    for name, m in list(model.named_modules()):
        if type(m).__name__.endswith(_ROTARY_SUFFIX):
            yield name, m


def rope_type(module: nn.Module) -> Optional[str]:
    """The ``rope_type`` of a rotary module (None where it has none)."""
    value = getattr(module, "rope_type", None)
    return value if isinstance(value, str) else None


def rope_depends_on_length(kind: str) -> bool:
    """True when transformers recomputes this type's frequencies from each batch's positions
    (the rule of ``transformers.modeling_rope_utils.dynamic_rope_update``)."""
    return "dynamic" in kind or kind == "longrope"


def rebuilt_rotary(module: nn.Module, device: torch.device) -> Optional[nn.Module]:
    """A fresh copy of a rotary module on ``device`` (its ``inv_freq`` is a non-persistent
    buffer, absent from state dicts), or None for one that cannot be rebuilt that way."""
    if not hasattr(module, "rope_init_fn") or not hasattr(module, "config"):
        return None
    try:
        return type(module)(config=module.config, device=device)
    except TypeError as e:
        raise RuntimeError(f"cannot rebuild {type(module).__name__} with (config=, device=) in "
                           f"{version_note()}: {e}") from e


def own_gradient_checkpointing(model: nn.Module) -> bool:
    """True when transformers' own gradient checkpointing is on for a module of ``model``
    (``gradient_checkpointing_enable()`` sets ``gradient_checkpointing=True`` on each
    ``GradientCheckpointingLayer`` and routes its ``__call__`` through
    ``_gradient_checkpointing_func``, ``torch.utils.checkpoint`` by default)."""
    return any(own_gradient_checkpointing_on(m) for m in model.modules())


def own_gradient_checkpointing_on(module: nn.Module) -> bool:
    """``own_gradient_checkpointing`` for ``module`` itself (not its children); reads only its
    instance dict (where ``gradient_checkpointing_enable()`` writes), so it costs no
    ``AttributeError`` on modules without the attributes."""
    d = module.__dict__
    return d.get("gradient_checkpointing") is True and "_gradient_checkpointing_func" in d
