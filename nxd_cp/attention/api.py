"""``context_parallel_attention``: the public entry point of CP attention.

Validates its inputs (once: the algorithms below trust them), takes ``comm_type`` /
``load_balance`` as given (explicit defaults ``"p2p"``, ``"zigzag"``: nothing is read from a
global config), resolves ``group=None`` to the CP group of ``parallel_state``, picks the
transport from the tensors' device and runs the K/V stream of the comm type
(``streams.stream_attention``: ring or all-gather; ``all_to_all.a2a_attention``: a2a and
a2a+p2p, whose sub-groups come from ``topology.subgroups``). A CP group of size 1 runs the
local kernel without communication.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from nxd_cp.attention.all_to_all import a2a_attention, kv_repeats, split_for
from nxd_cp.attention.dispatch import local_attention
from nxd_cp.attention.documents import PackedDocuments, local_document_mask
from nxd_cp.attention.parts import RankIndex
from nxd_cp.attention.schedule import BlockMask, make_plan
from nxd_cp.attention.streams import stream_attention
from nxd_cp.comm import get_transport
from nxd_cp.config import COMM_TYPES, check_a2a_size
from nxd_cp.parallel_state import resolve_group
from nxd_cp.sequence.layout import check_load_balance, check_sequence_length
from nxd_cp.topology.agreement import attention_signature, check_group_agreement
from nxd_cp.topology.subgroups import context_subgroups


def _validate(q, k, v, causal, comm_type, window_size, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, H, S_local, D], got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)}")
    (b, hq, s, d), (bk, hkv, sk, dk) = q.shape, k.shape
    if (b, s, d) != (bk, sk, dk):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, "
                         f"sequence and head dim ([B, H, S_local, D])")
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {hkv} "
                         f"(Hq % Hkv == 0)")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if s == 0:
        raise ValueError(f"q has an empty local sequence (S_local=0, shape {tuple(q.shape)}): "
                         "every CP rank needs at least one token of the sequence")
    if q.dtype == torch.float64:
        warnings.warn("context_parallel_attention computes float64 inputs with float32 partial "
                      "results and merges (relative error ~1e-7, not float64's ~1e-16); the "
                      "output is float64", stacklevel=3)
    if comm_type not in COMM_TYPES:
        raise ValueError(f"comm_type={comm_type!r} must be one of {COMM_TYPES}")
    if window_size is not None:
        if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 1:
            raise ValueError(f"window_size={window_size!r} must be None or an integer >= 1")
        if not causal:
            raise ValueError(f"window_size={window_size} needs causal=True (sliding windows "
                             f"are causal, as in Mistral)")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, s) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor [B, S_local] = {(b, s)}, "
                             f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def _validate_documents(q, seq_idx, position_ids, needs_positions: bool) -> None:
    """Shapes and dtypes of the packed-document inputs (their values: ``documents.py``)."""
    b, s = q.shape[0], q.shape[2]
    for name, t, batches in (("seq_idx", seq_idx, (b,)), ("position_ids", position_ids, (1, b))):
        if t is None:
            continue
        if (not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != s
                or t.shape[0] not in batches or t.is_floating_point() or t.is_complex()
                or t.dtype == torch.bool):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)
            raise ValueError(f"{name} must be an integer tensor [B, S_local] = {(b, s)} (this "
                             f"rank's tokens), got {got}")
    if needs_positions and position_ids is None:
        raise ValueError("position_ids are required with seq_idx, load_balance='per_document' "
                         "and window_size: the sliding window inside a document reads the "
                         "tokens' positions, which this layout does not fix")


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               causal: bool = True, comm_type: str = "p2p",
                               window_size: Optional[int] = None,
                               softmax_scale: Optional[float] = None,
                               load_balance: str = "zigzag", group=None,
                               key_padding_mask: Optional[torch.Tensor] = None,
                               seq_idx: Optional[torch.Tensor] = None,
                               position_ids: Optional[torch.Tensor] = None,
                               a2a_size: Optional[int] = None) -> torch.Tensor:
    """Exact attention of this rank's sequence shard against the whole sequence of its CP group.

    q [B, Hq, S_local, D]; k, v [B, Hkv, S_local, D] with Hq % Hkv == 0 (K/V are exchanged with
    their Hkv heads, never repeated; a2a repeats them only when Hkv does not split over its
    group). The inputs are this rank's shard in the ``load_balance``
    layout (``nxd_cp.sequence.layout.shard_sequence``). Returns [B, Hq, S_local, D] in q's dtype.

    causal: causal mask on global positions; window_size: sliding window (key j visible to
    query i iff j <= i and i - j < window_size, needs causal); softmax_scale: default
    1/sqrt(D); comm_type: "p2p" (ring), "all_gather", "a2a" (Ulysses: all-to-all over the
    CP group, ``Hq`` divisible by cp) or "a2a+p2p" (all-to-all inside groups of ``a2a_size``
    contiguous CP ranks, the ring across them; ``all_to_all.py``); load_balance: "zigzag",
    "contiguous" or "per_document" (a model from ``transform`` passes its bound config's);
    group: None for the CP group of ``parallel_state``, or a ``GroupSpec`` / ProcessGroup;
    key_padding_mask: bool [B, S_local], True for real tokens of this shard (its key part
    travels with K/V). a2a_size: ``"a2a+p2p"`` only, dividing the CP size.
    seq_idx: packed documents, int [B, S_local]: the document index of each of this rank's
    tokens (non-decreasing along the full sequence, a document is a run of equal ids, as
    ``get_batch_on_this_context_parallel_rank`` returns it); a query then sees only keys of its
    own document. position_ids [B, S_local]: positions inside the documents (or global), read
    only with ``load_balance="per_document"`` and a window, where they are required.
    Rows that see no key return zeros.
    """
    _validate(q, k, v, causal, comm_type, window_size, key_padding_mask)
    check_load_balance(load_balance)
    check_a2a_size(comm_type, a2a_size)
    per_document = load_balance == "per_document"
    if isinstance(group, str):
        raise ValueError(f"group={group!r} must be None (the CP group of parallel_state), a "
                         "GroupSpec or a torch.distributed ProcessGroup, not a string")
    spec = resolve_group(group)
    check_a2a_size(comm_type, a2a_size, spec.size)
    seq_len = q.shape[2] * spec.size
    check_sequence_length(seq_len, spec.size, load_balance,
                          f"local sequence length {q.shape[2]} is not a {load_balance} shard: "
                          "the full sequence length")
    # Only per_document with a window reads positions (its positions depend on the documents).
    positions = per_document and window_size is not None and spec.size > 1
    a2a = comm_type in ("a2a", "a2a+p2p") and spec.size > 1
    n = split_for(comm_type, a2a_size, spec.size) if a2a else 1
    if a2a:
        kv_repeats(q.shape[1], k.shape[1], n)  # ValueError naming the head counts, up front
    _validate_documents(q, seq_idx, position_ids if positions else None,
                        positions and seq_idx is not None)
    check_group_agreement("context_parallel_attention", attention_signature(
        q, k, causal, comm_type, window_size, softmax_scale, load_balance,
        key_padding_mask is not None, seq_idx is not None, a2a_size),
        spec)  # host-side, once per signature
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if spec.size == 1:  # every layout is the identity: static positions
        mask = BlockMask(0, 0, causal=True, window=window_size) if causal else None
        docs = None if seq_idx is None else local_document_mask(
            seq_idx.to(q.device), static=q.device.type != "xla")
        return local_attention(q, k, v, scale=scale, mask=mask, kv_keep=key_padding_mask,
                               documents=docs)
    transport = get_transport(spec, q.device)
    # The mask travels as uint8: not every backend moves bool tensors.
    keep = None if key_padding_mask is None else key_padding_mask.to(torch.uint8)
    if a2a:
        if seq_idx is not None:  # the ids' order, checked in this CP layout (every rank)
            PackedDocuments(seq_idx.to(q.device), per_document).summarize(
                make_plan(spec.size, seq_len, "zigzag" if per_document else load_balance,
                          causal, window_size), transport,
                RankIndex(transport.rank_value(q.device)))
        inner, outer = context_subgroups(spec, n)
        return a2a_attention(
            q, k, v, keep, inner=get_transport(inner, q.device),
            outer=get_transport(outer, q.device), seq_len=seq_len, load_balance=load_balance,
            causal=causal, window=window_size, scale=scale,
            seq_idx=None if seq_idx is None else seq_idx.to(q.device),
            position_ids=position_ids.to(q.device) if positions else None,
            positions=positions)
    documents = None
    if seq_idx is not None:
        documents = PackedDocuments(seq_idx.to(q.device), per_document,
                                    position_ids.to(q.device) if positions else None,
                                    window_size if positions else None)
    # per_document runs zigzag's plan on slots; a window on data positions is the documents'.
    return stream_attention(q, k, v, keep, comm_type=comm_type, transport=transport,
                            seq_len=seq_len,
                            load_balance="zigzag" if per_document else load_balance,
                            causal=causal,
                            window=None if positions and documents is not None else window_size,
                            scale=scale, documents=documents)
