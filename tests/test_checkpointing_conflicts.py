"""Checkpointing switched on twice, or where it cannot run, caught by the forward of a transformed
model (``nxd_cp.models.inputs`` -> ``training.checkpointing.checkpointing_conflict``).

One process, CPU, a 1 x 1 world (``explicit_rank``): the check reads module attributes and the
input's device type only, so the world's size does not matter to it. Each case has its negative
control: the same model without the second checkpointing (or in eval) trains / runs.
"""
import pytest
import torch
from test_models import make_batch, make_model

from nxd_cp import parallel_state as ps
from nxd_cp.models import transform
from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank
from nxd_cp.testing import activate_config

pytestmark = [pytest.mark.unit]


def _model(ckpt):
    config = dict(activate_config("p2p"), activation_checkpoint_config=ckpt)
    return transform(make_model("llama"), config)


def _train_step(model):
    batch = get_batch_on_this_context_parallel_rank(make_batch(100))
    model(**batch).loss.backward()


@pytest.fixture
def world():
    with ps.explicit_rank(1, 0):
        yield


def test_gradient_checkpointing_enable_after_transform_with_nxd_cp_checkpointing(world):
    model = _model("full")
    _train_step(model)  # control: nxd_cp's checkpointing alone trains
    model.gradient_checkpointing_enable()  # after transform: transform cannot see it
    with pytest.raises(RuntimeError, match="on twice.*gradient_checkpointing_disable"):
        _train_step(model)
    model.eval()
    with torch.no_grad():
        model(**get_batch_on_this_context_parallel_rank(make_batch(100)))  # eval: no recompute
    model.train()
    model.gradient_checkpointing_disable()
    _train_step(model)  # control: back to one checkpointing


def test_gradient_checkpointing_enable_after_transform_alone(world):
    """Off XLA transformers' own checkpointing runs (torch.utils.checkpoint) and is left alone;
    an input on an XLA device is refused before anything runs, naming what to do instead."""
    model = _model(None)
    model.gradient_checkpointing_enable()
    _train_step(model)  # control: CPU
    torch_xla = pytest.importorskip("torch_xla")
    batch = {k: v.to(torch_xla.device())
             for k, v in get_batch_on_this_context_parallel_rank(make_batch(100)).items()}
    with pytest.raises(RuntimeError, match='activation_checkpoint_config="full"'):
        model(**batch)


def test_checkpoint_wrapper_on_an_nxd_cp_checkpointed_layer(world):
    """NxD's initialize_parallel_model applies its activation_checkpoint_config with torch's
    CheckpointWrapper (NxDCheckpointWrapper): on a layer nxd_cp checkpointed too, twice."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    def wrap(model):
        layers = model.model.layers
        layers[0] = checkpoint_wrapper(layers[0])
        return model

    _train_step(wrap(_model(None)))  # control: the wrapper alone
    model = wrap(_model("full"))
    with pytest.raises(RuntimeError, match="checkpoint wrapper.*activation_checkpoint_config': "
                                           "None"):
        _train_step(model)
