"""The docs stay in step with the code: every public name is in docs/api.md, every relative link
in README.md and docs/*.md points to an existing file (and, for ``file.md#anchor``, to an
existing heading). No processes, no torch.distributed: a few seconds (importing transformers
through ``nxd_cp.models`` is most of it)."""
from __future__ import annotations

import glob
import importlib
import inspect
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_MD = os.path.join(ROOT, "docs", "api.md")

# Modules whose public names must be documented: ``__all__`` where the module defines one,
# else every public callable defined in the module itself (not imported into it).
MODULES = ("nxd_cp", "nxd_cp.parallel_state", "nxd_cp.sequence.layout", "nxd_cp.attention",
           "nxd_cp.comm", "nxd_cp.models", "nxd_cp.nn", "nxd_cp.config", "nxd_cp.nxd_config",
           "nxd_cp.sequence.batch", "nxd_cp.training.loss", "nxd_cp.training.grads",
           "nxd_cp.training.checkpoint", "nxd_cp.testing", "nxd_cp.sequence.packing",
           "nxd_cp.training.optim", "nxd_cp.layers", "nxd_cp.plan")


def public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return sorted(name for name, obj in vars(module).items()
                  if not name.startswith("_") and callable(obj)
                  and getattr(obj, "__module__", None) == module_name)


def code_spans(text: str) -> str:
    """The text of every fenced code block and inline code span, joined."""
    fenced = re.findall(r"^```.*?^```", text, flags=re.S | re.M)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    return "\n".join(fenced + inline)


@pytest.mark.parametrize("module_name", MODULES)
def test_public_names_are_in_api_md(module_name):
    code = code_spans(open(API_MD, encoding="utf-8").read())
    names = public_names(module_name)
    assert names, f"{module_name} exports nothing?"
    missing = [n for n in names if not re.search(rf"(?<![\w.]){re.escape(n)}\b", code)
               and not re.search(rf"\.{re.escape(n)}\b", code)]
    assert not missing, (f"public names of {module_name} not documented (in a code span) in "
                         f"docs/api.md: {missing}")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    text = re.sub(r"^```.*?^```", "", open(path, encoding="utf-8").read(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def doc_files() -> list[str]:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs",
                                                                             "*.md")))


def relative_links(path: str) -> list[str]:
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    links = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    return [u for u in links if not re.match(r"^[a-z][a-z0-9+.-]*:", u, flags=re.I)]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    broken = []
    for link in relative_links(path):
        target, _, anchor = link.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        if not os.path.exists(file):
            broken.append(f"{link} (no file {os.path.relpath(file, ROOT)})")
        elif anchor and file.endswith(".md") and anchor not in anchors(file):
            broken.append(f"{link} (no heading with anchor #{anchor} in "
                          f"{os.path.relpath(file, ROOT)})")
    assert not broken, f"{os.path.relpath(path, ROOT)} has broken links: {broken}"


def test_api_md_lists_real_signatures():
    """The signatures quoted in headings of docs/api.md match the code's (defaults, ``*``)."""
    import nxd_cp

    text = open(API_MD, encoding="utf-8").read()
    for func in (nxd_cp.neuronx_distributed_config, nxd_cp.context_parallel_attention,
                 nxd_cp.get_batch_on_this_context_parallel_rank, nxd_cp.transform,
                 nxd_cp.context_parallel_cross_entropy, nxd_cp.shard_sequence,
                 nxd_cp.unshard_sequence, nxd_cp.sequence_positions):
        parts = []
        for p in inspect.signature(func).parameters.values():
            if p.kind is p.KEYWORD_ONLY and "*" not in parts:
                parts.append("*")  # keyword-only parameters follow a bare "*"
            parts.append(p.name if p.default is p.empty
                         else f"{p.name}={p.default!r}".replace("'", '"'))
        shown = ", ".join(parts)
        assert f"`{func.__name__}({shown})" in text, (
            f"docs/api.md has no heading with the signature {func.__name__}({shown})")


def test_choosing_md_table_is_what_its_script_prints():
    """docs/choosing.md's memory table is the output of the Python block below it."""
    import contextlib
    import io

    text = open(os.path.join(ROOT, "docs", "choosing.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    script = next(b for b in blocks if "params_per_rank" in b)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(script, "docs/choosing.md", "exec"), {})
    assert out.getvalue() in text, "re-run the script of docs/choosing.md and paste its table"
