"""Build layersel_ext: the C++ kernels always, the CUDA kernels when possible.

Switches (environment variables):
  LAYERSEL_CUDA=1      compile the CUDA kernels even without a visible GPU (needs nvcc and a CUDA torch)
  LAYERSEL_CUDA=0      CPU-only build
  (unset)              CUDA when torch was built with CUDA and nvcc is found
  TORCH_CUDA_ARCH_LIST architectures to compile for (default: the visible GPU's, else "8.0;9.0+PTX")
  LAYERSEL_NO_EXT=1    install the pure-torch package only (no compiler needed)

The decisions are printed and written to layersel_ext/_build_record.json.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import site
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def log(msg: str) -> None:
    print(f"[layersel_ext setup] {msg}", file=sys.stderr, flush=True)


def nvidia_include_dirs() -> list[str]:
    """CUDA library headers shipped by the nvidia-* pip packages (cusparse.h, curand_kernel.h, ...)."""
    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    found: list[str] = []
    for root in dict.fromkeys(roots):
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(root, pattern))):
                if os.path.isdir(d) and d not in found:
                    found.append(d)
    return found


def resolve_cuda_home() -> None:
    """Point CUDA_HOME at the real toolkit when nvcc on PATH is a wrapper script (/usr/local/bin/nvcc).

    torch guesses CUDA_HOME as the parent of nvcc's folder, which then lacks lib64/libcudart.
    nvcc itself knows its TOP folder; ask it.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        Path(src).write_text("")
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                capture_output=True, text=True, timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.realpath(line.split("=", 1)[1].strip())
            if os.path.isdir(os.path.join(top, "include")):
                os.environ["CUDA_HOME"] = top
                log(f"CUDA_HOME resolved through nvcc: {top}")
            return


def decide_cuda(torch) -> tuple[bool, str]:
    from torch.utils.cpp_extension import CUDA_HOME

    switch = os.environ.get("LAYERSEL_CUDA", "").strip().lower()
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    have_nvcc = bool(nvcc and os.path.exists(nvcc))
    if switch in ("0", "off", "false", "no"):
        return False, "LAYERSEL_CUDA=0 asked for a CPU-only build"
    if torch.version.cuda is None:
        if switch in ("1", "on", "true", "yes"):
            raise SystemExit("LAYERSEL_CUDA=1 but this torch has no CUDA (torch.version.cuda is None)")
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not have_nvcc:
        if switch in ("1", "on", "true", "yes"):
            raise SystemExit("LAYERSEL_CUDA=1 but nvcc was not found (PATH, CUDA_HOME)")
        return False, "nvcc not found (PATH, CUDA_HOME)"
    if switch in ("1", "on", "true", "yes"):
        return True, f"forced by LAYERSEL_CUDA=1 (nvcc: {nvcc}, torch CUDA {torch.version.cuda})"
    return True, f"torch has CUDA {torch.version.cuda} and nvcc is at {nvcc}"


def extension_modules():
    if os.environ.get("LAYERSEL_NO_EXT", "") == "1":
        log("LAYERSEL_NO_EXT=1: building the pure-torch package only")
        return [], {}
    resolve_cuda_home()
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda, why = decide_cuda(torch)
    sources = ["csrc/ops.cpp", "csrc/python_module.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-Xcompiler", "-ffp-contract=off"]
    include_dirs = [str(ROOT / "csrc")]
    arch_list = ""
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if torch.cuda.is_available():
                caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
                os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        include_dirs += nvidia_include_dirs()
        cxx_flags.append("-DLAYERSEL_WITH_CUDA")
        nvcc_flags.append("-DLAYERSEL_WITH_CUDA")
    cxx_flags.append(f'-DLAYERSEL_CUDA_ARCH_LIST="{arch_list}"')
    log(f"CUDA kernels: {'ON' if with_cuda else 'OFF'} ({why})")
    if with_cuda:
        log(f"CUDA arch list: {arch_list}")
        log(f"extra include dirs: {include_dirs[1:] or 'none'}")
    log(f"sources: {' '.join(sources)}")
    log(f"cxx flags: {' '.join(cxx_flags)}")

    record = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cuda": with_cuda,
        "cuda_reason": why,
        "cuda_arch_list": arch_list,
        "sources": sources,
        "cxx_flags": cxx_flags,
        "nvcc_flags": nvcc_flags if with_cuda else [],
    }
    (ROOT / "layersel_ext" / "_build_record.json").write_text(json.dumps(record, indent=2) + "\n")

    ext_cls = CUDAExtension if with_cuda else CppExtension
    kwargs = {"extra_compile_args": {"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx_flags}}
    ext = ext_cls(
        name="layersel_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_link_args=["-fopenmp"],
        **kwargs,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="layersel_ext",
    version="0.1.0",
    description="Fused C++/CUDA drop-in for fl4health.parameter_exchange.parameter_selection_criteria",
    packages=find_packages(include=["layersel_ext", "layersel_ext.*"]),
    package_data={"layersel_ext": ["py.typed", "_build_record.json"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
