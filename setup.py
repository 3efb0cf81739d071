"""Builds cram_ext's kernels as a PyTorch extension (`cram_ext._C`).

The CUDA kernels are built when the installed torch has CUDA and nvcc is found (CUDA_HOME);
otherwise, or with CRAM_EXT_FORCE_CPU=1, the CPU-only extension. Install against an installed
torch, as with Mamba and FlashAttention:

    pip install --no-build-isolation .

Environment: CRAM_EXT_FORCE_CPU=1 (no CUDA kernels), TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"),
CRAM_EXT_CPU_ARCH (compiler -march for the CPU kernels, default "native"; the package is built
on the machine that runs it), CRAM_EXT_PTXAS_VERBOSE=1 (print ptxas register/spill reports).
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_wanted():
    if os.environ.get("CRAM_EXT_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(pattern):
    """Kernel sources matching `pattern` under csrc/, without the native unit tests."""
    found = glob.glob(os.path.join(ROOT, pattern), recursive=True)
    return sorted(p for p in (os.path.relpath(f, ROOT) for f in found) if not p.startswith("csrc/tests/"))


def extension():
    with_cuda = cuda_wanted()
    cpu_sources = ["csrc/bindings.cpp"] + sources("csrc/**/*_cpu.cpp")
    # -fno-trapping-math lets branch-free selects around exp/log vectorise; nothing reads FP flags.
    # -fopenmp: at::parallel_for (behind cram::parallel_for) is an inline template that only
    # runs in parallel when the file calling it is compiled with OpenMP; the runtime it links to
    # is the libgomp.so.1 that torch already loads.
    cxx_flags = ["-O3", "-std=c++20", "-fno-trapping-math", "-fopenmp",
                 f"-march={os.environ.get('CRAM_EXT_CPU_ARCH', 'native')}"]
    if not with_cuda:
        return CppExtension("cram_ext._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])
    nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    if os.environ.get("CRAM_EXT_PTXAS_VERBOSE", "0") == "1":
        nvcc_flags.append("-Xptxas=-v")
    return CUDAExtension(
        "cram_ext._C",
        cpu_sources + sources("csrc/**/*.cu"),
        define_macros=[("CRAM_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="cram_ext",
    version="0.1.0",
    description="CRAM: adaptive attention with a selective scan, a router and consolidation into "
                "semantic memory; CPU and CUDA kernels for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cram_ext", "cram_ext.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "expecttest", "matplotlib"],
        "plot": ["matplotlib"],                                    # every figure
        "analysis": ["transformers", "tokenizers", "matplotlib"],  # cram-redundancy on HF models
    },
    # experiments/ and examples/ stay in the repository: run them from its root.
    entry_points={
        "console_scripts": [
            "cram-train = cram_ext.train:main",
            "cram-redundancy = cram_ext.redundancy.cli:main",
        ],
    },
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
