"""Plan a training layout: TP x CP x PP x DP, comm type and memory options (``python -m
nxd_cp.plan``). Pure functions, bytes and seconds; docs/choosing.md explains the formulas."""
from nxd_cp.plan.catalog import load_config, shipped_models
from nxd_cp.plan.comm import (INSTANCES, cp_bytes_per_layer, step_flops, step_time,
                              tp_bytes_per_layer)
from nxd_cp.plan.memory import (activation_bytes, gradient_bytes, in_flight_microbatches,
                                layer_bytes_per_token, logits_bytes, model_dims,
                                optimizer_bytes, parameter_bytes, parameter_count,
                                recompute_bytes)
from nxd_cp.plan.search import Plan, launcher_command, memory_per_core, nxd_config_call, search

__all__ = ["INSTANCES", "Plan", "activation_bytes", "cp_bytes_per_layer", "gradient_bytes",
           "in_flight_microbatches", "launcher_command", "layer_bytes_per_token",
           "load_config", "logits_bytes", "memory_per_core", "model_dims", "nxd_config_call",
           "optimizer_bytes", "parameter_bytes", "parameter_count", "recompute_bytes", "search",
           "shipped_models", "step_flops", "step_time", "tp_bytes_per_layer"]
