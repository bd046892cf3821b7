"""Context-parallel attention: local block kernels, LSE merge, ring and all-gather CP.

Public: ``context_parallel_attention`` (see ``api.py``); ``local_attention``, ``BlockMask``,
``register_kernel`` for plugging a device kernel in; ``use_reference_kernel`` /
``reference_kernel_only`` to run every block on the pure-torch reference kernel.
"""
from nxd_cp.attention.api import context_parallel_attention
from nxd_cp.attention.dispatch import (
                                       local_attention,
                                       reference_kernel_only,
                                       register_kernel,
                                       use_reference_kernel,
)
from nxd_cp.attention.schedule import BlockMask

__all__ = ["context_parallel_attention", "local_attention", "BlockMask", "register_kernel",
           "reference_kernel_only", "use_reference_kernel"]
