"""Argument checks of clipping, ZeRO-1 and FSDP2 (no ranks spawned; the numerics are in
tests/test_sharded_state.py)."""
import pytest
import torch

import nxd_cp
from nxd_cp.nxd_config import _check_supported, build_config
from nxd_cp.training.fsdp import _policy, decoder_layers
from nxd_cp.training.zero1 import optimizer_state_bytes

pytestmark = pytest.mark.unit


def test_zero1_config_runs_on_the_fallback():
    cfg = build_config(optimizer_config={"zero_one_enabled": True})
    _check_supported(cfg, with_nxd=False)  # no NotImplementedError any more
    assert cfg.to_dict()["optimizer_config"]["zero_one_enabled"]


@pytest.mark.parametrize("bad", [0, -1.0, True, "1"])
def test_clip_grad_norm_refuses_bad_max_norm(bad):
    with pytest.raises(ValueError, match="max_norm"):
        nxd_cp.clip_grad_norm([torch.nn.Parameter(torch.ones(2))], bad)


def test_initialize_parallel_optimizer_refusals():
    with pytest.raises(ValueError, match="nxd_config"):
        nxd_cp.initialize_parallel_optimizer(object(), torch.optim.SGD, [], lr=0.1)
    cfg = build_config(optimizer_config={"zero_one_enabled": True}).to_dict()
    bf16 = [torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))]
    with pytest.raises(NotImplementedError, match="use_master_weights.*bfloat16"):
        nxd_cp.initialize_parallel_optimizer(cfg, torch.optim.SGD, bf16, lr=0.1)
    with pytest.raises(ValueError, match="parameters is empty"):
        nxd_cp.initialize_parallel_optimizer(cfg, torch.optim.SGD, [], lr=0.1)


def test_fsdp_options():
    assert _policy("bf16").param_dtype == torch.bfloat16
    assert _policy("bf16").reduce_dtype == torch.float32
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        _policy("fp8")
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    model.head = torch.nn.Linear(2, 2)
    assert decoder_layers(model) == list(model.layers)


def test_optimizer_state_bytes_of_a_plain_optimizer():
    p = torch.nn.Parameter(torch.ones(5, 3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones_like(p)
    opt.step()
    assert optimizer_state_bytes(opt) == 5 * 3 * 4  # one fp32 momentum buffer
