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
from typing import Any, Iterable, List, Optional, Sequence

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


def checkpointing_conflict(model: nn.Module, on_xla: bool) -> Optional[str]:
    """What is wrong with the checkpointing of a transformed ``model`` in training, or None:

    * transformers' own gradient checkpointing (``model.gradient_checkpointing_enable()``,
      before or after ``transform``) and nxd_cp's (``activation_checkpoint_config``) both on;
    * a checkpoint wrapper (``_checkpoint_wrapped_module``: torch's ``CheckpointWrapper``, which
      NxD's ``initialize_parallel_model`` inserts for its ``activation_checkpoint_config``)
      together with nxd_cp's or transformers' checkpointing: each layer recomputed twice;
    * transformers' own checkpointing on XLA (``on_xla``): ``torch.utils.checkpoint`` fails
      there (torch 2.9 / torch-xla 2.9). Off XLA it works, and is left alone.

    Host-side (module attributes only, one walk over ``model.modules()``), no collective: every
    rank runs the same script on the same device type, so every rank gets the same answer."""
    ours = own = wrapped = False
    for m in model.modules():  # instance dicts: a missing nn.Module attribute costs an exception
        d = m.__dict__
        ours = ours or d.get(MARK) is True
        own = own or hf_compat.own_gradient_checkpointing_on(m)
        wrapped = wrapped or "_checkpoint_wrapped_module" in d.get("_modules", ())
    instead = ("set activation_checkpoint_config=\"full\" (or the module classes) in "
               "nxd_cp.neuronx_distributed_config(...) and nxd_cp.transform the model with that "
               "config")
    if wrapped + ours + own >= 2:
        where = [w for w, on in (
            ("a checkpoint wrapper (NxD's initialize_parallel_model with activation_checkpoint_"
             "config)", wrapped), ("nxd_cp.transform (activation_checkpoint_config)", ours),
            ("transformers' model.gradient_checkpointing_enable()", own)) if on]
        fixes = ["call model.gradient_checkpointing_disable()"] if own and (ours or wrapped) \
            else []
        if wrapped and ours:
            fixes.append("give initialize_parallel_model the config with activation_checkpoint_"
                         "config=None ({**config, 'activation_checkpoint_config': None})")
        return (f"activation checkpointing is on twice: {' and '.join(where)}; every layer would "
                f"be recomputed twice. Set it in one place, nxd_cp's activation_checkpoint_config "
                f"(it runs on every device): {'; '.join(fixes)}")
    if own and on_xla:
        return ("transformers' own gradient checkpointing (model.gradient_checkpointing_enable())"
                " is on: on XLA it runs torch.utils.checkpoint, which fails with torch 2.9 / "
                "torch-xla 2.9 (module 'torch' has no attribute 'xla'). Call model.gradient_"
                f"checkpointing_disable() and {instead}")
    return None


__all__ = ["checkpoint_modules", "checkpointed_modules", "checkpointing_conflict",
           "modules_to_checkpoint"]
