"""RoPE under context parallelism: every rank uses the frequencies of the *global* sequence.

transformers (4.57) ships six ``rope_type`` values. Four compute their inverse frequencies once,
from the config: ``default``, ``linear``, ``yarn``, ``llama3``; they are exact under CP as they
are (each rank applies them at its tokens' global ``position_ids``). Two recompute them in every
forward from the batch (``dynamic_rope_update``): ``dynamic`` (NTK base grown from
``max(position_ids) + 1`` once it exceeds ``max_position_embeddings``, reset below it) and
``longrope`` (long or short factors depending on ``max(position_ids) + 1`` against
``original_max_position_embeddings``). Under CP each rank sees only its shard, so its maximum
position differs from the full sequence's and its frequencies (hence loss and gradients) were
silently wrong.

``GlobalLengthRotary`` wraps such a rotary module: it all-gathers the ranks' maximum position over
the CP group (one scalar per forward; only for these two types) and calls the unmodified module
on the rank's ``position_ids`` with that global maximum appended as one extra position, whose
cos / sin it drops. transformers' own update code then sees exactly the maximum the unmodified
model sees on the full batch, for any layout and any ``position_ids``.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.comm import get_transport
from nxd_cp.compat import transformers as hf_compat
from nxd_cp.tensor_parallel.partition import set_path

STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3")
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")


def depends_on_length(rope_type: str) -> bool:
    """True when transformers recomputes this type's frequencies from each batch's positions
    (the rule of ``transformers.modeling_rope_utils.dynamic_rope_update``)."""
    return hf_compat.rope_depends_on_length(rope_type)


class GlobalLengthRotary(nn.Module):
    """A length-dependent rotary module evaluated with the CP group's maximum position.

    forward(x, position_ids [B, S_local] global positions) -> (cos, sin) ``[B, S_local, D_rot]``,
    equal to what the unwrapped module gives these positions inside the full-sequence batch.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def rope_type(self) -> str:
        return self.inner.rope_type

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        spec = ps.get_group_spec("context")
        if spec.size == 1:
            return self.inner(x, position_ids)
        local_max = position_ids.max().reshape(1)
        global_max = get_transport(spec, local_max.device).all_gather(local_max, 0).max()
        extended = torch.cat([position_ids, global_max.expand(position_ids.shape[0], 1)], dim=1)
        cos, sin = self.inner(x, extended)
        return cos[:, :-1], sin[:, :-1]


def wrap_length_dependent(model: nn.Module) -> List[str]:
    """Wrap every rotary module of ``model`` whose frequencies depend on the batch's length;
    returns their paths (empty for the static types)."""
    wrapped = []
    for name, m in hf_compat.rotary_modules(model):
        rope_type = hf_compat.rope_type(m)
        if rope_type is not None and depends_on_length(rope_type):
            set_path(model, name, GlobalLengthRotary(m))
            wrapped.append(name)
    return wrapped
