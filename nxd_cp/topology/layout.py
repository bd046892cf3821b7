"""Rank layout of NxD as pure functions: no processes, no torch.distributed.

The groups are exactly those of NeuronX Distributed 0.18's ``initialize_model_parallel``
(``parallel_layers/parallel_state.py``) for every (platform, tp, cp, pp) it accepts, and a
``ValueError`` for what it refuses (tests/test_nxd_layout.py compares against NxD's own function
over a grid):

* default ("LOGIC1", and ``platform=None``, the non-Neuron layout): ranks are
  ``arange(world).reshape(pp, dp, cp, tp)``: TP contiguous, CP stride TP, DP stride TP*CP, PP
  stride TP*CP*DP;
* trn1 (also trn1n / inf2) with TP=4: each TP group takes every ``local_world_size/4``-th rank of
  one node (``[0, 8, 16, 24]`` on a 32-core node), so that TP never crosses nodes; NxD refuses it
  with CP > 1 and when DP is not a multiple of ``local_world_size/4``;
* trn2 with (lnc 1, TP=64) or (lnc 2, TP=32) ("LOGIC2", unless lnc 2 on fewer than 64 ranks):
  a TP group joins rows 0 and 3, and rows 1 and 2, of the node's 4x(local/4) core grid (all four
  rows when the node holds one TP group); CP / DP / PP groups zip consecutive TP groups.

Every group list is a list of groups, each a list of global ranks in group order (a rank's index
in its group is its rank inside that group). DP excludes CP, as in NxD; DP x CP is the group over
which gradients of a CP model are reduced (``data_context_parallel_groups``, the union of a CP
group's DP groups). NxD reduces gradients over its "expert data parallel" groups
(``expert_data_parallel_groups``), which are the DP x CP groups on every layout except LOGIC2 with
DP or CP > 1.

NxD silently clamps a size larger than the world to the world size; here that is a ValueError.
"""
from __future__ import annotations

import itertools
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

Groups = List[List[int]]
# NxD's return value of initialize_model_parallel(..., mesh_only=True).
ParallelGroups = namedtuple("ParallelGroups", ["tp_groups", "dp_groups", "pp_groups",
                                               "ep_model_groups", "ep_data_groups", "cp_groups"])

# NxD's neuronx_distributed.utils.utils.hardware names -> the hardware family.
_PLATFORMS = {"trn1": "trn1", "trn1n": "trn1", "inf2": "trn1", "trn2": "trn2", "trn3": "trn3"}


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


def _grid_groups(grid: Dict[Tuple[int, int, int, int], int], shape, varying: str) -> Groups:
    """Groups of ``grid[(p, d, c, t)]`` along the axes in ``varying``; groups ordered by the
    fixed coordinates in (p, d, c, t) order, members by the varying ones."""
    axes = "pdct"
    fixed = [i for i, a in enumerate(axes) if a not in varying]
    moving = [i for i, a in enumerate(axes) if a in varying]
    groups = []
    for f in itertools.product(*(range(shape[i]) for i in fixed)):
        group = []
        for m in itertools.product(*(range(shape[i]) for i in moving)):
            coord = [0] * 4
            for i, v in zip(fixed, f):
                coord[i] = v
            for i, v in zip(moving, m):
                coord[i] = v
            group.append(grid[tuple(coord)])
        groups.append(group)
    return groups


