"""Sharded, atomic checkpoints of a transformed model, with exact resume.

Names and layout follow NxD's ``neuronx_distributed.trainer.checkpoint``
(``save_checkpoint(checkpoint_dir_str, tag, model=, optimizer=, scheduler=, user_content=,
num_kept_ckpts=)``, ``load_checkpoint(path, tag=None, ...)`` returning the user content,
``has_checkpoint``, a ``done`` marker per tag and a ``newest`` file)::

    checkpoint_dir/
      newest                                  the tag of the newest complete checkpoint
      <tag>/
        metadata.json                         layout (tp, cp, dp, pp, world), comm type, layout,
                                              step, data position, model config, nxd_cp config
        model/dp_rank_00_tp_rank_XX_pp_rank_00.pt    this TP shard's model.state_dict()
        optim/dp_rank_00_tp_rank_XX_pp_rank_00.pt    its optimizer.state_dict()
        fsdp/tp_rank_XX_pp_rank_XX/           instead of model/ and optim/ for an FSDP2 model:
                                              torch's sharded state dicts, DCP files
        scheduler.pt, user_content.pt
        rng/rank_XXXXX.pt                     every rank's RNG states (torch, CUDA, Python)
        done

Sharded: a TP shard is identical on the DP x CP ranks holding it (the gradients are reduced
over DP x CP), so only the first rank of each DP x CP group writes it (one writer per group of
replicas, as NxD); every rank reads it back. Atomic: everything is written into
``.<tag>.tmp``; after a barrier rank 0 marks it ``done``, renames it to ``<tag>`` and rewrites
``newest`` (write + ``os.replace``). A crash before the rename leaves only the temporary
directory, which loading ignores, so the previous checkpoint stays the newest.

Exact: parameters, optimizer and scheduler states are saved bit for bit, and each rank's RNG
states too; with the data position (``step`` / ``data_position``, returned by
``checkpoint_metadata``) a resumed run repeats the uninterrupted one bit for bit.

ZeRO-1 (``initialize_parallel_optimizer`` with ``zero_one_enabled``): every rank writes its own
optimizer shard, ``optim/zero1_dpcp_rank_XXX_tp_rank_XX_pp_rank_XX.pt``; it loads only under the
same dp * cp (a ``ValueError`` names both otherwise).

FSDP2 (``nxd_cp.fully_shard``): the model's and optimizer's DTensor shards differ on every DP x
CP rank; they are saved with torch's ``get_state_dict`` and DCP (``torch.distributed.checkpoint
.save``), a collective per DP x CP group, into ``fsdp/tp_rank_XX_pp_rank_XX/``
(``training.fsdp_checkpoint``; ``metadata.json`` records ``fsdp_dp_cp``). DCP reshards on load:
another dp * cp with the same tp loads exactly. FSDP2 checkpoints load only into FSDP2 models and
the reverse (``ValueError``).

Another layout: model and optimizer shards depend only on TP (and PP), so a checkpoint loads
exactly under any other cp / dp with the same tp. A different tp or pp is refused with a
``ValueError`` naming both layouts (``full_state_dict`` gives unsharded weights to start from).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from nxd_cp import parallel_state as ps
from nxd_cp.training.fsdp_checkpoint import check_fsdp, load_fsdp, save_fsdp, uses_fsdp

METADATA = "metadata.json"
DONE = "done"
NEWEST = "newest"
FORMAT = 1


def _shard_file(kind: str) -> str:
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    return os.path.join(kind, f"dp_rank_00_tp_rank_{tp:02d}_pp_rank_{pp:02d}.pt")


def _is_zero1(optimizer) -> bool:
    """True for a ZeRO-1 ``ParallelOptimizer`` (``training.zero1``): its state is per rank."""
    return bool(getattr(optimizer, "nxd_cp_reduces_gradients", False)
                and getattr(optimizer, "zero_one_enabled", False))


def _optim_file(zero1: bool) -> str:
    """The optimizer file of this rank: per TP (PP) shard, or per rank of DP x CP with ZeRO-1."""
    if not zero1:
        return _shard_file("optim")
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dc = ps.get_data_context_parallel_rank()
    return os.path.join("optim", f"zero1_dpcp_rank_{dc:03d}_tp_rank_{tp:02d}_pp_rank_{pp:02d}.pt")


def _check_zero1(saved_dp_cp: Optional[int], zero1: bool, ckpt: str) -> None:
    """ValueError when the optimizer's sharding is not the checkpoint's."""
    here = ps.get_data_context_parallel_size()
    if zero1 and saved_dp_cp != here:
        what = (f"sharded over dp*cp={saved_dp_cp} ranks (ZeRO-1)" if saved_dp_cp
                else "unsharded (no ZeRO-1)")
        raise ValueError(
            f"checkpoint {ckpt!r} holds optimizer state {what}; this run's ZeRO-1 optimizer "
            f"shards over dp*cp={here}: ZeRO-1 state loads only under the same data x context "
            "parallel size, into a ZeRO-1 optimizer")
    if not zero1 and saved_dp_cp:
        raise ValueError(
            f"checkpoint {ckpt!r} holds ZeRO-1 optimizer state sharded over dp*cp={saved_dp_cp} "
            "ranks; this optimizer is not sharded: load it into the ZeRO-1 optimizer of "
            "initialize_parallel_optimizer(optimizer_config={'zero_one_enabled': True}) with "
            "the same dp*cp")


def _context_parallel_config(model) -> Dict[str, Any]:
    """The comm type and layout the model was built with (``transform`` binds them), else the
    active config's."""
    bound = (getattr(model, "nxd_cp_config", None) or {}).get("context_parallel_config")
    return dict(bound) if bound is not None else ps.get_context_parallel_config().to_dict()


