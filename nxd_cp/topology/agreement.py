"""Cross-rank agreement: do the ranks of a CP group make the same call?

Every rank of a CP group must call ``context_parallel_attention`` (and ``transform``) with the
same comm type, layout, window, causal flag, scale, local shapes and dtype. Ranks that disagree
would silently compute wrong results (``load_balance``, ``window_size``), hang (``comm_type``)
or abort the process inside gloo (local sequence length). ``check_group_agreement`` turns that
into a ``ValueError`` naming the argument, the values and the ranks that hold each value.

Cost: the first time a rank sees a call signature for a group, each rank of the group writes
its signature (a few hundred bytes of text) to torch.distributed's key-value store (the
host-side store every ``init_process_group`` has, also under NxD / XLA) and reads the others';
the signature is then cached, so later calls with the same signature cost a set lookup. No
collective is issued and no tensor is read, so the check adds nothing to an XLA graph.

Limit: ranks compare their *new* signatures in order. When a rank reaches a signature it has
already checked while another rank's is new, the latter waits for a partner that never comes
and raises a ``RuntimeError`` after the store's timeout (``init_process_group(timeout=...)``)
naming the ranks that did not arrive; the first mismatching call is always caught.
"""
from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, Dict, Mapping, Optional, Set, Tuple

from nxd_cp.compat import torch as torch_compat
from nxd_cp.topology.groups import GroupSpec

_KEY_PREFIX = "nxd_cp/agree"
# Signatures this process has seen agreed on, and per (call, group) the number of checks run
# (the store key of the next one). Pure caches: clearing them only costs a re-check.
_AGREED: Set[Tuple] = set()
_ROUNDS: Dict[Tuple, int] = {}


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _describe(values: Dict[int, Dict[str, str]], name: str) -> str:
    by_value: Dict[str, list] = {}
    for rank, fields in sorted(values.items()):
        by_value.setdefault(fields.get(name, "<missing>"), []).append(rank)
    return ", ".join(f"{v} on ranks {r}" for v, r in by_value.items())


def check_group_agreement(call: str, fields: Mapping[str, Any], group: GroupSpec,
                          timeout: Optional[timedelta] = None) -> None:
    """``ValueError`` unless every rank of ``group`` passed the same ``fields`` to ``call``.

    call: the public function checked (part of the store key and of the message).
    fields: argument name -> value (compared by ``repr``; strings as they are).
    group: the ranks that must agree (global ranks in ``group.ranks``).
    timeout: how long to wait for the other ranks (default: the store's timeout).
    Raises ``RuntimeError`` when some ranks do not reach the check in time.
    """
    if group.size == 1:
        return
    mine = {name: _as_text(v) for name, v in fields.items()}
    signature = (call, group.ranks, tuple(mine.items()))
    if signature in _AGREED:
        return
    store = torch_compat.default_store()
    if store is None:
        return
    round_key = (call, group.ranks)
    n = _ROUNDS.get(round_key, 0)
    _ROUNDS[round_key] = n + 1
    prefix = f"{_KEY_PREFIX}/{call}/{'_'.join(map(str, group.ranks))}/{n}"
    keys = {r: f"{prefix}/{r}" for r in group.ranks}
    store.set(keys[group.ranks[group.rank]], json.dumps(mine))
    wait = timeout if timeout is not None else store.timeout
    try:
        store.wait(list(keys.values()), wait)
    except RuntimeError as e:  # DistStoreError is a RuntimeError
        missing = [r for r, k in keys.items() if not store.check([k])]
        raise RuntimeError(
            f"{call}: ranks {missing} of the CP group {list(group.ranks)} did not reach the "
            f"cross-rank agreement check within {wait.total_seconds():.0f}s (check #{n} of "
            f"this group; rank {group.ranks[group.rank]} called with {mine}); they are "
            "probably in a different call, e.g. with arguments they had already checked "
            "while this rank's are new") from e
    values = {r: json.loads(store.get(k)) for r, k in keys.items()}
    differing = [name for name in mine if len({v.get(name) for v in values.values()}) > 1]
    differing += sorted({name for v in values.values() for name in v} - set(mine))
    if differing:
        details = "; ".join(f"{name}: {_describe(values, name)}" for name in differing)
        raise ValueError(
            f"{call}: the ranks of the CP group {list(group.ranks)} disagree on "
            f"{', '.join(differing)} ({details}); every rank of a CP group must make the same "
            "call")
    _AGREED.add(signature)


def attention_signature(q, k, causal: bool, comm_type: str, window_size, softmax_scale,
                        load_balance: str, has_mask: bool,
                        has_documents: bool = False, a2a_size=None) -> Dict[str, Any]:
    """The arguments of ``context_parallel_attention`` the ranks of a CP group must share."""
    return {"comm_type": comm_type, "load_balance": load_balance, "causal": causal,
            "window_size": window_size, "softmax_scale": softmax_scale,
            "q shape": tuple(q.shape), "k/v shape": tuple(k.shape), "dtype": str(q.dtype),
            "key_padding_mask": "given" if has_mask else None,
            "seq_idx": "given" if has_documents else None, "a2a_size": a2a_size}
