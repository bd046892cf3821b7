"""``HeadShared``: a module applied per attention head, with parameters shared by all heads.

Under TP each rank holds ``H/tp`` heads. A module applied to every head with one set of
parameters (Qwen3's ``q_norm`` / ``k_norm``, RMSNorm over ``head_dim``) stays whole on every TP
rank, but each rank's gradient only covers its own heads: the full gradient is their sum over
TP. ``HeadShared`` runs the wrapped module with its parameters passed through
``copy_to_group`` (identity forward, all-reduce over TP in backward), so every TP rank ends the
backward with the full, identical gradient -- as for the other TP-replicated parameters.

The wrapper registers the wrapped module's own parameters and buffers under the same names
(``q_norm.weight`` stays ``q_norm.weight``): state dicts, ``full_state_dict`` and checkpoints
are unchanged. With replicated KV heads (Hkv < tp) the sum over the whole TP group is still the
right one for ``k_norm``: each rank's K gradient comes only from its own query heads.
"""
from __future__ import annotations

from torch import nn
from torch.func import functional_call

from nxd_cp import parallel_state as ps
from nxd_cp.comm import autograd as cg
from nxd_cp.comm import get_transport


class HeadShared(nn.Module):
    """Wrap ``module`` (a leaf module: no children) so its parameters' gradients are summed over
    the TP group. forward: the module's own forward, same arguments and result."""

    def __init__(self, module: nn.Module, tensor_model_parallel_group=None):
        super().__init__()
        if any(True for _ in module.children()):
            raise ValueError(f"HeadShared(module): {type(module).__name__} has submodules; wrap "
                             f"its leaf modules instead")
        self._tp = ps.resolve_group(tensor_model_parallel_group, kind="tensor")
        self.__dict__["inner"] = module  # not a submodule: parameter names stay the same
        for name, p in module.named_parameters(recurse=False):
            self.register_parameter(name, p)
        persistent = set(module.state_dict(keep_vars=True))
        for name, b in module.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name in persistent)

    def forward(self, *args, **kwargs):
        tensors = dict(self.named_buffers(recurse=False))
        params = dict(self.named_parameters(recurse=False))
        if params and self._tp.size > 1:
            t = get_transport(self._tp, next(iter(params.values())).device)
            params = {n: cg.copy_to_group(p, t) for n, p in params.items()}
        tensors.update(params)
        return functional_call(self.inner, tensors, args, kwargs)

    def extra_repr(self) -> str:
        return f"{self.inner!r}, gradients summed over TP ({self._tp.size} ranks)"

