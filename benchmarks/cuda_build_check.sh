#!/usr/bin/env bash
# Usage: benchmarks/cuda_build_check.sh   (from anywhere; needs nvcc, network to PyPI on first run)
#
# CUDA build check without a GPU: with the public index's CUDA build of torch and the local nvcc,
# setup.py must find the toolkit by itself, build the CUDA kernels, and the test suite must pass on
# CPU (CUDA tests skip). Too heavy for every CI run; run it whenever csrc/cuda or setup.py changes
# and record the date and result in docs/gpu.md ("CUDA build check (no GPU)").
#
#   CPL_CUDA_VENV   the CUDA-torch venv, created once (torch+cu130 and its CUDA libraries: ~5 GB on disk)
#                   default $HOME/.cache/cpl-kernels/cuda-venv; recreated when requirements.txt changes
#   CPL_CUDA_WORK   scratch copy of the tree that is built (never the checkout: its build/ and
#                   cpl_kernels/_C*.so belong to the dev venv); default $HOME/.cache/cpl-kernels/cuda-build
#   CPL_CUDA_ARCHS  passed through to setup.py (default there: "80;90")
#   PYTHON          interpreter the venv is created from (default python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CPL_CUDA_VENV:-$HOME/.cache/cpl-kernels/cuda-venv}"
WORK="${CPL_CUDA_WORK:-$HOME/.cache/cpl-kernels/cuda-build}"
PY="${PYTHON:-python3}"
case "$WORK/" in "$ROOT"/*) echo "CPL_CUDA_WORK must be outside the repo ($ROOT)" >&2; exit 2 ;; esac

# The proof is that setup.py finds the toolkit itself: nothing set by hand may help it.
unset CUDA_HOME CUDA_PATH CPL_BUILD_CUDA
# This machine's pip config caps torch and points at a local CPU wheel; this venv must get the
# public index's CUDA build. PIP_CERT (the CA bundle) is kept.
export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= PIP_INDEX_URL= PIP_EXTRA_INDEX_URL=

T_START=$SECONDS
SUMMARY=()
# phase NAME CMD...: runs CMD, logs its duration, aborts the script on failure. CMD runs in a
# subshell with errexit on: in `CMD || rc=$?` bash would ignore set -e inside CMD.
phase() {
  local name="$1"; shift
  local t0=$SECONDS rc
  echo "== $name: start $(date -u +%H:%M:%SZ)"
  set +e
  (set -e; "$@")
  rc=$?
  set -e
  local dt=$((SECONDS - t0))
  SUMMARY+=("$name: exit $rc, ${dt}s")
  echo "== $name: exit $rc, ${dt}s"
  if [[ $rc != 0 ]]; then
    printf '%s\n' "-- summary (FAILED at $name)" "${SUMMARY[@]}"
    exit 1
  fi
}

REQ_HASH="$(sha256sum "$ROOT/requirements.txt" | cut -c1-16)"
make_venv() {
  if [[ -f "$VENV/.cpl-installed" && "$(cat "$VENV/.cpl-installed")" == "$REQ_HASH" ]]; then
    echo "reusing $VENV (requirements.txt unchanged)"
    return 0
  fi
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
  "$VENV/bin/pip" install -q -r "$ROOT/requirements.txt"
  echo "$REQ_HASH" >"$VENV/.cpl-installed"
}

check_torch() {
  "$VENV/bin/python" - <<'EOF'
import sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torch.version.cuda", torch.version.cuda,
      "| triton", triton.__version__, "| GPU visible:", torch.cuda.is_available())
assert torch.version.cuda, "this venv's torch is not a CUDA build: the check would prove nothing"
EOF
  nvcc --version | tail -n 2
}

copy_tree() {
  rm -rf "$WORK"
  mkdir -p "$WORK"
  # Tracked files plus untracked-not-ignored ones: what the lead would commit. Files deleted in
  # the working tree are skipped.
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -xf - -C "$WORK"
  echo "copied $(cd "$WORK" && find . -type f | wc -l) files to $WORK:" \
    "HEAD $(git -C "$ROOT" rev-parse --short HEAD) + $(git -C "$ROOT" status --porcelain | wc -l) uncommitted changes"
}

build() {
  # Same install as `make install`, verbose so setup.py's toolkit line shows; full log kept.
  (cd "$WORK" && "$VENV/bin/pip" install -v --no-build-isolation --no-deps -e . >"$WORK/build.log" 2>&1) || {
    tail -n 80 "$WORK/build.log"; return 1; }
  grep -h "cpl-kernels setup:" "$WORK/build.log" | sort -u
  grep -q "cpl-kernels setup: CUDA toolkit" "$WORK/build.log" || { echo "setup.py did not build the CUDA kernels"; return 1; }
  ls -la "$WORK"/cpl_kernels/_C*.so
}

check_registrations() {
  # Every op declared in csrc/ops.cpp (m.def("name(...")) must have a CUDA kernel registered.
  (cd /tmp && "$VENV/bin/python" - "$WORK/csrc/ops.cpp" "$WORK" <<'EOF'
import re, sys, torch, cpl_kernels
ops = re.findall(r'm\.def\(\s*"(\w+)\(', open(sys.argv[1]).read())
assert ops, "no m.def(...) found in csrc/ops.cpp"
assert cpl_kernels._C.__file__.startswith(sys.argv[2]), f"imported {cpl_kernels._C.__file__}, not the scratch build"
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"cpl::{op}", "CUDA")]
print(f"{len(ops) - len(missing)}/{len(ops)} ops with a CUDA kernel:", ", ".join(o for o in ops if o not in missing))
assert not missing, f"no CUDA kernel for: {missing}"
EOF
  )
}

run_tests() {
  (cd "$WORK" && "$VENV/bin/python" -m pytest -q tests 2>&1 | tee "$WORK/tests.log"; exit "${PIPESTATUS[0]}")
}

phase venv make_venv
phase torch check_torch
phase copy copy_tree
phase build build
phase registrations check_registrations
phase tests run_tests

printf '%s\n' "-- summary (all passed, $((SECONDS - T_START))s, $(date -u +%Y-%m-%dT%H:%M:%SZ))" "${SUMMARY[@]}"
echo "tests: $(grep -E '[0-9]+ (passed|failed)' "$WORK/tests.log" | tail -n 1)"
