"""save_checkpoint / load_checkpoint: exact resume, other layouts, a rank killed mid-save.

Three spawns (4, 4 and 1 gloo ranks):
1. Uninterrupted runs of N=6 steps (AdamW with weight decay, a warm-up + decay LR schedule, one
   random draw per step standing in for dropout) for TP2xCP2 p2p and CP2xDP2 all_gather (tp=1),
   saving a checkpoint after step K=3.
2. Resumed runs: fresh models and optimizers load the newest checkpoint and run steps K+1..N;
   losses, random draws and final parameters must be bit-identical to run 1 (no tolerance:
   the same operations on the same bits). Then, under TP1xCP4: the CP2xDP2 checkpoint loads
   (same tp, other cp/dp) bit for bit, the TP2xCP2 one is refused naming both layouts, and
   a save is started during which rank 1 is killed (SIGKILL).
3. After the kill, one rank loads the newest checkpoint of that directory: still step K,
   bit-identical to run 1's parameters at step K.
"""
import os

import pytest
import torch

from nxd_cp.testing import run_ranks

N, K, SEQ = 6, 3, 64
CONFIGS = {"tp2cp2": (2, 2, "p2p"), "cp2dp2": (1, 2, "all_gather")}


def make_model():
    import transformers as tf

    torch.manual_seed(5)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ))


def batch(step, dp_rank):
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    ids = torch.randint(0, 128, (2, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def build(comm):
    from nxd_cp.models import transform
    from test_models import configure

    model = transform(make_model(), configure(comm))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2) * 0.8 ** s)
    return model, opt, sched


def train(model, opt, sched, steps):
    """Steps ``steps``; returns per step (loss, a random draw) of this rank."""
    from nxd_cp import parallel_state as ps
    from nxd_cp.sequence.batch import get_batch_on_this_context_parallel_rank
    from nxd_cp.training.grads import allreduce_data_context_parallel_gradients

    out = []
    for step in steps:
        opt.zero_grad()
        loss = model(**get_batch_on_this_context_parallel_rank(
            batch(step, ps.get_data_parallel_rank()))).loss
        loss.backward()
        allreduce_data_context_parallel_gradients(model)
        opt.step()
        sched.step()
        out.append((loss.item(), torch.rand(1).item()))
    return out


def _plain(state):
    """Tensors as numpy arrays: picklable by value across the process boundary."""
    return None if state is None else {k: v.numpy().copy() for k, v in state.items()}


def uninterrupted(rank, world, root):
    import nxd_cp
    from nxd_cp import parallel_state as ps

    res = {}
    for name, (tp, cp, comm) in CONFIGS.items():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        model, opt, sched = build(comm)
        steps = train(model, opt, sched, range(1, K + 1))
        nxd_cp.save_checkpoint(os.path.join(root, name), f"step{K}", model=model,
                               optimizer=opt, scheduler=sched, user_content={"step": K},
                               step=K, data_position=K + 1)
        at_k = _plain(nxd_cp.full_state_dict(model))
        steps += train(model, opt, sched, range(K + 1, N + 1))
        res[name] = {"steps": steps, "at_k": at_k, "final": _plain(nxd_cp.full_state_dict(model))}
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(context_parallel_size=2)
    model, opt, _ = build("p2p")
    for tag in ("a", "b", "c"):  # num_kept_ckpts=2 drops the oldest complete one
        nxd_cp.save_checkpoint(os.path.join(root, "kept"), tag, model=model, num_kept_ckpts=2)
    res["kept"] = sorted(os.listdir(os.path.join(root, "kept")))
    return res


def resumed(rank, world, root):
    import signal

    import nxd_cp
    from nxd_cp import parallel_state as ps

    res = {}
    for name, (tp, cp, comm) in CONFIGS.items():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        model, opt, sched = build(comm)
        torch.manual_seed(1234)  # a different RNG state: the checkpoint must restore it
        content = nxd_cp.load_checkpoint(os.path.join(root, name), model=model, optimizer=opt,
                                         scheduler=sched)
        meta = nxd_cp.checkpoint_metadata(os.path.join(root, name))
        first = meta["data_position"]
        steps = train(model, opt, sched, range(first, N + 1))
        res[name] = {"steps": steps, "final": _plain(nxd_cp.full_state_dict(model)),
                     "content": content,
                     "meta": meta}
        ps.destroy_model_parallel()

    ps.initialize_model_parallel(context_parallel_size=4)
    model, opt, sched = build("p2p")
    nxd_cp.load_checkpoint(os.path.join(root, "cp2dp2"), model=model, optimizer=opt,
                           scheduler=sched)
    res["cp4_from_cp2dp2"] = _plain(nxd_cp.full_state_dict(model))
    try:
        nxd_cp.load_checkpoint(os.path.join(root, "tp2cp2"), model=model)
        res["tp_change"] = None
    except ValueError as e:
        res["tp_change"] = str(e)
    if rank == 0:
        torch.save(res, os.path.join(root, "resumed.pt"))
    torch.distributed.barrier()
    if rank == 1:  # killed while writing its part of the next checkpoint
        torch.save = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    nxd_cp.save_checkpoint(os.path.join(root, "cp2dp2"), "step99", model=model, optimizer=opt)
    return "the save completed although rank 1 was killed"


