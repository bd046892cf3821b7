#!/usr/bin/env bash
# The README's main job: train a tiny Llama 3.1-style model with TP2 x CP2 on 4 gloo ranks on
# this CPU, on 8,192-token sequences of the project's own docs, and check step 1's loss and
# every gradient against the unmodified transformers model. Ends with a table and
# "PASS parity <err>" (exit 0) or "FAIL ..." (exit 1). Extra arguments go to the example.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# 4 ranks share this machine's cores: one intra-op thread each.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
exec "$root/.venv/bin/torchrun" --standalone --nproc_per_node 4 \
  examples/train_llama_cp.py --device cpu --tensor_parallel_size 2 --context_parallel_size 2 \
  --cp_comm_type p2p --seq_len 8192 --batch_size 1 --steps 20 --log_every 5 --check "$@"
