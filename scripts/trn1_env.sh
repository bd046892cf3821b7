# shellcheck shell=bash
# Shared logic of scripts/run_trn1.sh and scripts/neuron_parallel_compile.sh; sourced, not run.
#
# trn1_main MODE "$@"   MODE is "run" or "compile". Parses the options, checks the rank
#                       arithmetic (DP = world / (TP*CP*PP)), sets the Neuron environment NxD's
#                       Llama scripts use, builds the torchrun command for
#                       examples/train_llama_cp.py and either prints everything (--dry-run) or
#                       runs it, teeing the output to a log file.
#
# Every option has an environment variable of the same meaning (NxD's names where NxD has one);
# an option on the command line wins over the variable.

TRN1_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

trn1_usage() {
  local prog="$1" mode="$2"
  cat <<EOF
Usage: $prog [options] [-- extra arguments for examples/train_llama_cp.py]

EOF
  if [ "$mode" = compile ]; then
    cat <<EOF
Ahead-of-time compilation: runs the training command under neuron_parallel_compile for a few
steps (graph extraction: NEURON_EXTRACT_GRAPHS_ONLY=1, outputs are not real), then compiles
every extracted graph in parallel into the Neuron compile cache. Run it once per
configuration before scripts/run_trn1.sh, on every node, with the same options.

EOF
  else
    cat <<EOF
Launch examples/train_llama_cp.py on Trainium (trn1.32xlarge: 32 NeuronCores per node) with
torchrun. Run scripts/neuron_parallel_compile.sh first with the same options, or the graphs
are compiled one by one during the first steps. Running this script under
neuron_parallel_compile (NEURON_EXTRACT_GRAPHS_ONLY=1) also limits it to COMPILE_STEPS steps.

EOF
  fi
  cat <<EOF
Options (environment variable in brackets, then the default):
  --tp N                tensor parallel size [TP_DEGREE] 8
  --cp N                context parallel size [CP_DEGREE] 4
  --pp N                pipeline parallel size [PP_DEGREE] 1 (on trn1 NxD's NxDPPModel
                        runs the stages; docs/trn1.md)
  --microbatches N      pipeline microbatches per step, divides --batch-size
                        [NUM_MICROBATCHES] PP_DEGREE
  --cp-comm-type T      p2p | all_gather | a2a [CP_COMM_TYPE] p2p (a2a: Hq/TP divisible by CP)
  --seq-len N           tokens per sequence [SEQ_LEN] 32768 (divisible by 2*CP: zigzag)
  --batch-size N        sequences per DP rank per step [MBS] 1
  --steps N             training steps [STEPS] 100
  --compile-steps N     steps traced in graph-extraction mode [COMPILE_STEPS] 5
  --model-config PATH   transformers config JSON [MODEL_CONFIG] (the example's tiny default)
  --data PATH           text file to train on [DATA_PATH] (the example's default)
  --nproc-per-node N    NeuronCores (ranks) per node [NPROC_PER_NODE] 32
  --nnodes N            nodes [NNODES, else SLURM_NNODES] 1
  --node-rank N         this node's index [NODE_RANK, else SLURM_NODEID] 0
  --master-addr HOST    rendezvous host, required with nnodes > 1 [MASTER_ADDR]
                        (under Slurm: the first host of SLURM_JOB_NODELIST)
  --master-port PORT    rendezvous port [MASTER_PORT] 44000
  --cache-dir DIR       Neuron compile cache [NEURON_CACHE_DIR] \$HOME/neuron_compile_cache
  --precision P         bf16 | fp32 [PRECISION] bf16 (bf16: XLA_DOWNCAST_BF16=1 and
                        stochastic rounding; fp32: neither)
  --log-dir DIR         where the per-node log goes [LOG_DIR] logs
  --num-parallel N      concurrent compilations, compile mode [NUM_PARALLEL] (tool default)
  --dry-run             print the environment and the command, run nothing, exit 0
  -h, --help            this text

Extra compiler flags: NEURON_CC_EXTRA_FLAGS is appended to NEURON_CC_FLAGS.
EOF
}

trn1_die() {
  echo "error: $*" >&2
  exit 2
}

# Print $1 shell-quoted only when it needs quoting (readable dry runs that still paste).
trn1_quote() {
  case "$1" in
    '' | *[!A-Za-z0-9_./:=,@%+-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}

trn1_check_int() {
  local name="$1" value="$2" min="$3"
  case "$value" in
    '' | *[!0-9]*) trn1_die "$name=$value is invalid: it must be an integer >= $min" ;;
  esac
  [ "$value" -ge "$min" ] || trn1_die "$name=$value is invalid: it must be an integer >= $min"
}

trn1_defaults() {
  TP_DEGREE="${TP_DEGREE:-8}"
  CP_DEGREE="${CP_DEGREE:-4}"
  PP_DEGREE="${PP_DEGREE:-1}"
  CP_COMM_TYPE="${CP_COMM_TYPE:-p2p}"
  SEQ_LEN="${SEQ_LEN:-32768}"
  MBS="${MBS:-1}"
  NUM_MICROBATCHES="${NUM_MICROBATCHES:-}"
  STEPS="${STEPS:-100}"
  COMPILE_STEPS="${COMPILE_STEPS:-5}"
  MODEL_CONFIG="${MODEL_CONFIG:-}"
  DATA_PATH="${DATA_PATH:-}"
  NPROC_PER_NODE="${NPROC_PER_NODE:-32}"
  NNODES="${NNODES:-${SLURM_NNODES:-1}}"
  NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
  MASTER_ADDR="${MASTER_ADDR:-}"
  MASTER_PORT="${MASTER_PORT:-44000}"
  NEURON_CACHE_DIR="${NEURON_CACHE_DIR:-$HOME/neuron_compile_cache}"
  PRECISION="${PRECISION:-bf16}"
  LOG_DIR="${LOG_DIR:-logs}"
  NUM_PARALLEL="${NUM_PARALLEL:-}"
  DRY_RUN=0
  EXTRA_ARGS=()
}

# The variable an option sets, or nothing for an unknown option.
trn1_option_var() {
  case "$1" in
    --tp) echo TP_DEGREE ;;
    --cp) echo CP_DEGREE ;;
    --pp) echo PP_DEGREE ;;
    --cp-comm-type) echo CP_COMM_TYPE ;;
    --seq-len) echo SEQ_LEN ;;
    --batch-size) echo MBS ;;
    --microbatches) echo NUM_MICROBATCHES ;;
    --steps) echo STEPS ;;
    --compile-steps) echo COMPILE_STEPS ;;
    --model-config) echo MODEL_CONFIG ;;
    --data) echo DATA_PATH ;;
    --nproc-per-node) echo NPROC_PER_NODE ;;
    --nnodes) echo NNODES ;;
    --node-rank) echo NODE_RANK ;;
    --master-addr) echo MASTER_ADDR ;;
    --master-port) echo MASTER_PORT ;;
    --cache-dir) echo NEURON_CACHE_DIR ;;
    --precision) echo PRECISION ;;
    --log-dir) echo LOG_DIR ;;
    --num-parallel) echo NUM_PARALLEL ;;
  esac
}

