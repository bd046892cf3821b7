"""Values a batch must hold, checked where it enters (the batch function, the model's pre-hook).

Pure functions: each returns an error message (``None`` when the input is fine) naming the
argument, the offending value and where it is (row, position), so a caller can first agree with
the other ranks and then raise the same ``ValueError`` everywhere. Values are read with one
reduction per tensor (``.any()``); tensors on an XLA device are not read (that would compile and
sync a graph): only dtypes and shapes are checked there, the host batch is checked by the batch
function before it moves.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

IGNORE_INDEX = -100


def _readable(t: torch.Tensor) -> bool:
    return t.device.type != "xla"


def _first(bad: torch.Tensor) -> str:
    """``row r, position p`` of the first True of a ``[B, S]`` mask (``position p`` if 1-D)."""
    where = [int(v) for v in bad.nonzero()[0]]
    return f"row {where[0]}, position {where[1]}" if len(where) == 2 else f"position {where[0]}"


def integer_tensor_error(name: str, t: Any) -> Optional[str]:
    """``name`` must be an integer tensor (not float, not bool)."""
    if not isinstance(t, torch.Tensor):
        return f"{name} must be a torch.Tensor of token ids, got {type(t).__name__}"
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        return (f"{name} must be an integer tensor (token ids), got dtype {t.dtype}: convert "
                "with .long() only if the values are really ids")
    return None


def token_ids_error(t: torch.Tensor, vocab_size: Optional[int], name: str = "input_ids"
                    ) -> Optional[str]:
    """Ids in ``[0, vocab_size)`` (``[0, inf)`` when the vocabulary is unknown)."""
    error = integer_tensor_error(name, t)
    if error or not _readable(t) or t.numel() == 0:
        return error
    bad = t < 0 if vocab_size is None else (t < 0) | (t >= vocab_size)
    if not bool(bad.any()):
        return None
    value = int(t[tuple(bad.nonzero()[0])])
    rule = "[0, vocab_size)" if vocab_size is None else f"[0, vocab_size={vocab_size})"
    hint = (" (-100 marks ignored *labels*; pad input_ids with the pad token id)"
            if value == IGNORE_INDEX else "")
    return f"{name} must be in {rule}: got {value} at {_first(bad)}{hint}"


def labels_error(t: torch.Tensor, vocab_size: Optional[int],
                 ignore_index: int = IGNORE_INDEX) -> Optional[str]:
    """Labels in ``[0, vocab_size)`` or ``ignore_index``."""
    error = integer_tensor_error("labels", t)
    if error or not _readable(t) or t.numel() == 0:
        return error
    out = t < 0 if vocab_size is None else (t < 0) | (t >= vocab_size)
    bad = out & (t != ignore_index)
    if not bool(bad.any()):
        return None
    value = int(t[tuple(bad.nonzero()[0])])
    rule = "[0, vocab_size)" if vocab_size is None else f"[0, vocab_size={vocab_size})"
    return (f"labels must be in {rule} or ignore_index={ignore_index}: got {value} at "
            f"{_first(bad)}")


def batch_size_error(batch_size: int, name: str = "batch") -> Optional[str]:
    if batch_size < 1:
        return f"{name} has batch size {batch_size}: a batch needs at least one row"
    return None


def num_items_error(num_items: Any) -> Optional[str]:
    """``num_items_in_batch`` (a count of target tokens) must be >= 1 where it can be read."""
    if num_items is None:
        return None
    if isinstance(num_items, torch.Tensor):
        if not _readable(num_items) or num_items.numel() != 1:
            return None
        value = num_items.item()
    elif isinstance(num_items, (int, float)) and not isinstance(num_items, bool):
        value = num_items
    else:
        return f"num_items_in_batch must be a number or a one-element tensor, got {num_items!r}"
    if value < 1:
        return (f"num_items_in_batch={value} must be >= 1: it is the number of target tokens of "
                "the full batch, the loss's denominator")
    return None
