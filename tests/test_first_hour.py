"""A fl4health user's first hour, as the README tells it, in a fresh Python 3.10 venv.

`pip install fl4health==0.4.2` (torch 2.6, numpy 1.26), then the README's install block exactly as
written, run inside a copy of this checkout without any build, then `python -m layersel_ext info`
from inside that checkout (the sources there have no build: the installed compiled module must be
the one in use), then one patched fl4health call compared with fl4health's own answer.

It runs on Python 3.10, fl4health 0.4.2's own Python (the fl4health stack:
`./dev.sh test-fl4health-stack --all`, as CI runs it), and takes minutes: a venv, the fl4health
install (from pip's cache when the stack's venv was made) and a CPU build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL_MARK = "pip install -v --no-build-isolation ."

PATCHED_CALL = """
import copy

import numpy as np
import torch
from torch import nn
from fl4health.parameter_exchange import parameter_selection_criteria as F

import layersel_ext
import layersel_ext.fl4health as lf

torch.manual_seed(0)
m0 = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
m = copy.deepcopy(m0)
with torch.no_grad():
    for p in m.parameters():
        p.add_(torch.randn_like(p))
reference = F.select_layers_by_percentage(0.5, True, True, m, m0)
lf.patch()
assert F.select_layers_by_percentage.__module__.startswith("layersel_ext"), F.select_layers_by_percentage.__module__
ours = F.select_layers_by_percentage(0.5, True, True, m, m0)
assert layersel_ext.backend() == "compiled", layersel_ext.LOAD_REASON
assert ours[1] == reference[1], (ours[1], reference[1])
assert all(np.array_equal(a, b) for a, b in zip(ours[0], reference[0]))
print("PATCHED CALL EQUALS FL4HEALTH", ours[1])
"""


def readme_install_block() -> str:
    """The README's fenced bash block that installs layersel_ext."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    found = [b for b in blocks if INSTALL_MARK in b]
    assert found, f"README.md has no ```bash block with {INSTALL_MARK!r}"
    return found[0]


def copy_checkout(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files: a clone of the working tree, no build in it."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    print(f"$ {' '.join(cmd)}  (exit {r.returncode})\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def test_readme_install_block_names_its_build_tools() -> None:
    block = readme_install_block()
    for tool in ("setuptools", "wheel", "ninja"):
        assert tool in block, f"the README's install block does not install {tool}"
    assert "python -m layersel_ext info" in block


@pytest.mark.skipif(
    sys.version_info[:2] != (3, 10), reason="fl4health 0.4.2 needs Python 3.10: runs in the fl4health stack"
)
def test_first_hour_in_a_fresh_fl4health_venv(tmp_path: Path) -> None:
    base_python = getattr(sys, "_base_executable", sys.executable)
    venv, clone = tmp_path / "venv", tmp_path / "layersel_ext"
    copy_checkout(clone)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERSEL_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), MAX_JOBS="2")
    assert run([base_python, "-m", "venv", str(venv)], tmp_path, env, 300).returncode == 0
    assert run(["pip", "install", "-q", "fl4health==0.4.2"], tmp_path, env, 1500).returncode == 0

    r = run(["bash", "-euo", "pipefail", "-c", readme_install_block()], clone, env, 1500)
    assert r.returncode == 0, "the README's install block failed as written"
    assert "compiled module: loaded" in r.stdout  # its last line is `python -m layersel_ext info`

    info = run([str(venv / "bin" / "python"), "-m", "layersel_ext", "info"], clone, env, 300)
    assert info.returncode == 0
    assert "compiled module: loaded from the installed build" in info.stdout
    assert re.search(r"layersel::drift_sq_norms\s+CPU", info.stdout)
    assert "active backend: compiled" in info.stdout
    assert "RuntimeWarning" not in info.stderr

    call = run([str(venv / "bin" / "python"), "-c", PATCHED_CALL], clone, env, 300)
    assert call.returncode == 0
    assert "PATCHED CALL EQUALS FL4HEALTH" in call.stdout
