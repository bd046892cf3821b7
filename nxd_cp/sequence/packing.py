"""Packed rows: several documents back to back in one row, described in one of three ways.

transformers' formats, all read on the *full* row before it is sharded (any one is enough):

* ``seq_idx`` ``[B, S]`` integers: the document index of every token (``DataCollatorWithFlattening
  (return_seq_idx=True)``); a document is a run of equal ids, ids are non-decreasing along a row;
* ``cu_seq_lens_q`` ``[n + 1]`` (and optionally the equal ``cu_seq_lens_k``): cumulative
  document lengths over the flattened batch, ``0 .. B*S`` (``return_flash_attn_kwargs=True``);
  every row boundary ``k*S`` must be a document boundary;
* ``position_ids`` ``[B, S]`` restarting at each document (the collator's default output): a
  document starts wherever ``position_ids[i] != position_ids[i-1] + 1`` (transformers' own rule,
  ``masking_utils.find_packed_sequence_indices``), and, as in transformers, only when the batch
  has no ``attention_mask``: with one, positions that jump (PoSE-style skipped positions for
  long-context training) stay one document. Rows whose positions never restart are one
  document, and a batch without any restart is not packed.

``document_ids`` turns any of them into canonical ids (``0, 1, ...`` per row, int32 ``[B, S]``);
given together they must describe the same documents. ``prepare_packed_batch`` then makes the
batch what a CP model needs: ``seq_idx`` (the canonical ids, sharded with the tokens and handed to
the attention), ``position_ids`` restarting at 0 for each document when absent (RoPE positions;
given ones must increase by 1 inside every document), labels (already shifted) ignored at the
last token of every document, so no token predicts the next document, and the flattened-batch
keys (``cu_seq_lens_*``, ``max_length_*``) dropped: they describe the unsharded row only.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

SEQ_IDX = "seq_idx"
CU_SEQ_LENS = ("cu_seq_lens_q", "cu_seq_lens_k")
FLATTENED_ONLY = CU_SEQ_LENS + ("max_length_q", "max_length_k")


def _runs_to_ids(x: torch.Tensor) -> torch.Tensor:
    """Canonical ids int32 ``[B, S]``: ``0`` for the first run of equal values of each row, +1 at
    every change."""
    change = torch.zeros_like(x, dtype=torch.int32)
    change[:, 1:] = (x[:, 1:] != x[:, :-1]).to(torch.int32)
    return torch.cumsum(change, dim=1, dtype=torch.int32)


def _integer_rows(name: str, x: Any, shape) -> torch.Tensor:
    if (not isinstance(x, torch.Tensor) or x.dim() != 2 or x.is_floating_point()
            or x.is_complex() or x.dtype == torch.bool):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be an integer tensor [batch, seq] = {tuple(shape)}, "
                         f"got {got}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, but the batch is "
                         f"[batch, seq] = {tuple(shape)}")
    return x


def _from_seq_idx(seq_idx: Any, shape) -> torch.Tensor:
    seq_idx = _integer_rows(SEQ_IDX, seq_idx, shape)
    down = seq_idx[:, 1:] < seq_idx[:, :-1]
    if down.any():
        b, i = (int(v) for v in down.nonzero()[0])
        raise ValueError(f"seq_idx must be non-decreasing along each row (a document is a run of "
                         f"equal ids): row {b} goes from {int(seq_idx[b, i])} at token {i} to "
                         f"{int(seq_idx[b, i + 1])} at token {i + 1}")
    return _runs_to_ids(seq_idx)


def _from_cu_seq_lens(name: str, cu: Any, shape) -> torch.Tensor:
    b, s = shape
    if (not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.is_floating_point()
            or cu.dtype == torch.bool or cu.numel() < 2):
        got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else cu
        raise ValueError(f"{name} must be a 1-D integer tensor [documents + 1] of cumulative "
                         f"lengths, got {got}")
    cu = cu.cpu().long()
    if int(cu[0]) != 0 or int(cu[-1]) != b * s:
        raise ValueError(f"{name} must run from 0 to batch*seq = {b}*{s} = {b * s} (the "
                         f"document boundaries must match the sequence length), got "
                         f"{int(cu[0])} .. {int(cu[-1])}")
    if not bool((cu[1:] > cu[:-1]).all()):
        raise ValueError(f"{name} must be strictly increasing (no empty document), got "
                         f"{cu.tolist()}")
    boundaries = set(cu.tolist())
    missing = [k * s for k in range(1, b) if k * s not in boundaries]
    if missing:
        raise ValueError(f"{name} has no boundary at token {missing[0]} of the flattened batch, "
                         f"the start of row {missing[0] // s}: a document cannot span two rows")
    flat = torch.searchsorted(cu[1:], torch.arange(b * s), right=True)
    return _runs_to_ids(flat.view(b, s))


def _from_position_ids(position_ids: torch.Tensor, shape) -> torch.Tensor:
    p = _integer_rows("position_ids", position_ids.expand(*shape), shape)
    restart = torch.zeros(shape, dtype=torch.bool, device=p.device)
    restart[:, 1:] = p[:, 1:] != p[:, :-1] + 1
    return torch.cumsum(restart.to(torch.int32), dim=1, dtype=torch.int32)


def document_ids(batch: Mapping[str, Any], batch_size: int,
                 seq_len: int) -> Optional[torch.Tensor]:
    """Canonical document ids int32 ``[B, S]`` of a packed batch, or None when it is not packed.

    Reads ``seq_idx``, ``cu_seq_lens_q`` / ``cu_seq_lens_k`` and ``position_ids`` (see the module
    docstring); ``ValueError`` for a malformed one, or for two that describe different documents.
    """
    shape = (batch_size, seq_len)
    found = {}
    if batch.get(SEQ_IDX) is not None:
        found[SEQ_IDX] = _from_seq_idx(batch[SEQ_IDX], shape)
    for name in CU_SEQ_LENS:
        if batch.get(name) is not None:
            found[name] = _from_cu_seq_lens(name, batch[name], shape)
    position_ids = batch.get("position_ids")
    if (not found and isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2
            and batch.get("attention_mask") is None):  # transformers' rule
        ids = _from_position_ids(position_ids, shape)
        return ids if bool((ids[:, -1] > 0).any()) else None
    if not found:
        return None
    first = next(iter(found))
    for name, ids in found.items():
        if not torch.equal(ids.cpu(), found[first].cpu()):
            b, i = (int(v) for v in (ids.cpu() != found[first].cpu()).nonzero()[0])
            raise ValueError(f"{name} and {first} describe different documents: they disagree "
                             f"first at token {i} of row {b}")
    return found[first]


def positions_in_documents(ids: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` (int64): each token's position inside its document (0 at every start)."""
    s = ids.shape[1]
    index = torch.arange(s, device=ids.device).expand_as(ids)
    start = torch.zeros_like(ids, dtype=torch.bool)
    start[:, 0] = True
    start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first = torch.cummax(torch.where(start, index, torch.zeros_like(index)), dim=1).values
    return index - first


