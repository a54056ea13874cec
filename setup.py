"""Builds glufx._C, the C++ op library (csrc/), as a torch extension.

GLUFX_SKIP_NATIVE=1 skips the native build (glufx then runs the pure-PyTorch reference kernels).
A CUDA build is attempted only when the installed torch has CUDA and CUDA_HOME is set, and csrc/
has CUDA sources.
"""
import glob
import os

from setuptools import setup


def extensions():
    if os.environ.get("GLUFX_SKIP_NATIVE", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden"]
    if cuda_sources and torch.version.cuda and CUDA_HOME:
        ext = CUDAExtension(
            "glufx._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-fmad=false"]}, extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    else:
        ext = CppExtension("glufx._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"], py_limited_api=True)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


def dependencies(native: bool) -> list[str]:
    """A C++ extension links one libtorch: pin the torch it was built against (local build tag dropped).
    Without the extension (GLUFX_SKIP_NATIVE=1) any torch of the supported range works."""
    torch_req = "torch>=2.13,<2.15"
    if native:
        import torch

        torch_req = f"torch=={torch.__version__.split('+')[0]}"
    return [torch_req, "transformers>=5.0", "torchao>=0.18", "numpy", "safetensors", "tqdm"]


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, install_requires=dependencies(bool(ext_modules)), options={"bdist_wheel": {"py_limited_api": "cp311"}} if ext_modules else {})
