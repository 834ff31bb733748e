#!/usr/bin/env bash
# Install matrix: the ways a user installs pydl from a checkout, each repeated in the same checkout,
# plus the sdist -> wheel path. Every install is followed by an import check from another directory.
#
#   scripts/check_install.sh            (make test-install; part of make test)
#
# Works in build/install-check/ (git-ignored):
#   venv/  a plain venv (python3 -m venv, its bundled pip) with torch==2.13.0, numpy, `build` and the
#          build tools for the setup.py case; reused between runs
#   src/   a copy of this working tree (tracked + untracked, non-ignored files); its build/ is kept
#          between runs, so a second run also builds against CMake caches left by the first run's
#          (deleted) pip build environments. The copy keeps the real checkout's pydl/_C*.so and
#          build trees untouched (an editable install writes pydl/_C*.so into the source tree).
#   out/, logs/, cwd/
# PYDL_CUDA=OFF keeps each build short; the CUDA build is covered by `make build` in CI.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE=${PYDL_INSTALL_CHECK_DIR:-$REPO/build/install-check}
PYTHON=${PYTHON:-python3}
VENV=$BASE/venv
VPY=$VENV/bin/python
SRC=$BASE/src
OUT=$BASE/out
LOGS=$BASE/logs
CWD=$BASE/cwd
VENV_REQS="torch==2.13.0 numpy build setuptools>=77 wheel pybind11>=2.12 cmake>=3.24 ninja"

export PYDL_CUDA=OFF PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
unset PYDL_BUILD_DIR PYDL_SANITIZE PYDL_BUILD_TYPE PYDL_NATIVE_LIB PYDL_BACKEND PYTHONPATH VIRTUAL_ENV

GIT_DIR_=$(git -C "$REPO" rev-parse --absolute-git-dir 2>/dev/null) \
  || { echo "check_install: $REPO is not a git checkout (the tree is copied from git ls-files)" >&2; exit 1; }
mkdir -p "$BASE" "$OUT" "$LOGS" "$CWD"
exec 9>"$BASE/.lock"
flock -n 9 || { echo "check_install: another run holds $BASE/.lock" >&2; exit 1; }

START=$SECONDS
PASSED=0
FAILED=0

# ---- setup (not a case: a failure here aborts the run) --------------------------------------
if [[ ! -x $VPY || "$(cat "$VENV/.pydl-check-ready" 2>/dev/null)" != "$VENV_REQS" ]]; then
  echo "check_install: creating $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VPY" -m pip install -q $VENV_REQS >"$LOGS/venv.log" 2>&1 || { tail -n 40 "$LOGS/venv.log"; exit 1; }
  echo "$VENV_REQS" >"$VENV/.pydl-check-ready"
fi

# Fresh copy of the working tree; keep src/build (CMake trees from earlier runs).
mkdir -p "$SRC"
find "$SRC" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
(cd "$REPO" && git ls-files -co --exclude-standard -- ':(exclude).venv*' ':(exclude)build' \
  | while IFS= read -r f; do if [[ -f $f || -L $f ]]; then printf '%s\0' "$f"; fi; done \
  | tar --null -T - -cf -) | tar -xf - -C "$SRC"
untracked() { git --git-dir="$GIT_DIR_" --work-tree="$SRC" ls-files -o --exclude-standard | sort; }
untracked >"$BASE/untracked.before"
VERSION=$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$SRC/pydl/_version.py")

