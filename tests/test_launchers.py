"""Trainium launchers: every script in scripts/ parses (bash -n), and the dry runs print the
environment and the torchrun command NxD users expect, with DP = world / (TP*CP*PP)."""
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
RUN = ROOT / "scripts" / "run_trn1.sh"
COMPILE = ROOT / "scripts" / "neuron_parallel_compile.sh"
EXAMPLE = str(ROOT / "examples" / "train_llama_cp.py")

# Variables a caller's shell (or Slurm) may have set that the launchers read.
_LAUNCHER_VARS = ("TP_DEGREE", "CP_DEGREE", "PP_DEGREE", "NUM_MICROBATCHES", "CP_COMM_TYPE",
                  "SEQ_LEN", "MBS", "STEPS", "COMPILE_STEPS", "MODEL_CONFIG", "DATA_PATH",
                  "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                  "NEURON_CACHE_DIR",
                  "PRECISION", "LOG_DIR", "NUM_PARALLEL", "NEURON_CC_EXTRA_FLAGS",
                  "NEURON_EXTRACT_GRAPHS_ONLY", "SLURM_NNODES", "SLURM_NODEID",
                  "SLURM_JOB_NODELIST")


def launch(script, *args, **env):
    """Run a launcher with a clean launcher environment plus ``env``; (rc, stdout, stderr)."""
    full = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    full.update(HOME="/home/trainer", **env)
    proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env=full, timeout=30)
    return proc.returncode, proc.stdout, proc.stderr


def parse_dry_run(stdout):
    """(layout line, {exported name: value}, command argv) from a dry run's output."""
    lines = stdout.strip().splitlines()
    layout = next(line for line in lines if line.startswith("# layout:"))
    env = {}
    for line in lines:
        if line.startswith("export "):
            name, value = shlex.split(line[len("export "):])[0].split("=", 1)
            env[name] = value
    command = shlex.split(lines[lines.index("# command") + 1])
    return layout, env, command


def flag(command, name):
    """The value following ``name`` in an argv."""
    return command[command.index(name) + 1]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", [RUN, COMPILE], ids=["run", "compile"])
def test_help(script):
    rc, out, _ = launch(script, "--help")
    assert rc == 0
    for option in ("--tp", "--cp", "--nnodes", "--master-addr", "--dry-run", "NNODES"):
        assert option in out


def test_single_node_tp8_cp4():
    rc, out, err = launch(RUN, "--dry-run")
    assert rc == 0, err
    layout, env, cmd = parse_dry_run(out)
    assert "world 32" in layout and "TP=8 CP=4 PP=1 -> DP=1" in layout
    assert env["NEURON_CC_FLAGS"] == ("--model-type transformer "
                                      "--cache_dir=/home/trainer/neuron_compile_cache")
    assert env["MALLOC_ARENA_MAX"] == "64"
    assert env["XLA_DOWNCAST_BF16"] == "1"
    assert env["NEURON_FUSE_SOFTMAX"] == "1"
    assert env["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"] == "3"
    assert env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "1"
    assert "FI_PROVIDER" not in env  # EFA only across nodes
    assert cmd[:4] == ["torchrun", "--nproc_per_node", "32", EXAMPLE]
    assert "--nnodes" not in cmd
    assert flag(cmd, "--tensor_parallel_size") == "8"
    assert flag(cmd, "--context_parallel_size") == "4"
    assert flag(cmd, "--cp_comm_type") == "p2p"
    assert flag(cmd, "--seq_len") == "32768"
    assert flag(cmd, "--device") == "xla"
    assert flag(cmd, "--steps") == "100"