# Option parsing: trn1_parse_args PROG MODE "$@" (PROG and MODE for --help).
trn1_parse_args() {
  local prog="$1" mode="$2" var
  shift 2
  while [ $# -gt 0 ]; do
    case "$1" in
      -h | --help) trn1_usage "$prog" "$mode"; exit 0 ;;
      --dry-run) DRY_RUN=1; shift; continue ;;
      --) shift; EXTRA_ARGS=("$@"); return 0 ;;
    esac
    var="$(trn1_option_var "$1")"
    [ -n "$var" ] || trn1_die "unknown option $1 (see --help)"
    [ $# -ge 2 ] || trn1_die "option $1 needs a value (see --help)"
    printf -v "$var" '%s' "$2"
    shift 2
  done
}

# Under Slurm without MASTER_ADDR, the first host of the allocation is the rendezvous host.
trn1_slurm_master() {
  if [ -z "$MASTER_ADDR" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] &&
    command -v scontrol >/dev/null; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  fi
}

trn1_validate() {
  local name
  for name in TP_DEGREE CP_DEGREE PP_DEGREE SEQ_LEN MBS STEPS COMPILE_STEPS NPROC_PER_NODE \
              NNODES MASTER_PORT; do
    trn1_check_int "$name" "${!name}" 1
  done
  trn1_check_int NODE_RANK "$NODE_RANK" 0
  [ -z "$NUM_PARALLEL" ] || trn1_check_int NUM_PARALLEL "$NUM_PARALLEL" 1
  case "$CP_COMM_TYPE" in p2p | all_gather | a2a) ;;
    *) trn1_die "CP_COMM_TYPE=$CP_COMM_TYPE is invalid: it must be p2p, all_gather or a2a" ;;
  esac
  case "$PRECISION" in bf16 | fp32) ;;
    *) trn1_die "PRECISION=$PRECISION is invalid: it must be bf16 or fp32" ;;
  esac
  [ -n "$NUM_MICROBATCHES" ] || NUM_MICROBATCHES="$PP_DEGREE"
  trn1_check_int NUM_MICROBATCHES "$NUM_MICROBATCHES" 1
  if [ $((MBS % NUM_MICROBATCHES)) -ne 0 ]; then
    trn1_die "MBS=$MBS is not divisible by NUM_MICROBATCHES=$NUM_MICROBATCHES: each" \
      "pipeline microbatch is an equal block of the batch's rows"
  fi
  [ "$NODE_RANK" -lt "$NNODES" ] ||
    trn1_die "NODE_RANK=$NODE_RANK is invalid: it must be < NNODES=$NNODES"
  if [ "$NNODES" -gt 1 ] && [ -z "$MASTER_ADDR" ]; then
    trn1_die "MASTER_ADDR is empty with NNODES=$NNODES: set it (or --master-addr) to the" \
      "address of node 0, the same on every node"
  fi
  if [ $((SEQ_LEN % (2 * CP_DEGREE))) -ne 0 ]; then
    trn1_die "SEQ_LEN=$SEQ_LEN is not divisible by 2*CP_DEGREE=$((2 * CP_DEGREE)) (zigzag" \
      "load balance cuts the sequence into 2*CP chunks)"
  fi
}

