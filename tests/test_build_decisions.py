"""Build and load decisions that must degrade, never abort: CUDA on/off in setup.py, the backend switch.

build_tools/cuda_decision.py is pure (no torch, no compile): the table below covers every reason the
CUDA compile cannot work, in auto mode (CPU kernels + reason), forced (one-line error with the fix)
and off.
"""

from __future__ import annotations

import importlib.util
import os
import re
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from layersel_ext import _loader

ROOT = Path(__file__).resolve().parents[1]


def _load_decision_module():
    spec = importlib.util.spec_from_file_location("layersel_cuda_decision", ROOT / "build_tools" / "cuda_decision.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


cd = _load_decision_module()
NVCC_13 = cd.Nvcc("/usr/local/cuda-13.0/bin/nvcc", "13.0")
NVCC_12_4 = cd.Nvcc("/usr/local/cuda-12.4/bin/nvcc", "12.4")
NVCC_12_8 = cd.Nvcc("/usr/local/cuda-12.8/bin/nvcc", "12.8")
NO_NVCC = cd.Nvcc(None)
BROKEN_NVCC = cd.Nvcc("/opt/cuda/bin/nvcc", None, "`nvcc --version` exited 127: libfoo.so: not found")

# (switch, torch CUDA, nvcc) -> compile CUDA?, and a piece of the reason (auto/on) or of the error (on)
CASES = [
    # the real case: fl4health's torch 2.6.0+cu124 on a machine whose nvcc is 13.0
    pytest.param(
        None,
        "12.4",
        NVCC_13,
        False,
        "nvcc is CUDA 13.0 and torch 2.6.0 was built with CUDA 12.4",
        id="auto-major-mismatch",
    ),
    pytest.param("", "12.4", NVCC_13, False, "CPU kernels only", id="empty-is-auto-major-mismatch"),
    pytest.param("auto", "12.4", NVCC_13, False, "CPU kernels only", id="auto-word-major-mismatch"),
    pytest.param(None, None, NVCC_13, False, "CPU-only build", id="auto-cpu-torch"),
    pytest.param(None, "13.0", NO_NVCC, False, "nvcc was not found", id="auto-no-nvcc"),
    pytest.param(None, "13.0", BROKEN_NVCC, False, "does not run", id="auto-nvcc-does-not-run"),
    pytest.param(None, "13.0", NVCC_13, True, "torch has CUDA 13.0 and nvcc 13.0", id="auto-match"),
    pytest.param(None, "12.4", NVCC_12_8, True, "minor versions differ", id="auto-minor-mismatch"),
    pytest.param("1", "13.0", NVCC_13, True, "forced by LAYERSEL_CUDA=1", id="on-match"),
    pytest.param("yes", "12.4", NVCC_12_4, True, "forced by LAYERSEL_CUDA=1", id="on-word-match"),
    pytest.param("0", "13.0", NVCC_13, False, "LAYERSEL_CUDA=0", id="off-everything-there"),
    pytest.param("0", "12.4", NVCC_13, False, "LAYERSEL_CUDA=0", id="off-major-mismatch"),
    pytest.param("off", None, NO_NVCC, False, "LAYERSEL_CUDA=0", id="off-nothing-there"),
]

FORCED_FAILURES = [
    pytest.param(
        "12.4",
        NVCC_13,
        "LAYERSEL_CUDA=1 but nvcc is CUDA 13.0 and torch 2.6.0 was built with CUDA 12.4: install a torch built "
        "for CUDA 13 or point CUDA_HOME at a CUDA 12 toolkit, or unset LAYERSEL_CUDA",
        id="on-major-mismatch",
    ),
    pytest.param(None, NVCC_13, "LAYERSEL_CUDA=1 but torch 2.6.0 is a CPU-only build", id="on-cpu-torch"),
    pytest.param("13.0", NO_NVCC, "LAYERSEL_CUDA=1 but nvcc was not found", id="on-no-nvcc"),
    pytest.param(
        "13.0", BROKEN_NVCC, "LAYERSEL_CUDA=1 but nvcc at /opt/cuda/bin/nvcc does not run", id="on-broken-nvcc"
    ),
]


@pytest.mark.parametrize(("switch", "torch_cuda", "nvcc", "expected", "reason"), CASES)
def test_decide_cuda(switch, torch_cuda, nvcc, expected, reason) -> None:
    with_cuda, why = cd.decide_cuda(switch, "2.6.0", torch_cuda, nvcc, gpus=1)
    assert with_cuda is expected
    assert reason in why
    assert "\n" not in why


def test_auto_without_a_visible_gpu_builds_cpu_kernels_only() -> None:
    """A toolkit that matches torch is not enough in auto mode: with no GPU the CUDA kernels could not
    run, and every install would pay for compiling them. LAYERSEL_CUDA=1 still compiles them."""
    for switch in (None, "", "auto"):
        with_cuda, why = cd.decide_cuda(switch, "2.14.1", "13.0", NVCC_13, gpus=0)
        assert with_cuda is False
        assert "no CUDA device is visible" in why and "LAYERSEL_CUDA=1" in why and "\n" not in why
    assert cd.decide_cuda("1", "2.14.1", "13.0", NVCC_13, gpus=0)[0] is True
    assert cd.decide_cuda(None, "2.14.1", "13.0", NVCC_13, gpus=2)[0] is True


@pytest.mark.parametrize(("torch_cuda", "nvcc", "message"), FORCED_FAILURES)
def test_forced_cuda_fails_with_reason_and_fix(torch_cuda, nvcc, message) -> None:
    for switch in ("1", "on", "true", " YES "):
        with pytest.raises(cd.CudaBuildError) as info:
            cd.decide_cuda(switch, "2.6.0", torch_cuda, nvcc, gpus=1)
        text = str(info.value)
        assert text.startswith(message)
        assert "\n" not in text and "unset LAYERSEL_CUDA" in text


def test_invalid_switch_is_an_error() -> None:
    with pytest.raises(cd.CudaBuildError, match="LAYERSEL_CUDA must be 1, 0 or unset"):
        cd.decide_cuda("maybe", "2.14.1", "13.0", NVCC_13, gpus=1)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.48\n", "13.0"),
        ("Cuda compilation tools, release 12.4, V12.4.131", "12.4"),
        ("Cuda compilation tools, release 11.8, V11.8.89", "11.8"),
        ("something else", None),
    ],
)
def test_parse_nvcc_version(text, version) -> None:
    assert cd.parse_nvcc_version(text) == version


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_probe_nvcc(tmp_path: Path) -> None:
    good = _script(tmp_path / "nvcc-good", 'echo "Cuda compilation tools, release 12.4, V12.4.131"')
    failing = _script(tmp_path / "nvcc-failing", 'echo "error while loading shared libraries" >&2; exit 127')
    mute = _script(tmp_path / "nvcc-mute", "echo hello")
    not_executable = tmp_path / "nvcc-not-executable"
    not_executable.write_text("")
    assert cd.probe_nvcc(good) == cd.Nvcc(good, "12.4")
    assert cd.probe_nvcc(None) == cd.Nvcc(None)
    assert cd.probe_nvcc(str(tmp_path / "absent")).path is None
    for broken in (failing, mute, str(not_executable)):
        probe = cd.probe_nvcc(broken)
        assert probe.path == broken and probe.version is None and probe.error
    assert "exited 127" in cd.probe_nvcc(failing).error
    # each of them gives a CPU build in auto mode
    for broken in (failing, mute, str(not_executable)):
        assert cd.decide_cuda(None, "2.14.1", "13.0", cd.probe_nvcc(broken), gpus=1)[0] is False


