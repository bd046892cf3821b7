"""Test environment: XLA on CPU when torch-xla is present, one intra-op thread per process."""
import os

# Must be set before torch_xla is imported anywhere in the test process.
os.environ.setdefault("PJRT_DEVICE", "CPU")
# xm.all_reduce short-circuits on a one-device world; lowering tests need the real op.
os.environ.setdefault("XLA_ALWAYS_ALLREDUCE", "1")

# The XLA device must exist before the autograd engine first runs a backward in this process:
# the engine sizes its per-device queues then, and a later XLA backward fails
# ("device_ready_queues_" internal assert, or an abort). Training scripts create their XLA
# device before any backward, as examples/train_llama_cp.py does.
try:
    import torch_xla
except ImportError:
    pass
else:
    torch_xla.device()
