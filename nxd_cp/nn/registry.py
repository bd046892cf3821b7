"""``register_module`` / ``parallelize``: swap a model's modules for distributed ones you wrote.

In the spirit of SageMaker model parallelism's ``smp.tp_register_with_module``: register, for
a module class, a replacement class (built from TP layers and ``ContextParallelAttention``) and
hooks that translate between the two; ``parallelize(model)`` (and ``nxd_cp.transform`` for
Hugging Face models) then replaces every instance of exactly that class:

* ``init_hook(original) -> (args, kwargs)``: the replacement's constructor arguments, read
  from the original instance (default: ``replacement_cls(original)``);
* ``forward_hook(*args, **kwargs) -> (args, kwargs)``: the original's forward arguments ->
  the replacement's (default: passed unchanged);
* ``return_hook(output) -> output``: the replacement's result -> what the original's callers
  expect (default: unchanged).

Weights are carried over by name: the replacement must name its parameters and persistent
buffers as the original does; each gets its part of the original's full tensor as laid out by
its layer (TP-split, KV-replicated or whole; ``nxd_cp.tensor_parallel.partition.partition_of``), so
``full_state_dict`` gives back the original's state dict. Replacements are not searched again
(a registered class inside a replacement stays as the replacement built it).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.tensor_parallel.partition import Partition, copy_shard, materialize, partitions


@dataclass(frozen=True)
class ModuleRegistration:
    module_cls: type
    replacement_cls: type
    init_hook: Optional[Callable] = None
    forward_hook: Optional[Callable] = None
    return_hook: Optional[Callable] = None


_REGISTRY: Dict[type, ModuleRegistration] = {}


def _describe(fn) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    try:
        return f"{name}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return name


def _forward_arguments(fn):
    """(placeholders for the required positional parameters, number of positional parameters,
    optional keyword names, has *args, has **kwargs) of a forward (``self`` excluded)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    P = inspect.Parameter
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is P.empty]
    optional = [p.name for p in params if p.default is not P.empty
                and p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)]
    return (tuple(object() for _ in required), len(positional), optional,
            any(p.kind == P.VAR_POSITIONAL for p in params),
            any(p.kind == P.VAR_KEYWORD for p in params))


def _check_accepts(fn, what: str, forward_of: type) -> None:
    """``ValueError`` naming ``what`` unless ``fn`` accepts every argument form of
    ``forward_of.forward`` (required positionals, optional ones given positionally or by
    keyword, *args, **kwargs)."""
    args, n_positional, optional, var_args, var_kw = _forward_arguments(forward_of.forward)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: checked when called
    problem = None
    try:
        sig.bind(*args)
        sig.bind(*[object() for _ in range(n_positional)])
        for name in optional:
            sig.bind(*args, **{name: None})
        if var_args:
            sig.bind(*args, object(), object())
        if var_kw:
            sig.bind(*args, __any_keyword__=None)
    except TypeError as e:
        problem = str(e)
    if problem:
        raise ValueError(
            f"{what} {_describe(fn)} does not accept the forward arguments of "
            f"{forward_of.__name__}.forward{inspect.signature(forward_of.forward)}: {problem}")


def _check_one_argument(fn, what: str, expects: str) -> None:
    try:
        inspect.signature(fn).bind(object())
    except TypeError as e:
        raise ValueError(f"{what} {_describe(fn)} must take one argument ({expects}): "
                         f"{e}") from None
    except ValueError:
        pass


def register_module(module_cls: type, replacement_cls: type, init_hook: Optional[Callable] = None,
                    forward_hook: Optional[Callable] = None,
                    return_hook: Optional[Callable] = None) -> None:
    """Have ``parallelize`` / ``transform`` replace every ``module_cls`` instance (see module
    docstring). Registering a class again replaces its registration. Raises ``ValueError`` for
    a non-module class or a hook whose signature cannot take what it will be given (naming the
    hook and both signatures)."""
    for what, cls in (("module_cls", module_cls), ("replacement_cls", replacement_cls)):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"register_module: {what}={cls!r} must be a torch.nn.Module "
                             f"subclass")
    for what, fn in (("init_hook", init_hook), ("forward_hook", forward_hook),
                     ("return_hook", return_hook)):
        if fn is not None and not callable(fn):
            raise ValueError(f"register_module: {what}={fn!r} must be callable or None")
    checked = replacement_cls
    if init_hook is not None:
        _check_one_argument(init_hook, "init_hook", f"the {module_cls.__name__} instance")
    else:
        _check_one_argument(checked,
                            f"{replacement_cls.__name__}.__init__ (no init_hook given)",
                            f"the {module_cls.__name__} instance")
    if forward_hook is not None:
        _check_accepts(forward_hook, "forward_hook", module_cls)
    else:
        _check_accepts(_unbound(checked.forward),
                       f"{replacement_cls.__name__}.forward (no forward_hook given)", module_cls)
    if return_hook is not None:
        _check_one_argument(return_hook, "return_hook",
                            f"the output of {replacement_cls.__name__}.forward")
    _REGISTRY[module_cls] = ModuleRegistration(module_cls, replacement_cls, init_hook,
                                               forward_hook, return_hook)