def test_two_nodes_from_env_give_dp2_and_efa():
    rc, out, err = launch(RUN, "--dry-run", "--cp-comm-type", "all_gather",
                          "--model-config", "/cfg/llama 8b.json", "--", "--check",
                          NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.7", MASTER_PORT="45000")
    assert rc == 0, err
    layout, env, cmd = parse_dry_run(out)
    assert "world 64" in layout and "-> DP=2" in layout and "node 1" in layout
    assert (env["FI_PROVIDER"], env["FI_EFA_USE_DEVICE_RDMA"], env["FI_EFA_FORK_SAFE"]) == \
        ("efa", "1", "1")
    assert cmd[:11] == ["torchrun", "--nproc_per_node", "32", "--nnodes", "2", "--node_rank",
                        "1", "--master_addr", "10.0.0.7", "--master_port", "45000"]
    assert flag(cmd, "--cp_comm_type") == "all_gather"
    assert flag(cmd, "--model_config") == "/cfg/llama 8b.json"  # quoted so it pastes
    assert cmd[-1] == "--check"


def test_options_override_env():
    rc, out, err = launch(RUN, "--dry-run", "--tp", "4", "--cp", "8", "--seq-len", "65536",
                          "--precision", "fp32", "--cache-dir", "/cache", TP_DEGREE="32")
    assert rc == 0, err
    _, env, cmd = parse_dry_run(out)
    assert flag(cmd, "--tensor_parallel_size") == "4"
    assert flag(cmd, "--context_parallel_size") == "8"
    assert "XLA_DOWNCAST_BF16" not in env and env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "0"
    assert env["NEURON_CC_FLAGS"].endswith("--cache_dir=/cache")


def test_compile_wraps_in_neuron_parallel_compile_with_few_steps():
    rc, out, err = launch(COMPILE, "--dry-run", "--num-parallel", "8", "--steps", "1000")
    assert rc == 0, err
    layout, env, cmd = parse_dry_run(out)
    assert "mode compile" in layout
    assert cmd[:4] == ["neuron_parallel_compile", "--num_parallel", "8", "torchrun"]
    assert flag(cmd, "--steps") == "5"  # COMPILE_STEPS, not --steps
    assert env["NEURON_CC_FLAGS"].startswith("--model-type transformer")
    # Same environment as the run, so the compiled graphs hit the cache at run time.
    _, run_env, run_cmd = parse_dry_run(launch(RUN, "--dry-run")[1])
    assert env == run_env
    assert cmd[3:cmd.index("--steps")] == run_cmd[:run_cmd.index("--steps")]


def test_70b_layout_tp32_cp2_pp8_on_16_nodes():
    """NxD's Llama-3-70B CP recipe layout: TP32 x CP2 x PP8 over 16 trn1.32xlarge (512 ranks),
    DP 1, 8 microbatches of one sequence each."""
    rc, out, err = launch(RUN, "--dry-run", "--tp", "32", "--cp", "2", "--pp", "8",
                          "--batch-size", "8", "--nnodes", "16", "--node-rank", "3",
                          "--master-addr", "node0", "--seq-len", "16384")
    assert rc == 0, err
    layout, _, cmd = parse_dry_run(out)
    assert "world 512" in layout and "TP=32 CP=2 PP=8 -> DP=1" in layout, layout
    assert flag(cmd, "--pipeline_parallel_size") == "8"
    assert flag(cmd, "--num_microbatches") == "8"
    assert flag(cmd, "--node_rank") == "3"


def test_run_under_graph_extraction_uses_compile_steps():
    rc, out, err = launch(RUN, "--dry-run", "--compile-steps", "3",
                          NEURON_EXTRACT_GRAPHS_ONLY="1")
    assert rc == 0, err
    assert flag(parse_dry_run(out)[2], "--steps") == "3"


@pytest.mark.parametrize("args,env,message", [
    (["--tp", "3"], {}, r"world size 32 \(NNODES=1 x NPROC_PER_NODE=32\) is not divisible by "
                        r"TP_DEGREE\(3\) \* CP_DEGREE\(4\) \* PP_DEGREE\(1\) = 12"),
    (["--cp", "16"], {"NNODES": "1"}, r"not divisible .* = 128"),
    (["--seq-len", "1001"], {}, r"SEQ_LEN=1001 is not divisible by 2\*CP_DEGREE=8"),
    (["--tp", "0"], {}, r"TP_DEGREE=0 is invalid: it must be an integer >= 1"),
    (["--cp-comm-type", "ring"], {}, r"CP_COMM_TYPE=ring is invalid"),
    (["--pp", "2"], {}, r"MBS=1 is not divisible by NUM_MICROBATCHES=2"),
    (["--microbatches", "0"], {}, r"NUM_MICROBATCHES=0 is invalid"),
    ([], {"NNODES": "2"}, r"MASTER_ADDR is empty with NNODES=2"),
    (["--node-rank", "2", "--nnodes", "2", "--master-addr", "h"], {},
     r"NODE_RANK=2 is invalid: it must be < NNODES=2"),
    (["--bogus"], {}, r"unknown option --bogus"),
    (["--tp"], {}, r"option --tp needs a value"),
])
def test_bad_setups_fail_with_a_message(args, env, message):
    rc, out, err = launch(RUN, "--dry-run", *args, **env)
    assert rc != 0
    assert re.search(message, err), err
    assert "# command" not in out


def test_real_run_without_neuron_fails_clearly(tmp_path):
    """Without --dry-run on a machine with no Neuron tools: a clear error, nothing started."""
    rc, _, err = launch(COMPILE, "--log-dir", str(tmp_path / "logs"),
                        PATH="/usr/bin:/bin")
    assert rc != 0
    assert "neuron_parallel_compile not found" in err and "Neuron pip repository" in err
