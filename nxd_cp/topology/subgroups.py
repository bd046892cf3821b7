"""The sub-groups of hierarchical CP (``comm_type="a2a+p2p"``): created once, cached.

``context_subgroups(spec, n)`` returns this rank's ``(inner, outer)`` ``GroupSpec``s for a CP
group ``spec`` (``layout.context_subgroups``: all-to-all inside ``n`` contiguous CP ranks, the
ring across those groups). On torch.distributed it creates a ProcessGroup for every inner and
outer group of the world: a collective of **every rank**, in the same order — which is why
``neuronx_distributed_config`` calls it when the config selects ``a2a+p2p`` (under pipeline
parallelism the stages reach their first attention at different times). A spec without a
ProcessGroup (XLA, where replica groups are enough) gets specs without one. The cache belongs
to parallel state: ``parallel_state.destroy_model_parallel`` clears it.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch.distributed as dist

from nxd_cp.topology.groups import GroupSpec
from nxd_cp.topology.layout import context_subgroups as split_groups

_CACHE: Dict[Tuple, Dict[Tuple[int, ...], object]] = {}


def _process_groups(groups) -> Dict[Tuple[int, ...], object]:
    return {tuple(g): dist.new_group(list(g)) for g in groups}


def context_subgroups(spec: GroupSpec, n: int) -> Tuple[GroupSpec, GroupSpec]:
    """This rank's ``(inner, outer)`` specs of the CP group ``spec`` cut by ``a2a_size`` n.
    ``n`` = the group size (``"a2a"``): the group itself and this rank alone, no new group."""
    inner_groups, outer_groups = split_groups([list(g) for g in spec.all_groups], n)
    me = spec.ranks[spec.rank]
    if n == spec.size:
        return spec, GroupSpec.explicit(outer_groups, me, None, spec.rank_as_tensor)
    pgs: Dict[Tuple[int, ...], object] = {}
    if spec.process_group is not None and spec.size > 1:
        key = (spec.all_groups, n)
        if key not in _CACHE:
            _CACHE[key] = {**_process_groups(inner_groups), **_process_groups(outer_groups)}
        pgs = _CACHE[key]

    def mine(groups) -> GroupSpec:
        ranks = next(tuple(g) for g in groups if me in g)
        return GroupSpec.explicit(groups, me, pgs.get(ranks), spec.rank_as_tensor)

    return mine(inner_groups), mine(outer_groups)


def clear() -> None:
    """Forget the cached groups (their process groups are destroyed with the world's)."""
    outside = dist.GroupMember.NON_GROUP_MEMBER
    for pgs in _CACHE.values():
        for pg in pgs.values():
            if dist.is_initialized() and pg is not None and pg != outside:
                dist.destroy_process_group(pg)
    _CACHE.clear()
