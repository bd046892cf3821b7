"""``fully_shard``: FSDP2 over the DP x CP group of a TP x CP model.

``fully_shard(model)`` applies ``torch.distributed.fsdp.fully_shard`` to every decoder layer
(each module of an ``nn.ModuleList`` named ``layers``, or the ``layers`` given) and then to the
root, on a 1-D ``DeviceMesh`` built from parallel state's DP x CP group
(``DeviceMesh.from_group``). TP is left as it is: each rank's TP shard of a parameter is
sharded again, on dim 0, over the dp * cp ranks of its DP x CP group (parameters, gradients and
optimizer state all ~1/(dp*cp) of the TP shard per rank).

Gradients: FSDP reduce-scatters them in backward over DP x CP. CP needs a *sum* over CP and a
*mean* over DP (``grads`` module docstring), i.e. the sum over DP x CP divided by dp: every FSDP
module gets ``set_gradient_divide_factor(dp)`` with ``set_force_sum_reduction_for_comms(True)``
(a SUM reduce-scatter then a division by dp; without it a divide factor other than dp * cp is a
``PREMUL_SUM`` op, which gloo lacks). After ``loss.backward()`` the gradients are final (sharded
DTensors): call nothing but ``clip_grad_norm`` (optional) and ``optimizer.step()``;
``allreduce_*_gradients`` on an FSDP model raise.

``fully_shard`` replaces every parameter with a sharded DTensor parameter and drops custom
parameter attributes; the attributes nxd_cp and NxD read (``tensor_model_parallel``,
``partition_dim``, ``partition_stride``, ``num_partitions``, ``sequence_parallel_enabled``,
``nxd_cp_kv_replicas``, ...) are copied onto the new parameters (layouts are also read from the
layer types, which FSDP keeps).

Mixed precision: ``mixed_precision="bf16"`` computes in bf16 (parameters all-gathered in bf16)
and reduces gradients in fp32, keeping fp32 sharded parameters (torch's
``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``); or pass a
``MixedPrecisionPolicy``.

Full weights: ``with unsharded(model): nxd_cp.full_state_dict(model)`` (``state_dict()``
returns full tensors inside the block). Not supported: NxD in charge (NxD shards with its own
ZeRO-1; ``NotImplementedError``), ``sequence_parallel=True`` (the SP gradient sum over TP would
have to follow FSDP's reduce-scatter inside backward; ``NotImplementedError``).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, List, Optional, Union

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.fsdp import fully_shard as torch_fully_shard
from torch.distributed.tensor import DTensor

from nxd_cp import parallel_state as ps
from nxd_cp.training.grads import is_pipelined


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The modules of every ``nn.ModuleList`` named ``layers`` (HF Llama / Mistral / Qwen
    ``model.layers``, GPT-NeoX ``gpt_neox.layers``), in order."""
    return [layer for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and name.rpartition(".")[2] == "layers"
            for layer in m]


def _policy(mixed_precision) -> MixedPrecisionPolicy:
    if mixed_precision is None:
        return MixedPrecisionPolicy()
    if isinstance(mixed_precision, MixedPrecisionPolicy):
        return mixed_precision
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    raise ValueError(f"mixed_precision={mixed_precision!r} must be None, 'bf16' or a "
                     "torch.distributed.fsdp.MixedPrecisionPolicy")


def _check(model: nn.Module) -> None:
    if ps.nxd_in_charge():
        raise NotImplementedError(
            "nxd_cp.fully_shard: NeuronX Distributed is in charge, and FSDP2 does not run on "
            "its XLA devices; shard the optimizer state with NxD's ZeRO-1 instead "
            "(neuronx_distributed_config(optimizer_config={'zero_one_enabled': True}) and "
            "initialize_parallel_optimizer)")
    cfg = getattr(model, "nxd_cp_config", None) or {}
    if cfg.get("sequence_parallel") or ps.sequence_parallel_enabled():
        raise NotImplementedError(
            "nxd_cp.fully_shard with sequence_parallel=True is not supported: the "
            "sequence-parallel parameters' gradient sum over TP would have to follow FSDP's "
            "reduce-scatter inside backward. Use ZeRO-1 (initialize_parallel_optimizer) or "
            "sequence_parallel=False")
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("nxd_cp.fully_shard: the model is already sharded with FSDP2")
    if is_pipelined(model):
        raise NotImplementedError(
            "nxd_cp.fully_shard on a pipelined model (pipeline_parallel_size > 1) is not "
            "supported yet: run_train reduces the gradients after the last microbatch, FSDP2 "
            "would reduce-scatter them in every microbatch's backward. Shard the optimizer "
            "state with ZeRO-1 instead (optimizer_config={'zero_one_enabled': True} and "
            "initialize_parallel_optimizer), which composes with PP")


def fully_shard(model: nn.Module, *, layers: Optional[Iterable[nn.Module]] = None,
                mixed_precision: Union[None, str, MixedPrecisionPolicy] = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` (a transformed TP x CP model) with FSDP2 over DP x CP; returns it.

    layers: the modules to shard one by one (default ``decoder_layers(model)``), then the root
    takes the rest (embedding, final norm, lm_head). mixed_precision: None (fp32), ``"bf16"``
    or a ``MixedPrecisionPolicy``. reshard_after_forward: FSDP2's (True frees each layer's
    gathered parameters after its forward). A collective over DP x CP (every rank calls it).
    """
    _check(model)
    policy = _policy(mixed_precision)
    attrs = {name: dict(vars(p)) for name, p in model.named_parameters(remove_duplicate=False)}
    group = ps.get_data_context_parallel_group()
    device = next(model.parameters()).device
    mesh = DeviceMesh.from_group(group, device.type)
    kwargs = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for layer in (decoder_layers(model) if layers is None else list(layers)):
        torch_fully_shard(layer, **kwargs)
    torch_fully_shard(model, **kwargs)
    dp = float(ps.get_data_parallel_size())
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
            m.set_gradient_divide_factor(dp)  # sum over DP x CP / dp: CP sum, DP mean
    for name, p in model.named_parameters(remove_duplicate=False):
        for key, value in attrs.get(name, {}).items():
            if not hasattr(p, key):
                setattr(p, key, value)
    return model


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Inside the block, ``model.state_dict()`` holds plain full tensors (this rank's TP
    shards, all-gathered over DP x CP with ``DTensor.full_tensor``; tied weights stay one
    tensor) instead of FSDP's sharded DTensors, so ``nxd_cp.full_state_dict(model)`` gives the
    unmodified model's weights. ``state_dict()`` is then a collective over DP x CP."""

    def to_full(module, state_dict, prefix, local_metadata):
        done = {}
        for key, value in state_dict.items():
            if isinstance(value, DTensor):
                if id(value) not in done:
                    done[id(value)] = value.full_tensor()
                state_dict[key] = done[id(value)]

    handle = model.register_state_dict_post_hook(to_full)
    try:
        yield model
    finally:
        handle.remove()
