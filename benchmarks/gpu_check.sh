#!/usr/bin/env bash
# One-shot GPU check: build the CUDA extension, run the test suite on CUDA, run the GPU benchmark.
# Usage: benchmarks/gpu_check.sh OUT_DIR   (from anywhere; needs an NVIDIA GPU, python3 with a
# CUDA build of torch + triton + pytest, and nvcc; no network). Every phase's log lands in
# OUT_DIR even when it fails; summary.md lists each phase's exit status and the results table.
set -euo pipefail

OUT="${1:?usage: gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT"

declare -A STATUS
# run_phase NAME CMD...: logs to OUT/NAME.log, records the exit status, never aborts the script.
run_phase() {
  local name="$1"; shift
  echo "== $name: $*" | tee "$OUT/$name.log"
  local rc=0
  "$@" >>"$OUT/$name.log" 2>&1 || rc=$?
  STATUS[$name]=$rc
  echo "== $name: exit $rc" | tee -a "$OUT/$name.log"
}

run_phase env "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); \
print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None); import triton; print('triton', triton.__version__)"
run_phase nvidia_smi nvidia-smi
run_phase build env CPL_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
run_phase cuda_registered "$PY" -c "import cpl_kernels, torch; from cpl_kernels import _backend; \
ok = _backend.has_native_kernel('CUDA'); print('CUDA kernels registered:', ok); assert ok"
run_phase tests "$PY" -m pytest -q tests
run_phase bench "$PY" benchmarks/gpu_bench.py --out "$OUT"

{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "| phase | exit |"
  echo "|---|---|"
  for p in env nvidia_smi build cuda_registered tests bench; do echo "| $p | ${STATUS[$p]} |"; done
  echo
  if [[ -f "$OUT/gpu_bench.md" ]]; then cat "$OUT/gpu_bench.md"; else echo "(no benchmark table: see bench.log)"; fi
  echo
  echo "Test summary: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1 || true)"
} >"$OUT/summary.md"
cat "$OUT/summary.md"

for p in build cuda_registered tests bench; do
  [[ "${STATUS[$p]}" == 0 ]] || exit 1
done
