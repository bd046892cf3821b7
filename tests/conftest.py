"""Test environment: XLA on CPU when torch-xla is present, one intra-op thread per process."""
import os

# Must be set before torch_xla is imported anywhere in the test process.
os.environ.setdefault("PJRT_DEVICE", "CPU")
# xm.all_reduce short-circuits on a one-device world; lowering tests need the real op.
os.environ.setdefault("XLA_ALWAYS_ALLREDUCE", "1")
