"""Stage split (pure functions of their arguments); the settings are ``nxd_subconfigs``'.

NxD's layout puts PP outermost (``arange(world).reshape(pp, dp, cp, tp)``); a stage is one
value of the PP rank. Stage ``s`` of ``pp`` owns the decoder layers
``[s * L // pp, (s + 1) * L // pp)`` of ``L`` (contiguous, sizes differ by at most one, the
later stages getting the extra layer); the first stage also owns the token embedding, the last
the final norm and the lm_head (and with tied embeddings a copy of the embedding weight).
"""
from __future__ import annotations

from typing import Any, Tuple

from torch import nn

from nxd_cp.nxd_subconfigs import PipelineSettings, pipeline_settings  # noqa: F401


def stage_layers(num_layers: int, pp: int, stage: int) -> Tuple[int, int]:
    """``(start, stop)``: the decoder layers of ``stage`` (module docstring); ``ValueError``
    when there are fewer layers than stages."""
    if num_layers < pp:
        raise ValueError(f"num_hidden_layers={num_layers} is less than pipeline_parallel_size="
                         f"{pp}: every pipeline stage needs at least one decoder layer")
    if not 0 <= stage < pp:
        raise ValueError(f"stage={stage} is outside [0, pipeline_parallel_size={pp})")
    return stage * num_layers // pp, (stage + 1) * num_layers // pp


class AbsentModule(nn.Module):
    """Stands in for a module another pipeline stage owns: no parameters, and calling it is an
    error (module names of the stage's own modules, hence state-dict keys, stay the
    Hugging Face ones)."""

    def __init__(self, path: str, stage: int):
        super().__init__()
        self.path, self.stage = path, stage

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.path} belongs to another pipeline stage than this rank's "
                           f"(stage {self.stage}): run a pipelined model with "
                           "model.run_train(**batch)")

    def extra_repr(self) -> str:
        return f"{self.path!r} on another stage"


def is_absent(module: Any) -> bool:
    return isinstance(module, AbsentModule)
