"""The TP modules that replace a Hugging Face model's own, built on the meta device.

Per decoder layer, the projections of the ``ArchitectureSpec``: ``column`` ones split by output
features, ``row`` ones by input features, K/V split like columns when ``Hkv % tp == 0`` else
one replicated KV head per TP rank (``ReplicatedKVLinear``), ``per_head`` modules shared by all
heads (``HeadShared``); the token embedding vocab-parallel and the lm_head a vocab-parallel
column (gathering full-vocabulary logits unless ``vocab_parallel_logits``). The layer classes
come from one ``TPLayers`` (NxD's or nxd_cp's), chosen once by ``transform``.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.models.registry import ArchitectureSpec
from nxd_cp.pipeline.split import is_absent
from nxd_cp.tensor_parallel import sequence_parallel as sp
from nxd_cp.tensor_parallel.factory import TPLayers
from nxd_cp.tensor_parallel.head_shared import HeadShared
from nxd_cp.tensor_parallel.kv_replication import ReplicatedKVLinear
from nxd_cp.tensor_parallel.partition import get_path

META = torch.device("meta")


def parallel_modules(model: nn.Module, spec: ArchitectureSpec, sizes: Dict[str, int],
                     layers: TPLayers, *, vocab_parallel_logits: bool,
                     sequence_parallel: bool, skip: Tuple[str, ...] = ()
                     ) -> Dict[str, nn.Module]:
    """path -> new TP module (on the meta device) for every module that gets split; paths
    under ``skip`` (replaced through ``register_module``) are left alone."""
    tp = ps.get_tensor_model_parallel_size()
    new: Dict[str, nn.Module] = {}

    def options(kind: str, in_attention: bool = False) -> dict:
        return sp.layer_options(kind, in_attention, sequence_parallel, layers.use_nxd)

    def column(path, gather_output=False, kind="column", in_attention=False):
        if path.startswith(skip):
            return
        lin = get_path(model, path)
        new[path] = layers.ColumnParallelLinear(
            lin.in_features, lin.out_features, bias=lin.bias is not None,
            gather_output=gather_output, dtype=lin.weight.dtype, device=META,
            **options(kind, in_attention))

    def row(path):
        if path.startswith(skip):
            return
        lin = get_path(model, path)
        new[path] = layers.RowParallelLinear(
            lin.in_features, lin.out_features, bias=lin.bias is not None,
            input_is_parallel=True, dtype=lin.weight.dtype, device=META, **options("row"))

    emb_path = f"{spec.base}.{spec.embedding}"
    emb = get_path(model, emb_path)
    if not is_absent(emb):  # pipeline stages other than the first hold no embedding
        new[emb_path] = layers.ParallelEmbedding(emb.num_embeddings, emb.embedding_dim,
                                                 padding_idx=emb.padding_idx,
                                                 dtype=emb.weight.dtype, device=META)
    hkv = sizes["num_key_value_heads"]
    in_attention = spec.attention + "."
    for i, layer in enumerate(get_path(model, f"{spec.base}.{spec.layers}")):
        if is_absent(layer):  # another pipeline stage's
            continue
        prefix = f"{spec.base}.{spec.layers}.{i}."
        for p in spec.column:
            column(prefix + p, in_attention=p.startswith(in_attention))
        for p in spec.row:
            row(prefix + p)
        for p in spec.per_head:
            if not (prefix + p).startswith(skip):
                new[prefix + p] = HeadShared(get_path(model, prefix + p))
        for p in spec.kv:
            if hkv % tp == 0 or (prefix + p).startswith(skip):
                column(prefix + p, in_attention=p.startswith(in_attention))
            else:
                lin = get_path(model, prefix + p)
                new[prefix + p] = ReplicatedKVLinear(lin.in_features, hkv, sizes["head_dim"],
                                                     bias=lin.bias is not None,
                                                     dtype=lin.weight.dtype, device=META)
    if not is_absent(get_path(model, spec.lm_head)):
        column(spec.lm_head, gather_output=not vocab_parallel_logits, kind="lm_head")
    return new
