"""``GroupSpec``: one rank's view of a group of ranks (pure data, no process state).

Its members (global ranks, in group order), its index among them, every group of the same kind
(the ``replica_groups`` XLA collectives need) and, on torch.distributed, the ProcessGroup.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Tuple


@dataclass(frozen=True)
class GroupSpec:
    """One rank's view of a process group.

    ranks: global ranks of this rank's group, in group order.
    rank: this rank's index in ``ranks``.
    all_groups: every group of this kind (a partition of the world), for XLA replica groups.
    process_group: the torch.distributed ProcessGroup, or None where there is none (XLA
        lowering with an explicit group).
    rank_as_tensor: hand the algorithms this rank's index as device data even off XLA (the
        form XLA always uses: one graph for every rank), so that schedule runs, and is tested,
        on gloo too. Set once, when the groups are built (``parallel_state``).
    """

    ranks: Tuple[int, ...]
    rank: int
    all_groups: Tuple[Tuple[int, ...], ...]
    process_group: Any = None
    rank_as_tensor: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.rank < len(self.ranks):
            raise ValueError(f"rank={self.rank} is outside the group {list(self.ranks)}")
        if tuple(self.ranks) not in {tuple(g) for g in self.all_groups}:
            raise ValueError(f"ranks={list(self.ranks)} is not one of all_groups="
                             f"{[list(g) for g in self.all_groups]}")

    @property
    def size(self) -> int:
        return len(self.ranks)

    @staticmethod
    def explicit(all_groups: Sequence[Sequence[int]], global_rank: int,
                 process_group: Any = None, rank_as_tensor: bool = False) -> "GroupSpec":
        """The spec of ``global_rank`` given every group of a kind (e.g. all CP groups)."""
        groups = tuple(tuple(int(r) for r in g) for g in all_groups)
        for g in groups:
            if global_rank in g:
                return GroupSpec(g, g.index(global_rank), groups, process_group, rank_as_tensor)
        raise ValueError(f"global_rank={global_rank} is in none of the groups {list(groups)}")
