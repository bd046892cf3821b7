"""Rank layout of NxD as pure functions: no processes, no torch.distributed.

NxD lays ranks out as ``torch.arange(world).reshape(pp, dp, cp, tp)``: TP ranks are contiguous,
CP ranks are TP apart, DP ranks are TP*CP apart and PP ranks are TP*CP*DP apart. Every group
list below is a list of groups, each a list of global ranks in group order (a rank's index in
its group is its rank inside that group). DP excludes CP, as in NxD; DP x CP is the group over
which gradients of a CP model are reduced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

Groups = List[List[int]]


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


@dataclass(frozen=True)
class ParallelLayout:
    """The TP x CP x DP x PP grid of ``world_size`` ranks.

    Raises ``ValueError`` when a size is < 1 or ``world_size`` is not divisible by
    ``tensor_model_parallel_size * context_parallel_size * pipeline_model_parallel_size``.
    """

    world_size: int
    tensor_model_parallel_size: int = 1
    context_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1

    def __post_init__(self) -> None:
        _check_size("world_size", self.world_size)
        _check_size("tensor_model_parallel_size", self.tensor_model_parallel_size)
        _check_size("context_parallel_size", self.context_parallel_size)
        _check_size("pipeline_model_parallel_size", self.pipeline_model_parallel_size)
        model = self.tp * self.cp * self.pp
        if self.world_size % model:
            raise ValueError(
                f"world_size={self.world_size} is not divisible by tensor_model_parallel_size"
                f"({self.tp}) * context_parallel_size({self.cp}) * "
                f"pipeline_model_parallel_size({self.pp}) = {model}")

    # Short names used by the arithmetic below.
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

    def coordinates(self, rank: int) -> Tuple[int, int, int, int]:
        """(pp, dp, cp, tp) coordinates of a global rank in the grid."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside [0, world_size={self.world_size})")
        tp_r = rank % self.tp
        cp_r = (rank // self.tp) % self.cp
        dp_r = (rank // (self.tp * self.cp)) % self.dp
        pp_r = rank // (self.tp * self.cp * self.dp)
        return pp_r, dp_r, cp_r, tp_r

    def _rank(self, pp_r: int, dp_r: int, cp_r: int, tp_r: int) -> int:
        return ((pp_r * self.dp + dp_r) * self.cp + cp_r) * self.tp + tp_r

    def _groups(self, varying: str) -> Groups:
        """Groups along the axes named in ``varying`` (subset of "pdct"), others fixed.

        Groups are ordered by the fixed coordinates (pp, dp, cp, tp order) and ranks inside a
        group by the varying coordinates in the same order, which is ascending global rank.
        """
        sizes = {"p": self.pp, "d": self.dp, "c": self.cp, "t": self.tp}
        axes = "pdct"
        fixed = [a for a in axes if a not in varying]
        moving = [a for a in axes if a in varying]

        def product(names):
            combos = [{}]
            for n in names:
                combos = [dict(c, **{n: i}) for c in combos for i in range(sizes[n])]
            return combos

        groups = []
        for f in product(fixed):
            group = []
            for m in product(moving):
                c = {**f, **m}
                group.append(self._rank(c["p"], c["d"], c["c"], c["t"]))
            groups.append(group)
        return groups

    def tensor_parallel_groups(self) -> Groups:
        return self._groups("t")

    def context_parallel_groups(self) -> Groups:
        return self._groups("c")

    def data_parallel_groups(self) -> Groups:
        return self._groups("d")

    def data_context_parallel_groups(self) -> Groups:
        return self._groups("dc")

    def pipeline_parallel_groups(self) -> Groups:
        return self._groups("p")

    def model_parallel_groups(self) -> Groups:
        """TP x PP groups (the ranks that hold one model replica's parameter shards)."""
        return self._groups("pt")

    def group_of(self, groups: Groups, rank: int) -> List[int]:
        for g in groups:
            if rank in g:
                return g
        raise ValueError(f"rank={rank} is in no group of {groups}")


def ring_pairs(groups: Groups, direction: int = 1) -> List[List[int]]:
    """Source -> target pairs of a one-step ring shift inside each group.

    ``direction=+1`` sends from group index i to i+1 (mod size), ``-1`` to i-1. The pairs of all
    groups are concatenated, which is what ``xm.collective_permute`` takes.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction={direction!r} must be +1 or -1")
    pairs = []
    for g in groups:
        n = len(g)
        for i in range(n):
            pairs.append([g[i], g[(i + direction) % n]])
    return pairs