def _check_positions(position_ids: torch.Tensor, ids: torch.Tensor) -> None:
    p = position_ids.expand_as(ids)
    inside = ids[:, 1:] == ids[:, :-1]
    bad = inside & (p[:, 1:] != p[:, :-1] + 1)
    if bad.any():
        b, i = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"position_ids must increase by 1 inside every document (RoPE and the "
                         f"sliding window read them): row {b} has {int(p[b, i])} then "
                         f"{int(p[b, i + 1])} at tokens {i}, {i + 1} of document "
                         f"{int(ids[b, i])}")


def prepare_packed_batch(full: Dict[str, Any], ids: torch.Tensor,
                         ignore_index: int = -100) -> Dict[str, Any]:
    """The full-row batch of a packed batch, ready to shard (see the module docstring).

    full: the batch with ``labels`` already shifted (``data.shift_labels``); ids: the canonical
    ``document_ids``. Returns a new dict; ``full`` is not modified.
    """
    out = {k: v for k, v in full.items() if k not in FLATTENED_ONLY}
    ref = next(v for v in full.values() if isinstance(v, torch.Tensor) and v.dim() >= 2)
    ids = ids.to(ref.device)
    out[SEQ_IDX] = ids
    if out.get("position_ids") is None:
        out["position_ids"] = positions_in_documents(ids)
    else:
        _check_positions(out["position_ids"], ids)
    labels = out.get("labels")
    if isinstance(labels, torch.Tensor):
        last = torch.zeros_like(ids, dtype=torch.bool)
        last[:, :-1] = ids[:, 1:] != ids[:, :-1]  # the token before a document start
        out["labels"] = labels.masked_fill(last.to(labels.device), ignore_index)
    return out
