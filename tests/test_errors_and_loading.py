"""Bad input gives a clear error naming the layer; inputs are never mutated; import never crashes."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import layersel_ext as L

ROOT = Path(__file__).resolve().parents[1]
SELECTORS = [
    lambda m, m0: L.select_layers_by_threshold(0.1, True, True, m, m0),
    lambda m, m0: L.select_layers_by_percentage(0.5, True, True, m, m0),
    lambda m, m0: L.largest_magnitude_change_scores(m, m0),
    lambda m, m0: L.layer_drift_norms(m, m0),
]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


@pytest.mark.parametrize("select", SELECTORS)
def test_different_keys(select):
    m, m0 = net(), nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(KeyError, match=r"'2.weight' is in model but not in initial_model"):
        select(m, m0)
    with pytest.raises(KeyError, match=r"'2.weight' is in initial_model but not in model"):
        select(m0, m)


@pytest.mark.parametrize("select", SELECTORS)
def test_different_shapes(select):
    m, m0 = net(), nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 5))
    with pytest.raises(ValueError, match=r"layer '2.weight': shape \(2, 3\) in model but \(5, 3\) in initial_model"):
        select(m, m0)


@pytest.mark.parametrize("select", SELECTORS)
def test_different_dtypes(select):
    m = net()
    m0 = copy.deepcopy(m).double()
    with pytest.raises(TypeError, match=r"layer '0.weight': dtype torch.float32 in model but torch.float64"):
        select(m, m0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("select", SELECTORS)
def test_different_devices(select):
    m = net()
    with pytest.raises(ValueError, match=r"layer '0.weight': device cpu in model but cuda"):
        select(m, copy.deepcopy(m).cuda())


def test_different_devices_meta():
    m = net()
    with pytest.raises(ValueError, match=r"layer '0.weight': device cpu in model but meta"):
        L.layer_drift_norms(m, copy.deepcopy(m).to("meta"))


@pytest.mark.parametrize("select", SELECTORS)
def test_initial_model_none(select):
    with pytest.raises(ValueError, match="needs initial_model"):
        select(net(), None)


@pytest.mark.parametrize("threshold", [0, -1.0])
def test_norm_threshold_must_be_positive(threshold):
    with pytest.raises(ValueError, match="norm_threshold must be > 0"):
        L.LayerSelectionFunctionConstructor(threshold, 0.5)


@pytest.mark.parametrize("pct", [0, -0.1, 1.01, 2])
def test_exchange_percentage_range(pct):
    with pytest.raises(ValueError, match=r"exchange_percentage must be in \(0, 1\]"):
        L.LayerSelectionFunctionConstructor(0.1, pct)


def test_bf16_layer_that_would_become_numpy():
    m = net().bfloat16()
    m0 = copy.deepcopy(m)
    with torch.no_grad():
        m[0].weight.add_(1)
    with pytest.raises(TypeError, match=r"layer '0.weight': dtype torch.bfloat16 cannot become a numpy array"):
        L.select_layers_by_threshold(1e-6, True, True, m, m0)
    # bf16 scores are fine (they stay tensors)
    assert L.largest_magnitude_change_scores(m, m0)["0.weight"].dtype == torch.bfloat16


def test_empty_model():
    with pytest.raises(ValueError, match="no state_dict entries"):
        L.select_layers_by_percentage(0.5, True, True, nn.Sequential(), nn.Sequential())
    with pytest.raises(ValueError, match="no state_dict entries"):
        L.largest_final_magnitude_scores(nn.ReLU(), None)


def test_bool_buffer_named():
    m = net()
    m.register_buffer("flag", torch.ones(2, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"layer 'flag': dtype torch.bool"):
        L.layer_drift_norms(m, copy.deepcopy(m))


def test_inputs_never_mutated():
    m = net()
    m0 = copy.deepcopy(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    before0 = {k: v.clone() for k, v in m0.state_dict().items()}
    L.select_layers_by_percentage(1.0, True, True, m, m0)
    L.select_layers_by_threshold(1e-9, False, False, m, m0)
    for fn in ("largest_final_magnitude_scores", "smallest_increase_in_magnitude_scores"):
        getattr(L, fn)(m, m0)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(torch.equal(before0[k], v) for k, v in m0.state_dict().items())


def test_state_dict_customisation_is_honoured():
    """A model with a state_dict hook goes through the real state_dict()."""
    m = net()
    m0 = copy.deepcopy(m)

    def drop_first(module, state_dict, prefix, local_metadata):
        state_dict.pop("0.bias", None)

    m._register_state_dict_hook(drop_first)
    m0._register_state_dict_hook(drop_first)
    assert "0.bias" not in L.layer_drift_norms(m, m0)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(  # noqa: PLW1510 (the return code is asserted)
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )  # fmt: skip


def test_import_never_crashes_without_compiled_module():
    code = (
        "import sys; sys.modules['layersel_ext._C'] = None\n"
        "import warnings; warnings.simplefilter('always')\n"
        "import layersel_ext as L, torch\n"
        "from torch import nn\n"
        "print('BACKEND', L.backend())\n"
        "m = nn.Linear(3, 2); print(L.largest_final_magnitude_scores(m, None)['weight'].shape)\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "BACKEND torch" in r.stdout
    assert "compiled kernels unavailable" in r.stderr and "installed torch" in r.stderr
    assert r.stderr.count("compiled kernels unavailable") == 1  # warned once


def _copy_package(dest: Path, with_build: bool) -> None:
    skip = ["__pycache__"] + ([] if with_build else ["_C.*", "_build_record*"])
    shutil.copytree(ROOT / "layersel_ext", dest / "layersel_ext", ignore=shutil.ignore_patterns(*skip))


def _info_from(cwd: Path, pythonpath: str) -> subprocess.CompletedProcess:
    return subprocess.run(  # noqa: PLW1510 (the return code is asserted)
        [sys.executable, "-m", "layersel_ext", "info"], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": pythonpath, "LAYERSEL_BACKEND": ""},
    )  # fmt: skip


def test_a_source_tree_without_a_build_uses_the_installed_build(tmp_path):
    """`pip install .`, then `python -m layersel_ext info` inside the clone: the clone's sources are
    imported, the installed compiled module is used, and info names where it came from."""
    from layersel_ext import _loader

    if _loader.COMPILED is None:
        pytest.skip("compiled module not loaded")
    clone, site = tmp_path / "clone", tmp_path / "site"
    _copy_package(clone, with_build=False)
    _copy_package(site, with_build=True)
    r = _info_from(clone, str(site))
    assert r.returncode == 0, r.stderr
    assert f"compiled module: loaded from the installed build in {site / 'layersel_ext'}" in r.stdout
    assert "active backend: compiled" in r.stdout
    assert '"torch_version"' in r.stdout  # the installed build's record
    assert "RuntimeWarning" not in r.stderr


def test_no_build_anywhere_is_one_warning_line_and_info_says_so(tmp_path):
    _copy_package(tmp_path, with_build=False)
    r = _info_from(tmp_path, "")
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if "compiled kernels unavailable" in line]
    assert len(warning) == 1 and "no compiled module for this Python" in warning[0], r.stderr
    assert "pip install -v --no-build-isolation ." in warning[0] and "installed torch" in warning[0]
    assert "circular import" not in r.stderr
    assert "compiled module: NOT loaded, the slower pure-torch backend runs" in r.stdout
    assert "active backend: torch" in r.stdout


def test_backend_switch_forces_torch():
    r = run_python("import layersel_ext as L; print(L.backend())", LAYERSEL_BACKEND="torch")
    assert r.returncode == 0 and r.stdout.strip() == "torch"


def test_backend_switch_compiled_missing_is_an_error():
    r = run_python(
        "import sys; sys.modules['layersel_ext._C'] = None; import layersel_ext", LAYERSEL_BACKEND="compiled"
    )
    assert r.returncode != 0 and "LAYERSEL_BACKEND=compiled" in r.stderr


def test_info_command():
    r = run_python(
        "import runpy, sys; sys.argv = ['layersel_ext', 'info']; runpy.run_module('layersel_ext', run_name='__main__')"
    )
    assert r.returncode == 0, r.stderr
    assert "active backend" in r.stdout and "layersel::drift_sq_norms" in r.stdout


def test_library_does_not_import_fl4health():
    r = run_python(
        "import sys, layersel_ext; from torch import nn; "
        "layersel_ext.select_scores_and_sample_masks(nn.Linear(2, 2), None); "
        "print([m for m in sys.modules if m.startswith(('fl4health', 'flwr', 'scipy'))])"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_python_dtype_list_equals_the_kernels_table():
    """The Python checks' SUPPORTED_DTYPES and the kernels' one dtype table (csrc/common/dtypes.h) agree."""
    from layersel_ext import _checks, _loader

    if _loader.COMPILED is None:
        pytest.skip("compiled module not loaded")
    c10_names = {"Float": torch.float32, "Double": torch.float64, "Half": torch.float16, "BFloat16": torch.bfloat16,
                 "Byte": torch.uint8, "Char": torch.int8, "Short": torch.int16, "Int": torch.int32,
                 "Long": torch.int64}  # fmt: skip
    table = {c10_names[n] for n in _loader.COMPILED.build_info()["dtypes"]}
    assert table == set(_checks.SUPPORTED_DTYPES)


def test_score_function_names_follow_the_score_kinds():
    """SCORE_FUNCTION_NAMES[kind] is the function of ScoreKind `kind` (sparse_coo.fused_kind relies on it)."""
    from layersel_ext._score_kinds import ScoreKind

    formulas = [k for k in ScoreKind if k != ScoreKind.GIVEN]
    assert L.SCORE_FUNCTION_NAMES == tuple(f"{k.name.lower()}_scores" for k in formulas)