def _env(**env: str | None) -> dict[str, str]:
    full_env = dict(os.environ)
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    return full_env


def _run(args: list[str], **env: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=300, check=False
    )


def test_setup_py_forced_cuda_mismatch_is_one_line(tmp_path: Path) -> None:
    """setup.py itself: LAYERSEL_CUDA=1 with an unusable toolkit stops before compiling, in one line, no traceback."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "include").mkdir()
    _script(tmp_path / "bin" / "nvcc", 'echo "Cuda compilation tools, release 11.8, V11.8.89"')
    r = _run(["setup.py", "--name"], LAYERSEL_CUDA="1", CUDA_HOME=str(tmp_path), CUDA_PATH=None, LAYERSEL_NO_EXT=None)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("[layersel_ext setup] error: LAYERSEL_CUDA=1 but "), r.stderr
    if torch.version.cuda is None:
        assert "CPU-only build" in last
    else:
        assert f"nvcc is CUDA 11.8 and torch {torch.__version__} was built with CUDA {torch.version.cuda}" in last


def test_empty_backend_switch_is_auto() -> None:
    """LAYERSEL_BACKEND='' (set but empty, as `LAYERSEL_BACKEND= python ...` does) behaves as unset."""
    code = "import layersel_ext as L; print(L.backend())"
    values = {"unset": None, "empty": "", "blank": "  ", "invalid": "cuda"}
    procs = {  # in parallel: each one imports torch
        name: subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=_env(LAYERSEL_BACKEND=value),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, value in values.items()
    }
    out = {name: (p.communicate(timeout=300), p.returncode) for name, p in procs.items()}
    for name in ("unset", "empty", "blank"):
        (stdout, stderr), rc = out[name]
        assert rc == 0, f"{name}: {stderr}"
        assert stdout == out["unset"][0][0], name
    (_, stderr), rc = out["invalid"]
    assert rc != 0 and "LAYERSEL_BACKEND must be" in stderr


def test_build_record_is_this_interpreters() -> None:
    """Each Python's in-place build has its own _C.<abi>.so and record; this run loaded its own."""
    abi = sysconfig.get_config_var("EXT_SUFFIX")
    assert _loader._RECORD_PATH.name == f"_build_record{abi[: -len('.so')]}.json"
    if _loader.COMPILED is None:
        pytest.skip(f"compiled module not loaded: {_loader.LOAD_REASON}")
    assert str(_loader.COMPILED.__file__).endswith(abi)
    record = _loader.build_record()
    assert record, f"no build record at {_loader._RECORD_PATH}"
    assert record["torch_version"] == torch.__version__
    assert record["python"].split(".")[:2] == [str(x) for x in sys.version_info[:2]]
    assert isinstance(record["cuda_reason"], str) and record["cuda_reason"]


