"""Activation checkpointing that runs on every device: recompute chosen modules in backward.

One entry point: ``nxd_cp.transform(model, config)`` reads NxD's ``activation_checkpoint_config``
from the config (``"full"``: every decoder layer; a module class or a list of them: every
module of those classes) and calls ``checkpoint_modules`` on what it names. A checkpointed
module keeps its class, its name and its state-dict keys (no wrapper module is inserted); its
instance ``forward`` is replaced by one that, in training with grad enabled, runs the class's
forward under

* XLA (an argument on an ``xla`` device): ``torch_xla.utils.checkpoint.checkpoint`` with
  ``use_reentrant=True`` — what NxD's ``checkpoint_wrapper`` uses — through
  ``nxd_cp.compat.torch_xla.checkpoint``: the recompute sits behind an optimization barrier over
  the inputs and the module's parameters, so XLA keeps it apart from the forward;
  ``torch.utils.checkpoint`` itself raises ``module 'torch' has no attribute 'xla'`` there
  (torch 2.9 / torch-xla 2.9);
* anything else (CPU, CUDA): ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``.

Outside training or under ``torch.no_grad()`` the module runs its forward directly. The
reentrant XLA form needs one tensor argument that requires grad (the hidden states do in a
decoder layer); keyword arguments are bound into the recomputed call (they get no gradient
there: masks, positions, rotary tables).
"""
from __future__ import annotations

import functools
import types
from typing import Any, Iterable, List, Sequence

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

from nxd_cp.compat import torch_xla as xla_compat
from nxd_cp.compat import transformers as hf_compat

MARK = "_nxd_cp_checkpointed"


def _on_xla(args: Sequence[Any], kwargs: dict) -> bool:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type == "xla"
    return False


def _class_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return type(module).forward(module, *args, **kwargs)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The instance ``forward`` of a checkpointed module (bound with ``types.MethodType``, so
    ``copy.deepcopy`` rebinds it to the copy)."""
    if not (self.training and torch.is_grad_enabled()):
        return _class_forward(self, *args, **kwargs)
    if _on_xla(args, kwargs):
        bound = types.MethodType(  # a bound method: torch-xla bars the module's weights too
            lambda module, *a: _class_forward(module, *a, **kwargs), self)
        return xla_compat.checkpoint(bound, *args)
    return torch_checkpoint.checkpoint(functools.partial(_class_forward, self), *args,
                                       use_reentrant=False, **kwargs)


def checkpoint_modules(modules: Iterable[nn.Module]) -> int:
    """Recompute each module of ``modules`` in backward (see the module docstring); returns
    how many were newly checkpointed (one already checkpointed is left as it is). Raises
    ``ValueError`` for a module whose instance already has its own ``forward``."""
    count = 0
    for m in modules:
        if getattr(m, MARK, False):
            continue
        if "forward" in vars(m):
            raise ValueError(f"cannot checkpoint {type(m).__name__}: the instance already has its "
                             "own forward attribute (another wrapper)")
        m.forward = types.MethodType(_checkpointed_forward, m)
        setattr(m, MARK, True)
        count += 1
    return count


def checkpointed_modules(model: nn.Module) -> List[str]:
    """Names of the modules of ``model`` that ``checkpoint_modules`` checkpointed."""
    return [name for name, m in model.named_modules() if getattr(m, MARK, False)]


def modules_to_checkpoint(model: nn.Module, value: Any, layers: Sequence[nn.Module]
                          ) -> List[nn.Module]:
    """The modules NxD's ``activation_checkpoint_config`` value names: ``"full"`` -> ``layers``
    (the decoder layers); a module class or a list / tuple of classes -> every module of
    ``model`` that is an instance of one of them. ``ValueError`` for any other value, for a
    class list that matches no module, and where transformers' own gradient checkpointing is on
    too (it would recompute twice)."""
    if hf_compat.own_gradient_checkpointing(model):
        raise ValueError("activation_checkpoint_config is set and transformers' own gradient "
                         "checkpointing is enabled too: call model.gradient_checkpointing_"
                         "disable() (nxd_cp's checkpointing replaces it on every device)")
    if value == "full":
        return list(layers)
    classes = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not classes or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
        raise ValueError(f"activation_checkpoint_config={value!r} is invalid: it must be None, "
                         "'full', a torch.nn.Module subclass or a non-empty list of them")
    found = [m for m in model.modules() if isinstance(m, classes)]
    if not found:
        raise ValueError(f"activation_checkpoint_config={value!r} matches no module of "
                         f"{type(model).__name__}")
    return found


__all__ = ["checkpoint_modules", "checkpointed_modules", "modules_to_checkpoint"]
