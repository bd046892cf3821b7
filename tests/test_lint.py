"""ruff over the library, tests, benchmarks and examples (rules: ruff.toml): part of the suite,
so `scripts/test.sh` fails on a lint error like on any other."""
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "nxd_cp",
                           "tests", "benchmarks", "examples"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if "No module named ruff" in proc.stderr:
        pytest.fail("ruff is not installed: scripts/setup.sh installs it (requirements-test.txt)")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_sees_a_violation(tmp_path):
    """Negative control: the same command fails on a file with an unused import."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config",
                           str(ROOT / "ruff.toml"), str(bad)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "F401" in proc.stdout, proc.stdout + proc.stderr
