"""neuronx_distributed_config: validation messages, the returned dict, and parallel state on
real gloo ranks (TP2 x CP2)."""
import dataclasses

import pytest
import torch

from nxd_cp import parallel_state as ps
from nxd_cp.config import ContextParallelConfig, context_parallel_config_of
from nxd_cp.nxd_config import (
    NXD_CONFIG_KEYS,
    NeuronxDistributedConfig,
    build_config,
    neuronx_distributed_config,
)
from nxd_cp.parallel_state import get_context_parallel_config
from nxd_cp.testing import run_ranks

# NxD's neuronx_distributed_config returns exactly these keys (trainer/trainer.py).
NXD_KEYS = {"tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size",
            "context_parallel_size", "pipeline_config", "optimizer_config",
            "activation_checkpoint_config", "pad_model", "sequence_parallel",
            "model_init_config", "lora_config", "mixed_precision_config", "lnc_size"}


@pytest.fixture(autouse=True)
def _fallback(monkeypatch):
    """Test the torch.distributed fallback even where a real NxD is importable."""
    monkeypatch.setenv("NXD_CP_DISABLE_NXD", "1")


def test_defaults_give_nxd_dict_plus_cp():
    cfg = neuronx_distributed_config()
    assert set(cfg) == NXD_KEYS | {"context_parallel_config"}
    assert tuple(cfg)[:len(NXD_CONFIG_KEYS)] == NXD_CONFIG_KEYS
    assert cfg["context_parallel_size"] == 1 and cfg["lnc_size"] == 1
    assert cfg["context_parallel_config"] == {"comm_type": "p2p", "load_balance": "zigzag",
                                              "a2a_size": None}
    # NxD's defaults for the dict configs.
    assert cfg["optimizer_config"] == {"zero_one_enabled": False, "grad_clipping": True,
                                       "max_grad_norm": 1.0}
    assert cfg["mixed_precision_config"] == {"use_master_weights": False,
                                             "use_fp32_grad_acc": False,
                                             "use_master_weights_in_ckpt": False}
    assert cfg["model_init_config"] == {"sequential_move_factor": 11, "meta_device_init": False,
                                        "param_init_fn": None}
    assert not ps.model_parallel_is_initialized()  # no process group: state left alone


def test_signature_is_nxds_plus_context_parallel_config():
    import inspect

    # NxD's trainer.neuronx_distributed_config, in order, with its defaults.
    nxd = [("tensor_parallel_size", 1), ("pipeline_parallel_size", 1),
           ("expert_parallel_size", 1), ("context_parallel_size", 1), ("pipeline_config", None),
           ("optimizer_config", None), ("activation_checkpoint_config", None),
           ("pad_model", False), ("sequence_parallel", False), ("model_init_config", None),
           ("lora_config", None), ("mixed_precision_config", None),
           ("sequential_move_factor", 11), ("lnc_size", 1)]
    params = inspect.signature(neuronx_distributed_config).parameters
    assert [(n, p.default) for n, p in params.items()] == nxd + [("context_parallel_config",
                                                                  None)]
    assert inspect.signature(build_config).parameters == params


