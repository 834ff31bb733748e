#!/usr/bin/env bash
# The one prepared command of a GPU machine (DESIGN.md §6):
#
#     scripts/gpu_check.sh OUTDIR [--dry-run] [--stages FILE] [--only REGEX]
#
# env (aborts loudly, exit 3, when torch cannot see the expected GPU) -> build for this GPU only
# -> per op family, from scripts/gpu_check/stages.txt (one line per family): native-CUDA tests
# (+ every device-fixture test, PYDL_TEST_DEVICE=cuda), Triton tests, the sanitizer workload plain
# and under compute-sanitizer memcheck / racecheck (synccheck / initcheck when time is left), the
# quick benchmark -> OUTDIR/report.md, summary.txt, results.json, bench.csv, logs.tar.gz, and a
# short summary table printed LAST. Every stage has its own timeout; the whole run stays within
# GPU_CHECK_BUDGET_S (default 450 s). Exit status: 0 all clean; 1 a test, sanitizer, build or
# benchmark check failed, or a stage ran out of time; 2 usage; 3 not a GPU run.
#
# Dry run (no GPU needed, e.g. here or in CI): GPU_CHECK_DRY_RUN=1 or --dry-run: tiny test samples
# on the CPU / Triton interpreter, no build, sanitizers "unavailable", a smoke benchmark.
# The driver is scripts/gpu_check/driver.py (its docstring lists every environment variable).
set -u
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: $0 OUTDIR [--dry-run] [--stages FILE] [--only REGEX]" >&2
  exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  py=$(command -v python3 || command -v python || true)
fi
if [ -z "$py" ]; then
  echo "gpu_check: no python3 on PATH (set PYTHON)" >&2
  exit 2
fi
export PYTHON="$py" PYTHONUNBUFFERED=1
exec "$py" "$here/gpu_check/driver.py" "$@"
