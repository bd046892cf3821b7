#!/usr/bin/env bash
# The README's test command: install the pinned stack if needed (scripts/setup.sh), then run the
# whole suite and print its wall time. Extra arguments go to pytest (e.g. scripts/test.sh -k ring
# -x). Tiers (pytest.ini, docs/verification.md "Running the tests"): --fast runs the unit tier
# (-m "unit and not slow", under 2 minutes on 2 cores); -m gloo / xla_exec / nxd / slow select one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
args=()
for arg in "$@"; do
    if [[ "$arg" == "--fast" ]]; then
        args+=(-m "unit and not slow")
    else
        args+=("$arg")
    fi
done
bash scripts/setup.sh
# XLA tests run torch-xla on the CPU (one device; multi-device collectives are only lowered).
export PJRT_DEVICE=CPU
export XLA_ALWAYS_ALLREDUCE=1
# Spawned ranks use one intra-op thread each (nxd_cp.testing.run_ranks); keep the parent alike.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
start=$(date +%s)
status=0
"$root/.venv/bin/python" -m pytest tests -q -p no:cacheprovider --durations=15 \
    ${args[@]+"${args[@]}"} || status=$?
echo "[test.sh] suite wall time: $(( $(date +%s) - start )) s"
exit "$status"
