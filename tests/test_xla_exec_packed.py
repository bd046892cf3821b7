"""Packed documents on XLA: one graph for every rank and every document layout, executed.

Each CP rank's forward + backward of ``context_parallel_attention`` with ``seq_idx`` (and
``position_ids`` for per_document + window) is lowered by torch-xla for two different document
layouts of the batch (``tests/xla_exec.py``). The document ids, positions and the rank are
device data, so all those modules must be one graph. That graph (rank 0's, lowered with layout
A) is then *executed* by JAX on both ranks with their inputs of layout B, the collectives running
for real, and compared with float64 SDPA masked per document for layout B.

Tolerances: fp32 forward 1e-5, gradients 1e-4, norm-wise relative (the fp32 standard). Negative
control: the same results against the reference without the document mask are far off.
"""
import re

import pytest
import torch

pytest.importorskip("torch_xla")
pytest.importorskip("jax")

from test_attention_packed import reference  # noqa: E402
from xla_exec import execute, lower_world, normalise_hlo  # noqa: E402

from nxd_cp.attention import context_parallel_attention  # noqa: E402
from nxd_cp.sequence.layout import sequence_positions, shard_sequence  # noqa: E402

CP, S, D = 2, 32, 16
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
LAYOUTS = {"A": ([3, 1, 12, 16], [20, 8, 4]), "B": ([1, 1, 1, 29], [5, 5, 18, 4])}  # last: pad
CASES = {"p2p-zigzag": dict(comm="p2p", layout="zigzag", window=None, heads=(4, 2)),
         "all_gather-contiguous": dict(comm="all_gather", layout="contiguous", window=None,
                                       heads=(4, 1)),
         "p2p-per_document-window5": dict(comm="p2p", layout="per_document", window=5,
                                          heads=(4, 2)),
         "all_gather-per_document": dict(comm="all_gather", layout="per_document", window=None,
                                         heads=(4, 4))}


def full_inputs(name, n):
    rows = LAYOUTS[name]
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r))
                       for r in rows])
    keep = torch.ones(2, S, dtype=torch.bool)
    keep[1, S - rows[1][-1]:] = False
    g = torch.Generator().manual_seed(n)
    hq, hkv = list(CASES.values())[n]["heads"]
    q, k, v, dout = (torch.randn(2, h, S, D, generator=g) for h in (hq, hkv, hkv, hq))
    return q, k, v, dout, ids, keep


def step_for(layout_name):
    import torch_xla

    from nxd_cp import parallel_state as ps

    def step(rank):
        dev = torch_xla.device()
        r = ps.get_context_model_parallel_rank()
        outputs = {}
        for n, (name, case) in enumerate(CASES.items()):
            q, k, v, dout, ids, keep = full_inputs(layout_name, n)
            lb = case["layout"]

            def shard(t, dim):
                return shard_sequence(t, dim, r, CP, lb, seq_idx=ids).to(dev)
            ql, kl, vl = (shard(t, 2).requires_grad_() for t in (q, k, v))
            # int32 as the data function returns seq_idx (an int64 input is an s64 parameter)
            pos = sequence_positions(S, r, CP, lb, seq_idx=ids).expand(2, -1).int().to(dev)
            out = context_parallel_attention(
                ql, kl, vl, comm_type=case["comm"], window_size=case["window"],
                load_balance=lb, key_padding_mask=shard(keep, 1), seq_idx=shard(ids.int(), 1),
                position_ids=pos)
            out.backward(shard(dout, 2))
            outputs.update({f"{name}/out": out, f"{name}/dq": ql.grad, f"{name}/dk": kl.grad,
                            f"{name}/dv": vl.grad})
        return outputs
    return step


def expected(layout_name, use_documents=True):
    want = [{} for _ in range(CP)]
    for n, (name, case) in enumerate(CASES.items()):
        q, k, v, dout, ids, keep = full_inputs(layout_name, n)
        ref = reference(q, k, v, dout, ids, keep, dict(case, causal=True), use_documents)[:4]
        for r in range(CP):
            for key, t in zip(("out", "dq", "dk", "dv"), ref):
                want[r][f"{name}/{key}"] = shard_sequence(t, 2, r, CP, case["layout"],
                                                          seq_idx=ids)
    return want


def worst_errors(got, want):
    worst = {}
    for g, w in zip(got, want):
        for name, ref in w.items():
            err = ((torch.from_numpy(g[name]).double() - ref).norm()
                   / ref.norm().clamp_min(1e-30)).item()
            worst[name] = max(worst.get(name, 0.0), err)
    return worst


@pytest.fixture(scope="module")
def executed():
    """Every rank's module for layouts A and B, and rank 0's layout-A module executed by both
    ranks on their layout-B inputs."""
    lowered = {name: lower_world(step_for(name), CP, context_parallel_size=CP)
               for name in LAYOUTS}
    # rank 0's module of layout A, run by both ranks on their layout-B inputs
    got = execute(lowered["A"][0], world_size=CP, inputs=[m.inputs for m in lowered["B"]],
                  timeout=300)
    return lowered, got, worst_errors(got, expected("B"))


def test_packed_attention_is_one_graph(executed):
    lowered, _, _ = executed
    graphs = {normalise_hlo(m.text) for ms in lowered.values() for m in ms}
    assert len(graphs) == 1, "ranks or document layouts lowered different graphs"
    text = lowered["A"][0].text
    assert not re.search(r"\b[fs]64\[", text), "f64 / s64 in the packed attention graph"


@pytest.mark.parametrize("case", list(CASES))
def test_packed_attention_executes(executed, case):
    _, _, worst = executed
    assert len(worst) == 4 * len(CASES)
    mine = {n: e for n, e in worst.items() if n.startswith(case + "/")}
    print(f"packed, XLA executed, {case}: " +
          ", ".join(f"{n} {e:.1e}" for n, e in sorted(mine.items())))
    assert len(mine) == 4, sorted(mine)
    bad = {n: e for n, e in mine.items() if e > (FWD_TOL if n.endswith("/out") else GRAD_TOL)}
    assert not bad, bad


def test_without_documents_the_reference_is_far_off(executed):
    """Negative control: the same results against the reference without the document mask."""
    _, got, _ = executed
    control = worst_errors(got, expected("B", use_documents=False))
    assert max(control[f"{n}/out"] for n in CASES) > 1e-2, control
