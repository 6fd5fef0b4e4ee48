"""Whether to compile the CUDA kernels, and the CUDA toolkit probes behind that decision.

Used by setup.py (the build), dev.sh (CMake arguments for ctest) and tests/test_build_decisions.py.
Imports neither torch nor setuptools at module level: ``decide_cuda`` is a pure function of the
switch, torch's CUDA version and what ``nvcc --version`` said, so the tests call it without
compiling anything.

Policy: ``LAYERSEL_CUDA`` unset (auto) never aborts a build; whatever stands in the way of the CUDA
compile (CPU-only torch, no nvcc, an nvcc that does not run, a toolkit whose major version differs
from torch's, on which torch's own check would raise) gives a CPU-kernel build and says why. Auto
also builds the CPU kernels alone when no GPU is visible: the CUDA kernels could not run there, and
compiling them costs minutes on every install.
``LAYERSEL_CUDA=1`` turns each of those into a one-line error with the fix; ``LAYERSEL_CUDA=0``
never looks at CUDA.

    python build_tools/cuda_decision.py cmake-args   # CMake -D arguments for ./dev.sh ctest, one a line
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ON = ("1", "on", "true", "yes")
OFF = ("0", "off", "false", "no")
AUTO = ("", "auto")


class CudaBuildError(Exception):
    """LAYERSEL_CUDA=1 (or an invalid value) where the CUDA compile cannot work; one line, with the fix."""


@dataclass(frozen=True)
class Nvcc:
    """What is known of the nvcc that the build would call."""

    path: str | None  # None: not found
    version: str | None = None  # "13.0", from `nvcc --version`; None: it did not run or named no release
    error: str = ""  # why version is None


def switch_mode(switch: str | None) -> str:
    """'auto', 'on' or 'off' for a LAYERSEL_CUDA value (None or empty: auto)."""
    value = (switch or "").strip().lower()
    if value in AUTO:
        return "auto"
    if value in ON:
        return "on"
    if value in OFF:
        return "off"
    raise CudaBuildError(f"LAYERSEL_CUDA must be 1, 0 or unset (auto), got {switch!r}")


def parse_nvcc_version(text: str) -> str | None:
    """'13.0' from nvcc's 'Cuda compilation tools, release 13.0, V13.0.48'; None if absent."""
    found = re.search(r"release (\d+)\.(\d+)", text)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def probe_nvcc(path: str | None) -> Nvcc:
    """Run ``path --version``; never raises."""
    if not path:
        return Nvcc(None)
    if not os.path.exists(path):
        return Nvcc(None, error=f"{path} does not exist")
    try:
        out = subprocess.run([path, "--version"], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return Nvcc(path, None, f"{type(exc).__name__}: {exc}")
    text = out.stdout + out.stderr
    if out.returncode != 0:
        last = text.strip().splitlines()[-1:] or [""]
        return Nvcc(path, None, f"`nvcc --version` exited {out.returncode}: {last[0][:200]}")
    version = parse_nvcc_version(text)
    if version is None:
        return Nvcc(path, None, "`nvcc --version` named no 'release X.Y'")
    return Nvcc(path, version)


def _major(version: str) -> str:
    return version.split(".", 1)[0]


def decide_cuda(
    switch: str | None, torch_version: str, torch_cuda: str | None, nvcc: Nvcc, *, gpus: int
) -> tuple[bool, str]:
    """(compile the CUDA kernels?, why). Raises CudaBuildError only when forced (or the switch is invalid).

    switch: LAYERSEL_CUDA's value; torch_version: torch.__version__; torch_cuda: torch.version.cuda;
    nvcc: the nvcc torch's build would call (``$CUDA_HOME/bin/nvcc``), probed with ``--version``;
    gpus: how many CUDA devices torch sees.
    """
    mode = switch_mode(switch)
    if mode == "off":
        return False, "LAYERSEL_CUDA=0 asked for a CPU-only build"
    problem = fix = ""
    if torch_cuda is None:
        problem = f"torch {torch_version} is a CPU-only build (torch.version.cuda is None)"
        fix = "install a CUDA build of torch"
    elif nvcc.path is None:
        problem = "nvcc was not found (CUDA_HOME, PATH)" + (f": {nvcc.error}" if nvcc.error else "")
        fix = f"install a CUDA {_major(torch_cuda)} toolkit and put its nvcc on PATH or set CUDA_HOME"
    elif nvcc.version is None:
        problem = f"nvcc at {nvcc.path} does not run ({nvcc.error})"
        fix = f"point CUDA_HOME at a working CUDA {_major(torch_cuda)} toolkit"
    elif _major(nvcc.version) != _major(torch_cuda):
        problem = f"nvcc is CUDA {nvcc.version} and torch {torch_version} was built with CUDA {torch_cuda}"
        fix = (
            f"install a torch built for CUDA {_major(nvcc.version)} "
            f"or point CUDA_HOME at a CUDA {_major(torch_cuda)} toolkit"
        )
    if problem:
        if mode == "on":
            raise CudaBuildError(f"LAYERSEL_CUDA=1 but {problem}: {fix}, or unset LAYERSEL_CUDA")
        return False, f"{problem}; CPU kernels only (LAYERSEL_CUDA=1 would make this an error)"
    assert torch_cuda is not None and nvcc.version is not None
    minor = (
        ""
        if nvcc.version == torch_cuda
        else f"; minor versions differ ({nvcc.version} vs {torch_cuda}), torch allows it"
    )
    if mode == "on":
        return True, f"forced by LAYERSEL_CUDA=1 (nvcc {nvcc.version} at {nvcc.path}, torch CUDA {torch_cuda}{minor})"
    if gpus == 0:
        return False, "no CUDA device is visible; CPU kernels only (LAYERSEL_CUDA=1 compiles the CUDA kernels anyway)"
    return True, f"torch has CUDA {torch_cuda} and nvcc {nvcc.version} is at {nvcc.path}{minor}"


def toolkit_root_of(nvcc: str) -> str | None:
    """The toolkit folder nvcc itself uses (its ``#$ TOP=``), also when nvcc on PATH is a wrapper script."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.realpath(line.split("=", 1)[1].strip())
            return top if os.path.isdir(os.path.join(top, "include")) else None
    return None


def resolve_cuda_home() -> str | None:
    """CUDA_HOME for torch's build: the environment's, else the toolkit of nvcc on PATH (exported)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    top = toolkit_root_of(nvcc) if nvcc else None
    if top:
        os.environ["CUDA_HOME"] = top
    return top


def nvidia_pip_cuda_dir(torch_cuda: str | None) -> str | None:
    """site-packages/nvidia/cu<major> (headers, libnvrtc) of the nvidia pip wheels, where present."""
    if not torch_cuda:
        return None
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return None
    for root in list(getattr(nvidia, "__path__", [])):
        d = os.path.join(root, f"cu{_major(torch_cuda)}")
        if os.path.isdir(d):
            return d
    return None


def cmake_args() -> list[str]:
    """CMake -D arguments for the ctest build, from the same probes as setup.py's."""
    import torch

    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    home = resolve_cuda_home()
    if home and torch.version.cuda:
        args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={home}")
        pip_dir = nvidia_pip_cuda_dir(torch.version.cuda)
        if pip_dir:
            libs = sorted(glob.glob(os.path.join(pip_dir, "lib", f"libnvrtc.so.{_major(torch.version.cuda)}*")))
            if libs:
                args.append(f"-DCUDA_nvrtc_LIBRARY={libs[0]}")
    return args


if __name__ == "__main__":
    if sys.argv[1:] == ["cmake-args"]:
        print("\n".join(cmake_args()))
    else:
        sys.exit("usage: python build_tools/cuda_decision.py cmake-args")
