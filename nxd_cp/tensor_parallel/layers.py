"""nxd_cp's tensor-parallel layers, with NxD's names, constructor signatures and layouts.

``ColumnParallelLinear``, ``RowParallelLinear`` and ``ParallelEmbedding`` are plain classes
(subclass them freely), built on ``nxd_cp.comm.autograd`` so they run on gloo, NCCL and XLA.
Which layers a model is built from -- NxD's own when NxD is in charge, else these -- is decided
once, by ``tensor_parallel.factory.tensor_parallel_layers``. They take NxD's constructor
arguments for the subset nxd_cp uses and lay parameters out as NxD does:

| layer                 | weight shard       | bias                                         |
|-----------------------|--------------------|----------------------------------------------|
| ColumnParallelLinear  | ``[out/tp, in]``   | ``[out/tp]``, or ``[out]`` with gather_output |
| RowParallelLinear     | ``[out, in/tp]``   | ``[out]``                                    |
| ParallelEmbedding     | ``[V/tp, H]``      | - (``[V, H/tp]`` weight if shard_across_embedding) |

Full-size biases are added after the gather / all-reduce. Sharded parameters carry NxD's
attributes ``tensor_model_parallel=True``, ``partition_dim``, ``partition_stride=1`` and
``num_partitions`` (``tensor_parallel.partition.partition_of`` reads the layout from the layer
type first, as these attributes do not survive ``.to("xla")``). Rank ``r`` of the TP group holds
the contiguous chunk ``r`` of the partition dim (stride 1).

SP (``sequence_parallel_enabled``, NxD's semantics): column layers all-gather the input on
``sequence_dimension`` (default 0; backward reduce-scatter), row layers reduce-scatter the output
(backward all-gather) and mark their bias ``sequence_parallel_enabled`` (see sequence_parallel).
``input_communicated = True`` skips a column layer's input collective (done by the caller).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nxd_cp.comm import autograd as cg
from nxd_cp.tensor_parallel.common import (
    TPLayer,
    default_linear_init,
    divide,
    init_shard,
    mark_parallel,
)


def _no_sequence_parallel(enabled: bool, layer: str) -> None:
    if enabled:
        raise NotImplementedError(
            f"{layer}(sequence_parallel_enabled=True) needs NeuronX Distributed: the fallback has "
            "it in its linear layers only (nxd_cp.transform scatters the embedding output)")


class ColumnParallelLinear(TPLayer):
    """``y = x W^T + b`` with W split by output features over TP.

    x ``[..., in]`` (replicated over TP; its gradient is all-reduced) ->
    ``[..., out/tp]``, or ``[..., out]`` with ``gather_output=True``. With
    ``sequence_parallel_enabled`` x holds this rank's ``1/tp`` of the sequence on
    ``sequence_dimension``; the output has the whole (TP group's) sequence.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 gather_output: bool = True, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, stride: int = 1,
                 init_method: Optional[Callable] = None, sequence_parallel_enabled: bool = False,
                 sequence_dimension: Optional[int] = None, keep_master_weight: bool = False,
                 skip_bias_add: bool = False, pad: bool = False,
                 tensor_model_parallel_group=None, **unsupported):
        super().__init__(tensor_model_parallel_group)
        if stride != 1 or pad or unsupported:
            raise NotImplementedError(
                f"ColumnParallelLinear fallback supports stride=1, pad=False and no other "
                f"options; got stride={stride}, pad={pad}, {sorted(unsupported)}")
        tp, rank = self._tp.size, self._tp.rank
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, tp, "output_size")
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dimension = sequence_dimension or 0  # NxD's default
        self.input_communicated = False
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size,
                                               dtype=dtype, device=device))
        mark_parallel(self.weight, 0, tp)
        master = init_shard(self.weight, (output_size, input_size), 0, rank, tp,
                             init_method or default_linear_init)
        self.master_weight = master if keep_master_weight else None  # NxD's attribute
        if bias:
            n = output_size if gather_output else self.output_size_per_partition
            self.bias = nn.Parameter(torch.zeros(n, dtype=dtype, device=device))
            if not gather_output:
                mark_parallel(self.bias, 0, tp)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor):
        t = self._transport(x)
        local_bias = None if (self.gather_output or self.skip_bias_add) else self.bias
        if not self.input_communicated:
            x = (cg.all_gather(x, self.sequence_dimension, t) if self.sequence_parallel_enabled
                 else cg.copy_to_group(x, t))
        linear = F.linear if self.sequence_regather is None else self.sequence_regather.linear
        y = linear(x, self.weight, local_bias)
        if self.gather_output:
            y = cg.gather_from_group(y, -1, t)
            if self.bias is not None and not self.skip_bias_add:
                y = y + self.bias
        return (y, self.bias) if self.skip_bias_add else y

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size} (local "
                f"{self.output_size_per_partition}), gather_output={self.gather_output}")