def after_kill(rank, world, root):
    import nxd_cp
    from nxd_cp import parallel_state as ps

    ps.initialize_model_parallel()
    model, opt, sched = build("p2p")
    content = nxd_cp.load_checkpoint(os.path.join(root, "cp2dp2"), model=model, optimizer=opt)
    return {"content": content, "params": _plain(nxd_cp.full_state_dict(model)),
            "listing": sorted(os.listdir(os.path.join(root, "cp2dp2"))),
            "has": nxd_cp.has_checkpoint(os.path.join(root, "cp2dp2"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    first = run_ranks(uninterrupted, 4, root, timeout=240)
    # The killed rank's peers fail in save_checkpoint's barrier (gloo sees the closed socket).
    with pytest.raises(AssertionError, match=r"in save_checkpoint\n\s+dist.barrier"):
        run_ranks(resumed, 4, root, timeout=240)
    second = torch.load(os.path.join(root, "resumed.pt"), weights_only=False)
    third = run_ranks(after_kill, 1, root, timeout=120)[0]
    return first, second, third


def _identical(a, b):
    """Same keys, dtypes, shapes and bits."""
    return sorted(a) == sorted(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_is_bit_identical(runs, name):
    first, second, _ = runs
    want = first[0][name]
    got = second[name]
    # Rank 0's losses and draws after the resume (other ranks: same code path).
    assert got["steps"] == want["steps"][K:], (got["steps"], want["steps"][K:])
    assert _identical(got["final"], want["final"]), "final parameters differ"
    assert got["content"] == {"step": K}
    layout = got["meta"]["layout"]
    assert (layout["tp"], layout["cp"], layout["dp"], got["meta"]["step"]) == \
        (CONFIGS[name][0], CONFIGS[name][1], 4 // (CONFIGS[name][0] * CONFIGS[name][1]), K)
    assert got["meta"]["context_parallel_config"]["comm_type"] == CONFIGS[name][2]


def test_num_kept_ckpts(runs):
    assert runs[0][0]["kept"] == ["b", "c", "newest"]


def test_other_cp_dp_same_tp_loads_exactly(runs):
    first, second, _ = runs
    assert _identical(second["cp4_from_cp2dp2"], first[0]["cp2dp2"]["at_k"])


def test_other_tp_is_refused_naming_both_layouts(runs):
    msg = runs[1]["tp_change"]
    assert msg is not None
    assert "was saved with tp=2, cp=2, dp=1, pp=1, world=4" in msg, msg
    assert "this run has tp=1, cp=4, dp=1, pp=1, world=4" in msg, msg


def test_rank_killed_mid_save_leaves_previous_checkpoint(runs):
    first, _, third = runs
    assert ".step99.tmp" in third["listing"] and "step99" not in third["listing"]
    assert third["has"] and third["content"] == {"step": K}
    assert _identical(third["params"], first[0]["cp2dp2"]["at_k"])


def test_example_kill_and_resume_is_bit_identical(tmp_path):
    """examples/train_llama_cp.py --save_dir/--save_every/--resume under torchrun, TP2xCP2:
    resuming from the step-2 checkpoint repeats steps 3 and 4 of the uninterrupted run bit for
    bit (losses compared as exact floats; warm-up LR schedule, AdamW)."""
    from test_example import run_example

    common = ["--tensor_parallel_size", "2", "--context_parallel_size", "2", "--seq_len", "256",
              "--steps", "4", "--warmup_steps", "3", "--save_dir", str(tmp_path / "ckpt")]
    full, out = run_example(tmp_path, 4, *common, "--save_every", "2")
    assert "saved" in out and sorted(os.listdir(tmp_path / "ckpt")) == [
        "newest", "step_000002", "step_000004"]
    resumed, out = run_example(tmp_path, 4, *common, "--resume", "step_000002")
    assert "resumed from" in out and "(step 2)" in out
    assert sorted(resumed["losses"]) == ["3", "4"]
    assert resumed["losses"] == {k: full["losses"][k] for k in ("3", "4")}, (resumed, full)
