"""One training step of a pipelined model on NxD's own ``NxDPPModel`` (NxD in charge).

``attach_nxd`` is the NxD-in-charge counterpart of ``pipeline.engine.PipelineEngine``: same
``run_train(input_ids, labels, position_ids, **stage_inputs)``, same result, but the schedule,
the microbatch split, the stage-to-stage send/recv and the DP x CP gradient reduction are
NxD's ``NxDPPModel`` (``neuronx_distributed.pipeline.model``), traced and partitioned by NxD.

What NxD gets (``PipelineTop``): a tracer-friendly top module over the transformed model's own
modules (shared, not copied), with three leaf-module kinds so that torch.fx never looks inside
transformers' code (``LlamaForCausalLM.forward`` is not fx-traceable):

* ``PipelineEmbed``: token embedding (-> embedding dropout), ``input_ids -> hidden``;
* ``PipelineBlock`` (NxD's ``transformer_layer_cls``): rotary embedding at the batch's global
  ``position_ids`` + one decoder layer, ``(hidden, position_ids, attention_mask, seq_idx) ->
  hidden`` (the rotary is recomputed per layer -- ``[mb, S_local, head_dim]``, cheap -- so
  only the hidden states travel between stages, and the tuple output of GPT-NeoX's layer is
  unwrapped inside the leaf);
* ``PipelineHead``: final norm -> lm_head -> the model's CP loss.

The pipeline cuts are after the last decoder layer of each stage of ``split.stage_layers``
(the fallback's split), where ``keep_stage`` already replaced other stages' modules by
``AbsentModule`` (inside the leaves: traced as calls, never run). NxD itself does not free
non-local modules (it only sets ``requires_grad=False`` on them and relies on meta-device
init), so the pruning is what keeps one stage's weights per rank; the model's parameter names
stay the HF ones and ``full_state_dict`` / ``save_checkpoint`` / ``load_checkpoint`` work as on
the fallback (per stage; NxDPPModel's own ``local_state_dict`` is not used).

The loss and gradient rules (NxD averages microbatch losses; nxd_cp weights tokens):

* ``N``: the batch's target tokens over the CP group (one all-reduce of a scalar).
* Each microbatch's loss given to NxD is ``m * sum_mb / N`` (``sum_mb``: the microbatch's
  token losses summed over CP). NxD backpropagates ``loss / m`` per microbatch, so the summed
  gradients are those of ``sum(sum_mb) / N`` -- the batch's token-weighted loss, whatever the
  padding --, and its reported mean over microbatches is that loss too.
* ``use_optimizer_wrapper=False``: NxDPPModel all-reduces the gradients over its
  expert-data-parallel group (= DP x CP) divided by dp -- the one DP x CP reduction of the
  step; nxd_cp adds only what NxD does not do there: the sequence-parallel parameters' sum over
  TP (``sequence_parallel=True``) and the tied embedding / lm_head sum between the first and
  last stage (the pruned stages hold separate copies, which NxD's shared-weight analysis cannot
  see).
* The loss is broadcast from the last stage over the pipeline group (NxD returns it there).

Schedule: NxD's 1F1B (``pipeline_config['schedule']='GPipe'`` is refused here; the
interleaved schedule would need ``keep_stage`` to keep ``virtual_pipeline_size`` chunks per
rank: not offered). NxDPPModel fixes its input names when it traces, so one is built per set
of present optional inputs (``attention_mask``, ``seq_idx``), on the first step that has that
set (every rank in the same step: building creates process groups).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.compat import nxd as nxd_compat
from nxd_cp.pipeline.engine import PipelineEngine, loss_from_last_stage, sum_tied_gradient
from nxd_cp.pipeline.split import PipelineSettings, stage_layers
from nxd_cp.tensor_parallel.partition import get_path
from nxd_cp.training.grads import reduce_sequence_parallel_once

OPTIONAL_INPUTS = ("attention_mask", "seq_idx")


class PipelineEmbed(nn.Module):
    """Leaf: ``input_ids -> hidden`` (token embedding, then embedding dropout if any)."""

    def __init__(self, embedding: nn.Module, dropout: Optional[nn.Module]):
        super().__init__()
        self.embedding, self.dropout = embedding, dropout

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(input_ids)
        return self.dropout(hidden) if self.dropout is not None else hidden


class PipelineBlock(nn.Module):
    """Leaf (NxD's ``transformer_layer_cls``): rotary at ``position_ids`` + one decoder layer,
    called as the model's own forward calls it."""

    def __init__(self, layer: nn.Module, rotary: nn.Module):
        super().__init__()
        self.layer, self.rotary = layer, rotary  # the rotary module is shared by every block

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids,
                  "position_embeddings": self.rotary(hidden, position_ids), "use_cache": False}
        if seq_idx is not None:
            kwargs["seq_idx"] = seq_idx
        out = self.layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out  # GPT-NeoX returns a tuple


