#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned stack of requirements-test.txt and nxd_cp installed
# editable. Idempotent: a stamp holding the hash of the pins skips the install when nothing
# changed. Never installs PyPI's torch-neuronx / neuronx-distributed (placeholders).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
venv="$root/.venv"
stamp="$venv/.nxd_cp_stamp"
want="$(cat requirements-test.txt setup.py | sha256sum | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import torch, jax, nxd_cp" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating $venv with the pinned stack (first time: a few minutes, ~7 GB)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r requirements-test.txt
"$venv/bin/python" -m pip install --quiet --no-deps -e .
# A stray placeholder package would break imports of the optional NxD path.
for bad in torch-neuronx neuronx-distributed; do
  if "$venv/bin/python" -m pip show "$bad" >/dev/null 2>&1; then
    echo "[setup] removing PyPI placeholder $bad" >&2
    "$venv/bin/python" -m pip uninstall -y "$bad" >/dev/null
  fi
done
"$venv/bin/python" -c "import torch, torch_xla, transformers, jax, nxd_cp; print('[setup] torch', torch.__version__, '| torch-xla', torch_xla.__version__, '| transformers', transformers.__version__, '| jax', jax.__version__)" >&2
echo "$want" > "$stamp"
