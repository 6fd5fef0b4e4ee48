"""Build layersel_ext: the C++ kernels always, the CUDA kernels when possible.

Switches (environment variables):
  LAYERSEL_CUDA=1      compile the CUDA kernels even without a visible GPU; an error (one line, with the
                       fix) when that cannot work: CPU-only torch, no nvcc, nvcc that does not run,
                       nvcc's CUDA major version differing from torch's
  LAYERSEL_CUDA=0      CPU-only build
  (unset)              CUDA when a GPU is visible and the toolkit matches torch's, else the CPU kernels,
                       with the reason logged (never aborts)
  TORCH_CUDA_ARCH_LIST architectures to compile for (default: the visible GPU's, else "8.0;9.0+PTX")
  LAYERSEL_NO_EXT=1    install the pure-torch package only (no compiler needed)

The decisions (build_tools/cuda_decision.py; the libstdc++ link input, build_tools/libstdcxx.py) are printed and written to
layersel_ext/_build_record.<python ABI>.json, beside the _C.<python ABI>.so they describe.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import platform
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # build_tools/ beside this file (pip's build backend does not add it)
from build_tools import cuda_decision, libstdcxx

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def log(msg: str) -> None:
    print(f"[layersel_ext setup] {msg}", file=sys.stderr, flush=True)


def import_cpp_extension():
    """torch.utils.cpp_extension, without its "No CUDA runtime is found" warning.

    torch prints it at import whenever a toolkit is found and no GPU is visible: on every build of a
    CPU-only or GPU-less machine. Whether a GPU is visible is logged once below instead.
    """
    marker = "No CUDA runtime is found"

    class DropNoRuntime(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return marker not in record.getMessage()

    logging.getLogger("torch.utils.cpp_extension").addFilter(DropNoRuntime())
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):  # older torch print()s it
        from torch.utils import cpp_extension
    for line in captured.getvalue().splitlines():
        if marker not in line:
            print(line, file=sys.stderr)
    return cpp_extension


def record_path() -> Path:
    """layersel_ext/_build_record.<abi>.json: one per interpreter ABI, beside the _C.<abi>.so it describes.

    Two stacks built in place in one checkout (Python 3.10 / torch 2.6 and Python 3.11 / torch 2.14)
    keep separate .so files (the ABI tag differs) and separate build/temp.* folders; the record
    follows the same rule so that neither build overwrites the other's.
    """
    abi = sysconfig.get_config_var("EXT_SUFFIX")  # .cpython-311-x86_64-linux-gnu.so
    return ROOT / "layersel_ext" / f"_build_record{abi[: -len('.so')]}.json"


def extension_modules():
    if os.environ.get("LAYERSEL_NO_EXT", "") == "1":
        log("LAYERSEL_NO_EXT=1: building the pure-torch package only")
        return [], {}
    cuda_decision.resolve_cuda_home()  # before torch computes its CUDA_HOME
    import torch

    cpp_extension = import_cpp_extension()
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = cuda_decision.probe_nvcc(os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None)
    gpus = torch.cuda.device_count() if (torch.version.cuda and torch.cuda.is_available()) else 0
    try:
        with_cuda, why = cuda_decision.decide_cuda(
            os.environ.get("LAYERSEL_CUDA"), torch.__version__, torch.version.cuda, nvcc, gpus=gpus
        )
    except cuda_decision.CudaBuildError as exc:
        raise SystemExit(f"[layersel_ext setup] error: {exc}") from None
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/python/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -Wno-maybe-uninitialized: GCC 12 reports ~13,000 lines of false -Wmaybe-uninitialized from
    # inside its own AVX-512 intrinsic headers (the `__m512 __Y = __Y;` idiom of _mm512_undefined_*)
    # when csrc/cpu/sample_masks.cpp (bernoulli_simd*.h) is compiled; every other warning stays on.
    # -g1 after Python's -g: line tables only. Full debug info of the kernels' template instantiations
    # and pybind11's casters was a fifth to a third of every unit's compile time, paid on every install.
    cxx_flags = ["-O3", "-g1", "-fopenmp", "-ffp-contract=off", "-Wno-maybe-uninitialized"]
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-Xcompiler", "-ffp-contract=off"]
    include_dirs = [str(ROOT / "csrc")]
    try:  # numpy's C API for _C.numpy_all's arrays (csrc/python/numpy_arrays.cpp); without it torch makes them
        import numpy

        include_dirs.append(numpy.get_include())
        cxx_flags.append("-DLAYERSEL_WITH_NUMPY")
        numpy_build = numpy.__version__
    except ImportError:
        numpy_build = None
    arch_list = ""
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if gpus:
                caps = sorted({torch.cuda.get_device_capability(i) for i in range(gpus)})
                os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        cxx_flags.append("-DLAYERSEL_WITH_CUDA")
        nvcc_flags.append("-DLAYERSEL_WITH_CUDA")
    cxx_flags.append(f'-DLAYERSEL_CUDA_ARCH_LIST="{arch_list}"')
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}")
    log(f"CUDA kernels: {'ON' if with_cuda else 'OFF'} ({why})")
    if torch.version.cuda:
        log(f"GPUs visible: {gpus}; CUDA_HOME: {cuda_home or 'none'}")
    if with_cuda:
        log(f"CUDA arch list: {arch_list}")
    log(f"sources: {' '.join(sources)}")
    log(f"cxx flags: {' '.join(cxx_flags)}")
    link_args = ["-fopenmp", *libstdcxx.libstdcxx_link_args()]
    log(f"link args: {' '.join(link_args)}")

    record = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cuda": with_cuda,
        "cuda_reason": why,
        "cuda_arch_list": arch_list,
        "numpy": numpy_build,
        "nvcc": nvcc.path,
        "nvcc_version": nvcc.version,
        "sources": sources,
        "cxx_flags": cxx_flags,
        "nvcc_flags": nvcc_flags if with_cuda else [],
        "link_args": link_args,
    }
    record_path().write_text(json.dumps(record, indent=2) + "\n")

    ext_cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    kwargs = {"extra_compile_args": {"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx_flags}}
    ext = ext_cls(
        name="layersel_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_link_args=link_args,
        **kwargs,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="layersel_ext",
    version="0.1.0",
    description="Fused C++/CUDA drop-in for fl4health.parameter_exchange.parameter_selection_criteria",
    packages=find_packages(include=["layersel_ext", "layersel_ext.*"]),
    package_data={"layersel_ext": ["py.typed", "_build_record*.json"]},
    # The two CI stacks are the ends of this range: Python 3.10 / torch 2.6 / numpy 1.26 (fl4health
    # 0.4.2's own) and Python 3.11 / torch 2.14.1 / numpy 2.x.
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy>=1.26,<3"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
