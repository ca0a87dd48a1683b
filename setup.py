"""Builds the blocksparse_attn._C extension; everything else is plain Python packaging (pyproject.toml).

A CUDAExtension is built when the installed torch has CUDA and a CUDA toolkit is found, a
CppExtension otherwise. Knobs (environment variables):
  TORCH_CUDA_ARCH_LIST   GPU architectures, read by torch's build helpers (e.g. "9.0a" for H100).
                         Unset: the visible GPUs' architectures, Hopper as 9.0a (its wgmma kernel
                         needs the arch-specific target), or "8.0;9.0a" with no GPU visible.
  MAX_JOBS               parallel compile jobs, read by torch's ninja build
  BSA_DEBUG=1            -O0 -g (and -G for device code), for sanitizers and debuggers
  BSA_FORCE_CPU=1        build the CPU-only extension even where CUDA is available
  BSA_HEAD_DIMS=64,128   instantiate only these head dims in the CUDA kernels (quick dev builds)
"""
import glob
import os
import runpy

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# The one list of head sizes (read without importing the package, which is not built yet).
SUPPORTED = runpy.run_path(os.path.join(ROOT, "blocksparse_attn", "supported.py"))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _use_cuda():
    if _flag("BSA_FORCE_CPU"):
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _cuda_arch_list():
    """The architectures to build for; sets TORCH_CUDA_ARCH_LIST when unset (see the knobs above)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs:
        import torch

        found = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        archs = ";".join("9.0a" if a == "9.0" else a for a in found) or "8.0;9.0a"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return [a.strip() for a in archs.replace(",", ";").replace(" ", ";").split(";") if a.strip()]


def _extension():
    debug = _flag("BSA_DEBUG")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp"]  # the C++ standard is chosen by torch (it knows what its headers need)
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _use_cuda():
        return cpp_extension.CppExtension(
            "blocksparse_attn._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    # csrc/cuda/generated/: one kernel instantiation per file (scripts/gen_kernels.py), compiled in parallel.
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/generated/*.cu") +
                          glob.glob("csrc/cuda/*.cpp"))
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
    nvcc += ["--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
             "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT16_OPERATORS__"]
    # The sm80 kernels pad head dims to multiples of 64 (64 | 80-128 | 256); each padded family is
    # a set of template instantiations that BSA_HEAD_DIMS can leave out for quick development builds.
    head_dims = os.environ.get("BSA_HEAD_DIMS", ",".join(map(str, SUPPORTED["HEAD_SIZES"])))
    pads = sorted({SUPPORTED["head_dim_pad"](int(d)) for d in head_dims.split(",") if d.strip()})
    for pad in pads:
        define = f"-DBSA_HEAD_DIM_PAD_{pad}=1"
        nvcc.append(define)
        cxx.append(define)
    cxx.append("-DBSA_WITH_CUDA")
    nvcc.append("-DBSA_WITH_CUDA")
    # The Hopper prefill kernel exists only in an sm_90a build; the host dispatch must know.
    if any(a.startswith("9.0a") for a in _cuda_arch_list()):
        cxx.append("-DBSA_BUILT_SM90A")
        nvcc.append("-DBSA_BUILT_SM90A")
    return cpp_extension.CUDAExtension(
        "blocksparse_attn._C", sources + cuda_sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