def test_loaded_libstdcxx_is_read_from_the_process_maps():
    from build_tools.libstdcxx import libstdcxx_link_args, loaded_libstdcxx

    maps = (
        "7f00-7f10 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f20-7f30 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.33\n"
        "7f40-7f50 rw-p 00000000 00:00 0 \n"
    )
    assert loaded_libstdcxx(maps) == "/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.33"
    assert loaded_libstdcxx("7f40-7f50 rw-p 00000000 00:00 0 [heap]\n") is None
    # This process has torch loaded, so on Linux it has a shared libstdc++ to name.
    if sys.platform.startswith("linux"):
        (path,) = libstdcxx_link_args()
        assert Path(path).exists() and "libstdc++.so" in path


def test_error_messages_with_numbers_do_not_crash_the_interpreter():
    # A private static libstdc++ copy in _C.so crashed here (SIGSEGV formatting "tensor #0") on the
    # GPU image; run in a child so a crash is a failure, not the end of the test session.
    code = (
        "import torch, layersel_ext\n"
        "try:\n"
        "    torch.ops.layersel.drift_sq_norms([torch.zeros(2, 3)], [torch.zeros(5, 3)])\n"
        "except ValueError as e:\n"
        "    assert 'tensor #0 has shape [2, 3]' in str(e), e\n"
        "    print('raised')\n"
    )
    from layersel_ext import _loader

    if _loader.COMPILED is None:
        pytest.skip("compiled module not loaded")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300, cwd=root
    )
    assert out.returncode == 0 and "raised" in out.stdout, out.stderr[-2000:]


def test_only_torch_internals_includes_torch_internal_headers() -> None:
    """torch/csrc/... is no stable API: a release that moves a header must cost the build one fallback, not
    every file. Only csrc/python/torch_internals.{h,cpp} include such headers, each behind __has_include of
    itself (the public fallback otherwise), and torch/extension.h (the whole C++ frontend, the slowest parse)
    only as that fallback."""
    include = re.compile(r"^\s*#\s*include\s*<(torch/(?:csrc/[^>]+|extension\.h))>", re.MULTILINE)
    internals = {"csrc/python/torch_internals.h", "csrc/python/torch_internals.cpp"}
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in (".h", ".cpp", ".cu", ".cuh", ".inc"):
            headers = include.findall(path.read_text())
            if headers:
                found[path.relative_to(ROOT).as_posix()] = headers
    assert set(found) <= internals, f"torch's internal headers included outside torch_internals: {found}"
    for name, headers in found.items():
        text = (ROOT / name).read_text()
        for header in headers:
            if header != "torch/extension.h":
                assert f"__has_include(<{header}>)" in text, f"{name}: <{header}> without __has_include"
