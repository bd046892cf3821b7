"""Tensor parallelism: the TP layers (NxD's or the fallback, chosen once by a factory), K/V
replication, sequence parallelism wiring, and the per-parameter shard <-> full mapping."""
