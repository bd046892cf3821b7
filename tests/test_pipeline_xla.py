"""Each pipeline stage lowers to one XLA graph, the same on every TP x CP rank of the stage.

For every global rank of TP2 x CP2 x PP2 and TP1 x CP2 x PP4 (tiny 4-layer Llama), torch-xla on
CPU lowers one microbatch forward + backward of the rank's ``CausalLMStage`` (``transform``
under ``parallel_state.explicit_rank``; ``benchmarks/bench_pipeline.py`` builds it): the first
stage from int32 token ids, the others from a hidden-state input, the last backward from the
model's loss. Per stage the normalised HLO (``normalise_hlo``) must be one graph over its TP x
CP ranks, with no f64, and with the collectives of its TP / CP sizes; stages with the embedding
or the head must differ from the others (a control that the comparison can tell graphs apart).
"""
import os
import sys

import pytest

pytest.importorskip("torch_xla")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

from bench_pipeline import stage_graphs  # noqa: E402


@pytest.mark.parametrize("tp,cp,pp", [(2, 2, 2), (1, 2, 4)])
def test_one_graph_per_stage_identical_over_its_tp_cp_ranks(tp, cp, pp):
    rows = stage_graphs(tp, cp, pp)
    assert [r["stage"] for r in rows] == list(range(pp))
    for r in rows:
        assert r["ranks"] == tp * cp, r
        assert r["distinct"] == 1, r
        assert r["f64"] == 0, r
        assert r["collectives"].get("collective-permute", 0) > 0, r  # the CP ring
        assert ("all-reduce" in r["collectives"]) == (tp > 1 or r["stage"] == pp - 1), r
    first, last = rows[0]["hashes"], rows[-1]["hashes"]
    assert first != last and all(first != r["hashes"] != last for r in rows[1:-1])
    if pp > 3:  # middle stages: same layers, no embedding / head -> the same graph
        assert len({tuple(r["hashes"]) for r in rows[1:-1]}) == 1
