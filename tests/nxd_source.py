"""Where NeuronX Distributed's real source is (../shared/nxd) and how ranks get it.

Only the spawned ranks of the NxD tests see NxD (``run_ranks(..., **NXD_RANKS)``): the pytest
process itself keeps testing the torch.distributed fallback.
"""
from pathlib import Path

import pytest

NXD_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "nxd"
NXD_RANKS = {
    "sys_path": [str(NXD_ROOT / "stubs"), str(NXD_ROOT / "src")],
    # NXD_CPU_MODE=1: NxD builds gloo groups on CPU (without it its initialize_model_parallel
    # deadlocks off device).
    "env": {"NXD_CPU_MODE": "1", "GLOO_SOCKET_IFNAME": "lo"},
}
requires_nxd = pytest.mark.skipif(
    not (NXD_ROOT / "src" / "neuronx_distributed").is_dir(),
    reason=f"NeuronX Distributed's source is not at {NXD_ROOT} (../shared/nxd relative to the "
           "repository root): the real-NxD tests need it")
