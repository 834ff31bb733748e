#!/usr/bin/env bash
# Compiles CUDA sources standalone with nvcc (no GPU, no CMake, no torch needed) for each
# architecture and prints, per kernel, registers, stack frame and spill bytes from ptxas -v.
# It also checks the PTX of every kernel with scripts/check_ptx_loads.py: no kernel may read
# memory that it writes through the non-coherent read-only path (ld.global.nc: undefined
# behaviour that tests and compute-sanitizer cannot see), and ln_fwd_uncached with a residual
# must re-read h (its parameter 5, written by its pass 1) with coherent loads.
# Objects go to a temporary directory that is removed afterwards.
#
# usage: scripts/check_cuda_compile.sh [file.cu ...]     (default: every csrc/cuda/*.cu)
# env:   NVCC (default nvcc), ARCHS (default "90a 80"), NVCC_FLAGS (extra flags), PYTHON,
#        JOBS (compiles run at a time, default 2; the report is printed in file order afterwards)
# Exit status: non-zero when a compile or the load check fails, or when STRICT=1 and a kernel
# spills or uses stack.
set -euo pipefail

cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCHS=${ARCHS:-"90a 80"}
STRICT=${STRICT:-0}
PYTHON=${PYTHON:-python3}
# Loads that must be coherent, as MANGLED-NAME-REGEX:PARAMETER-INDEX (see check_ptx_loads.py):
# ln_fwd_uncached<T, P, VEC, U, RES = true, RMS> re-reads h, its parameter 5 (both norms).
PTX_EXPECT=(--expect-coherent "ln_fwd_uncachedI.*Lb1ELb[01]EE:5")
if [ "$#" -gt 0 ]; then files=("$@"); else files=(csrc/cuda/*.cu); fi

command -v "$NVCC" >/dev/null 2>&1 || { echo "check_cuda_compile: $NVCC not found" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

demangle() { if command -v c++filt >/dev/null 2>&1; then c++filt; else cat; fi; }

# Phase 1: every (file, arch) compiled, JOBS at a time (nvcc is single-threaded): its log, the PTX
# it kept (-keep, for the load check), its exit status and seconds in $tmp.
compile_one() {  # FILE ARCH
  local f=$1 arch=$2 stem start rc
  stem=$(basename "$f" .cu)
  start=$(date +%s)
  mkdir -p "$tmp/keep.$stem.sm_$arch"
  rc=0
  "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -Icsrc/include \
    -gencode="arch=compute_$arch,code=sm_$arch" -Xptxas -v ${NVCC_FLAGS:-} \
    -keep -keep-dir "$tmp/keep.$stem.sm_$arch" -c "$f" -o "$tmp/$stem.sm_$arch.o" \
    >"$tmp/$stem.sm_$arch.log" 2>&1 || rc=$?
  echo "$rc $(( $(date +%s) - start ))" >"$tmp/$stem.sm_$arch.rc"
}
export -f compile_one
export NVCC NVCC_FLAGS tmp
for f in "${files[@]}"; do for arch in $ARCHS; do printf '%s %s\n' "$f" "$arch"; done; done |
  xargs -P "${JOBS:-2}" -n 2 bash -c 'compile_one "$1" "$2"' _

# Phase 2: the report, file by file in order.
status=0
bad=0
for f in "${files[@]}"; do
  for arch in $ARCHS; do
    stem=$(basename "$f" .cu)
    log="$tmp/$stem.sm_$arch.log"
    keep="$tmp/keep.$stem.sm_$arch"
    read -r rc secs <"$tmp/$stem.sm_$arch.rc"
    if [ "$rc" != "0" ]; then
      echo "== $f sm_$arch: COMPILE FAILED"
      grep -v 'ptxas info' "$log" || true
      status=1
      continue
    fi
    echo "== $f sm_$arch: compiled in ${secs}s"
    # Warnings other than ptxas's info lines.
    grep -v -e 'ptxas info' -e 'bytes stack frame' "$log" | sed 's/^/   /' || true
    # ptxas prints, per entry: "Compiling entry function 'NAME' for 'sm_XX'", then
    # "N bytes stack frame, N bytes spill stores, N bytes spill loads", then "Used N registers".
    awk '
      /Compiling entry function/ { match($0, /function .[^'"'"']+/); name = substr($0, RSTART + 10, RLENGTH - 10); next }
      /bytes stack frame/ { stack = $1; st = $5; ld = $9; next }
      /Used [0-9]+ registers/ && name != "" {
        for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i + 1);
        printf "%s\t%s\t%s\t%s\t%s\n", regs, stack, st, ld, name; name = ""
      }' "$log" >"$tmp/rows.tsv"
    cut -f5 "$tmp/rows.tsv" | demangle | sed -e 's/(anonymous namespace):://g' -e 's/__nv_bfloat16/bf16/g' \
      -e 's/(.*)$//' >"$tmp/names.txt"
    printf '   %5s %6s %8s %8s  %s\n' regs stack spill_st spill_ld kernel
    paste "$tmp/rows.tsv" "$tmp/names.txt" | sort -t$'\t' -k6 |
      while IFS=$'\t' read -r regs stack st ld _ name; do
        flag=""
        if [ "$stack" != "0" ] || [ "$st" != "0" ] || [ "$ld" != "0" ]; then flag="  <-- stack/spill"; fi
        printf '   %5s %6s %8s %8s  %s%s\n' "$regs" "$stack" "$st" "$ld" "$name" "$flag"
      done
    n_bad=$(awk -F'\t' '$2 != 0 || $3 != 0 || $4 != 0' "$tmp/rows.tsv" | wc -l)
    bad=$((bad + n_bad))
    if ! "$PYTHON" scripts/check_ptx_loads.py "${PTX_EXPECT[@]}" "$keep/$stem.ptx" | sed 's/^/   /'; then
      echo "== $f sm_$arch: LOAD CHECK FAILED (a kernel reads memory it writes through ld.global.nc)"
      status=1
    fi
    rm -rf "$keep"
  done
done
echo "kernels with stack or spills: $bad"
if [ "$STRICT" = "1" ] && [ "$bad" -gt 0 ]; then status=1; fi
exit $status
