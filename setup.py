"""Builds cpl_kernels._C.

Build flags live here and only here:
  * C++ CPU kernels are always built: -O3, OpenMP (-fopenmp), C++20 (template lambdas). The hot
    loops are compiled twice, for baseline x86-64 and with `__attribute__((target("avx2")))`, and
    picked at run time by __builtin_cpu_supports (csrc/cpu/simd.h): one binary runs AVX2 code
    where the CPU has it (no -march=native: the build must run on any x86-64).
  * CUDA kernels (csrc/cuda) are built when the toolchain is there: a CUDA build of torch
    (torch.version.cuda) and nvcc. Never decided by probing for a GPU.
    CPL_BUILD_CUDA=1 forces them (fails loudly without the toolchain), CPL_BUILD_CUDA=0 skips them.
    CPL_CUDA_ARCHS (default "80;90") picks the SASS targets.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("CPL_BUILD_CUDA")
    toolchain = torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME") is not None
    )
    if flag == "0":
        return False
    if flag == "1":
        if not toolchain:
            raise RuntimeError(
                "CPL_BUILD_CUDA=1 but the CUDA toolchain is missing: need a CUDA build of torch "
                f"(torch.version.cuda={torch.version.cuda}) and nvcc on PATH."
            )
        return True
    if flag not in (None, ""):
        raise RuntimeError(f"CPL_BUILD_CUDA must be 0 or 1, got {flag!r}")
    return toolchain


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extension():
    sources = rel([os.path.join(ROOT, "csrc", "ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"]
    if not want_cuda():
        return CppExtension("cpl_kernels._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"], py_limited_api=False)
    sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    archs = os.environ.get("CPL_CUDA_ARCHS", "80;90").split(";")
    # No --use_fast_math: it flushes denormals to zero, and tiny Adam state (v ~ 1e-40) must match
    # the CPU reference.
    nvcc = ["-O3", "-std=c++17", "-lineinfo"]
    for a in archs:
        nvcc += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return CUDAExtension("cpl_kernels._C", sources,
                         extra_compile_args={"cxx": cxx + ["-DCPL_WITH_CUDA"], "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


setup(
    packages=find_packages(include=["cpl_kernels", "cpl_kernels.*"]) + find_packages(where="python"),
    package_dir={"cpl_lab": "python/cpl_lab"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
