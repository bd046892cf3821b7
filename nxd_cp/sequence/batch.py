"""This CP rank's part of a batch: labels shifted on the full sequence, then sharded.

Every rank of a CP group receives the same full-sequence batch (the sampler uses the DP rank and
size) and keeps its tokens in the layout of the model's config (``sequence.layout``): the one
``transform`` bound into its attention, given as ``config=model``, or by default the active
config, which the transformed model checks it was built with.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from nxd_cp import parallel_state as ps
from nxd_cp.compat import torch_xla as torch_xla_compat
from nxd_cp.config import ContextParallelConfig, context_parallel_config_of
from nxd_cp.sequence import packing
from nxd_cp.sequence import validation as check
from nxd_cp.sequence.layout import shard_sequence

SEQ_DIM = 1
logger = logging.getLogger("nxd_cp")


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``[B, S]`` -> ``[B, S]`` with ``out[:, i] = labels[:, i + 1]`` and the last one ignored.

    Token i then carries the target it predicts, so the loss needs no neighbour after sharding.
    """
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=SEQ_DIM)


def check_padding_mask(mask: Any) -> None:
    """``ValueError`` unless ``mask`` is None or a 2-D ``[batch, seq]`` padding mask."""
    if isinstance(mask, torch.Tensor) and mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D [batch, seq] (1 = real token) under "
                         f"context parallelism, got shape {tuple(mask.shape)}")


SEQUENCE_KEYS = ("input_ids", "inputs_embeds", "labels", "attention_mask", "position_ids",
                 packing.SEQ_IDX)


def _sequence_length(batch: Mapping[str, Any]) -> int:
    """S of the batch; ``ValueError`` unless every known per-token entry is ``[B, S, ...]``
    with the same S >= 1 (a shorter ``labels`` would otherwise be left unsharded)."""
    found = {}
    for key in SEQUENCE_KEYS:
        v = batch.get(key)
        if isinstance(v, torch.Tensor):
            if v.dim() < 2:
                raise ValueError(f"{key} must be [batch, seq, ...] (at least 2-D), got shape "
                                 f"{tuple(v.shape)}: add the batch dimension, e.g. "
                                 f"{key}.unsqueeze(0)")
            found[key] = v.shape[SEQ_DIM]
    if not found:
        raise ValueError("batch has none of input_ids, inputs_embeds, labels: cannot tell the "
                         "sequence length")
    first = next(iter(found))
    for key, length in found.items():
        if length != found[first]:
            raise ValueError(f"{key} has sequence length {length} (dim 1) but {first} has "
                             f"{found[first]}: every per-token entry of the batch must cover "
                             "the same full sequence")
    if found[first] < 1:
        raise ValueError(f"{first} has sequence length 0: there is nothing to shard")
    error = check.batch_size_error(batch[first].shape[0], first)
    if error:
        raise ValueError(error)
    return found[first]


def _vocab_size(config: Any) -> Optional[int]:
    """The vocabulary of a transformed model given as ``config`` (None otherwise)."""
    hf_config = getattr(config, "config", None)
    size = getattr(hf_config, "vocab_size", None)
    return size if isinstance(size, int) else None


def _check_values(batch: Mapping[str, Any], vocab_size: Optional[int],
                  ignore_index: int) -> None:
    """Token ids and labels of the full batch (identical on every rank of a CP group, so every
    rank raises the same ``ValueError``)."""
    for error in (check.token_ids_error(batch["input_ids"], vocab_size)
                  if batch.get("input_ids") is not None else None,
                  check.labels_error(batch["labels"], vocab_size, ignore_index)
                  if batch.get("labels") is not None else None):
        if error:
            raise ValueError(error)


def drop_predictions_without_keys(labels: torch.Tensor, mask: torch.Tensor,
                                  documents: Optional[torch.Tensor],
                                  ignore_index: int = -100) -> Tuple[torch.Tensor, int]:
    """Shifted ``labels`` ``[B, S]`` with ``ignore_index`` wherever the query row that predicts
    the label sees no key: every key up to it (inside its document) is padding (left padding:
    the last pad position predicts the first real token). Such a row gives zeros here, while
    transformers attends it to every key, future ones included; neither is a prediction worth
    training on. Returns the labels and how many were dropped."""
    seen = torch.cumsum(mask.to(torch.int64), dim=1)
    if documents is not None:  # count only the keys of the token's own document
        first = torch.arange(mask.shape[1], device=mask.device) - packing.positions_in_documents(
            documents)
        before = torch.where(first > 0, seen.gather(1, (first - 1).clamp_min(0)),
                             torch.zeros_like(seen))
        seen = seen - before
    blind = (seen == 0) & (labels != ignore_index)
    dropped = int(blind.sum())
    return (labels.masked_fill(blind, ignore_index) if dropped else labels), dropped


def _context_parallel_config(config: Any) -> ContextParallelConfig:
    """The layout to shard with: a model from ``transform`` (its bound config), a config dict
    or ``ContextParallelConfig``, or None (the active config)."""
    if config is None:
        return ps.get_context_parallel_config()
    bound = getattr(config, "nxd_cp_config", None)
    if isinstance(bound, Mapping) and "context_parallel_config" in bound:
        return context_parallel_config_of(bound["context_parallel_config"])
    return context_parallel_config_of(config)


