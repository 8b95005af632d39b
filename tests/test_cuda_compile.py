"""Every csrc/cuda/*.cu compiles with plain nvcc for setup.py's default archs (sm_80, sm_90),
warnings as errors.

No GPU needed (docs/design.md section 4): this checks the CUDA build everywhere nvcc exists. The flags
are setup.py's own (NVCC_FLAGS and DEFAULT_CUDA_ARCHS, read from setup.py as literals so they are
stated once and importing setup.py cannot run a build) plus -Werror; each file is compiled once
for both archs, two files at a time (nvcc is slow and the suite shares small machines).
"""
import ast
import glob
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc")


def _setup_py_constants() -> dict:
    """setup.py's NVCC_FLAGS and DEFAULT_CUDA_ARCHS, without running setup.py."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    return {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name) and t.id in ("NVCC_FLAGS", "DEFAULT_CUDA_ARCHS")}


_SETUP = _setup_py_constants()
ARCHS = _SETUP["DEFAULT_CUDA_ARCHS"].split(";")
FLAGS = ["-c", *_SETUP["NVCC_FLAGS"], *(f for a in ARCHS for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")),
         "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


def _compile(path: str, out_dir: str) -> tuple[str, int, str]:
    out = os.path.join(out_dir, os.path.basename(path) + ".o")
    proc = subprocess.run([NVCC, *FLAGS, path, "-o", out], capture_output=True, text=True, timeout=900)
    return path, proc.returncode, proc.stdout + proc.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: the CUDA sources cannot be compile-checked here")
def test_every_cuda_file_compiles(tmp_path):
    assert CU_FILES, "no csrc/cuda/*.cu files found"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda p: _compile(p, str(tmp_path)), CU_FILES))
    failures = [f"{os.path.relpath(p, ROOT)} (exit {rc}):\n{log}" for p, rc, log in results if rc != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    for p, _, _ in results:
        obj = tmp_path / (os.path.basename(p) + ".o")
        assert obj.stat().st_size > 0, f"{p}: empty object file"
