#!/usr/bin/env bash
# One-shot validation of pydl on a GPU machine (DESIGN.md §6). Run from anywhere:
#
#     scripts/gpu_check.sh OUTDIR
#
# Steps (each timed; a failure is recorded and the script goes on to the report):
#   1 env        nvidia-smi, python / torch / triton / nvcc / cmake versions
#   2 build      the CUDA kernels for this GPU only (-j16), then `python -m pydl info`
#   3 pytest     every cuda/triton test on the GPU (PYDL_TEST_DEVICE=cuda)
#   4 sanitizer  compute-sanitizer memcheck + racecheck over scripts/sanitize_layer_norm.py
#   5 bench      python -m pydl.bench --quick --device cuda
#   6 report     OUTDIR/report.md; a short summary table printed LAST on stdout
#
# OUTDIR stays flat and holds at most 8 files: report.md, bench.csv, build.log, pytest.log,
# sanitizer-memcheck.log, sanitizer-racecheck.log, bench.log, bench-plots.png.
# The whole run is bounded by GPU_CHECK_BUDGET_S (default 450 s, under 8 minutes); every step
# gets a `timeout` cut from what is left, keeping a reserve for the steps after it.
# Optional environment: PYTHON (default python3), PYDL_COMMIT (commit to report when the copy
# has no .git), PYDL_CUDA_ARCHS (skip detection), GPU_CHECK_BUDGET_S.
# No network is needed or used.

set -u
if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)

STEP_NAMES=()
STEP_STATUS=()
STEP_SECS=()
record() {  # record NAME STATUS SECONDS
  STEP_NAMES+=("$1"); STEP_STATUS+=("$2"); STEP_SECS+=("$3")
  printf '[gpu_check] %-10s %-40s %4ss  (elapsed %ss)\n' "$1" "$2" "$3" "$(( $(date +%s) - START ))"
}

# limit CAP RESERVE: seconds a step may run: CAP, or less so that RESERVE seconds stay for
# the steps after it; never under 10.
limit() {
  local left=$(( START + BUDGET - $(date +%s) - $2 ))
  local t=$1
  (( left < t )) && t=$left
  (( t < 10 )) && t=10
  echo "$t"
}

# run_step NAME CAP RESERVE LOG CMD...: runs CMD under `timeout`, appending to LOG; sets RC, SECS.
run_step() {
  local name=$1 cap=$2 reserve=$3 log=$4
  shift 4
  local t
  t=$(limit "$cap" "$reserve")
  local s
  s=$(date +%s)
  echo "### $name: $* (timeout ${t}s)" >>"$log"
  timeout -k 10 "$t" "$@" >>"$log" 2>&1
  RC=$?
  SECS=$(( $(date +%s) - s ))
  if (( RC == 124 || RC == 137 )); then
    echo "### $name: TIMEOUT after ${t}s" >>"$log"
    STEP_TIMEOUT=$t
  else
    STEP_TIMEOUT=
  fi
}

status_of() {  # status_of RC -> ok / timeout / fail (rc N)
  if [ -n "$STEP_TIMEOUT" ]; then echo "timeout (${STEP_TIMEOUT}s)"
  elif (( $1 == 0 )); then echo "ok"
  else echo "fail (rc $1)"; fi
}

# ------------------------------------------------------------------------------ 1 env
ENV_TXT=$WORK/env.txt
env_probe() {
  echo "\$ nvidia-smi -L"; timeout 15 nvidia-smi -L 2>&1 || echo "(nvidia-smi failed)"
  echo "\$ nvidia-smi --query-gpu=..."
  timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
    --format=csv 2>&1 || true
  echo "\$ python"; "$PY" --version 2>&1
  "$PY" - <<'EOF' 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"cc {p.major}.{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.1f} GiB", f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
EOF
  echo "\$ nvcc --version"; (nvcc --version 2>&1 || echo "(nvcc not found)") | tail -n 2
  echo "\$ cmake --version"; (cmake --version 2>&1 || echo "(cmake not found)") | head -n 1
  echo "\$ ninja --version"; ninja --version 2>&1 || echo "(ninja not found)"
}
s=$(date +%s)
env_probe >"$ENV_TXT" 2>&1
record env ok $(( $(date +%s) - s ))

