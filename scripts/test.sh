#!/usr/bin/env bash
# The README's test command: install the pinned stack if needed (scripts/setup.sh), then run the
# whole suite. Extra arguments go to pytest (e.g. scripts/test.sh -k ring -x).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# XLA tests run torch-xla on the CPU (one device; multi-device collectives are only lowered).
export PJRT_DEVICE=CPU
export XLA_ALWAYS_ALLREDUCE=1
# Spawned ranks use one intra-op thread each (tests/harness.py); keep the parent alike.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$root/.venv/bin/python" -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