def _layout() -> Dict[str, int]:
    return {"tp": ps.get_tensor_model_parallel_size(), "cp": ps.get_context_model_parallel_size(),
            "dp": ps.get_data_parallel_size(), "pp": ps.get_pipeline_model_parallel_size(),
            "world": dist.get_world_size()}


def _to_cpu(obj: Any) -> Any:
    """Tensors moved to the CPU (XLA / CUDA state), structure unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_config(model) -> Optional[dict]:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else None


def _completed_tags(root: str):
    """Complete tags (with a ``done`` marker), oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root)
            if not t.startswith(".") and os.path.isfile(os.path.join(root, t, DONE))]
    return sorted(tags, key=lambda t: os.path.getmtime(os.path.join(root, t, DONE)))


def has_checkpoint(checkpoint_dir_str: str) -> bool:
    """True when ``checkpoint_dir_str`` holds at least one complete checkpoint."""
    return bool(_completed_tags(checkpoint_dir_str))


def _newest_tag(root: str) -> str:
    path = os.path.join(root, NEWEST)
    if os.path.isfile(path):
        with open(path) as f:
            tag = f.read().strip()
        if os.path.isfile(os.path.join(root, tag, DONE)):
            return tag
    tags = _completed_tags(root)
    if not tags:
        raise RuntimeError(f"no complete checkpoint under {root!r} (a directory with a "
                           f"'{DONE}' marker)")
    return tags[-1]


def save_checkpoint(checkpoint_dir_str: str, tag: str, model=None, optimizer=None,
                    scheduler=None, user_content: Any = None,
                    num_kept_ckpts: Optional[int] = None, step: Optional[int] = None,
                    data_position: Any = None) -> None:
    """Save a checkpoint under ``checkpoint_dir_str/tag``; a collective: every rank calls it.

    model: the transformed model (its local ``state_dict``); optimizer: a torch optimizer over
    its parameters; scheduler: anything with ``state_dict``; user_content: any picklable object
    (returned by ``load_checkpoint``). step / data_position: where training stands (JSON
    values, kept in ``metadata.json``; read them back with ``checkpoint_metadata``).
    num_kept_ckpts: keep only this many newest complete checkpoints (None: all).
    """
    if not isinstance(tag, str) or not tag or tag.startswith(".") or os.sep in tag \
            or tag == NEWEST:
        raise ValueError(f"tag={tag!r} must be a non-empty directory name, not starting with "
                         f"'.' and not {NEWEST!r}")
    fsdp = uses_fsdp(model, optimizer)
    root = checkpoint_dir_str
    tmp = os.path.join(root, f".{tag}.tmp")
    rank = dist.get_rank()
    if rank == 0:
        if os.path.exists(tmp):  # left by a crashed save
            shutil.rmtree(tmp)
        for sub in ("rng",) if fsdp else ("model", "optim", "rng"):  # FSDP2: fsdp/ (DCP)
            os.makedirs(os.path.join(tmp, sub))
    dist.barrier()
    writer = ps.get_data_context_parallel_rank() == 0
    fsdp_dp_cp = save_fsdp(tmp, model, optimizer) if fsdp else None  # DCP: all of DP x CP
    if writer and model is not None and not fsdp:
        torch.save(_to_cpu(model.state_dict()), os.path.join(tmp, _shard_file("model")))
    zero1 = _is_zero1(optimizer)
    if optimizer is not None and not fsdp and (writer or zero1):  # ZeRO-1: every rank writes
        torch.save(_to_cpu(optimizer.state_dict()), os.path.join(tmp, _optim_file(zero1)))
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        if scheduler is not None:
            torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        if user_content is not None:
            torch.save(user_content, os.path.join(tmp, "user_content.pt"))
        meta = {"format": FORMAT, "tag": tag, "layout": _layout(), "step": step,
                "data_position": data_position,
                "nxd_cp_config": getattr(model, "nxd_cp_config", None),
                "context_parallel_config": _context_parallel_config(model),
                "model_config": _model_config(model),
                "saved": {"model": model is not None, "optimizer": optimizer is not None,
                          "scheduler": scheduler is not None},
                "zero1_dp_cp": ps.get_data_context_parallel_size() if zero1 else None,
                "fsdp_dp_cp": fsdp_dp_cp}
        with open(os.path.join(tmp, METADATA), "w") as f:
            json.dump(meta, f, indent=1, default=str)
    dist.barrier()  # every shard is on disk
    if rank == 0:
        _commit(root, tmp, tag, num_kept_ckpts)
    dist.barrier()


