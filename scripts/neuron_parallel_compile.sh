#!/usr/bin/env bash
# Ahead-of-time compile the graphs of examples/train_llama_cp.py into the Neuron compile cache:
# the command of scripts/run_trn1.sh, limited to COMPILE_STEPS steps, run under
# neuron_parallel_compile (graph extraction, then parallel compilation). Same options as
# scripts/run_trn1.sh; --help for them, --dry-run to print without running anything.
set -euo pipefail
# shellcheck source=scripts/trn1_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/trn1_env.sh"
trn1_main compile "$(basename "$0")" "$@"