# WORLD and DP from the node shape; a clear error when TP*CP*PP does not divide the world.
trn1_layout() {
  WORLD=$((NPROC_PER_NODE * NNODES))
  local model=$((TP_DEGREE * CP_DEGREE * PP_DEGREE))
  if [ $((WORLD % model)) -ne 0 ]; then
    trn1_die "world size $WORLD (NNODES=$NNODES x NPROC_PER_NODE=$NPROC_PER_NODE) is not" \
      "divisible by TP_DEGREE($TP_DEGREE) * CP_DEGREE($CP_DEGREE) * PP_DEGREE($PP_DEGREE) =" \
      "$model; pick sizes whose product divides $WORLD"
  fi
  DP=$((WORLD / model))
}

# The exported environment, as NAME=VALUE lines in TRN1_ENV (order kept for the dry run).
trn1_environment() {
  local cc_flags="--model-type transformer --cache_dir=$NEURON_CACHE_DIR"
  [ -z "${NEURON_CC_EXTRA_FLAGS:-}" ] || cc_flags+=" $NEURON_CC_EXTRA_FLAGS"
  TRN1_ENV=(
    "NEURON_CC_FLAGS=$cc_flags"
    "NEURON_FUSE_SOFTMAX=1"
    "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS=3"
    "MALLOC_ARENA_MAX=64"
    "NEURON_RT_NUM_CORES=$NPROC_PER_NODE"
    "NUM_NEURONCORES=$NPROC_PER_NODE"
    "TPU_NUM_DEVICES=$NPROC_PER_NODE"
    "TPU_CHIPS_PER_HOST_BOUNDS=$NPROC_PER_NODE"
  )
  if [ "$PRECISION" = bf16 ]; then
    # fp32 tensors in torch, bf16 on the device; rounding stochastically keeps bf16 updates.
    TRN1_ENV+=("XLA_DOWNCAST_BF16=1" "NEURON_RT_STOCHASTIC_ROUNDING_EN=1")
  else
    TRN1_ENV+=("NEURON_RT_STOCHASTIC_ROUNDING_EN=0")
  fi
  if [ "$NNODES" -gt 1 ]; then
    TRN1_ENV+=("FI_PROVIDER=efa" "FI_EFA_USE_DEVICE_RDMA=1" "FI_EFA_FORK_SAFE=1")
  fi
}