def get_batch_on_this_context_parallel_rank(batch: Mapping[str, Any],
                                            ignore_index: int = -100,
                                            cp_rank: Optional[int] = None,
                                            cp_size: Optional[int] = None,
                                            config: Any = None) -> Dict[str, Any]:
    """This CP rank's shard of a full-sequence batch.

    batch: a mapping of ``[B, S, ...]`` tensors (``input_ids``, ``labels``, ``attention_mask``
        (2-D, 1 = real token), ``position_ids``, ``inputs_embeds``, ...).

    1. ``labels`` are shifted on the full sequence (``shift_labels``): the returned labels are
       the targets of the returned tokens, ready for ``context_parallel_cross_entropy`` and for
       a model from ``nxd_cp.transform``, which does not shift again.
    2. ``position_ids`` are added as the global positions ``arange(S)`` ``[B, S]`` if absent.
    3. Every tensor whose dim 1 has the sequence length S is sharded to ``[B, S/cp, ...]`` in
       the ``load_balance`` layout of ``config``: a model from ``nxd_cp.transform`` (the layout
       its attention is bound to), the dict of ``neuronx_distributed_config`` or a
       ``ContextParallelConfig``; None: the active config (``parallel_state.
       get_context_parallel_config()``, which a transformed model checks it was built with).
       Other entries are returned unchanged.

    Packed rows (``sequence.packing``: ``seq_idx``, ``cu_seq_lens_q`` or ``position_ids`` that
    restart, as transformers' ``DataCollatorWithFlattening`` returns them): the documents are
    found on the full row, the returned batch carries their ids as ``seq_idx`` ``[B, S/cp]``
    (int32; the model hands them to the attention), ``position_ids`` restart at 0 for each
    document (RoPE), no label predicts the next document, and ``load_balance="per_document"``
    splits every document head-tail over the ranks (``nxd_cp.sequence.layout``).

    Unlike NxD's function of the same name, labels are shifted at cp == 1 too (the transformed
    model never shifts), and the layout is zigzag by default (NxD: contiguous).
    Raises ``ValueError`` when S is not divisible by 2*cp (zigzag, per_document) or cp
    (contiguous), for malformed document descriptions (``nxd_cp.sequence.packing``), when an
    entry of ``SEQUENCE_KEYS`` is not ``[B, S, ...]`` with the same S >= 1 (e.g. 1-D
    ``input_ids``, ``labels`` shorter than ``input_ids``), or for a 4-D attention mask.
    """
    batch, device = _on_host(batch)
    if cp_size is None:
        cp_size = ps.get_context_model_parallel_size()
    if cp_rank is None:
        cp_rank = ps.get_context_model_parallel_rank()
    load_balance = _context_parallel_config(config).load_balance
    check_padding_mask(batch.get("attention_mask"))
    seq_len = _sequence_length(batch)  # shard_sequence checks that it splits into the chunks
    _check_values(batch, _vocab_size(config), ignore_index)

    full = dict(batch)
    ref = next(v for k, v in full.items() if isinstance(v, torch.Tensor)
               and v.dim() >= 2 and v.shape[SEQ_DIM] == seq_len)
    documents = packing.document_ids(full, ref.shape[0], seq_len)
    if isinstance(full.get("labels"), torch.Tensor):
        full["labels"] = shift_labels(full["labels"], ignore_index)
    if documents is not None:
        full = packing.prepare_packed_batch(full, documents, ignore_index)
    mask = full.get("attention_mask")
    if isinstance(full.get("labels"), torch.Tensor) and isinstance(mask, torch.Tensor):
        full["labels"], dropped = drop_predictions_without_keys(full["labels"], mask,
                                                                documents, ignore_index)
        if dropped:
            _log_dropped(dropped)
    if full.get("position_ids") is None:
        full["position_ids"] = torch.arange(seq_len, device=ref.device).expand(ref.shape[0], -1)

    out = {}
    for key, value in full.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[SEQ_DIM] == seq_len:
            value = shard_sequence(value, SEQ_DIM, cp_rank, cp_size, load_balance,
                                   seq_idx=documents).contiguous()
        out[key] = value
    if device is not None:  # back where the batch came from
        out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


def _on_host(batch: Mapping[str, Any]) -> Tuple[Mapping[str, Any], Optional[torch.device]]:
    """A batch on an XLA device, copied to the host in one transfer (the checks, documents and
    layouts read values: on the device each read would be a sync), and that device; else the
    batch itself and None."""
    keys = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.device.type == "xla"]
    if not keys:
        return batch, None
    host = dict(batch)
    for key, value in zip(keys, torch_xla_compat.to_host([batch[k] for k in keys])):
        host[key] = value
    return host, batch[keys[0]].device


_LOGGED_DROP: list = []


def _log_dropped(n: int) -> None:
    if not _LOGGED_DROP:
        _LOGGED_DROP.append(True)
        logger.warning("nxd_cp: %d label(s) set to ignore_index: their query rows see no key "
                       "(left padding: every key up to them is padding). transformers would "
                       "attend such a row to every key, future ones included; nxd_cp drops the "
                       "prediction instead (logged once; docs/models.md)", n)