class RowParallelLinear(TPLayer):
    """``y = x W^T + b`` with W split by input features over TP.

    x ``[..., in/tp]`` with ``input_is_parallel=True`` (else ``[..., in]``, scattered here) ->
    ``[..., out]``, all-reduced over TP (``reduce_output=False`` leaves the partial sums); with
    ``sequence_parallel_enabled`` reduce-scattered instead: this rank's ``1/tp`` of the sequence
    on ``sequence_dimension``.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 input_is_parallel: bool = False, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, stride: int = 1,
                 init_method: Optional[Callable] = None, sequence_parallel_enabled: bool = False,
                 sequence_dimension: Optional[int] = None, keep_master_weight: bool = False,
                 skip_bias_add: bool = False, pad: bool = False, reduce_output: bool = True,
                 tensor_model_parallel_group=None, **unsupported):
        super().__init__(tensor_model_parallel_group)
        if sequence_parallel_enabled and not (input_is_parallel and reduce_output):
            raise RuntimeError("RowParallelLinear(sequence_parallel_enabled=True) needs input_is_"
                               f"parallel=True and reduce_output=True, got {input_is_parallel=}, "
                               f"{reduce_output=}")
        if stride != 1 or pad or unsupported:
            raise NotImplementedError(
                f"RowParallelLinear fallback supports stride=1, pad=False and no other "
                f"options; got stride={stride}, pad={pad}, {sorted(unsupported)}")
        tp, rank = self._tp.size, self._tp.rank
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, tp, "input_size")
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.reduce_output = reduce_output
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dimension = sequence_dimension or 0  # NxD's default
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition,
                                               dtype=dtype, device=device))
        mark_parallel(self.weight, 1, tp)
        master = init_shard(self.weight, (output_size, input_size), 1, rank, tp,
                             init_method or default_linear_init)
        self.master_weight = master if keep_master_weight else None  # NxD's attribute
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype, device=device))
            self.bias.sequence_parallel_enabled = sequence_parallel_enabled  # as NxD marks it
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor):
        t = self._transport(x)
        if not self.input_is_parallel:
            x = cg.scatter_to_group(x, -1, t)
        y = F.linear(x, self.weight)
        if self.sequence_parallel_enabled:
            y = cg.reduce_scatter(y, self.sequence_dimension, t)
        elif self.reduce_output:
            y = cg.reduce_from_group(y, t)
        if self.skip_bias_add:
            return y, self.bias
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.input_size} (local {self.input_size_per_partition}), "
                f"out={self.output_size}, input_is_parallel={self.input_is_parallel}")


class ParallelEmbedding(TPLayer):
    """Embedding split over TP by vocabulary (default) or by embedding dim.

    ids ``[...]`` (int, replicated over TP) -> ``[..., H]``. Vocab-parallel: rank r holds rows
    ``[r*V/tp, (r+1)*V/tp)``, looks up the ids in its range, zeroes the others and all-reduces.
    ``padding_idx`` keeps nn.Embedding's meaning (that row gets no gradient).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 padding_idx: Optional[int] = None, max_norm: Optional[float] = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False,
                 init_method: Callable = nn.init.normal_, device: Optional[torch.device] = None,
                 dtype: torch.dtype = torch.float32, shard_across_embedding: bool = False,
                 pad: bool = False, sequence_parallel_enabled: bool = False,
                 tensor_model_parallel_group=None, sequence_dimension: Optional[int] = None,
                 **unsupported):
        super().__init__(tensor_model_parallel_group)
        _no_sequence_parallel(sequence_parallel_enabled, "ParallelEmbedding")
        if max_norm is not None or scale_grad_by_freq or sparse or pad or unsupported:
            raise NotImplementedError(
                "ParallelEmbedding fallback supports no max_norm, scale_grad_by_freq, sparse, "
                f"pad or {sorted(unsupported)}")
        tp, rank = self._tp.size, self._tp.rank
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.shard_across_embedding = shard_across_embedding
        self.padding_idx = padding_idx
        if shard_across_embedding:
            shape, dim = (num_embeddings, divide(embedding_dim, tp, "embedding_dim")), 1
            self.start_index, self.end_index = 0, num_embeddings
        else:
            per = divide(num_embeddings, tp, "num_embeddings")
            shape, dim = (per, embedding_dim), 0
            self.start_index, self.end_index = rank * per, (rank + 1) * per
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        mark_parallel(self.weight, dim, tp)

        def init(w):
            init_method(w)
            if padding_idx is not None:
                with torch.no_grad():
                    w[padding_idx].zero_()
        init_shard(self.weight, (num_embeddings, embedding_dim), dim, rank, tp, init)

    def _local_padding_idx(self) -> Optional[int]:
        p = self.padding_idx
        if p is None or not self.start_index <= p < self.end_index:
            return None
        return p - self.start_index

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self._transport(self.weight)
        if self.shard_across_embedding:
            out = F.embedding(ids, self.weight, self._local_padding_idx())
            return cg.gather_from_group(out, -1, t)
        if t.size == 1:
            return F.embedding(ids, self.weight, self._local_padding_idx())
        return cg.reduce_from_group(self._vocab_shard_lookup(ids, t), t)

    def _vocab_shard_lookup(self, ids: torch.Tensor, t) -> torch.Tensor:
        """``[..., H]``: the rows of ``ids`` in this rank's vocabulary range, 0 elsewhere.

        Written for one graph on every TP rank: the range start is device data
        (``Transport.rank_value``), index arithmetic is int32, and ``padding_idx`` (a row of one
        rank only) is honoured by stopping the gradient of pad tokens, not by F.embedding's
        rank-dependent ``padding_idx``.
        """
        per = self.weight.shape[0]
        rank = t.rank_value(ids.device)
        ids = ids.to(torch.int32)
        local = ids - rank * per  # [...], in [0, per) inside this rank's range
        inside = (local >= local.new_zeros(())) & (local < local.new_full((), per))
        local = torch.where(inside, local, torch.zeros_like(local))
        # index_select, not F.embedding: its backward compares the ids with Python ints
        # (s64 on XLA); index_add with int32 ids does not.
        out = self.weight.index_select(0, local.flatten()).unflatten(0, local.shape)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        if self.padding_idx is not None:  # nn.Embedding: the pad row gets no gradient
            is_pad = ids == ids.new_full((), self.padding_idx)
            out = torch.where(is_pad.unsqueeze(-1), out.detach(), out)
        return out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.start_index}, "
                f"{self.end_index}), shard_across_embedding={self.shard_across_embedding}")


# The names of the fallback before the factory existed (kept: tests and users import them).
FallbackColumnParallelLinear = ColumnParallelLinear
FallbackRowParallelLinear = RowParallelLinear
FallbackParallelEmbedding = ParallelEmbedding

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "ParallelEmbedding",
           "FallbackColumnParallelLinear", "FallbackRowParallelLinear",
           "FallbackParallelEmbedding"]
