"""All-to-all CP (``"a2a"``, ``"a2a+p2p"``) executed on XLA: each rank's lowered HLO run by
JAX's XLA:CPU with gloo collectives (tests/xla_exec.py), against float64 SDPA.

tests/test_xla_exec_attention.py's harness: one module per rank holds every case of a world;
cp = 2 and 4 with ``"a2a"`` (K/V heads 2 and 1 replicated to cp where they do not split),
cp = 4 with ``"a2a+p2p"``, a2a_size 2. Tolerances: fp32 forward 1e-5, gradients 1e-4,
norm-wise relative per tensor and rank. The modules must hold the all-to-all, be the same
program on every rank (the rank is device data) and carry no 64-bit type.
"""
import re

import pytest

pytest.importorskip("torch_xla")
pytest.importorskip("jax")

from test_xla_exec_attention import (CHUNK, FWD_TOL, GRAD_TOL, attention_step,  # noqa: E402
                                     errors, expected)
from xla_exec import execute, lower_world, normalise_hlo  # noqa: E402


def cases(cp, comm, a2a_size=None):
    small = CHUNK // 2 - 1
    out = {
        f"{comm}-window{small}-zigzag-mqa": dict(heads=(4, 1), window=small),
        f"{comm}-causal-padding-gqa": dict(heads=(4, 2), padding=True),
    }
    if cp == 2:  # the other masks and layout once (compilation dominates: few cases per world)
        out.update({f"{comm}-causal-contiguous-mha": dict(heads=(4, 4), layout="contiguous"),
                    f"{comm}-bidirectional-mqa": dict(heads=(4, 1), causal=False)})
    for c in out.values():
        c.update(comm=comm, a2a_size=a2a_size)
        c.setdefault("causal", True)
        c.setdefault("window", None)
        c.setdefault("layout", "zigzag")
        c.setdefault("padding", False)
    return out


@pytest.fixture(scope="module", params=[(2, "a2a", None), (4, "a2a", None), (4, "a2a+p2p", 2)],
                ids=["cp2-a2a", "cp4-a2a", "cp4-a2a+p2p"])
def world(request):
    cp, comm, n = request.param
    case_map = cases(cp, comm, n)
    modules = lower_world(attention_step(cp, case_map, seed=20 * cp), cp,
                          context_parallel_size=cp)
    return cp, comm, case_map, modules, execute(modules, timeout=400), \
        expected(cp, case_map, 20 * cp)


def test_all_to_all_executes_and_matches_sdpa(world):
    cp, comm, case_map, _, got, want = world
    worst = errors(got, want)
    fails = [f"cp{cp} {name}: rel err {e:.2e}" for name, e in sorted(worst.items())
             if not e <= (FWD_TOL if name.endswith("/out") else GRAD_TOL)]
    print({name: f"{e:.1e}" for name, e in sorted(worst.items())})
    assert len(worst) == 4 * len(case_map)
    assert not fails, "\n".join(fails)


def test_modules_hold_all_to_all_one_program_no_64_bit(world):
    cp, comm, _, modules, _, _ = world
    for m in modules:
        opcodes = set(re.findall(r'opcode: "([a-z-]+)"', m.hlo_text))
        assert "all-to-all" in opcodes, opcodes
        assert ("collective-permute" in opcodes) == (comm == "a2a+p2p"), opcodes
        assert not re.search(r"\b[fs]64\[", m.text) and not m.needs_x64
    assert len({normalise_hlo(m.text) for m in modules}) == 1  # one program for every rank