class PipelineHead(nn.Module):
    """Leaf: final norm -> lm_head -> ``scale * loss_function(logits, labels, N)`` (module
    docstring: ``scale`` = num_microbatches, ``N`` set by the engine before each step)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, loss_function: Callable):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head
        self.loss_function = loss_function
        self.scale: float = 1.0
        self.count: Optional[torch.Tensor] = None

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.count is None:
            raise RuntimeError("PipelineHead: the batch's token count is unset (run it through "
                               "model.run_train(**batch))")
        logits = self.lm_head(self.norm(hidden))
        return self.scale * self.loss_function(logits, labels, num_items_in_batch=self.count)


class PipelineTop(nn.Module):
    """The whole causal LM as NxD traces it (module docstring); its forward returns the
    microbatch's (scaled) loss."""

    def __init__(self, embed: PipelineEmbed, blocks: Sequence[PipelineBlock],
                 head: PipelineHead):
        super().__init__()
        self.embed, self.layers, self.head = embed, nn.ModuleList(blocks), head

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for block in self.layers:
            hidden = block(hidden, position_ids, attention_mask, seq_idx)
        return self.head(hidden, labels)


LEAF_NAMES = (PipelineEmbed.__name__, PipelineHead.__name__)


def pipeline_cuts(num_layers: int, pp: int) -> Tuple[str, ...]:
    """NxD's cut points (the last layer of every stage but the last) of ``stage_layers``."""
    return tuple(f"layers.{stage_layers(num_layers, pp, s)[1] - 1}" for s in range(pp - 1))


class NxDPipelineEngine:
    """``run_train`` on NxD's ``NxDPPModel`` (module docstring).

    top: the ``PipelineTop`` over the transformed (pruned) model; target: the transformed
    model (its SP gradients are reduced over TP here); tied: this stage's copy of a tied
    embedding / lm_head weight and the {first, last stage} group that sums its gradient.
    """

    def __init__(self, top: PipelineTop, settings: PipelineSettings, target: nn.Module,
                 tied: Optional[Tuple[nn.Parameter, dist.ProcessGroup]] = None):
        if settings.schedule != "1F1B":
            raise ValueError(f"pipeline_config['schedule']={settings.schedule!r}: NxD's "
                             "NxDPPModel (NxD in charge) trains with 1F1B only; GPipe runs on "
                             "the torch.distributed fallback")
        self.top, self.settings, self.target, self.tied = top, settings, target, tied
        self.pp_spec = ps.get_group_spec("pipeline")
        self.num_stages = self.pp_spec.size
        self.cuts = pipeline_cuts(len(top.layers), self.num_stages)
        self._models: Dict[Tuple[str, ...], Any] = {}

    # the fallback's batch checks (rows divisible by m; m >= pp for 1F1B) and token count N
    _check = PipelineEngine._check
    _target_tokens = PipelineEngine._target_tokens

    def nxd_model(self, input_names: Tuple[str, ...]):
        """The ``NxDPPModel`` for these input names (built, traced and partitioned once)."""
        if input_names not in self._models:
            self._models[input_names] = nxd_compat.pipeline_model(
                self.top, transformer_layer_cls=PipelineBlock,
                num_microbatches=self.settings.num_microbatches,
                pipeline_cuts=list(self.cuts), input_names=list(input_names),
                leaf_module_cls=list(LEAF_NAMES))
        return self._models[input_names]

    def run_train(self, input_ids: torch.Tensor, labels: torch.Tensor,
                  position_ids: torch.Tensor, **stage_inputs) -> torch.Tensor:
        """One step over the microbatches of this rank's batch ``[B, S_local]``; returns the
        batch's token-weighted loss (fp32 scalar, every rank) with the gradients reduced."""
        rows = labels.shape[0]
        self._check(rows)
        head = self.top.head
        head.count = self._target_tokens(labels)
        head.scale = float(self.settings.num_microbatches)
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels,
                  **{k: v for k, v in stage_inputs.items() if v is not None}}
        names = ("input_ids", "position_ids", "labels") + tuple(
            k for k in OPTIONAL_INPUTS if k in inputs)
        try:
            loss = self.nxd_model(names).run_train(**inputs)
        finally:
            head.count = None
        self._reduce()
        if loss is None:  # not the last stage: NxD returns the loss there only
            loss = torch.zeros((), dtype=torch.float32, device=labels.device)
        return loss_from_last_stage(loss.detach().float().to(labels.device).reshape(()),
                                    self.pp_spec)

    @torch.no_grad()
    def _reduce(self) -> None:
        """What NxDPPModel leaves undone (module docstring): tied weights, SP over TP."""
        sum_tied_gradient(self.tied)
        reduce_sequence_parallel_once(self.target)


def build_top(model: nn.Module, spec: Any) -> PipelineTop:
    """``PipelineTop`` over the pruned transformed ``model``'s own modules (``spec``: its
    ``ArchitectureSpec``): every layer (``AbsentModule`` for other stages'), the embedding,
    final norm and lm_head (``AbsentModule`` where not this stage's)."""
    base = get_path(model, spec.base)
    dropout = getattr(base, spec.embedding_dropout) if spec.embedding_dropout else None
    rotary = getattr(base, spec.rotary)
    blocks = [PipelineBlock(layer, rotary) for layer in get_path(base, spec.layers)]
    head = PipelineHead(getattr(base, spec.final_norm), get_path(model, spec.lm_head),
                        model.loss_function)
    return PipelineTop(PipelineEmbed(getattr(base, spec.embedding), dropout), blocks, head)


def attach_nxd(model: nn.Module, spec: Any, settings: PipelineSettings,
               tied: Optional[Tuple[nn.Parameter, dist.ProcessGroup]] = None
               ) -> NxDPipelineEngine:
    """The NxD-in-charge engine of ``models.pipelined.attach`` (module docstring)."""
    return NxDPipelineEngine(build_top(model, spec), settings, model, tied)