# The command in TRN1_CMD (an array). MODE compile prefixes neuron_parallel_compile.
trn1_command() {
  local mode="$1" steps="$STEPS"
  if [ "$mode" = compile ] || [ "${NEURON_EXTRACT_GRAPHS_ONLY:-0}" != 0 ]; then
    steps="$COMPILE_STEPS"
  fi
  TRN1_CMD=()
  if [ "$mode" = compile ]; then
    TRN1_CMD+=(neuron_parallel_compile)
    [ -z "$NUM_PARALLEL" ] || TRN1_CMD+=(--num_parallel "$NUM_PARALLEL")
  fi
  TRN1_CMD+=(torchrun --nproc_per_node "$NPROC_PER_NODE")
  if [ "$NNODES" -gt 1 ]; then
    TRN1_CMD+=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
               --master_port "$MASTER_PORT")
  fi
  TRN1_CMD+=("$TRN1_REPO_ROOT/examples/train_llama_cp.py"
             --tensor_parallel_size "$TP_DEGREE" --context_parallel_size "$CP_DEGREE"
             --pipeline_parallel_size "$PP_DEGREE" --num_microbatches "$NUM_MICROBATCHES"
             --cp_comm_type "$CP_COMM_TYPE" --seq_len "$SEQ_LEN" --batch_size "$MBS"
             --steps "$steps" --device xla
             # What a Llama-3.1-8B-sized model needs to fit (docs/choosing.md).
             --gradient_checkpointing --vocab_parallel_logits)
  [ -z "$MODEL_CONFIG" ] || TRN1_CMD+=(--model_config "$MODEL_CONFIG")
  [ -z "$DATA_PATH" ] || TRN1_CMD+=(--data "$DATA_PATH")
  TRN1_CMD+=("${EXTRA_ARGS[@]}")
}

trn1_print() {
  local mode="$1" kv arg
  echo "# layout: NNODES=$NNODES x NPROC_PER_NODE=$NPROC_PER_NODE = world $WORLD;" \
    "TP=$TP_DEGREE CP=$CP_DEGREE PP=$PP_DEGREE -> DP=$DP; node $NODE_RANK; mode $mode"
  if [ "$mode" = compile ]; then
    echo "# neuron_parallel_compile sets NEURON_EXTRACT_GRAPHS_ONLY=1 for the traced run itself"
  fi
  echo "# environment"
  for kv in "${TRN1_ENV[@]}"; do
    printf 'export %s=%s\n' "${kv%%=*}" "$(trn1_quote "${kv#*=}")"
  done
  echo "# command"
  local line=""
  for arg in "${TRN1_CMD[@]}"; do
    line+="${line:+ }$(trn1_quote "$arg")"
  done
  printf '%s\n' "$line"
}

trn1_require() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || trn1_die "$tool not found: install torch-neuronx and" \
      "neuronx-distributed from the Neuron pip repository" \
      "(https://pip.repos.neuron.amazonaws.com, see docs/trn1.md), not PyPI's placeholders," \
      "and activate that environment"
  done
  [ -f "$TRN1_REPO_ROOT/examples/train_llama_cp.py" ] ||
    trn1_die "$TRN1_REPO_ROOT/examples/train_llama_cp.py not found"
}

trn1_execute() {
  local mode="$1" kv log
  if [ "$mode" = compile ]; then
    trn1_require neuron_parallel_compile torchrun
  else
    trn1_require torchrun
    [ -e /dev/neuron0 ] || trn1_die "no Neuron device (/dev/neuron0): run on a Trainium" \
      "instance, or pass --dry-run to only print the commands"
  fi
  for kv in "${TRN1_ENV[@]}"; do
    export "${kv?}"
  done
  mkdir -p "$LOG_DIR" "$NEURON_CACHE_DIR"
  log="$LOG_DIR/${mode}-node${NODE_RANK}.log"
  echo "[trn1] world $WORLD: TP=$TP_DEGREE CP=$CP_DEGREE DP=$DP; log: $log" >&2
  # pipefail (set by the caller) makes the pipeline fail when the command does.
  "${TRN1_CMD[@]}" 2>&1 | tee "$log"
}

trn1_main() {
  local mode="$1" prog="$2"
  shift 2
  trn1_defaults
  trn1_parse_args "$prog" "$mode" "$@"
  trn1_slurm_master
  trn1_validate
  trn1_layout
  trn1_environment
  trn1_command "$mode"
  if [ "$DRY_RUN" = 1 ]; then
    trn1_print "$mode"
    return 0
  fi
  trn1_execute "$mode"
}