def _commit(root: str, tmp: str, tag: str, num_kept: Optional[int]) -> None:
    """Mark ``tmp`` complete, move it to ``root/tag`` and point ``newest`` at it."""
    open(os.path.join(tmp, DONE), "w").close()
    final = os.path.join(root, tag)
    old = os.path.join(root, f".{tag}.old")
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    with open(os.path.join(root, NEWEST + ".tmp"), "w") as f:
        f.write(tag)
    os.replace(os.path.join(root, NEWEST + ".tmp"), os.path.join(root, NEWEST))
    if num_kept is not None and num_kept > 0:
        for stale in _completed_tags(root)[:-num_kept]:
            if stale != tag:
                shutil.rmtree(os.path.join(root, stale))


def checkpoint_metadata(path: str, tag: Optional[str] = None) -> Dict[str, Any]:
    """``metadata.json`` of ``tag`` (default: the newest complete checkpoint), plus its tag."""
    tag = tag if tag is not None else _newest_tag(path)
    with open(os.path.join(path, tag, METADATA)) as f:
        meta = json.load(f)
    meta["tag"] = tag
    return meta


def _check_layout(saved: Dict[str, int], path: str, tag: str) -> None:
    here = _layout()
    if (saved["tp"], saved["pp"]) != (here["tp"], here["pp"]):
        def show(d):
            return ", ".join(f"{k}={d[k]}" for k in ("tp", "cp", "dp", "pp", "world"))
        raise ValueError(
            f"checkpoint {os.path.join(path, tag)!r} was saved with {show(saved)}; this run has "
            f"{show(here)}: its model and optimizer shards are split over tp={saved['tp']} "
            f"(pp={saved['pp']}), and resharding over another tensor / pipeline parallel size "
            "is not supported (cp and dp may change). Start from unsharded weights instead "
            "(nxd_cp.full_state_dict)")


def load_checkpoint(path: str, tag: Optional[str] = None, model=None, optimizer=None,
                    scheduler=None, strict: bool = True) -> Any:
    """Load ``tag`` (default: the newest complete checkpoint) into the given objects; a
    collective: every rank calls it. Returns the saved ``user_content`` (or None).

    RNG states are restored when the world size equals the saved one (each rank its own).
    Raises ``ValueError`` for a checkpoint of another tp / pp (both layouts named), and
    ``RuntimeError`` when there is no complete checkpoint or a requested part was not saved.
    """
    tag = tag if tag is not None else _newest_tag(path)
    meta = checkpoint_metadata(path, tag)
    _check_layout(meta["layout"], path, tag)
    ckpt = os.path.join(path, tag)
    for name, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None and not meta["saved"][name]:
            raise RuntimeError(f"checkpoint {ckpt!r} has no {name} state to load")
    fsdp = uses_fsdp(model, optimizer)
    if model is not None or optimizer is not None:
        check_fsdp(meta.get("fsdp_dp_cp"), fsdp, ckpt)
    if fsdp:
        load_fsdp(ckpt, model, optimizer, strict=strict)
    elif model is not None:
        state = torch.load(os.path.join(ckpt, _shard_file("model")), map_location="cpu")
        model.load_state_dict(state, strict=strict)
    if optimizer is not None and not fsdp:
        zero1 = _is_zero1(optimizer)
        _check_zero1(meta.get("zero1_dp_cp"), zero1, ckpt)
        state = torch.load(os.path.join(ckpt, _optim_file(zero1)), map_location="cpu")
        optimizer.load_state_dict(state)
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(os.path.join(ckpt, "scheduler.pt"),
                                             weights_only=False))
    rng = os.path.join(ckpt, "rng", f"rank_{dist.get_rank():05d}.pt")
    if meta["layout"]["world"] == dist.get_world_size() and os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    user = os.path.join(ckpt, "user_content.pt")
    content = torch.load(user, weights_only=False) if os.path.isfile(user) else None
    dist.barrier()
    return content