def _logic1(world: int, tp: int, cp: int, pp: int, trn1_tp4_local: Optional[int]):
    """NxD's default layout (and trn1's TP=4 one when ``trn1_tp4_local`` is the ranks per node)."""
    dp = world // (tp * cp * pp)
    if trn1_tp4_local is None:
        grid = {(p, d, c, t): ((p * dp + d) * cp + c) * tp + t
                for p, d, c, t in itertools.product(range(pp), range(dp), range(cp), range(tp))}
    else:
        # arange(world).reshape(pp, dp // n, cp, tp, n).transpose(-1, -2).reshape(pp, dp, cp, tp)
        n = trn1_tp4_local
        grid = {}
        for p, d, c, t in itertools.product(range(pp), range(dp), range(cp), range(tp)):
            d_hi, d_lo = divmod(d, n)
            grid[(p, d, c, t)] = (((p * (dp // n) + d_hi) * cp + c) * tp + t) * n + d_lo
    shape = (pp, dp, cp, tp)
    groups = {k: _grid_groups(grid, shape, v) for k, v in
              (("tensor", "t"), ("data", "d"), ("pipeline", "p"), ("context", "c"))}
    # EP = 1: NxD's expert grid is arange(world).reshape(pp, world/(pp*tp), 1, tp) (transposed
    # like the main grid for trn1 TP=4, which only exists with cp == 1).
    ranks = sorted(grid.values())
    edp = world // (pp * tp)
    if trn1_tp4_local is None:
        exp = {(p, e, 0, t): ranks[(p * edp + e) * tp + t]
               for p, e, t in itertools.product(range(pp), range(edp), range(tp))}
    else:
        exp = {(p, e, 0, t): grid[(p, e, 0, t)]
               for p, e, t in itertools.product(range(pp), range(edp), range(tp))}
    groups["expert_data"] = _grid_groups(exp, (pp, edp, 1, tp), "d")
    groups["expert_model"] = _grid_groups(exp, (pp, edp, 1, tp), "c")
    return groups


def _zip_tp_groups(tp_groups: Groups, parallel_size: int, merge: Optional[int]) -> Groups:
    """NxD's create_parallel_groups_from_tp_groups: zip each run of ``parallel_size`` TP groups
    (after merging every ``merge`` consecutive ones)."""
    out = []
    for i in range(0, len(tp_groups), parallel_size):
        chunk = tp_groups[i:i + parallel_size]
        if merge is not None:
            chunk = [sum(chunk[j:j + merge], []) for j in range(0, len(chunk), merge)]
        out.extend(list(z) for z in zip(*chunk))
    return out


def _logic2(world: int, tp: int, cp: int, pp: int, local: int):
    """NxD's trn2 "ascending-descending ring" layout (its tensor-model-parallel rows)."""
    dp = world // (tp * cp * pp)
    per_row = local // 4
    rows = [list(range(r * per_row, (r + 1) * per_row)) for r in range(4)]
    per_node = local // tp
    tp_groups = []
    for node in range(world // local):
        base = node * local
        a = [base + r for r in rows[0] + rows[3]]
        b = [base + r for r in rows[1] + rows[2]]
        tp_groups.extend([a + b] if per_node == 1 else [a, b])
    if len(tp_groups) != world // tp:
        raise ValueError(f"tensor_model_parallel_size={tp} with LOCAL_WORLD_SIZE={local} on "
                         f"world_size={world}: NxD's trn2 layout needs each node of {local} "
                         f"ranks to hold one or two TP groups")
    for size, what in ((cp, "context"), (dp * cp, "data x context"),
                       (pp * dp * cp, "pipeline x data x context")):
        if len(tp_groups) % size:
            raise ValueError(f"{len(tp_groups)} TP groups are not divisible by the {what} "
                             f"size {size} (NxD's trn2 layout)")
    singles = [[r] for r in range(world)]
    groups = {"tensor": tp_groups,
              "context": _zip_tp_groups(tp_groups, cp, None),
              "data": _zip_tp_groups(tp_groups, dp * cp, cp) if dp > 1 else singles,
              "pipeline": _zip_tp_groups(tp_groups, pp * dp * cp, dp * cp) if pp > 1 else singles}
    edp = world // (pp * tp)
    if edp > 1:
        groups["expert_data"] = [[(p * edp + e) * tp + t for e in range(edp)]
                                 for p in range(pp) for t in range(tp)]
    else:
        groups["expert_data"] = singles
    groups["expert_model"] = singles
    return groups


def nxd_groups(world_size: int, tensor_model_parallel_size: int = 1,
               context_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
               platform: Optional[str] = None, lnc_size: int = 1,
               local_world_size: Optional[int] = None) -> Dict[str, Groups]:
    """NxD's groups: ``{"tensor", "context", "data", "pipeline", "expert_data", "expert_model"}``
    -> group lists (expert groups for expert_model_parallel_size=1).

    ``platform``: None (non-Neuron: the plain layout) or NxD's platform target ("trn1", "trn1n",
    "inf2", "trn2", "trn3"); ``local_world_size``: ranks per node (NxD's ``LOCAL_WORLD_SIZE``;
    None: NxD's default, the world size for trn1 TP=4 and 64 for trn2). Raises ``ValueError``
    where NxD raises (or clamps), naming the sizes and the rule.
    """
    world, tp = world_size, tensor_model_parallel_size
    cp, pp = context_parallel_size, pipeline_model_parallel_size
    for name, value in (("world_size", world), ("tensor_model_parallel_size", tp),
                        ("context_parallel_size", cp), ("pipeline_model_parallel_size", pp),
                        ("lnc_size", lnc_size)):
        _check_size(name, value)
    for name, value in (("tensor_model_parallel_size", tp), ("context_parallel_size", cp),
                        ("pipeline_model_parallel_size", pp)):
        if value > world:
            raise ValueError(f"{name}={value} is larger than world_size={world} (NxD would "
                             "silently use the world size)")
    if world % (tp * cp * pp):
        raise ValueError(
            f"world_size={world} is not divisible by tensor_model_parallel_size({tp}) * "
            f"context_parallel_size({cp}) * pipeline_model_parallel_size({pp}) = {tp * cp * pp}")
    if platform is not None and platform not in _PLATFORMS:
        raise ValueError(f"platform={platform!r} is not one NxD knows: {sorted(_PLATFORMS)} "
                         "(or None off Neuron)")
    family = _PLATFORMS.get(platform)
    dp = world // (tp * cp * pp)
    if family == "trn1" and tp == 4:
        local = world if local_world_size is None else local_world_size
        n = local // 4
        if cp > 1:
            raise ValueError(f"tensor_model_parallel_size=4 with context_parallel_size={cp} is "
                             f"refused by NxD on {platform}: its TP=4 layout (TP groups strided "
                             "inside a node) supports context_parallel_size=1 only; use TP=8 "
                             "or TP=2 with CP")
        if n < 1 or dp % n:
            raise ValueError(f"tensor_model_parallel_size=4 on {platform} needs the data "
                             f"parallel size ({dp}) to be a multiple of LOCAL_WORLD_SIZE/4 "
                             f"({local}/4): NxD lays TP=4 groups out strided inside each node")
        return _logic1(world, tp, cp, pp, n)
    logic2 = family == "trn2" and (lnc_size, tp) in ((1, 64), (2, 32))
    if logic2 and lnc_size == 2 and world < 64:
        logic2 = False
    if logic2:
        local = 64 if local_world_size is None else local_world_size
        return _logic2(world, tp, cp, pp, local)
    return _logic1(world, tp, cp, pp, None)


def union_groups(outer: Groups, inner: Groups) -> Groups:
    """For each group of ``outer``, the sorted union of the ``inner`` groups of its members."""
    result = []
    for g in outer:
        members = sorted({r for m in g for ig in inner if m in ig for r in ig})
        if members not in result:
            result.append(members)
    return result


@dataclass(frozen=True)
class ParallelLayout:
    """The TP x CP x DP x PP grid of ``world_size`` ranks, as NxD lays it out.

    ``platform`` / ``lnc_size`` / ``local_world_size`` as in ``nxd_groups``. Raises
    ``ValueError`` for sizes NxD refuses.
    """

    world_size: int
    tensor_model_parallel_size: int = 1
    context_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    platform: Optional[str] = None
    lnc_size: int = 1
    local_world_size: Optional[int] = None
    _groups: Dict[str, Groups] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_groups", nxd_groups(
            self.world_size, self.tp, self.cp, self.pp, self.platform, self.lnc_size,
            self.local_world_size))

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def cp(self) -> int:
        return self.context_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.cp * self.pp)

    def _copy(self, kind: str) -> Groups:
        return [list(g) for g in self._groups[kind]]

    def tensor_parallel_groups(self) -> Groups:
        return self._copy("tensor")

    def context_parallel_groups(self) -> Groups:
        return self._copy("context")

    def data_parallel_groups(self) -> Groups:
        return self._copy("data")

    def pipeline_parallel_groups(self) -> Groups:
        return self._copy("pipeline")

    def expert_data_parallel_groups(self) -> Groups:
        """NxD's expert-data-parallel groups (EP = 1): where NxD's optimizer reduces gradients."""
        return self._copy("expert_data")

    def expert_model_parallel_groups(self) -> Groups:
        return self._copy("expert_model")

    def data_context_parallel_groups(self) -> Groups:
        """DP x CP: for each CP group, the union of its members' DP groups (sorted)."""
        return union_groups(self._groups["context"], self._groups["data"])

    def groups(self) -> Dict[str, Groups]:
        """Kind (tensor, context, data, data_context, pipeline) -> its groups."""
        return {"tensor": self.tensor_parallel_groups(), "context": self.context_parallel_groups(),
                "data": self.data_parallel_groups(),
                "data_context": self.data_context_parallel_groups(),
                "pipeline": self.pipeline_parallel_groups()}

    def mesh(self) -> ParallelGroups:
        """What NxD's ``initialize_model_parallel(..., mesh_only=True)`` returns."""
        return ParallelGroups(self.tensor_parallel_groups(), self.data_parallel_groups(),
                              self.pipeline_parallel_groups(), self.expert_model_parallel_groups(),
                              self.expert_data_parallel_groups(), self.context_parallel_groups())

    def coordinates(self, rank: int) -> Tuple[int, int, int, int]:
        """(pp, dp, cp, tp) ranks of a global rank: its index in each of its groups."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside [0, world_size={self.world_size})")
        return tuple(self.group_of(self._groups[k], rank).index(rank)
                     for k in ("pipeline", "data", "context", "tensor"))

    def group_of(self, groups: Groups, rank: int) -> List[int]:
        for g in groups:
            if rank in g:
                return list(g)
        raise ValueError(f"rank={rank} is in no group of {groups}")


def context_subgroups(groups: Groups, n: int) -> Tuple[Groups, Groups]:
    """``(inner, outer)`` of the hierarchical CP of ``a2a+p2p``: every CP group cut into
    groups of ``n`` contiguous members (the all-to-all groups, inside a node) and the groups of
    members ``n`` apart (the ring across them). CP group ``[0, 2, 4, 6]``, n=2: inner
    ``[0, 2], [4, 6]``; outer ``[0, 4], [2, 6]``."""
    inner, outer = [], []
    for g in groups:
        if len(g) % n:
            raise ValueError(f"a2a_size={n} does not divide the CP group size {len(g)}")
        inner += [list(g[i:i + n]) for i in range(0, len(g), n)]
        outer += [list(g[j::n]) for j in range(n)]
    return inner, outer


def ring_pairs(groups: Groups, direction: int = 1) -> List[List[int]]:
    """Source -> target pairs of a one-step ring shift inside each group, all groups.

    ``direction=+1`` sends from group index i to i+1 (mod size), ``-1`` to i-1. The pairs of all
    groups are concatenated, which is what ``xm.collective_permute`` takes (the XLA transport).
    """
    if direction not in (1, -1):
        raise ValueError(f"direction={direction!r} must be +1 or -1")
    pairs = []
    for g in groups:
        n = len(g)
        for i in range(n):
            pairs.append([g[i], g[(i + direction) % n]])
    return pairs


def rank_ring_pairs(groups: Groups, rank: int) -> List[Tuple[int, int]]:
    """NxD's ``get_context_model_parallel_src_tgt_pairs()``: the +1 ring pairs of the group that
    holds ``rank``, as sorted ``(src, tgt)`` tuples (``[(0, 2), (2, 0)]`` for TP2xCP2 rank 0)."""
    for g in groups:
        if rank in g:
            return sorted(tuple(p) for p in ring_pairs([g], 1))
    raise ValueError(f"rank={rank} is in no group of {groups}")