# ---- helpers --------------------------------------------------------------------------------
# import check from a directory without pydl/ in it; $1: where pydl must be imported from
import_check() {
  (cd "$CWD" && "$VPY" - "$1" "$VERSION" <<'EOF'
import importlib.metadata as md, os, sys
import pydl, pydl._native as n
assert n.load_error() is None, n.load_error()
import pydl.ops
where, version = sys.argv[1], sys.argv[2]
assert os.path.realpath(pydl.__file__).startswith(os.path.realpath(where)), (pydl.__file__, where)
assert pydl.__version__ == version == md.version("pydl-kernels"), (pydl.__version__, version)
print(pydl.__version__, pydl.__file__)
EOF
  ) && (cd "$CWD" && "$VPY" -m pydl info)
}
site_packages() { "$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])'; }
installed_regular() { import_check "$(site_packages)/pydl"; }
installed_editable() { import_check "$SRC/pydl"; }
# $1: archive, then patterns that must occur in its listing
has_entries() {
  local archive=$1 listing; shift
  if [[ $archive == *.whl ]]; then listing=$("$VPY" -m zipfile -l "$archive"); else listing=$(tar -tzf "$archive"); fi
  for pat in "$@"; do grep -Eq -- "$pat" <<<"$listing" || { echo "missing in $archive: $pat"; return 1; }; done
}
wheel_ok() { has_entries "$1" '^ *pydl/py\.typed' '^ *pydl/_C[^/]*\.so' 'dist-info/licenses/LICENSE'; }
one() { local f; f=$(ls "$@" 2>/dev/null | head -n 1); [[ -n $f ]] || { echo "no file: $*"; return 1; }; echo "$f"; }

# run_case NAME FUNCTION: one PASS/FAIL line; the log is printed on failure.
N=0
run_case() {
  local name=$1 fn=$2 log t0 rc
  N=$((N + 1)); log=$(printf '%s/%02d-%s.log' "$LOGS" "$N" "$fn"); t0=$SECONDS
  set +e
  (set -euo pipefail; cd "$SRC"; "$fn") >"$log" 2>&1
  rc=$?
  set -e
  if ((rc == 0)); then
    PASSED=$((PASSED + 1)); printf 'PASS %-52s %4ss\n' "$name" $((SECONDS - t0))
  else
    FAILED=$((FAILED + 1)); printf 'FAIL %-52s %4ss  (log: %s)\n' "$name" $((SECONDS - t0)) "$log"
    tail -n 40 "$log" | sed 's/^/    | /'
  fi
}

# ---- cases ----------------------------------------------------------------------------------
install_dot() { "$VPY" -m pip install . && installed_regular; }
install_editable() { "$VPY" -m pip install -e . && installed_editable; }
build_ext_inplace() {
  # the Makefile's developer build, sharing the CMake tree that pip's builds configured
  "$VPY" setup.py -q build_ext --inplace && installed_editable
}
install_bench() {
  "$VPY" -m pip install '.[bench]' && installed_regular && (cd "$CWD" && "$VPY" -c "import tqdm, matplotlib")
}
wheel_dot() {
  rm -rf "$OUT/wheel" && "$VPY" -m pip wheel --no-deps . -w "$OUT/wheel" && wheel_ok "$(one "$OUT"/wheel/*.whl)"
}
sdist() {
  rm -rf "$OUT/sdist" && "$VPY" -m build --sdist -o "$OUT/sdist" . || return 1
  local sd; sd=$(one "$OUT"/sdist/*.tar.gz)
  has_entries "$sd" '/CMakeLists\.txt$' '/csrc/cpu/layer_norm\.cpp$' '/csrc/cuda/layer_norm_fwd\.cu$' '/csrc/cuda/layer_norm_common\.cuh$' \
    '/csrc/cuda/cuda_utils\.cuh$' '/csrc/include/pydl/layer_norm\.h$' '/LICENSE$' '/pydl/py\.typed$' \
    '/pydl/_version\.py$' '/pyproject\.toml$' '/setup\.py$' '/README\.md$' || return 1
  if tar -tzf "$sd" | grep -Eq '\.(so|o)$|/build/'; then echo "build outputs in $sd"; return 1; fi
}
wheel_from_sdist() {
  rm -rf "$OUT/sdist-wheel" && "$VPY" -m pip wheel --no-deps "$(one "$OUT"/sdist/*.tar.gz)" -w "$OUT/sdist-wheel" || return 1
  local whl; whl=$(one "$OUT"/sdist-wheel/*.whl)
  wheel_ok "$whl" && "$VPY" -m pip install --force-reinstall --no-deps "$whl" && installed_regular
}
checkout_clean() {
  untracked >"$BASE/untracked.after"
  diff -u "$BASE/untracked.before" "$BASE/untracked.after"
}

echo "check_install: $SRC (copy of $REPO), venv $VENV, PYDL_CUDA=$PYDL_CUDA"
run_case "pip install .  (1st)" install_dot
run_case "pip install .  (2nd, same checkout)" install_dot
run_case "pip install -e .  (1st)" install_editable
run_case "pip install -e .  (2nd)" install_editable
run_case "setup.py build_ext --inplace (after pip builds)" build_ext_inplace
run_case "pip install '.[bench]'" install_bench
run_case "pip wheel .  (1st)" wheel_dot
run_case "pip wheel .  (2nd)" wheel_dot
run_case "python -m build --sdist (contents)" sdist
run_case "pip wheel <sdist> + install that wheel" wheel_from_sdist
run_case "no files outside git-ignored paths" checkout_clean

echo "check_install: $((SECONDS - START))s in all"
echo "install-matrix: $PASSED passed, $FAILED failed"
((FAILED == 0))