def _unbound(forward):
    """``forward`` without its ``self`` parameter (to check it like a hook)."""
    sig = inspect.signature(forward)
    params = list(sig.parameters.values())[1:]

    def f(*args, **kwargs):
        pass
    f.__signature__ = sig.replace(parameters=params)
    f.__qualname__ = forward.__qualname__
    return f


def unregister_module(module_cls: type) -> None:
    """Forget ``module_cls``'s registration (no error when there is none)."""
    _REGISTRY.pop(module_cls, None)


def registered_modules() -> Dict[type, ModuleRegistration]:
    """module class -> its ``ModuleRegistration`` (a copy)."""
    return dict(_REGISTRY)


def _translated_forward(reg: ModuleRegistration):
    def pre_hook(module, args, kwargs):
        out = reg.forward_hook(*args, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], tuple)
                and isinstance(out[1], dict)):
            raise ValueError(f"forward_hook {_describe(reg.forward_hook)} must return "
                             f"(args tuple, kwargs dict), got {type(out).__name__}")
        return out
    return pre_hook


def _build(reg: ModuleRegistration, original: nn.Module, path: str) -> nn.Module:
    if reg.init_hook is None:
        args, kwargs = (original,), {}
    else:
        out = reg.init_hook(original)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], (tuple, list))
                and isinstance(out[1], dict)):
            raise ValueError(f"init_hook {_describe(reg.init_hook)} must return (args tuple, "
                             f"kwargs dict) for {reg.replacement_cls.__name__}, got {out!r}")
        args, kwargs = tuple(out[0]), out[1]
    try:
        inspect.signature(reg.replacement_cls).bind(*args, **kwargs)
    except TypeError as e:
        hook = "init_hook " + _describe(reg.init_hook) if reg.init_hook else "default init"
        raise ValueError(f"{hook} gave arguments that {reg.replacement_cls.__name__}"
                         f"{inspect.signature(reg.replacement_cls)} does not accept (module "
                         f"{path!r}): {e}") from None
    new = reg.replacement_cls(*args, **kwargs)
    _carry_weights(original, new, path)
    if reg.forward_hook is not None:
        new.register_forward_pre_hook(_translated_forward(reg), with_kwargs=True)
    if reg.return_hook is not None:
        new.register_forward_hook(lambda module, args, output: reg.return_hook(output))
    return new


@torch.no_grad()
def _carry_weights(original: nn.Module, new: nn.Module, path: str) -> None:
    """Give ``new`` this rank's part of every tensor of ``original``'s state dict."""
    full = original.state_dict()
    target = new.state_dict(keep_vars=True)
    if sorted(full) != sorted(target):
        raise ValueError(
            f"module {path!r}: {type(new).__name__} has state-dict keys {sorted(target)} but "
            f"{type(original).__name__} has {sorted(full)}; a replacement must name its "
            f"parameters and buffers as the original does (weights are carried over by name)")
    device = next((t.device for t in full.values()), None)
    if any(t.is_meta for t in target.values()):
        materialize(new, device or torch.device("cpu"))
    elif device is not None and any(t.device != device for t in target.values()):
        new.to(device)  # built on the default device: follow the original (CUDA, XLA)
    target = new.state_dict(keep_vars=True)
    parts = partitions(new)
    for name, t in target.items():
        copy_shard(t, parts.get(name, Partition()), full[name],
                   f"module {path!r} ({type(new).__name__}): {name}")


def replace_registered_modules(model: nn.Module) -> List[str]:
    """Replace, in place, every submodule of a registered class; returns the replaced paths."""
    replaced = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = prefix + name
            reg = _REGISTRY.get(type(child))
            if reg is None:
                visit(child, path + ".")
                continue
            setattr(parent, name, _build(reg, child, path))
            replaced.append(path)

    if type(model) in _REGISTRY:
        raise ValueError(f"parallelize(model): the model's own class {type(model).__name__} is "
                         f"registered; register its submodules' classes instead")
    visit(model, "")
    return replaced


def parallelize(model: nn.Module) -> nn.Module:
    """Replace every instance of a registered module class in ``model`` (in place); returns it.

    For models that are not Hugging Face families (``nxd_cp.transform`` does the same for
    those). Call after ``parallel_state.initialize_model_parallel`` on every rank, with the same
    full weights on every rank. Raises ``RuntimeError`` when parallel state is not initialised,
    ``ValueError`` when nothing is registered for any of its modules.
    """
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("call nxd_cp.parallel_state.initialize_model_parallel(...) before "
                           "nxd_cp.parallelize(model)")
    if not replace_registered_modules(model):
        raise ValueError(f"parallelize: no module of {type(model).__name__} has a registered "
                         f"class (registered: {[c.__name__ for c in _REGISTRY]}); call "
                         f"nxd_cp.register_module(module_cls, replacement_cls, ...) first")
    return model
