"""The model configs shipped with the planner (``nxd_cp/plan/configs/*.json``: Hugging Face
``config.json`` values, no weights) and loading a config by name, file or directory."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def shipped_models() -> List[str]:
    """Names of the model configs shipped in ``nxd_cp/plan/configs`` (``--model NAME``)."""
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))


def load_config(model: str) -> Dict[str, Any]:
    """An HF config dict from a shipped name, a ``config.json`` path or a directory holding
    one; ``ValueError`` naming the argument otherwise."""
    with open(config_path(model)) as f:
        return json.load(f)


def config_path(model: str) -> str:
    """The ``config.json`` path of ``model`` (see ``load_config``)."""
    for path in (os.path.join(CONFIG_DIR, model + ".json"), model,
                 os.path.join(model, "config.json")):
        if os.path.isfile(path):
            return path
    raise ValueError(f"model={model!r} is neither a shipped model ({shipped_models()}) nor a "
                     "config.json file nor a directory holding one")
