"""Hugging Face adapters: ``transform`` (TP x CP) and ``full_state_dict`` (back to HF), and the
public architecture registration (``ArchitectureSpec``, ``register_architecture``).

Registered on import, through ``register_architecture`` as any user family: ``LlamaForCausalLM``,
``MistralForCausalLM``, ``GPTNeoXForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``.
"""
from nxd_cp.models.registry import (ArchitectureSpec, architecture_of, register_architecture,
                                    registered_architectures, supported_architectures)
from nxd_cp.models.state_dict import full_gradients, full_state_dict
from nxd_cp.models.transform import transform
# isort: off
# register the built-ins, in this order (supported_architectures lists them so)
from nxd_cp.models import llama, gpt_neox, qwen  # noqa: F401
# isort: on

__all__ = ["transform", "full_state_dict", "full_gradients", "supported_architectures",
           "ArchitectureSpec", "register_architecture", "registered_architectures",
           "architecture_of"]
