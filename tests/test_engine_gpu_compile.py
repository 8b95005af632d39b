"""Step engine checks that need no GPU, beyond tests/test_engine.py's single-tensor table:

* CUDA (nvcc only): the kind table of csrc/cuda/directions.cuh agrees with cpl_kernels/kinds.py
  (names, hyper counts, state slots), and the engine kernels' PTX has no fused multiply-add and no
  unrounded fp32 multiply/add that ptxas could contract (docs/design.md section 4: one rounding
  per operation; the _rn intrinsics are never contracted).
* Triton (compiler only, no GPU): the engine kernel compiles for sm_90 for every kind, its PTX has
  no FMA and no approximate division or square root, and a whole-chunk tile of an aligned launch
  uses 16-byte vector loads and stores.
* Triton (interpreter): the packed multi-tensor launches of cpl_kernels/triton/step.py (several
  dtype groups, more tensors than one table holds, misaligned views, some params without codes,
  empty tensors, grad_scale, found_inf) against the reference, bit for bit.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from cpl_kernels import kinds
from cpl_kernels import reference as ref
from cpl_kernels import reference_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")

# Sample hyper values per kind (the order of kinds.KINDS[kind].hyper) for the state-slot check.
SAMPLE_HYPERS = {
    "adam": [[0.9, 0.999, 1e-8, 0.0]],
    "adamw": [[0.9, 0.999, 1e-8, 0.1]],
    "sgd": [[0.0, 0.0, 0.0, 0.0, 0.0], [0.9, 0.0, 0.0, 1.0, 1.0]],
    "lion": [[0.9, 0.99, 0.1]],
    "mofo": [[0.9, 0.999, 1e-8, 0.1, 0.05]],
}

_KIND_TABLE_MAIN = r"""
#include <cstdio>
#include <cstdlib>
#include "kernels.cuh"
int main(int argc, char** argv) {
  std::printf("names %s\n", cpl_cuda::step_kind_names());
  // argv: kind h0 h1 ... kind h0 ...: one line per kind, "kind num_hyper state_slots"
  for (int a = 1; a < argc;) {
    const char* kind = argv[a++];
    const int n = cpl_cuda::step_kind_num_hyper(kind);
    double hyper[16] = {0};
    for (int j = 0; j < n && a < argc; ++j) hyper[j] = std::atof(argv[a++]);
    std::printf("%s %d %d\n", kind, n, n < 0 ? -1 : cpl_cuda::step_kind_state_slots(kind, hyper));
  }
  return 0;
}
"""


@needs_nvcc
def test_cuda_kind_table_matches_kinds_py(tmp_path):
    """step_engine.cu's host functions, compiled into a tiny host program and asked directly."""
    main = tmp_path / "kind_table.cu"
    main.write_text(_KIND_TABLE_MAIN)
    exe = tmp_path / "kind_table"
    # One arch only: the device code is not under test here (test_cuda_compile.py covers it).
    proc = subprocess.run([NVCC, "-O1", "-std=c++17", "-gencode", "arch=compute_80,code=sm_80", "-I", CUDA_DIR,
                           str(main), os.path.join(CUDA_DIR, "step_engine.cu"), "-o", str(exe)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args, expected = [], {}
    for kind, hypers in SAMPLE_HYPERS.items():
        for h in hypers:
            args += [kind, *map(repr, h)]
            expected.setdefault(kind, []).append((len(kinds.KINDS[kind].hyper),
                                                  kinds.state_slots(kinds.KINDS[kind], h)))
    args += ["adamax"]
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "names " + ", ".join(kinds.KINDS)
    got = {}
    for line in lines[1:]:
        kind, n, slots = line.split()
        got.setdefault(kind, []).append((int(n), int(slots)))
    assert got.pop("adamax") == [(-1, -1)]
    assert got == expected
    assert set(SAMPLE_HYPERS) == set(kinds.KINDS), "add the new kind to SAMPLE_HYPERS"


@needs_nvcc
def test_cuda_engine_ptx_has_no_contractible_fp32_math(tmp_path):
    ptx = tmp_path / "step_engine.ptx"
    proc = subprocess.run([NVCC, "-ptx", "-O3", "-std=c++17", "-arch=compute_90",
                           os.path.join(CUDA_DIR, "step_engine.cu"), "-o", str(ptx)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Split the PTX into entries; check each engine kernel.
    text = ptx.read_text()
    entries = re.split(r"\n(?=\.visible \.entry|\.entry|\.weak \.entry)", text)
    engine = [e for e in entries if "step_engine_kernel" in e.split("(", 1)[0]]
    assert len(engine) == 3 * len(kinds.KINDS), "one kernel per kind and param dtype"
    engine8 = [e for e in entries if "step_engine_8bit_kernel" in e.split("(", 1)[0]]
    assert len(engine8) == 3 * len(kinds.KINDS), "one 8-bit state kernel per kind and param dtype"
    engine += engine8
    for body in engine:
        name = body.split("(", 1)[0].split()[-1]
        assert not re.search(r"\bfma\.rn\.f32\b|\bfma\.f32\b", body), f"{name}: an fp32 FMA"
        # mul.f32 / add.f32 / sub.f32 without a rounding modifier may be contracted by ptxas.
        assert not re.search(r"\b(mul|add|sub)\.f32\b", body), f"{name}: contractible fp32 arithmetic"
        assert re.search(r"\bmul\.rn\.f32\b", body), f"{name}: no rounded multiply at all?"


# ---- Triton: compiled for a GPU (no GPU needed) -------------------------------------------

_TRITON_PTX_SCRIPT = r"""
import json, re, sys
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from cpl_kernels import kinds, reference_step
from cpl_kernels.triton import step as st
from cpl_kernels.triton.directions import constexprs

hypers = json.loads(sys.argv[1])
fn = st._step_kernel
pointer_types = {"table_ptr": "*i64", "partial_ptr": "*i64", "found_ptr": "*i32", "scale_ptr": "*fp32",
                 "qmap_ptr": "*fp32"}
out = {}
for kind, hyper, format8 in [(k, h, f) for k, h in hypers.items() for f in (False, True)]:
    k = kinds.KINDS[kind]
    s = reference_step.scalars(k, 3.0, 0.05, dict(zip(k.hyper, hyper)))
    cx = dict(DTYPE=tl.float32, TABLE=st.TABLE_TENSORS, BLOCK_WORDS=st.STEP_BLOCK_WORDS, ALIGNED=True,
              HAS_CODES=True, CRITERION_UPDATE=True, STRICT=True, SKIP_NONFINITE=True, HAS_SCALE=False,
              HAS_FOUND_INF=True, FORMAT8=format8, **constexprs(kind, s, kinds.state_slots(k, hyper)))
    sig = {a: "constexpr" if a in cx else pointer_types.get(a, "i64" if a in ("program_base", "total_programs") else "fp32")
           for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in pointer_types}
    # What _common.exact_fp gives a CUDA device (it asks torch for the device kind; none here).
    options = dict(enable_fp_fusion=False, enable_reflect_ftz=False, num_warps=4)
    ptx = triton.compile(ASTSource(fn, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                         options=options).asm["ptx"]
    out[kind + ("/8bit" if format8 else "")] = {name: len(re.findall(pat, ptx)) for name, pat in [
        ("fma", r"\bfma\.[a-z]*\.?f32"), ("unrounded", r"\b(mul|add|sub)\.f32\b"),
        ("approx", r"\.approx\.|div\.full"), ("ftz", r"\.ftz\b"),
        ("ld_v4", r"ld\.global(\.[a-z]+)*\.v4"), ("st_v4", r"st\.global(\.[a-z]+)*\.v4")]}
print(json.dumps(out))
"""


def test_triton_engine_compiles_for_sm90_without_fma():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler
    hypers = {kind: h[-1] for kind, h in SAMPLE_HYPERS.items()}
    proc = subprocess.run([sys.executable, "-c", _TRITON_PTX_SCRIPT, json.dumps(hypers)], capture_output=True,
                          text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(counts) == set(kinds.KINDS) | {k + "/8bit" for k in kinds.KINDS}  # fp32 and 8-bit state
    for kind, c in counts.items():
        assert c["fma"] == 0 and c["unrounded"] == 0, (kind, c)
        assert c["approx"] == 0 and c["ftz"] == 0, (kind, c)
        assert c["ld_v4"] > 0 and c["st_v4"] > 0, (kind, c)  # the whole-chunk path is vectorised


# ---- Triton: packed multi-tensor launches --------------------------------------------------

def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _make(kind, hyper, seed):
    """13 params over three dtypes (two empty, every third a misaligned view), codes on every other
    one, a NaN and an inf gradient in each param of 4+ elements."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [0, 5, 2048, 2049, 4099, 1, 33, 0, 1000, 3000, 17, 16, 4096]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    slots = kinds.state_slots(kinds.KINDS[kind], hyper)
    P, G, S1, S2, C = [], [], [], [], []
    for i, n in enumerate(sizes):
        dt = dtypes[i % 3]
        off = 1 if i % 3 == 1 else 0
        P.append(torch.randn(n + off, generator=gen).to(dt)[off:])
        G.append(torch.randn(n + off, generator=gen).to(dt)[off:])
        if n > 3:
            G[-1][1], G[-1][n - 1] = float("nan"), float("inf")
        if slots >= 1:
            S1.append(torch.randn(n, generator=gen) * 0.1)
        if slots >= 2:
            S2.append(torch.rand(n, generator=gen) * 0.1)
        r = torch.randn(n, generator=gen)
        C.append(ref.pack_signs_(r, torch.empty(ref.num_code_words(n), dtype=torch.int32)) if i % 2 == 0 else None)
    return P, G, S1, S2, C


@pytest.mark.parametrize("kind, hyper, criterion, strict", [
    ("adamw", [0.9, 0.999, 1e-3, 0.1], "update", True),
    ("adam", [0.9, 0.99, 1e-8, 0.1], "gradient", False),
    ("sgd", [0.9, 0.1, 0.05, 0.0, 0.0], "gradient", True),
    ("sgd", [0.0, 0.0, 0.01, 0.0, 0.0], "update", True),
    ("lion", [0.9, 0.99, 0.1], "update", True),
    ("mofo", [0.9, 0.999, 1e-3, 0.1, 0.08], "gradient", True),
])
def test_triton_multi_tensor_launches_match_reference(monkeypatch, kind, hyper, criterion, strict):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton engine runs here only under TRITON_INTERPRET=1 (CPU tensors)")
    step_mod = pytest.importorskip("cpl_kernels.triton.step")
    monkeypatch.setattr(step_mod, "TABLE_TENSORS", 4)  # 13 params: several launches per dtype group
    mine = _make(kind, hyper, 1)
    theirs = [[None if t is None else t.clone() for t in xs] for xs in mine]
    scale = torch.tensor(256.0, dtype=torch.float64)
    for step in (1, 2):
        got = step_mod.cpl_step_(*mine, kind, torch.tensor(float(step), dtype=torch.float64),
                                 torch.tensor(0.05, dtype=torch.float64), hyper, criterion, strict, True, scale, None)
        want = reference_step.cpl_step_(*theirs, kind, float(step), 0.05, hyper, criterion, strict, True, scale, None)
        assert torch.equal(got, want), f"step {step}"
        for a, b in zip(mine[0] + mine[2] + mine[3], theirs[0] + theirs[2] + theirs[3]):
            assert torch.equal(_bits(a), _bits(b)), f"step {step}"
    before = [t.clone() for t in mine[0] + mine[2] + mine[3]]
    # A nonzero found_inf too small for fp32 still skips the step (the flag is found_inf != 0).
    got = step_mod.cpl_step_(*mine, kind, torch.tensor(3.0, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64),
                             hyper, criterion, strict, True, scale, torch.tensor(1e-300, dtype=torch.float64))
    assert got.shape == (2, 13) and not got.any()
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(mine[0] + mine[2] + mine[3], before))
