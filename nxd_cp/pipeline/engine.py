"""One training step of a pipelined model on ``torch.distributed.pipelining`` (the fallback).

``PipelineEngine.run_train(**batch)`` (NxD's ``NxDPPModel.run_train``):

1. counts the batch's target tokens over the CP group (``N``, one all-reduce of a scalar);
2. cuts the batch's rows into ``num_microbatches`` and runs the schedule (1F1B or GPipe) over
   the pipeline group: activations ``[mb, S_local(/tp under SP), H]`` go forward between stages,
   their gradients back; ``position_ids`` / ``attention_mask`` / ``seq_idx`` are given to every
   stage by its own rank (each holds the same batch), so nothing but activations travels;
3. the last stage's loss of a microbatch is its tokens' loss summed over the CP group divided
   by ``N`` (not by the microbatch's own count), and gradients are summed over microbatches
   (``scale_grads=False``): the sum of the microbatch losses is the full batch's
   token-weighted loss, exactly, whatever the padding;
4. reduces the gradients once, as ``NxDPPModel`` does: tied embedding / lm_head weights summed
   between the first and last stage, the sequence-parallel ones over TP, then every gradient
   summed over CP and averaged over DP (one all-reduce over DP x CP). ``allreduce_*_gradients``
   on the model or its parameters afterwards raise (``training.grads``);
5. returns the batch's loss on every rank (broadcast from the last stage over the pipeline
   group: one scalar).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.comm import get_transport
from nxd_cp.compat import torch as torch_compat
from nxd_cp.pipeline.split import PipelineSettings
from nxd_cp.pipeline.stage import CausalLMStage
from nxd_cp.training.grads import reduce_step_gradients

STAGE_INPUTS = ("position_ids", "attention_mask", "seq_idx")  # given to every stage


def tied_weight_groups() -> Optional[dist.ProcessGroup]:
    """This rank's group of {first stage, last stage} of its pipeline group (for tied
    embedding / lm_head weights), created for every pipeline group on every rank (a
    collective call); None on the middle stages, and without torch.distributed (one process
    lowering every rank's graph under ``explicit_rank``)."""
    spec = ps.get_group_spec("pipeline")
    mine = None
    if not dist.is_initialized():
        return None
    for ranks in spec.all_groups:
        group = dist.new_group([ranks[0], ranks[-1]])
        if dist.get_rank() in (ranks[0], ranks[-1]):
            mine = group
    return mine


class PipelineEngine:
    """Runs ``stage`` (this rank's ``CausalLMStage``) in the pipeline (module docstring).

    loss_function: ``(logits, labels, num_items_in_batch=N) -> loss`` (the model's).
    tied: this stage's copy of a weight tied between the first and last stage (or None) and
        the group that sums its gradient.
    target: what ``reduce_step_gradients`` reduces (the transformed model).
    """

    def __init__(self, stage: CausalLMStage, settings: PipelineSettings,
                 loss_function: Callable, target: nn.Module,
                 tied: Optional[Tuple[nn.Parameter, dist.ProcessGroup]] = None):
        self.stage_module, self.settings = stage, settings
        self.loss_function, self.target, self.tied = loss_function, target, tied
        self.pp_spec = ps.get_group_spec("pipeline")
        self.stage_index, self.num_stages = self.pp_spec.rank, self.pp_spec.size
        self._schedules: Dict[Tuple, object] = {}
        self._count: Optional[torch.Tensor] = None

    # --- the schedule for one microbatch shape ---------------------------------------------
    def _meta_args(self, mb: int, seq: int, first_input: torch.Tensor, out_seq: int,
                   hidden: int, dtype: torch.dtype, vocab: int):
        meta = torch.device("meta")
        if self.stage_module.is_first:
            inputs = (torch.empty(mb, seq, dtype=first_input.dtype, device=meta),)
        else:
            inputs = (torch.empty(mb, out_seq, hidden, dtype=dtype, device=meta),)
        if self.stage_module.is_last:
            output = torch.empty(mb, seq, vocab, dtype=dtype, device=meta)
        else:
            output = torch.empty(mb, out_seq, hidden, dtype=dtype, device=meta)
        return inputs, output

    def _schedule(self, batch_rows: int, seq: int, input_ids: Optional[torch.Tensor],
                  device: torch.device):
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

        m = self.settings.num_microbatches
        key = (batch_rows, seq, str(device))
        if key in self._schedules:
            return self._schedules[key]
        hidden, dtype, vocab, out_seq = self._shapes(seq)
        sample = input_ids if input_ids is not None else torch.empty(0, dtype=torch.int64)
        inputs, output = self._meta_args(batch_rows // m, seq, sample, out_seq, hidden, dtype,
                                         vocab)
        stage = torch_compat.pipeline_stage_class()(
            self.stage_module, self.stage_index, self.num_stages, device, input_args=inputs,
            output_args=output, group=self.pp_spec.process_group)
        cls = Schedule1F1B if self.settings.schedule == "1F1B" else ScheduleGPipe
        schedule = cls(stage, m, loss_fn=self._microbatch_loss, scale_grads=False)
        self._schedules[key] = schedule
        return schedule

    def _shapes(self, seq: int):
        """(hidden size, activation dtype, logits width, activation length) of this model."""
        cfg = self.target.config
        dtype = next(p for p in self.stage_module.parameters()).dtype
        out_seq = seq // ps.get_tensor_model_parallel_size() if self.target.nxd_cp_config[
            "sequence_parallel"] else seq
        vocab = cfg.vocab_size
        if self.target.nxd_cp_config["vocab_parallel_logits"]:
            vocab //= ps.get_tensor_model_parallel_size()
        return cfg.hidden_size, dtype, vocab, out_seq

    def _microbatch_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_function(logits, labels, num_items_in_batch=self._count)

    # --- one step ---------------------------------------------------------------------------
    def _check(self, batch_rows: int) -> None:
        m = self.settings.num_microbatches
        if batch_rows % m:
            raise ValueError(f"batch size {batch_rows} is not divisible by pipeline_config"
                             f"['num_microbatches']={m}: microbatches are equal row blocks")
        if self.settings.schedule == "1F1B" and m < self.num_stages:
            raise ValueError(f"pipeline_config['num_microbatches']={m} is less than "
                             f"pipeline_parallel_size={self.num_stages}: the 1F1B schedule "
                             "needs at least one microbatch per stage")

    def _target_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        count = (labels != -100).sum().to(torch.float32)
        spec = ps.get_group_spec("context")
        return get_transport(spec, labels.device).all_reduce(count) if spec.size > 1 else count

    def run_train(self, input_ids: torch.Tensor, labels: torch.Tensor,
                  position_ids: torch.Tensor, **stage_inputs) -> torch.Tensor:
        """One step over the microbatches of this rank's batch ``[B, S_local]``; returns the
        batch's token-weighted loss (fp32 scalar, every rank) with the gradients reduced."""
        rows, seq = labels.shape
        self._check(rows)
        device = labels.device
        if device.type == "xla":
            raise RuntimeError("pipeline parallelism on an XLA device runs with NeuronX "
                               "Distributed in charge (NxDPPModel); the torch.distributed."
                               "pipelining fallback runs on CPU (gloo) and CUDA (NCCL)")
        self._count = self._target_tokens(labels)
        schedule = self._schedule(rows, seq, input_ids, device)
        kwargs = {"position_ids": position_ids, **{
            k: v for k, v in stage_inputs.items() if v is not None}}
        losses: List[torch.Tensor] = []
        args = (input_ids,) if self.stage_module.is_first else ()
        target = labels if self.stage_module.is_last else None
        schedule.step(*args, target=target, losses=losses, **kwargs)
        self._reduce()
        loss = (torch.stack([x.detach().float() for x in losses]).sum() if losses
                else torch.zeros((), dtype=torch.float32, device=device))
        return loss_from_last_stage(loss, self.pp_spec)

    @torch.no_grad()
    def _reduce(self) -> None:
        sum_tied_gradient(self.tied)
        reduce_step_gradients(self.target)


@torch.no_grad()
def sum_tied_gradient(tied: Optional[Tuple[nn.Parameter, dist.ProcessGroup]]) -> None:
    """Sum the gradient of a weight tied between the first and last stage over their group
    (``tied``: this stage's copy and the group, or None)."""
    if tied is None:
        return
    weight, group = tied
    if weight.grad is None:  # both stages use it; keep the collective matched anyway
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=group)


def loss_from_last_stage(loss: torch.Tensor, pp_spec) -> torch.Tensor:
    """The last stage's loss (fp32 scalar) on every rank of the pipeline group ``pp_spec``."""
    dist.broadcast(loss, group=pp_spec.process_group, group_src=pp_spec.size - 1)
    return loss
