"""Pipeline parallelism for a transformed Hugging Face model: this rank's stage only.

``transform`` with ``pipeline_parallel_size > 1`` keeps on each rank the modules of its stage
(``pipeline.split``: the first stage the token embedding, the last the final norm and lm_head,
each its contiguous decoder layers) and puts an ``AbsentModule`` in place of the others, so the
model's parameter names -- hence state dicts and checkpoints -- stay the Hugging Face ones.
Then ``attach`` gives the model NxD's ``run_train(**batch)`` (``pipeline.engine``); its plain
``forward`` raises. ``stage_state_dict`` gathers per-stage dicts into the whole model's.

Tied embeddings (Mistral's, Qwen2's small models): the first stage holds the embedding weight,
the last a copy for its lm_head, loaded from the same tensor; ``run_train`` sums the two
copies' gradients (Megatron's embedding group), so they stay equal step after step.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.models.inputs import check_inputs
from nxd_cp.models.registry import ArchitectureSpec
from nxd_cp.pipeline.engine import PipelineEngine, tied_weight_groups
from nxd_cp.pipeline.nxd_engine import attach_nxd  # NxD in charge (issue 27)
from nxd_cp.pipeline.split import AbsentModule, is_absent, pipeline_settings, stage_layers
from nxd_cp.pipeline.stage import CausalLMStage
from nxd_cp.tensor_parallel.partition import get_path, set_path
from nxd_cp.training.clipping import TIED_COPY
from nxd_cp.training.grads import PIPELINED

ENGINE_ATTR = "nxd_cp_pipeline"
RUN_TRAIN_KEYS = ("input_ids", "labels", "position_ids", "attention_mask", "seq_idx")


def keep_stage(model: nn.Module, spec: ArchitectureSpec) -> Dict[str, Any]:
    """Replace what other stages own by ``AbsentModule``; returns the stage record kept in
    ``model.nxd_cp_config["pipeline"]``."""
    pp, stage = ps.get_pipeline_model_parallel_size(), ps.get_pipeline_model_parallel_rank()
    layers = get_path(model, f"{spec.base}.{spec.layers}")
    start, stop = stage_layers(len(layers), pp, stage)
    for i in range(len(layers)):
        if not start <= i < stop:
            layers[i] = AbsentModule(f"{spec.base}.{spec.layers}.{i}", stage)
    owned = []
    if stage != 0:
        owned.append(f"{spec.base}.{spec.embedding}")
    if stage != pp - 1:
        owned += [f"{spec.base}.{spec.final_norm}", spec.lm_head]
    for path in owned:
        set_path(model, path, AbsentModule(path, stage))
    return {"stage": stage, "num_stages": pp, "layers": (start, stop)}


def present(module: Optional[nn.Module]) -> bool:
    return module is not None and not is_absent(module)


def _stage_module(model: nn.Module, spec: ArchitectureSpec) -> CausalLMStage:
    base = get_path(model, spec.base)
    layers = [m for m in get_path(base, spec.layers) if present(m)]
    emb = getattr(base, spec.embedding)
    last = present(get_path(model, spec.lm_head))
    return CausalLMStage(
        layers, getattr(base, spec.rotary),
        embedding=emb if present(emb) else None,
        embedding_dropout=getattr(base, spec.embedding_dropout) if (
            present(emb) and spec.embedding_dropout) else None,
        norm=getattr(base, spec.final_norm) if last else None,
        lm_head=get_path(model, spec.lm_head) if last else None)


class PipelinedCausalLM:
    """Mixed into a pipelined model's class: NxD's ``run_train``; ``forward`` refuses."""

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "this model is pipelined (pipeline_parallel_size > 1): it holds one stage, so "
            "model(**batch) cannot run; call loss = model.run_train(**batch) (forward and "
            "backward over the microbatches, gradients reduced)")

    def run_train(self, **batch) -> torch.Tensor:
        """One training step over ``pipeline_config['num_microbatches']`` microbatches of this
        rank's batch (``get_batch_on_this_context_parallel_rank``'s output: ``input_ids``,
        ``labels`` (shifted), ``position_ids``, optional ``attention_mask`` / ``seq_idx``,
        ``[B, S_local]``). Returns the batch's token-weighted loss on every rank; afterwards
        the gradients are final (reduced over DP x CP once): call ``optimizer.step()``."""
        unknown = sorted(set(batch) - set(RUN_TRAIN_KEYS))
        if unknown or "labels" not in batch or "input_ids" not in batch:
            raise ValueError(f"run_train(**batch) takes {RUN_TRAIN_KEYS} (input_ids and labels "
                             f"required); got keys {sorted(batch)}")
        _, batch = check_inputs(self, (), dict(batch))
        batch.pop("use_cache", None)
        if batch.get("position_ids") is None:  # cp == 1 (check_inputs requires them for cp > 1)
            ids = batch["input_ids"]
            batch["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.__dict__[ENGINE_ATTR].run_train(**batch)


@functools.lru_cache(maxsize=None)
def _pipelined_class(cls: type) -> type:
    return type(f"Pipelined{cls.__name__}", (PipelinedCausalLM, cls), {})


def attach(model: nn.Module, spec: ArchitectureSpec, pipeline_config: Optional[Mapping],
           tied: bool) -> Dict[str, Any]:
    """Make ``model`` (this rank's stage, transformed) a pipelined model; every rank calls it
    (it creates the tied-weight groups). Returns the settings recorded in ``nxd_cp_config``."""
    settings = pipeline_settings(pipeline_config)
    stage = _stage_module(model, spec)
    groups = tied_weight_groups() if tied else None
    tied_pair = None
    if tied and (stage.is_first or stage.is_last):
        weight = stage.embedding.weight if stage.is_first else stage.lm_head.weight
        tied_pair = (weight, groups)
        if not stage.is_first:
            setattr(weight, TIED_COPY, True)  # counted once by clip_grad_norm
    for p in model.parameters():
        setattr(p, PIPELINED, True)
    # --- NxD in charge: NxD's NxDPPModel (pipeline/nxd_engine.py), issue 27 -------------------
    if ps.nxd_in_charge():
        engine = attach_nxd(model, spec, settings, tied=tied_pair)
    else:  # -------------------------------------------------------------------------------
        engine = PipelineEngine(stage, settings, model.loss_function, model, tied=tied_pair)
    model.__dict__[ENGINE_ATTR] = engine
    model.__class__ = _pipelined_class(type(model))
    return {"num_microbatches": settings.num_microbatches, "schedule": settings.schedule,
            "tied_embeddings": tied}


def is_pipelined_model(model: nn.Module) -> bool:
    return ENGINE_ATTR in model.__dict__


def merge_stages(stage_dict: Optional[Dict[str, Any]], rank0_only: bool,
                 tied_keys=()) -> Optional[Dict[str, Any]]:
    """The whole model's dict from each stage's ``stage_dict``: on global rank 0 (or every
    rank unless ``rank0_only``), None elsewhere. A collective over the pipeline groups that
    keep it (with ``rank0_only`` only global rank 0's). ``tied_keys`` ``(embedding key, lm_head
    key)`` map to one tensor, as in the unmodified model's state dict."""
    spec = ps.get_group_spec("pipeline")
    if rank0_only and 0 not in spec.ranks:
        return None
    parts = [None] * spec.size
    dist.all_gather_object(parts, stage_dict, group=spec.process_group)
    if rank0_only and dist.get_rank() != 0:
        return None
    out: Dict[str, Any] = {}
    for part in parts:
        out.update(part or {})
    if tied_keys and all(k in out for k in tied_keys):
        out[tied_keys[1]] = out[tied_keys[0]]
    return out
