"""Hugging Face checkpoint directories in and out of a transformed model, shard by shard.

``load_pretrained(path, config)`` (``nxd_cp.from_pretrained``) reads ``config.json``, builds the
model on the meta device (transformers' ``init_empty_weights``: parameters on meta, buffers
real), and runs ``transform`` with a ``CheckpointReader`` as its ``state_dict``: ``transform``
keeps this rank's pipeline stage and TP modules, then asks the reader for each of this rank's
tensors; the reader cuts this rank's part (``partition.shard_of``'s chunking) out of the
safetensors file with ``safe_open(...).get_slice``, so a rank's host memory holds its own shard
plus at most one tensor being read.

``save_pretrained(model, out)`` is the inverse: every rank calls it; tensor by tensor it gathers
each weight over FSDP (``DTensor.full_tensor``) and TP (``gather_full``) and brings the other
pipeline stages' tensors to global rank 0, which alone writes (sharded safetensors planned by
``huggingface_hub.split_torch_state_dict_into_shards``, a shard written once it is complete, an
index, ``config.json``, tokenizer and generation config of the source directory).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.models.pipelined import is_pipelined_model
from nxd_cp.models.registry import architecture_of
from nxd_cp.models.transform import transform
from nxd_cp.tensor_parallel.partition import Partition, gather_full, partitions, shard_of

PathLike = Union[str, os.PathLike]
# what load_pretrained read: {"path", "bytes_read", "largest_read"} (path: the tokenizer source)
SOURCE_ATTR = "nxd_cp_checkpoint"


def _weights_names():
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    return SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME


class CheckpointReader:
    """The tensors of a Hugging Face checkpoint directory (``model.safetensors``, or sharded
    ``*.safetensors`` with ``model.safetensors.index.json``), read one rank's part at a time.

    ``name in reader`` and ``keys()`` read only the index / headers; ``read(name, partition,
    target, what)`` copies this TP rank's part of tensor ``name`` (laid out as ``partition``)
    into ``target`` (casting to its dtype), reading only that part from disk. ``stats``
    (``bytes_read``, ``largest_read``) counts what was read (bytes of the checkpoint's dtype).
    """

    device = torch.device("cpu")  # where transform materialises the meta-built model

    def __init__(self, path: PathLike):
        single, index = _weights_names()
        self.path = Path(path)
        self._aliases: Dict[str, str] = {}
        self._handles: Dict[str, object] = {}
        self.stats = {"bytes_read": 0, "largest_read": 0}  # shared with with_alias's copies
        if (self.path / index).is_file():
            weight_map = json.loads((self.path / index).read_text())["weight_map"]
            self._file_of = dict(weight_map)
        elif (self.path / single).is_file():
            self._file_of = {k: single for k in self._open(single).keys()}
        else:
            raise ValueError(f"path={str(path)!r} holds neither {single} nor {index}: "
                             "load_pretrained reads a Hugging Face safetensors checkpoint "
                             "directory (model.save_pretrained(path) writes one)")

    def __repr__(self) -> str:
        return f"checkpoint {str(self.path)!r}"

    def _open(self, file: str):
        from safetensors import safe_open

        if file not in self._handles:
            if not (self.path / file).is_file():
                raise ValueError(f"{self!r}: its index names {file!r}, which is not there")
            self._handles[file] = safe_open(str(self.path / file), framework="pt")
        return self._handles[file]

    def _slice(self, name: str):
        key = self._aliases.get(name, name)
        if key not in self._file_of:
            raise KeyError(f"{self!r} has no tensor {name!r}")
        return self._open(self._file_of[key]).get_slice(key)

    def __contains__(self, name: object) -> bool:
        return self._aliases.get(name, name) in self._file_of

    def keys(self) -> List[str]:
        return list(self._file_of) + [a for a in self._aliases if a not in self._file_of]

    def __getitem__(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (reads all of it)."""
        return self._slice(name)[...]

    def with_alias(self, name: str, existing: str) -> "CheckpointReader":
        """A reader on the same files where ``name`` reads tensor ``existing`` (the last
        pipeline stage's lm_head copy of tied embeddings, which checkpoints store once)."""
        other = copy.copy(self)
        other._aliases = {**self._aliases, name: existing}
        return other

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point tensors (the first one's)."""
        for name in self._file_of:
            piece = self._slice(name)
            if piece.get_shape():  # an empty slice: its dtype, no data
                empty = piece[0:0]
                if empty.is_floating_point():
                    return empty.dtype
        return torch.get_default_dtype()

    def read(self, name: str, part: Partition, target: torch.Tensor, what: str) -> None:
        """Copy this TP rank's part of tensor ``name`` into ``target``; a ``ValueError`` naming
        ``what`` when its shape is not the target's."""
        piece = self._slice(name)
        shape = tuple(piece.get_shape())
        index: Tuple[slice, ...] = ()
        expected = torch.Size(shape)
        if part.dim is not None or part.kv_replicas is not None:
            # the bounds shard_of cuts (its chunking exactly), found on a meta tensor
            dim = 0 if part.kv_replicas is not None else part.dim
            if not 0 <= dim < len(shape):
                raise ValueError(f"{what} of shape {shape} cannot be split on dim {dim} for "
                                 f"the tensor of shape {tuple(target.shape)} it loads into")
            full = torch.empty(shape, device="meta")
            mine = shard_of(part, full)
            start = mine.storage_offset() // full.stride(dim) if full.stride(dim) else 0
            index = (slice(None),) * dim + (slice(start, start + mine.shape[dim]),)
            expected = mine.shape
        if expected != target.shape:
            raise ValueError(f"{what} of shape {shape} gives this rank a part of shape "
                             f"{tuple(expected)}, but the tensor it loads into has shape "
                             f"{tuple(target.shape)}: does config.json match the weights?")
        data = piece[index] if index else piece[...]
        nbytes = data.numel() * data.element_size()
        self.stats["bytes_read"] += nbytes
        self.stats["largest_read"] = max(self.stats["largest_read"], nbytes)
        target.copy_(data)
        del data  # at most one tensor read at a time


@torch.no_grad()
def load_pretrained(path: PathLike, config=None, *, torch_dtype: Optional[torch.dtype] = None,
                    model_class=None, **transform_kwargs) -> nn.Module:
    """The transformed model (``nxd_cp.transform``) of the Hugging Face checkpoint directory
    ``path``, each rank reading only its own part of the weights.

    path: a directory with ``config.json`` and ``model.safetensors`` (or sharded
        ``*.safetensors`` and ``model.safetensors.index.json``), as ``save_pretrained`` writes.
    config: the dict ``nxd_cp.neuronx_distributed_config(...)`` returned (or None: the active
        one); call that first on every rank, as for ``transform``.
    torch_dtype: the parameters' dtype; default the checkpoint's (its floating tensors').
    model_class: the class built from ``config.json`` (default ``AutoModelForCausalLM``); give
        it for an architecture registered with ``register_architecture`` that transformers'
        auto classes do not know.
    transform_kwargs: passed to ``transform`` (``vocab_parallel_logits``).

    The model is built on the meta device (``init_empty_weights``), reduced to this rank's
    pipeline stage and TP modules, then filled from ``safe_open(...).get_slice``: this rank's
    TP part (KV heads replicated where tp exceeds them), this stage's tensors, the tied
    embedding for the last stage's lm_head when the checkpoint omits ``lm_head.weight``. Host
    memory per rank: its shard plus one tensor. ``model.nxd_cp_checkpoint`` records ``{"path",
    "bytes_read", "largest_read"}`` (bytes in the checkpoint's dtype). Raises ``ValueError``
    naming the tensors a checkpoint lacks, or a tensor whose shape does not fit the model of
    ``config.json``.
    """
    import transformers
    from transformers.integrations.accelerate import init_empty_weights

    reader = CheckpointReader(path)
    hf_config = transformers.AutoConfig.from_pretrained(str(path))
    dtype = torch_dtype if torch_dtype is not None else reader.dtype()
    cls = model_class if model_class is not None else transformers.AutoModelForCausalLM
    with init_empty_weights():
        model = cls.from_config(hf_config, dtype=dtype)
    model.tie_weights()  # as from_pretrained does (from_config under init_empty_weights does not)
    model = transform(model, config, state_dict=reader, **transform_kwargs)
    setattr(model, SOURCE_ATTR, {"path": str(path), **reader.stats})
    return model


from_pretrained = load_pretrained  # the name nxd_cp exports


# --- export -----------------------------------------------------------------------------------
def _original_class(model: nn.Module) -> type:
    cls = type(model)
    return cls.__bases__[1] if is_pipelined_model(model) else cls  # Pipelined<cls>(mixin, cls)


def _full_shape(part: Partition, value: torch.Tensor) -> Tuple[int, ...]:
    shape, tp = list(value.shape), ps.get_tensor_model_parallel_size()  # DTensor: global shape
    if part.kv_replicas is not None:
        shape[0] *= tp // part.kv_replicas
    elif part.dim is not None:
        shape[part.dim] *= tp
    return tuple(shape)


def _stage_tensors(model: nn.Module) -> List[Tuple[str, Partition, torch.Tensor]]:
    """This stage's (name, TP partition, tensor) in state-dict order, each tensor once; the
    last stage's copy of tied embeddings left out (checkpoints store the embedding only)."""
    parts, seen, out = partitions(model), set(), []
    spec = architecture_of(model)
    stage = model.nxd_cp_config.get("pipeline") or {}
    skip = {f"{spec.lm_head}.weight"} if stage.get("tied_embeddings") else set()
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen or name in skip:
            continue
        seen.add(id(value))
        out.append((name, parts.get(name, Partition()), value))
    return out


def _gathered(items) -> Iterator[Tuple[str, Optional[torch.Tensor]]]:
    """(name, full tensor on CPU) of this stage, one at a time: a collective over FSDP's DP x CP
    mesh (DTensors) and TP."""
    from torch.distributed.tensor import DTensor

    for name, part, value in items:
        local = value.full_tensor() if isinstance(value, DTensor) else value
        yield name, gather_full(part, local).cpu()


def _metadata(items, group) -> List[List[Tuple[str, Tuple[int, ...], torch.dtype]]]:
    """Per stage of global rank 0's pipeline group: [(name, full shape, dtype)]."""
    mine = [(n, _full_shape(p, v), v.dtype) for n, p, v in items]
    if group is None:
        return [mine]
    stages: List = [None] * group.size
    dist.all_gather_object(stages, mine, group=group.process_group)
    return stages


def _write_tokenizer(out: Path, tokenizer_from: Optional[PathLike], source: Optional[str]):
    import transformers

    src = tokenizer_from if tokenizer_from is not None else source
    if src is None:
        return
    if tokenizer_from is not None or any((Path(src) / f).is_file() for f in (
            "tokenizer_config.json", "tokenizer.json")):
        transformers.AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    if source is not None and (Path(source) / "generation_config.json").is_file():
        transformers.GenerationConfig.from_pretrained(source).save_pretrained(str(out))


class _ShardWriter:
    """Rank 0: tensors in, each planned shard file written once all its tensors are in."""

    def __init__(self, out: Path, stages, max_shard_size):
        from huggingface_hub import split_torch_state_dict_into_shards

        single, _ = _weights_names()
        plan = {n: torch.empty(s, dtype=d, device="meta") for st in stages for n, s, d in st}
        pattern = single.replace(".safetensors", "{suffix}.safetensors")
        self.split = split_torch_state_dict_into_shards(plan, filename_pattern=pattern,
                                                        max_shard_size=max_shard_size)
        self.out, self.pending = out, {f: {} for f in self.split.filename_to_tensors}
        self.plan = plan

    def add(self, name: str, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        if tuple(tensor.shape) != tuple(self.plan[name].shape):
            raise RuntimeError(f"{name}: gathered shape {tuple(tensor.shape)}, planned "
                               f"{tuple(self.plan[name].shape)}")
        file = self.split.tensor_to_filename[name]
        self.pending[file][name] = tensor.contiguous()
        if len(self.pending[file]) == len(self.split.filename_to_tensors[file]):
            save_file(self.pending.pop(file), str(self.out / file), metadata={"format": "pt"})

    def finish(self) -> None:
        _, index = _weights_names()
        if self.split.is_sharded:
            (self.out / index).write_text(json.dumps(
                {"metadata": self.split.metadata, "weight_map": self.split.tensor_to_filename},
                indent=2, sort_keys=True) + "\n")


def _clear(out: Path) -> None:
    """Remove an earlier checkpoint's weight files (another shard count would mix with it)."""
    single, index = _weights_names()
    for f in [out / single, out / index, *out.glob("model-*-of-*.safetensors")]:
        f.unlink(missing_ok=True)


def _write_config(model: nn.Module, out: Path, dtype: torch.dtype) -> None:
    config = copy.deepcopy(model.config)
    config.architectures = [_original_class(model).__name__]
    config.dtype = dtype
    config.save_pretrained(str(out))  # to_dict leaves out the attention implementation


@torch.no_grad()
def save_pretrained(model: nn.Module, out_dir: PathLike, tokenizer_from: Optional[PathLike] = None,
                    max_shard_size: Union[int, str] = "5GB") -> None:
    """Write the transformed ``model`` as a Hugging Face checkpoint directory ``out_dir`` that
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads (the unmodified architecture).

    A collective: every rank calls it with the same arguments. Weights are gathered tensor by
    tensor over FSDP2, TP and the pipeline stages; only global rank 0 holds full tensors beyond
    the one in flight, one shard file (``max_shard_size``: bytes or ``"50KB"`` / ``"5GB"``, as
    transformers' ``save_pretrained``) at a time, and writes ``model-0000i-of-0000N.safetensors``
    with ``model.safetensors.index.json`` (one file: ``model.safetensors``), ``config.json`` (the
    unmodified class in ``architectures``; no ``"nxd_cp"`` attention implementation) and the
    tokenizer of ``tokenizer_from`` (default: the directory ``load_pretrained`` read, when it
    holds one) with its ``generation_config.json``. Tied embeddings are stored once.
    """
    if getattr(model, "nxd_cp_config", None) is None:
        raise ValueError(f"model={type(model).__name__} is not transformed by nxd_cp: call "
                         "its own save_pretrained(out_dir)")
    if tokenizer_from is not None and not Path(tokenizer_from).is_dir():
        raise ValueError(f"tokenizer_from={str(tokenizer_from)!r} is not a directory: it must "
                         "hold the tokenizer files to copy (or be None: the source's)")
    out = Path(out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    items = _stage_tensors(model)
    pipe = ps.get_group_spec("pipeline") if is_pipelined_model(model) else None
    in_rank0_pipe = pipe is None or 0 in pipe.ranks
    stages = _metadata(items, pipe) if in_rank0_pipe else None
    writer, error = None, None  # rank 0's error: raised on every rank at the end (no hang)
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            _clear(out)
            writer = _ShardWriter(out, stages, max_shard_size)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the collectives
            error = e
    my_stage = pipe.rank if pipe is not None else 0
    gathered = _gathered(items)
    for stage, names in enumerate(stages if in_rank0_pipe else []):
        for name, _, _ in names:
            tensor = next(gathered)[1] if stage == my_stage else None
            if pipe is not None and stage != 0:  # to rank 0 (the first stage)
                box = [tensor]
                dist.broadcast_object_list(box, src=pipe.ranks[stage], group=pipe.process_group)
                tensor = box[0]
            if writer is not None and error is None:
                try:
                    writer.add(name, tensor)
                except Exception as e:  # noqa: BLE001 - re-raised below
                    error = e
            del tensor
    for _ in gathered:  # ranks outside rank 0's pipeline group: their TP / FSDP collectives
        pass
    if writer is not None and error is None:
        try:
            writer.finish()
            _write_config(model, out, items[0][2].dtype)
            source = getattr(model, SOURCE_ATTR, None)
            _write_tokenizer(out, tokenizer_from, source["path"] if source else None)
        except Exception as e:  # noqa: BLE001 - re-raised below
            error = e
    _raise_everywhere(error)


def _raise_everywhere(error: Optional[BaseException]) -> None:
    """Every rank returns once rank 0 has written, or raises rank 0's error."""
    message = None if error is None else f"{type(error).__name__}: {error}"
    if dist.is_initialized():
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"save_pretrained failed on rank 0, which writes: {message}")
