"""Hugging Face adapters: ``transform`` (TP x CP) and ``full_state_dict`` (back to HF).

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``GPTNeoXForCausalLM``.
"""
from nxd_cp.models.state_dict import full_gradients, full_state_dict
from nxd_cp.models.transform import supported_architectures, transform

__all__ = ["transform", "full_state_dict", "full_gradients", "supported_architectures"]
