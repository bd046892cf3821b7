"""Registration APIs without processes: clear errors for specs and hooks that cannot work, an
unknown architecture's error saying how to register one, weights carried over by name.
(The registrations at work, on real ranks: test_custom_models.py.)"""
import dataclasses

import pytest
import torch
from torch import nn


class Original(nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x, scale=1.0):
        return self.lin(x) * scale


class Replacement(nn.Module):
    def __init__(self, dim, *, factor=1):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, hidden_states, *, scale=1.0):
        return (self.lin(hidden_states) * scale, None)


class NoArguments(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x):
        return x


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Original()

    def forward(self, x):
        return self.inner(x, scale=2.0)


@pytest.fixture
def registry():
    from nxd_cp import nn as cnn

    yield cnn
    cnn.unregister_module(Original)


# register_module(...) arguments (the module class first) -> the error they must raise
MISMATCHED = {
    "init_hook_arguments": (
        (Original, Replacement), dict(init_hook=lambda: ((4,), {})),
        r"init_hook .*must take one argument \(the Original instance\)"),
    "forward_hook_arguments": (
        (Original, Replacement), dict(init_hook=lambda m: ((4,), {}), forward_hook=lambda x: x),
        r"forward_hook .*does not accept the forward arguments "
        r"of Original.forward\(self, x, scale=1.0\)"),
    "return_hook_arguments": (
        (Original, Replacement), dict(init_hook=lambda m: ((4,), {}),
                                      forward_hook=lambda x, scale=1.0: ((x,), {"scale": scale}),
                                      return_hook=lambda out, extra: out),
        r"return_hook .*must take one argument"),
    # no forward_hook: the replacement's own forward must take the original's arguments
    "no_forward_hook": (
        (Original, Replacement), dict(init_hook=lambda m: ((4,), {})),
        r"Replacement.forward \(no forward_hook given\)"),
    "no_init_hook": (
        (Original, NoArguments), dict(forward_hook=lambda x, scale=1.0: ((x,), {})),
        r"NoArguments.__init__ \(no init_hook given\) NoArguments\(\) must take one argument"),
    "not_a_module": (
        (int, Replacement), {}, r"module_cls=.* must be a torch.nn.Module subclass"),
}


@pytest.mark.parametrize("case", list(MISMATCHED))
def test_hooks_with_mismatched_signatures_are_named(registry, case):
    classes, kwargs, match = MISMATCHED[case]
    with pytest.raises(ValueError, match=match):
        registry.register_module(*classes, **kwargs)
    assert Original not in registry.registered_modules()  # nothing half-registered


def test_hooks_checked_when_called(registry):
    from nxd_cp.nn.registry import replace_registered_modules

    # init_hook returns arguments the replacement does not take
    registry.register_module(Original, Replacement, init_hook=lambda m: ((4, 5), {}),
                             forward_hook=lambda x, scale=1.0: ((x,), {"scale": scale}))
    with pytest.raises(ValueError, match=r"init_hook .* gave arguments that Replacement\(dim, "
                                         r"\*, factor=1\) does not accept \(module 'inner'\)"):
        replace_registered_modules(Holder())
    # forward_hook returning something that is not (args, kwargs)
    registry.register_module(Original, Replacement, init_hook=lambda m: ((4,), {}),
                             forward_hook=lambda x, scale=1.0: x,
                             return_hook=lambda out: out[0])
    model = Holder()
    with pytest.raises(ValueError, match=r"forward_hook .* must return \(args tuple, kwargs "
                                         r"dict\), got Tensor"):
        replace_registered_modules(model)
        model(torch.ones(1, 4))


def test_replacement_carries_weights_and_translates(registry):
    """TP-free (replicated) parameters: the replacement's output equals the original's."""
    from nxd_cp.nn.registry import replace_registered_modules

    registry.register_module(Original, Replacement, init_hook=lambda m: ((4,), {}),
                             forward_hook=lambda x, scale=1.0: ((x,), {"scale": scale}),
                             return_hook=lambda out: out[0])
    torch.manual_seed(0)
    model, x = Holder(), torch.randn(3, 4)
    want = model(x)
    assert replace_registered_modules(model) == ["inner"]
    assert isinstance(model.inner, Replacement)
    # same weights, same arithmetic: bit-identical
    assert torch.equal(model(x), want)


def test_replacement_with_other_parameter_names_is_an_error(registry):
    from nxd_cp.nn.registry import replace_registered_modules

    class Renamed(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.proj = nn.Linear(dim, dim)

        def forward(self, x, scale=1.0):
            return self.proj(x)

    registry.register_module(Original, Renamed, init_hook=lambda m: ((4,), {}))
    with pytest.raises(ValueError, match=r"module 'inner': Renamed has state-dict keys "
                                         r"\['proj.bias', 'proj.weight'\] but Original has"):
        replace_registered_modules(Holder())


def test_unknown_architecture_says_how_to_register():
    import transformers as tf

    from nxd_cp.models import transform

    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"unsupported architecture GPT2LMHeadModel: .*"
                       r"Qwen2ForCausalLM, Qwen3ForCausalLM\. To add a family, describe it with "
                       r"nxd_cp.ArchitectureSpec\(.*nxd_cp.register_architecture\(spec\)"):
        transform(model)


def test_register_architecture_validates():
    import nxd_cp
    from nxd_cp.models import registered_architectures
    from nxd_cp.models.qwen import QWEN2

    bad = {"class_names": "Qwen2ForCausalLM", "column": "q_proj", "fused_qkv_layout": "blocks"}
    for key, value in bad.items():
        with pytest.raises(ValueError, match=rf"ArchitectureSpec.{key}="):
            nxd_cp.register_architecture(dataclasses.replace(QWEN2, **{key: value}))
    with pytest.raises(ValueError, match="kv is empty, so the K/V projections must be fused"):
        nxd_cp.register_architecture(dataclasses.replace(QWEN2, kv=()))
    with pytest.raises(ValueError, match=r"window must take \(config, layer_idx\)"):
        nxd_cp.register_architecture(dataclasses.replace(QWEN2, window=lambda config: None))
    other = dataclasses.replace(QWEN2, name="my_qwen2")
    with pytest.raises(ValueError, match="Qwen2ForCausalLM is already registered by "
                                         "architecture 'qwen2'; pass override=True"):
        nxd_cp.register_architecture(other)
    assert registered_architectures()["Qwen2ForCausalLM"] is QWEN2
    assert nxd_cp.register_architecture(QWEN2) is QWEN2  # the same spec again: a no-op

