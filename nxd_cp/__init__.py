"""nxd_cp: context parallelism for NeuronX Distributed, with a torch.distributed fallback.

The public API is what this module exports (see docs/api.md)::

    import nxd_cp
    cfg = nxd_cp.neuronx_distributed_config(tensor_parallel_size=2, context_parallel_size=2,
                                            context_parallel_config={"comm_type": "p2p"})
    model = nxd_cp.transform(hf_model, cfg)          # needs transformers
    batch = nxd_cp.get_batch_on_this_context_parallel_rank(full_batch)  # the config's layout
    model(**batch).loss.backward()
    nxd_cp.allreduce_context_parallel_gradients(model)

``transform``, ``full_state_dict``, ``from_pretrained`` / ``save_pretrained`` (Hugging Face
checkpoint directories, ``nxd_cp.models.hf_checkpoint``), ``models``, ``ArchitectureSpec`` and
``register_architecture`` import ``nxd_cp.models`` (and transformers) on first use, so the rest
works without it. Your own models: ``nxd_cp.nn`` (``ContextParallelAttention``,
``register_module``, ``parallelize``).
"""
import importlib

from nxd_cp import parallel_state
from nxd_cp.training import optim
from nxd_cp.attention import context_parallel_attention
from nxd_cp.training.checkpoint import (checkpoint_metadata, has_checkpoint, load_checkpoint,
                               save_checkpoint)
from nxd_cp.comm import count_bytes
from nxd_cp.config import ContextParallelConfig
from nxd_cp.parallel_state import get_context_parallel_config
from nxd_cp.nxd_config import neuronx_distributed_config
from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank
from nxd_cp.training.grads import (allreduce_context_parallel_gradients,
                          allreduce_data_context_parallel_gradients)
from nxd_cp.training.loss import context_parallel_cross_entropy
from nxd_cp.training.memory import count_saved_bytes
from nxd_cp.nn import ContextParallelAttention, parallelize, register_module
from nxd_cp.training.grads import allreduce_sequence_parallel_gradients
from nxd_cp.training.clipping import clip_grad_norm
from nxd_cp.training.zero1 import initialize_parallel_optimizer, optimizer_state_bytes
from nxd_cp.training.fsdp import fully_shard
from nxd_cp.sequence.layout import sequence_positions, shard_sequence
from nxd_cp.sequence.unshard import unshard_sequence

_LAZY = {"transform": "nxd_cp.models", "full_state_dict": "nxd_cp.models",
         "models": "nxd_cp.models", "ArchitectureSpec": "nxd_cp.models",
         "register_architecture": "nxd_cp.models",
         "from_pretrained": "nxd_cp.models.hf_checkpoint",
         "save_pretrained": "nxd_cp.models.hf_checkpoint"}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if name == "models" else getattr(module, name)
    raise AttributeError(f"module 'nxd_cp' has no attribute {name!r}")


__all__ = ["parallel_state", "optim", "context_parallel_attention", "count_bytes",
           "count_saved_bytes", "ContextParallelConfig", "get_context_parallel_config",
           "neuronx_distributed_config",
           "get_batch_on_this_context_parallel_rank", "allreduce_context_parallel_gradients",
           "allreduce_data_context_parallel_gradients", "allreduce_sequence_parallel_gradients",
           "context_parallel_cross_entropy",
           "sequence_positions", "shard_sequence", "unshard_sequence", "transform",
           "full_state_dict", "models", "save_checkpoint", "load_checkpoint", "has_checkpoint",
           "checkpoint_metadata", "ContextParallelAttention", "register_module",
           "parallelize", "ArchitectureSpec", "register_architecture", "clip_grad_norm",
           "initialize_parallel_optimizer", "optimizer_state_bytes", "fully_shard",
           "from_pretrained", "save_pretrained"]
