"""A TP2 x CP2 training step with activation checkpointing, lowered and executed on XLA.

``activation_checkpoint_config="full"`` (every decoder layer recomputed in backward with
torch-xla's checkpoint: ``torch.utils.checkpoint`` fails on torch-xla 2.9). As in
``tests/test_xla_exec_models.py``: the 4 ranks' step graphs (forward, loss, backward, CP
gradient reduction, ``nxd_cp.training.optim.AdamW``) are lowered in this process and must be
the same HLO; rank 0's module is executed by ``tests/xla_exec.py`` for all 4 ranks (JAX
XLA:CPU, gloo collectives) and compared with the unmodified transformers model (fp32): loss
1e-5 relative (CP/TP reorder fp32 sums), gradients and parameters after one AdamW step 1e-4
norm-wise relative per tensor, worst rank. The recompute is really in the graph: an
``opt-barrier`` per decoder layer and more instructions than the step without checkpointing.

Model: ``tests/test_models.py``'s tiny Llama (GQA, llama3 rope, hidden 64, 2 layers, sequence
256, batch 2), p2p, int32 batch.
"""
import re

import pytest
import torch

pytest.importorskip("torch_xla")
pytest.importorskip("jax")

from test_models import configure, make_model, rel  # noqa: E402
from test_xla_exec_models import reference, traced_step  # noqa: E402
from xla_exec import execute, lower_world, normalise_hlo  # noqa: E402

pytestmark = [pytest.mark.xla_exec]

TP, CP, WORLD = 2, 2, 4


def step(rank, ckpt="full"):
    """This rank's Llama p2p step: loss, full gradients, full parameters after AdamW."""
    import torch_xla

    from nxd_cp.models import transform

    config = dict(configure("p2p"), activation_checkpoint_config=ckpt)
    model = transform(make_model("llama"), config).to(torch_xla.device())
    return traced_step(model, torch.int32)


def _instructions(text):
    return sum(1 for line in text.splitlines() if re.match(r"\s+(ROOT )?%", line))


@pytest.fixture(scope="module")
def run():
    modules = lower_world(step, WORLD, tensor_model_parallel_size=TP, context_parallel_size=CP)
    got = execute(modules[0], world_size=WORLD, inputs=[m.inputs for m in modules], timeout=500)
    return modules, _plain_rank0_text(), got


def _plain_rank0_text():
    """Rank 0's HLO text of the same step without checkpointing."""
    import torch_xla

    from nxd_cp import parallel_state as ps
    from nxd_cp.compat import torch_xla as xla_compat

    xla_compat.reset_collective_token(str(torch_xla.device()))
    with ps.explicit_rank(WORLD, 0, TP, CP, 1):
        outputs = step(0, ckpt=None)
    return xla_compat.tensors_hlo(list(outputs.values()))


def test_checkpointed_step_is_one_graph_with_the_recompute(run):
    modules, plain, _ = run
    graphs = {normalise_hlo(m.text) for m in modules}
    assert len(graphs) == 1, f"{len(graphs)} distinct graphs over {WORLD} ranks"
    text = modules[0].text
    assert not re.search(r"\bf64\[", text)
    assert len(re.findall(r"\bopt-barrier\(", text)) >= 2, "one barrier per decoder layer"
    assert "opt-barrier(" not in plain
    n_ckpt, n_plain = _instructions(text), _instructions(plain)
    print(f"instructions: checkpointed {n_ckpt}, plain {n_plain}")
    assert n_ckpt > n_plain  # the recomputed forward of both layers is in the backward


def test_checkpointed_step_matches_transformers(run):
    _, _, got = run
    want_loss, want_grads, want_params = reference("llama")
    loss_err = max(abs(float(out["loss"]) - want_loss) / abs(want_loss) for out in got)
    assert loss_err <= 1e-5, loss_err  # fp32: CP and TP only reorder sums
    for what, want in (("grad", want_grads), ("param", want_params)):
        errs = {n: max(rel(torch.from_numpy(out[f"{what}/{n}"]), t) for out in got)
                for n, t in want.items()}
        worst = max(errs, key=errs.get)
        print(f"loss {loss_err:.1e} worst {what} {worst} {errs[worst]:.1e}")
        assert errs[worst] <= 1e-4, (worst, errs[worst])  # fp32, norm-wise per tensor
