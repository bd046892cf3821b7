#!/usr/bin/env bash
# Run every benchmark, then write performance.md and performance.png (benchmarks/report.py).
#
#   benchmarks/run_all.sh                 full sizes (~12 min on 2 cores) -> docs/
#   benchmarks/run_all.sh --quick         tiny sizes (about a minute)     -> a temporary folder
#   benchmarks/run_all.sh [--quick] --out DIR
#
# Every benchmark runs even if one fails; the script then exits 1 and the report marks the
# missing section. Raw output (stdout + stderr) of each benchmark is kept in a temporary
# results folder (printed first) beside its JSON figures.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-.venv/bin/python}"
quick=""
out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) quick="--quick"; shift ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [[ -z "$out" ]]; then
  if [[ -n "$quick" ]]; then out="$(mktemp -d -t nxd_cp_perf_XXXX)"; else out="docs"; fi
fi
results="$(mktemp -d -t nxd_cp_bench_XXXX)"  # JSON, logs and command lines of this run
echo "results: $results"
# One intra-op thread everywhere: spawned ranks use one (nxd_cp/testing.py), and the CPU
# efficiency benchmark compares both sides at the same count.
export OMP_NUM_THREADS=1

benches=(bench_load_balance bench_comm bench_memory bench_cpu_efficiency bench_e2e_cpu bench_gpu
         bench_packing_balance bench_xla_graph bench_sequence_parallel bench_pipeline
         bench_model_state bench_convergence)
declare -A extra=([bench_cpu_efficiency]="--threads 1" [bench_convergence]="--png $out/convergence.png")
failed=()
start=$SECONDS
for b in "${benches[@]}"; do
  cmd="$py benchmarks/$b.py"
  for a in $quick ${extra[$b]:-}; do cmd="$cmd $a"; done
  echo "$cmd" >> "$results/commands.txt"
  echo "== $cmd"
  t0=$SECONDS
  if $cmd --json "$results/$b.json" > "$results/$b.log" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s)"
  else
    echo "   FAILED ($((SECONDS - t0)) s), see $results/$b.log"
    tail -20 "$results/$b.log"
    failed+=("$b")
  fi
done
echo "$((SECONDS - start))" > "$results/seconds.txt"
"$py" benchmarks/report.py --results "$results" --out "$out" $quick || failed+=(report)
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