GPU_NAME=$(timeout 15 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
GPU_NAME=${GPU_NAME:-unknown-gpu}
COMMIT=${PYDL_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
DIRTY=""
if git rev-parse --git-dir >/dev/null 2>&1 && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  DIRTY=" (uncommitted changes present)"
fi
export PYDL_COMMIT=$COMMIT   # the bench CSV records the same commit

# ---------------------------------------------------------------------------- 2 build
ARCH=${PYDL_CUDA_ARCHS:-$("$PY" -c '
import torch
M, m = torch.cuda.get_device_capability(0)
print(f"{M}{m}" + ("a" if M >= 9 else ""))' 2>/dev/null)}
ARCH=${ARCH:-90a}
BUILD_LOG=$OUT/build.log
: >"$BUILD_LOG"
run_step build 240 230 "$BUILD_LOG" \
  env PYDL_CUDA=ON PYDL_CUDA_ARCHS="$ARCH" PYDL_BUILD_JOBS=16 "$PY" setup.py build_ext --inplace
BUILD_STATUS=$(status_of $RC)
BUILD_SECS=$SECS
INFO_TXT=$WORK/info.txt
timeout 60 "$PY" -m pydl info >"$INFO_TXT" 2>&1
INFO_RC=$?
if (( INFO_RC != 0 )); then
  BUILD_STATUS="$BUILD_STATUS; pydl info failed (rc $INFO_RC)"
elif ! grep -Eq '^cuda_kernels_built +True' "$INFO_TXT"; then
  BUILD_STATUS="$BUILD_STATUS; CUDA kernels NOT built"
fi
record build "$BUILD_STATUS (sm_$ARCH)" "$BUILD_SECS"

# --------------------------------------------------------------------------- 3 pytest
PYTEST_LOG=$OUT/pytest.log
: >"$PYTEST_LOG"
PYTEST_ARGS=(tests -m "cuda or triton" -q -rfEs -p no:cacheprovider)
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
  PYTEST_ARGS+=(--timeout=120)
fi
run_step pytest 150 170 "$PYTEST_LOG" env PYDL_TEST_DEVICE=cuda "$PY" -m pytest "${PYTEST_ARGS[@]}"
PYTEST_RC=$RC
PYTEST_COUNTS=$(grep -Eo '[0-9]+ (passed|failed|skipped|errors?|xfailed|xpassed|deselected)' "$PYTEST_LOG" \
  | tail -n 8 | awk '{c[$2]=$1} END {n=0; for (k in c) {printf "%s%s %s", (n++ ? ", " : ""), c[k], k}}')
PYTEST_COUNTS=${PYTEST_COUNTS:-no counts}
if [ -z "$STEP_TIMEOUT" ] && (( PYTEST_RC == 5 )); then PYTEST_STATUS="no tests collected"
else PYTEST_STATUS=$(status_of $PYTEST_RC); fi
record pytest "$PYTEST_STATUS: $PYTEST_COUNTS" "$SECS"

# ------------------------------------------------------------------------ 4 sanitizer
CS=$(command -v compute-sanitizer 2>/dev/null)
if [ -z "$CS" ]; then
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
           "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/nvcc)")/compute-sanitizer"; do
    if [ -x "$c" ]; then CS=$c; break; fi
  done
fi
declare -A SAN_STATUS SAN_SECS SAN_SUMMARY
for tool in memcheck racecheck; do
  log=$OUT/sanitizer-$tool.log
  : >"$log"
  if [ -z "$CS" ]; then
    echo "compute-sanitizer not found" >>"$log"
    SAN_STATUS[$tool]="unavailable (tool missing)"; SAN_SECS[$tool]=0; SAN_SUMMARY[$tool]=""
    record "$tool" "${SAN_STATUS[$tool]}" 0
    continue
  fi
  if [ "$tool" = racecheck ] && [[ "${SAN_STATUS[memcheck]}" == unavailable* || "${SAN_STATUS[memcheck]}" == skipped* ]]; then
    echo "not run: memcheck was ${SAN_STATUS[memcheck]}" >>"$log"
    SAN_STATUS[$tool]="${SAN_STATUS[memcheck]}"; SAN_SECS[$tool]=0; SAN_SUMMARY[$tool]=""
    record "$tool" "${SAN_STATUS[$tool]}" 0
    continue
  fi
  if [ "$tool" = memcheck ]; then reserve=140; else reserve=110; fi
  run_step "$tool" 75 "$reserve" "$log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$CS" --tool "$tool" --error-exitcode 1 --print-limit 50 "$PY" scripts/sanitize_layer_norm.py
  summary=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|failing case' "$log" | tr '\n' ' ' | sed 's/========= //g')
  if grep -Eq 'Device not supported|error 999|CUDA_ERROR_UNKNOWN|cudaErrorUnknown|CUDA error: unknown error' "$log"; then
    st="unavailable (device not supported)"
  elif grep -q 'native CUDA kernels not built' "$log"; then
    st="skipped (CUDA kernels not built)"
  elif [ -n "$STEP_TIMEOUT" ]; then
    st="timeout (${STEP_TIMEOUT}s)"
  elif (( RC == 0 )); then
    st="clean"
  else
    st="FAIL (rc $RC)"
  fi
  SAN_STATUS[$tool]=$st; SAN_SECS[$tool]=$SECS; SAN_SUMMARY[$tool]=$summary
  record "$tool" "$st" "$SECS"
done

# ---------------------------------------------------------------------------- 5 bench
BENCH_LOG=$OUT/bench.log
: >"$BENCH_LOG"
BENCH_DIR=$WORK/bench
t_bench=$(limit 180 15)
# The harness stops starting new points ~30 s before the step's timeout (one point, the report
# and the plots still fit) and records the points it did not reach as skipped.
run_step bench "$t_bench" 15 "$BENCH_LOG" \
  "$PY" -m pydl.bench --quick --device cuda --out "$BENCH_DIR" \
  --time-limit-s $(( t_bench > 60 ? t_bench - 30 : t_bench / 2 ))
BENCH_STATUS=$(status_of $RC)
BENCH_SECS=$SECS
if [ -f "$BENCH_DIR/results.csv" ]; then
  cp "$BENCH_DIR/results.csv" "$OUT/bench.csv"
  n_bad=$(grep -cE ',(mismatch|error),' "$OUT/bench.csv")
  n_limit=$(grep -c 'time-limit-s reached' "$OUT/bench.csv")
  (( n_bad > 0 )) && BENCH_STATUS="$BENCH_STATUS; $n_bad mismatch/error rows"
  (( n_limit > 0 )) && BENCH_STATUS="$BENCH_STATUS; $n_limit rows cut by time limit"
else
  BENCH_STATUS="$BENCH_STATUS; no results.csv"
fi
# One combined PNG of the per-op plots (OUTDIR keeps at most 8 files).
if ls "$BENCH_DIR"/plot_*.png >/dev/null 2>&1; then
  timeout 60 "$PY" - "$OUT/bench-plots.png" "$BENCH_DIR"/plot_*.png >>"$BENCH_LOG" 2>&1 <<'EOF' || true
import sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.image as mpimg
import numpy as np
imgs = [mpimg.imread(p)[..., :3] for p in sys.argv[2:]]
w = max(i.shape[1] for i in imgs)
imgs = [np.pad(i, ((0, 0), (0, w - i.shape[1]), (0, 0)), constant_values=1.0) for i in imgs]
mpimg.imsave(sys.argv[1], np.concatenate(imgs, axis=0))
EOF
fi
record bench "$BENCH_STATUS" "$BENCH_SECS"

# --------------------------------------------------------------------------- 6 report
TOTAL=$(( $(date +%s) - START ))
DATE=$(date -u +%Y-%m-%d)
GPU_SLUG=$(echo "$GPU_NAME" | tr 'A-Z' 'a-z' | grep -Eo 'h100|h200|a100|l40s|b200|gh200' | head -n 1)
GPU_SLUG=${GPU_SLUG:-$(echo "$GPU_NAME" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')}
SUGGESTED="benchmarks/results/$DATE-$GPU_SLUG-$COMMIT"
REPORT=$OUT/report.md
{
  echo "# pydl GPU check — $DATE — $GPU_NAME — $COMMIT$DIRTY"
  echo
  echo "Produced by \`scripts/gpu_check.sh\` in ${TOTAL} s (budget ${BUDGET} s). Commit this file as"
  echo "\`$SUGGESTED.md\` and bench.csv as \`$SUGGESTED.csv\`."
  echo
  echo "## Steps"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
  for i in "${!STEP_NAMES[@]}"; do
    echo "| ${STEP_NAMES[$i]} | ${STEP_STATUS[$i]//|/\\|} | ${STEP_SECS[$i]} |"
  done
  echo
  echo "- build: sm_$ARCH, log build.log"
  echo "- tests: \`pytest tests -m \"cuda or triton\"\` with PYDL_TEST_DEVICE=cuda: $PYTEST_COUNTS (pytest.log)"
  for tool in memcheck racecheck; do
    echo "- compute-sanitizer $tool: ${SAN_STATUS[$tool]}${SAN_SUMMARY[$tool]:+ — ${SAN_SUMMARY[$tool]}} (sanitizer-$tool.log)"
  done
  echo
  echo "## Environment"
  echo
  echo '```'
  cat "$ENV_TXT"
  echo '```'
  echo
  echo "## python -m pydl info"
  echo
  echo '```'
  cat "$INFO_TXT"
  echo '```'
  echo
  if [ -s "$PYTEST_LOG" ]; then
    echo "## Test failures and skips (tail of pytest.log)"
    echo
    echo '```'
    grep -E '^(FAILED|ERROR|SKIPPED)|passed|failed' "$PYTEST_LOG" | tail -n 40
    echo '```'
    echo
  fi
  if [ -f "$BENCH_DIR/report.md" ]; then
    echo "## Benchmarks (python -m pydl.bench --quick --device cuda)"
    echo
    # The harness report, its headings pushed one level down.
    sed -e 's/^# /### /' -e 's/^## /### /' "$BENCH_DIR/report.md" | grep -v '^!\[' | grep -v '^## Plots'
  else
    echo "## Benchmarks"
    echo
    echo "No results (see bench.log)."
  fi
} >"$REPORT"

# Short summary LAST on stdout: the benchmark table, then the steps.
if [ -f "$BENCH_LOG" ]; then
  sed -n '/^pydl.bench — /,/^wrote /p' "$BENCH_LOG" | grep -v '^\[' | tail -n 60
fi
echo
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
echo "== gpu_check: $GPU_NAME, commit $COMMIT$DIRTY, ${TOTAL}s =="
printf '%-10s  %-60s  %s\n' step status seconds
for i in "${!STEP_NAMES[@]}"; do
  printf '%-10s  %-60s  %s\n' "${STEP_NAMES[$i]}" "${STEP_STATUS[$i]}" "${STEP_SECS[$i]}"
done
echo "report: $REPORT  (commit as $SUGGESTED.md / .csv)"
exit 0
