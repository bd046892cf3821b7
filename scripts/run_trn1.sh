#!/usr/bin/env bash
# Train examples/train_llama_cp.py on Trainium with torchrun: one trn1.32xlarge (TP8 x CP4,
# 32K tokens by default) or several (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT; EFA).
# Compile first with scripts/neuron_parallel_compile.sh and the same options. --help for the
# options, --dry-run to print the environment and the command without running anything.
set -euo pipefail
# shellcheck source=scripts/trn1_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/trn1_env.sh"
trn1_main run "$(basename "$0")" "$@"
