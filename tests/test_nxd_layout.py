"""nxd_cp.topology.layout against NxD's own layout function over a (platform, world, tp, cp,
pp) grid.

One spawned rank (a 1-process gloo world) imports NxD's real source and calls its
``initialize_model_parallel(..., mesh_only=True)``, which returns the groups without creating
process groups; only torch.distributed's world-size / rank queries are patched to the grid's
world. nxd_cp must give exactly NxD's groups where NxD accepts the sizes and a ValueError where
NxD raises (sizes above the world size, which NxD silently clamps, are left out: refused here).
"""
import itertools
import os

from nxd_cp.testing import run_ranks
from nxd_source import NXD_RANKS, requires_nxd

pytestmark = requires_nxd

WORLDS = (8, 32, 64, 128)
TPS = (1, 2, 4, 8, 32, 64)
CPS = (1, 2, 4, 8)
PPS = (1, 2, 4)
# (platform, lnc_size, LOCAL_WORLD_SIZE or None for NxD's default)
PLATFORMS = (("trn1", 1, None), ("trn1", 1, 32), ("trn2", 1, None), ("trn2", 1, 128),
             ("trn2", 2, None), ("trn3", 1, None))


def golden(rank, world):
    import torch.distributed as dist
    from neuronx_distributed.parallel_layers import parallel_state as nps

    from nxd_cp.topology.layout import ParallelLayout, rank_ring_pairs
    from neuronxcc.nki._private_kernels.collectives import CollectivesConfig

    fake = {"world": 1}
    dist.get_world_size = lambda group=None: fake["world"]
    dist.get_rank = lambda group=None: 0
    out = {"compared": 0, "refused_by_both": 0, "mismatch": [], "refusals": {}}
    for (platform, lnc, local), w, tp, cp, pp in itertools.product(PLATFORMS, WORLDS, TPS, CPS,
                                                                    PPS):
        if max(tp, cp, pp) > w:
            continue
        case = (platform, lnc, local, w, tp, cp, pp)
        os.environ["NXD_STUB_PLATFORM"] = platform
        os.environ.pop("LOCAL_WORLD_SIZE", None)
        if local is not None:
            os.environ["LOCAL_WORLD_SIZE"] = str(local)
        fake["world"] = w
        try:
            theirs = nps.initialize_model_parallel(tp, pp, cp, lnc_size=lnc, mesh_only=True)
        except Exception as e:  # noqa: BLE001 - NxD raises RuntimeError / AssertionError / ...
            theirs = e
        try:
            ours = ParallelLayout(w, tp, cp, pp, platform=platform, lnc_size=lnc,
                                  local_world_size=local)
        except ValueError as e:
            ours = e
        if isinstance(theirs, Exception) or isinstance(ours, Exception):
            if isinstance(theirs, Exception) and isinstance(ours, Exception):
                out["refused_by_both"] += 1
                out["refusals"][case] = str(ours)
            else:
                out["mismatch"].append((case, repr(theirs)[:200], repr(ours)[:200]))
            continue
        out["compared"] += 1
        mine = ours.mesh()
        for field in theirs._fields:
            if [list(g) for g in getattr(theirs, field)] != getattr(mine, field):
                out["mismatch"].append((case, field))
        cc = CollectivesConfig(replica_groups=theirs.cp_groups)
        for r in (0, w - 1):
            if cc.rank_src_tgt_pairs[r] != rank_ring_pairs(mine.cp_groups, r):
                out["mismatch"].append((case, f"src_tgt_pairs of rank {r}"))
    return out


def test_layout_equals_nxds_over_the_grid():
    res = run_ranks(golden, 1, timeout=300, **NXD_RANKS)[0]
    print(f"\n{res['compared']} layouts equal to NxD's, {res['refused_by_both']} refused by both")
    assert not res["mismatch"], res["mismatch"][:10]
    assert res["compared"] > 500 and res["refused_by_both"] > 50
    # The cases the docs name: TP4 x CP8 on one 32-core trn1 node is refused, as by NxD.
    msg = res["refusals"][("trn1", 1, 32, 32, 4, 8, 1)]
    assert "tensor_model_parallel_size=4 with context_parallel_size=8" in msg
