"""Builds cpl_kernels._C.

Build flags live here and only here:
  * C++ CPU kernels are always built: -O3, OpenMP (-fopenmp), C++20 (template lambdas). The hot
    loops are compiled twice, for baseline x86-64 and with `__attribute__((target("avx2")))`, and
    picked at run time by __builtin_cpu_supports (csrc/cpu/simd.h): one binary runs AVX2 code
    where the CPU has it (no -march=native: the build must run on any x86-64).
  * CUDA kernels (csrc/cuda) are built when the toolchain is there: a CUDA build of torch
    (torch.version.cuda) and a CUDA toolkit. Never decided by probing for a GPU.
    The toolkit is $CUDA_HOME, else $CUDA_PATH, else the one nvcc on PATH belongs to; it must
    have include/cuda_runtime.h. The line "cpl-kernels setup: ..." says which one was used.
    CPL_BUILD_CUDA=1 forces them (fails loudly without the toolchain), CPL_BUILD_CUDA=0 skips them.
    CPL_CUDA_ARCHS (default "80;90") picks the SASS targets.
    NVCC_FLAGS and DEFAULT_CUDA_ARCHS are also read (as literals) by tests/test_cuda_compile.py.
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
# No --use_fast_math: it flushes denormals to zero, and tiny Adam state (v ~ 1e-40) must match
# the CPU reference.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
DEFAULT_CUDA_ARCHS = "80;90"


def is_toolkit(home) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def nvcc_top(nvcc: str):
    """The toolkit root nvcc itself reports (`TOP=` in --dryrun): right even when the nvcc on PATH
    is a wrapper script, which no symlink resolution can see through."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    return os.path.realpath(m.group(1).strip()) if m else None


def find_cuda_toolkit():
    """(root, source) of the CUDA toolkit, or (None, why not). torch's own guess (nvcc's folder's
    parent, unresolved) breaks when nvcc is reached through a link or wrapper outside the toolkit:
    the build then finds no cuda_runtime.h."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            return (home, f"${var}") if is_toolkit(home) else (None, f"${var}={home} has no include/cuda_runtime.h")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "no nvcc on PATH, CUDA_HOME and CUDA_PATH unset"
    real = os.path.realpath(nvcc)
    candidates = [(os.path.dirname(os.path.dirname(real)), f"nvcc on PATH, resolved to {real}"),
                  (nvcc_top(nvcc), f"nvcc on PATH ({nvcc}), its --dryrun TOP=")]
    for home, source in candidates:
        if is_toolkit(home):
            return home, source
    looked = ", ".join(f"{home} ({source})" for home, source in candidates)
    return None, f"nvcc is {nvcc} but no include/cuda_runtime.h under: {looked}; set CUDA_HOME"


def cuda_plan():
    """(toolkit root or None, reason). Raises where CPL_BUILD_CUDA=1 cannot be honoured."""
    flag = os.environ.get("CPL_BUILD_CUDA", "")
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"CPL_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return None, "CPL_BUILD_CUDA=0"
    if torch.version.cuda is None:
        home, reason = None, f"torch {torch.__version__} is not a CUDA build"
    else:
        home, reason = find_cuda_toolkit()
    if home is None and flag == "1":
        raise RuntimeError(f"CPL_BUILD_CUDA=1 but the CUDA toolchain is missing: {reason}")
    return home, reason


CUDA_HOME, SOURCE = cuda_plan()
if CUDA_HOME:
    # torch.utils.cpp_extension takes CUDA_HOME from the environment when first imported; set the
    # module attribute as well in case something imported it earlier.
    os.environ["CUDA_HOME"] = CUDA_HOME
from torch.utils import cpp_extension  # noqa: E402

if CUDA_HOME:
    cpp_extension.CUDA_HOME = CUDA_HOME


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extension():
    sources = rel([os.path.join(ROOT, "csrc", "ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # -ffp-contract=off: the kernels match the reference bit for bit only if every multiply and add
    # is rounded on its own. x86-64's baseline and the AVX2 clones (simd.h) have no FMA, but GCC
    # contracts a*b+c into an FMA by default wherever the target has one (aarch64, -march=native).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
    if not CUDA_HOME:
        print(f"cpl-kernels setup: building CPU kernels only ({SOURCE})", flush=True)
        return cpp_extension.CppExtension("cpl_kernels._C", sources, extra_compile_args={"cxx": cxx},
                                          extra_link_args=["-fopenmp"], py_limited_api=False)
    sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    archs = os.environ.get("CPL_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split(";")
    print(f"cpl-kernels setup: CUDA toolkit {CUDA_HOME} (from {SOURCE}), archs {';'.join(archs)}", flush=True)
    nvcc = list(NVCC_FLAGS)
    for a in archs:
        nvcc += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return cpp_extension.CUDAExtension("cpl_kernels._C", sources,
                                       extra_compile_args={"cxx": cxx + ["-DCPL_WITH_CUDA"], "nvcc": nvcc},
                                       extra_link_args=["-fopenmp"])


setup(
    packages=find_packages(include=["cpl_kernels", "cpl_kernels.*"]) + find_packages(where="python"),
    package_dir={"cpl_lab": "python/cpl_lab"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