def test_good_config_round_trip():
    user_optim = {"max_grad_norm": 0.5}
    cfg = neuronx_distributed_config(
        tensor_parallel_size=2, context_parallel_size=4, sequential_move_factor=3,
        optimizer_config=user_optim,
        context_parallel_config={"comm_type": "all_gather", "load_balance": "contiguous"})
    assert cfg["tensor_parallel_size"] == 2 and cfg["context_parallel_size"] == 4
    assert cfg["optimizer_config"]["max_grad_norm"] == 0.5
    assert cfg["optimizer_config"]["grad_clipping"] is True
    assert cfg["model_init_config"]["sequential_move_factor"] == 3
    # Validated and passed on to NxD's wrapper (build_config does not check what runs here).
    ckpt = build_config(activation_checkpoint_config=[torch.nn.Linear]).to_dict()
    assert ckpt["activation_checkpoint_config"] == [torch.nn.Linear]
    init_fn = torch.nn.Linear(1, 1)  # a callable object must be passed on, not copied
    cfg2 = neuronx_distributed_config(model_init_config={"param_init_fn": init_fn})
    assert cfg2["model_init_config"]["param_init_fn"] is init_fn
    assert user_optim == {"max_grad_norm": 0.5}  # the caller's dict is not updated
    cp = context_parallel_config_of(cfg)
    assert cp == ContextParallelConfig(comm_type="all_gather", load_balance="contiguous")
    assert context_parallel_config_of({"context_parallel_size": 1}) == ContextParallelConfig()
    assert context_parallel_config_of({"comm_type": "all_gather"}).comm_type == "all_gather"
    assert get_context_parallel_config() == ContextParallelConfig()  # nothing active here
    with pytest.raises(ValueError, match=r"config='p2p' is invalid: it must be None, a "
                       "ContextParallelConfig"):
        context_parallel_config_of("p2p")


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import nxd_cp.config
    import nxd_cp.nxd_config

    for cls, mod in ((ContextParallelConfig, nxd_cp.config),
                     (NeuronxDistributedConfig, nxd_cp.nxd_config)):
        tree = ast.parse(inspect.getsource(mod))
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
        documented = set()
        for a, b in zip(node.body, node.body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                documented.add(a.target.id)
        assert documented == {f.name for f in dataclasses.fields(cls)}, cls.__name__


BAD = [
    (dict(tensor_parallel_size=0), ValueError, r"tensor_parallel_size=0 .*integer >= 1"),
    (dict(context_parallel_size=2.0), ValueError, r"context_parallel_size=2\.0 .*integer >= 1"),
    (dict(context_parallel_size=True), ValueError, r"context_parallel_size=True .*integer"),
    (dict(lnc_size=-1), ValueError, r"lnc_size=-1 .*integer >= 1"),
    (dict(sequential_move_factor=0), ValueError, r"sequential_move_factor=0 .*integer >= 1"),
    (dict(context_parallel_config={"comm_type": "ring"}), ValueError,
     r"context_parallel_config\['comm_type'\]='ring' .*\['p2p', 'all_gather', 'a2a', 'a2a\+p2p'\]"),
    (dict(context_parallel_config={"load_balance": "random"}), ValueError,
     r"context_parallel_config\['load_balance'\]='random' .*"
     r"\['zigzag', 'contiguous', 'per_document'\]"),
    (dict(context_parallel_config={"comm_typ": "p2p"}), ValueError,
     r"context_parallel_config has unknown key\(s\) \['comm_typ'\].*comm_type"),
    (dict(context_parallel_config=["p2p"]), ValueError,
     r"context_parallel_config=\['p2p'\] .*dict or None"),
    (dict(optimizer_config={"zero1": True}), ValueError,
     r"optimizer_config has unknown key\(s\) \['zero1'\]"),
    (dict(optimizer_config={"max_grad_norm": 0}), ValueError,
     r"optimizer_config\['max_grad_norm'\]=0 .*> 0"),
    (dict(mixed_precision_config={"use_bf16": True}), ValueError,
     r"mixed_precision_config has unknown key\(s\) \['use_bf16'\]"),
    (dict(mixed_precision_config={"use_master_weights": True}), ValueError,
     r"mixed_precision_config\['use_master_weights'\]=True .*zero_one_enabled'\]=False"),
    (dict(model_init_config={"device": "meta"}), ValueError,
     r"model_init_config has unknown key\(s\) \['device'\]"),
    (dict(model_init_config={"meta_device_init": True}), ValueError,
     r"model_init_config\['meta_device_init'\]=True needs .*param_init_fn"),
    (dict(pad_model="yes"), ValueError, r"pad_model='yes' .*True or False"),
    (dict(activation_checkpoint_config="some"), ValueError,
     r"activation_checkpoint_config='some' .*'full'"),
    (dict(pipeline_config=[1]), ValueError, r"pipeline_config=\[1\] .*dict or None"),
    (dict(pipeline_parallel_size=2), ValueError,
     r"pipeline_config=None .*pipeline_parallel_size=2"),
    # Features that need NxD's wrappers: NotImplementedError on the fallback.
    # pipeline_config is checked up front on the fallback (torch.distributed.pipelining)
    (dict(pipeline_parallel_size=2, pipeline_config={"num_microbatches": 0}), ValueError,
     r"pipeline_config\['num_microbatches'\]=0 must be an integer >= 1"),
    (dict(pipeline_parallel_size=2, pipeline_config={"pipeline_cuts": ["x"]}), ValueError,
     r"pipeline_config keys \['pipeline_cuts'\] are not supported: nxd_cp takes"),
    (dict(expert_parallel_size=2), NotImplementedError,
     r"expert_parallel_size=2 is not supported"),
    (dict(lnc_size=2), NotImplementedError, r"lnc_size=2 is not supported"),
    (dict(pad_model=True), NotImplementedError, r"pad_model=True needs NeuronX Distributed"),
    (dict(lora_config=object()), NotImplementedError, r"lora_config=.* needs NeuronX"),
    (dict(model_init_config={"meta_device_init": True, "param_init_fn": print}),
     NotImplementedError, r"model_init_config\['meta_device_init'\]=True needs NeuronX"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[str(sorted(b[0])) + str(i)
                                                       for i, b in enumerate(BAD)])
def test_bad_config_raises_with_key_value_and_rule(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        neuronx_distributed_config(**kwargs)


def test_zero1_config_is_valid_where_nxd_would_run_it():
    """ZeRO-1 and its mixed-precision defaults are valid, with NxD and on the fallback
    (nxd_cp.initialize_parallel_optimizer shards over DP x CP there); so is activation
    checkpointing (transform applies it)."""
    from nxd_cp.nxd_config import _check_supported

    cfg = build_config(optimizer_config={"zero_one_enabled": True},
                       activation_checkpoint_config="full")
    assert cfg.mixed_precision_config.use_master_weights  # NxD's default follows ZeRO-1
    _check_supported(cfg, with_nxd=True)
    _check_supported(cfg, with_nxd=False)


def _outcome(fn, **kwargs):
    """("ok", result) or (exception type name, message): compared in the parent process."""
    try:
        return "ok", fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - the parent asserts on the type and message
        return type(e).__name__, str(e)


def _config_on_ranks(rank, world):
    """TP2 x CP2 on 4 ranks: groups, idempotent second call, conflicting call, bad world."""
    out = {"bad_world": _outcome(neuronx_distributed_config, tensor_parallel_size=3)}
    out["bad_world_left_state_alone"] = not ps.model_parallel_is_initialized()
    status, cfg = _outcome(neuronx_distributed_config, tensor_parallel_size=2,
                           context_parallel_size=2,
                           context_parallel_config={"comm_type": "all_gather"})
    out["first"] = status
    out["cfg"] = {k: cfg[k] for k in ("tensor_parallel_size", "context_parallel_size",
                                      "context_parallel_config")} if status == "ok" else cfg
    out["cp_groups"] = ps.get_context_model_parallel_group(as_list=True)
    out["tp_groups"] = ps.get_tensor_model_parallel_group(as_list=True)
    out["sizes"] = (ps.get_tensor_model_parallel_size(), ps.get_context_model_parallel_size(),
                    ps.get_data_parallel_size())
    out["cp_rank"] = ps.get_context_model_parallel_rank()
    out["active_after_first"] = get_context_parallel_config().comm_type
    out.update(_one_config_everywhere(cfg))
    group = ps.get_context_model_parallel_group()
    out["again"] = _outcome(neuronx_distributed_config, tensor_parallel_size=2,
                            context_parallel_size=2)[0]
    out["active_after_again"] = get_context_parallel_config().comm_type  # replaced: defaults
    out["same_group_after_again"] = ps.get_context_model_parallel_group() is group
    out["conflict"] = _outcome(neuronx_distributed_config, tensor_parallel_size=4,
                               context_parallel_size=1)
    out["cp_size_after_conflict"] = ps.get_context_model_parallel_size()
    ps.destroy_model_parallel()
    out["active_after_destroy"] = ps.get_training_config() is None
    return out


def _one_config_everywhere(cfg):
    """The config given once reaches data and model; a mismatch is an error, never silent."""
    import transformers as tf

    import nxd_cp
    from nxd_cp.nn import ContextParallelAttention

    out = {}
    ids = torch.arange(16).reshape(1, 16)
    # the data follows the active layout (zigzag, cp=2: chunks r and 3-r of four)
    out["positions"] = nxd_cp.get_batch_on_this_context_parallel_rank(
        {"input_ids": ids})["position_ids"][0].tolist()
    llama = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    model = nxd_cp.transform(tf.LlamaForCausalLM(llama), cfg)  # the active config: accepted
    other = dict(cfg, context_parallel_config={"comm_type": "p2p", "load_balance": "zigzag"})
    out["transform_other"] = _outcome(nxd_cp.transform, model=tf.LlamaForCausalLM(llama),
                                      config=other)
    out["transform_string"] = _outcome(nxd_cp.transform, model=tf.LlamaForCausalLM(llama),
                                       config="p2p")
    attn = ContextParallelAttention(cfg)
    q = torch.randn(1, 2, 8, 4)
    out["attention_active"] = _outcome(lambda: tuple(attn(q, q, q).shape))
    batch = nxd_cp.get_batch_on_this_context_parallel_rank({"input_ids": ids % 64})
    neuronx_distributed_config(tensor_parallel_size=2, context_parallel_size=2,
                               sequence_parallel=True)  # a new active config
    out["model_after_reconfig"] = _outcome(lambda: model(**batch))
    out["attention_after_reconfig"] = _outcome(lambda: tuple(attn(q, q, q).shape))
    out["attention_bound"] = attn.config.comm_type  # bound at construction, never swapped
    return out


# One 4-rank world runs the scenario above in order (each step depends on the state the previous
# left); the tests below each check one of its steps on every rank.
@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(_config_on_ranks, 4)


def test_bad_world_size_is_refused_and_leaves_state_alone(four_ranks):
    for rank, got in enumerate(four_ranks):
        status, msg = got["bad_world"]
        assert status == "ValueError" and "world size 4 is not divisible" in msg, msg
        assert "tensor_parallel_size(3)" in msg and "= 3" in msg
        assert got["bad_world_left_state_alone"]


def test_config_initialises_parallel_state_on_four_ranks(four_ranks):
    for rank, got in enumerate(four_ranks):
        assert got["first"] == "ok", got["cfg"]
        assert got["cfg"] == {"tensor_parallel_size": 2, "context_parallel_size": 2,
                              "context_parallel_config": {"comm_type": "all_gather",
                                                          "load_balance": "zigzag",
                                                          "a2a_size": None}}
        assert got["cp_groups"] == [[0, 2], [1, 3]]
        assert got["tp_groups"] == [[0, 1], [2, 3]]
        assert got["sizes"] == (2, 2, 1)
        assert got["cp_rank"] == rank // 2
        assert got["active_after_first"] == "all_gather"


def test_one_config_reaches_data_and_model(four_ranks):
    for rank, got in enumerate(four_ranks):
        assert got["positions"] == ([0, 1, 2, 3, 12, 13, 14, 15] if rank < 2 else
                                    [4, 5, 6, 7, 8, 9, 10, 11]), got["positions"]
        status, msg = got["transform_other"]
        assert status == "ValueError" and "config['context_parallel_config']=" in msg, msg
        assert "comm_type='p2p'" in msg and "differs from the active config's" in msg, msg
        status, msg = got["transform_string"]
        assert status == "ValueError" and "config='p2p' is invalid" in msg, msg
        assert got["attention_active"] == ("ok", (1, 2, 8, 4)), got["attention_active"]
        status, msg = got["model_after_reconfig"]
        assert status == "RuntimeError" and "sequence_parallel=False" in msg, msg
        assert "'comm_type': 'all_gather'" in msg and "'comm_type': 'p2p'" in msg, msg
        # the module keeps the config it was built with (no silent swap, nothing read per call)
        assert got["attention_after_reconfig"] == ("ok", (1, 2, 8, 4))
        assert got["attention_bound"] == "all_gather"


def test_second_call_conflict_and_destroy(four_ranks):
    for rank, got in enumerate(four_ranks):
        assert got["again"] == "ok" and got["same_group_after_again"]
        assert got["active_after_again"] == "p2p" and got["active_after_destroy"]
        status, msg = got["conflict"]
        assert status == "RuntimeError", msg
        assert "already initialized with tensor_parallel_size=2, context_parallel_size=2" in msg
        assert "asks for tensor_parallel_size=4, context_parallel_size=1" in msg
        assert "destroy_model_parallel" in msg
        assert got["cp_size_after_conflict"] == 2
