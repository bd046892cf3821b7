"""nxd_cp: context parallelism for NeuronX Distributed, with a torch.distributed fallback.

Public API (everything else is internal)::

    from nxd_cp import parallel_state
    from nxd_cp.sharding import shard_sequence, unshard_sequence, sequence_positions
    from nxd_cp.comm import count_bytes
"""
from nxd_cp import parallel_state
from nxd_cp.comm import count_bytes
from nxd_cp.sharding import sequence_positions, shard_sequence, unshard_sequence

__all__ = ["parallel_state", "count_bytes", "sequence_positions", "shard_sequence",
           "unshard_sequence"]
