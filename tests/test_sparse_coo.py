"""Sparse COO selection: parity with fl4health's exchanger, the radix select against torch, the exchanger."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from conftest import fl4health_criteria, requires_cuda
from models import make_pair, model_zoo
from torch import Tensor, nn

import layersel_ext as L
from layersel_ext import _loader, _torch_ops, ops
from layersel_ext._score_kinds import ScoreKind
from layersel_ext.sparse_coo import SparseCooParameterExchanger, select_sparse_parameters

SCORE_FUNCTIONS = list(L.SCORE_FUNCTION_NAMES)
compiled_only = pytest.mark.skipif(_loader.COMPILED is None, reason="compiled module not loaded")


@pytest.fixture(autouse=True)
def quiet_fl4health():
    logging.disable(logging.WARNING)  # fl4health logs a warning per constant-score tensor
    yield
    logging.disable(logging.NOTSET)


def reference_exchanger(sparsity: float, fn):
    fl4health_criteria()
    from fl4health.parameter_exchange.sparse_coo_parameter_exchanger import SparseCooParameterExchanger as Ref

    return Ref(sparsity, fn)


def assert_same_selection(ref, ours) -> None:
    (rv, (ri, rs, rn)), (ov, (oi, os_, on)) = ref, ours
    assert on == rn
    for kind, a, b in (("values", rv, ov), ("indices", ri, oi), ("shapes", rs, os_)):
        assert len(a) == len(b), kind
        for n, x, y in zip(rn, a, b):
            assert x.dtype == y.dtype and x.shape == y.shape, (kind, n, x.dtype, y.dtype, x.shape, y.shape)
            np.testing.assert_array_equal(x, y, err_msg=f"{kind} {n}")


def smallest_sparsity(model: nn.Module) -> float:
    n = sum(t.numel() for t in model.state_dict().values())
    return 1.0 / n  # k = 1


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("constant", [False, True])
@pytest.mark.parametrize("fn", SCORE_FUNCTIONS)
def test_matches_fl4health_exchanger(seed, constant, fn, backend):
    F = fl4health_criteria()
    for name, base in model_zoo(seed):
        model, initial = make_pair(base, seed, constant=constant)
        for sparsity in (smallest_sparsity(model), 0.001, 0.01, 0.1, 0.5, 1.0):
            ref = reference_exchanger(sparsity, getattr(F, fn)).select_parameters(model, initial)
            for score_fn in (getattr(F, fn), getattr(L, fn)):  # fused either way
                assert_same_selection(ref, select_sparse_parameters(model, initial, sparsity, score_fn))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_dtypes_match(dtype, backend):
    F = fl4health_criteria()
    model, initial = make_pair(model_zoo(0)[0][1], 0, dtype=dtype)
    for sparsity in (0.01, 0.3):
        for fn in ("largest_magnitude_change_scores", "smallest_final_magnitude_scores"):
            ref = reference_exchanger(sparsity, getattr(F, fn)).select_parameters(model, initial)
            assert_same_selection(ref, select_sparse_parameters(model, initial, sparsity, getattr(L, fn)))


def test_custom_score_function(backend):
    """A score function that is not one of the six: its scores are used as given."""

    def random_scores(model: nn.Module, initial: nn.Module | None) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(5)
        return {k: torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v.clone()
                for k, v in model.state_dict().items()}  # fmt: skip

    def float_scores_for_everything(model: nn.Module, initial: nn.Module | None) -> dict[str, torch.Tensor]:
        return {k: v.float().abs() for k, v in model.state_dict().items()}

    model, initial = make_pair(model_zoo(0)[0][1], 0)
    for fn in (random_scores, float_scores_for_everything):
        for sparsity in (0.01, 0.2):
            ref = reference_exchanger(sparsity, fn).select_parameters(model, initial)
            assert_same_selection(ref, select_sparse_parameters(model, initial, sparsity, fn))


def test_fl4health_tie_case(backend):
    """fl4health's own test: 64 tied values at sparsity 0.001 of a 7000-parameter model: all 64 are sent."""
    model = nn.Linear(100, 70, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.weight.view(-1)[:64] = 3.0
    values, (indices, shapes, names) = select_sparse_parameters(model, None, 0.001, L.largest_final_magnitude_scores)
    assert names == ["weight"] and values[0].shape == (64,) and (values[0] == 3.0).all()
    assert indices[0].shape == (64, 2) and shapes[0].tolist() == [70, 100]


def test_zero_values_and_0d_tensors_are_not_sent(backend):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scalar = nn.Parameter(torch.tensor(100.0))
            self.w = nn.Parameter(torch.tensor([0.0, -0.0, 5.0, 6.0]))
            self.zeros = nn.Parameter(torch.zeros(3))

    values, (indices, shapes, names) = select_sparse_parameters(M(), None, 1.0, L.largest_final_magnitude_scores)
    assert names == ["w"] and values[0].tolist() == [5.0, 6.0] and indices[0].tolist() == [[2], [3]]
    assert shapes[0].tolist() == [4]


# ---------------------------------------------------------------------- the radix select against torch

ADVERSARIAL = {
    "all_equal": [torch.full((70000,), 0.25)],
    "all_negative": [-torch.rand(5000) - 1.0, -torch.rand(33) - 2.0],
    "signed_zeros": [torch.tensor([0.0, -0.0] * 500 + [1.0, -1.0])],
    "denormals": [torch.tensor([1e-45, 3e-44, -1e-45, 1e-40, 0.0] * 100)],
    "infinities": [torch.tensor([float("inf"), float("-inf"), 1.0, -1.0] * 50)],
    "ties_at_threshold": [torch.cat([torch.full((1000,), 7.0), torch.rand(1000)])],
    "mixed_dtypes": [torch.rand(300), torch.randint(-5, 5, (100,)), torch.rand(50)],
}


@compiled_only
@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_kth_largest_against_sort(case):
    tensors = ADVERSARIAL[case]
    promoted = torch.cat([t.reshape(-1) for t in tensors]).dtype
    flat = torch.cat([t.reshape(-1).to(promoted) for t in tensors])
    ordered = torch.sort(flat, descending=True)[0]
    n = flat.numel()
    for k in sorted({1, 2, n // 3, n // 2, n - 1, n}):
        want = ordered[k - 1]
        for impl in (torch.ops.layersel.kth_largest_score, _torch_ops.kth_largest_score):
            got = impl(tensors, tensors, ScoreKind.GIVEN, k, promoted)
            assert got.dtype == promoted and got.item() == want.item(), (case, k, impl)


@compiled_only
def test_kth_largest_nan_ranks_first():
    t = [torch.tensor([1.0, float("nan"), 2.0, -float("nan")])]
    for k, want in ((1, "nan"), (2, "nan"), (3, 2.0), (4, 1.0)):
        got = torch.ops.layersel.kth_largest_score(t, t, ScoreKind.GIVEN, k, torch.float32).item()
        assert math.isnan(got) if want == "nan" else got == want, (k, got)
        twin = _torch_ops.kth_largest_score(t, t, ScoreKind.GIVEN, k, torch.float32).item()
        assert math.isnan(twin) if want == "nan" else twin == want, (k, twin)


@compiled_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64])
def test_kth_largest_other_dtypes(dtype):
    g = torch.Generator().manual_seed(3)
    t = [(torch.randn(10007, generator=g) * 100).to(dtype), (torch.randn(99, generator=g) * 100).to(dtype)]
    flat = torch.cat(t)
    ordered = torch.sort(flat, descending=True)[0]
    for k in (1, 17, 5000, flat.numel()):
        got = torch.ops.layersel.kth_largest_score(t, t, ScoreKind.GIVEN, k, dtype)
        assert got.item() == ordered[k - 1].item()
        assert _torch_ops.kth_largest_score(t, t, ScoreKind.GIVEN, k, dtype).item() == ordered[k - 1].item()


@compiled_only
def test_sparse_extract_compiled_equals_twin():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 70000, generator=g), torch.randn(5, generator=g), torch.randint(-3, 3, (4, 4, 4))]
    ys = [torch.randn(3, 70000, generator=g), torch.randn(5, generator=g), torch.randint(-3, 3, (4, 4, 4))]
    for kind in range(6):
        thresholds = [0.5, -0.1, 1.0]
        a = torch.ops.layersel.sparse_extract(xs, ys, kind, thresholds)
        b = _torch_ops.sparse_extract(xs, ys if kind >= 2 else [], kind, thresholds)
        for u, v in zip(a[0] + a[1], b[0] + b[1]):
            assert torch.equal(u, v), kind


@compiled_only
def test_opcheck_sparse_ops():
    xs = [torch.randn(10), torch.randn(3, 4)]
    ys = [torch.randn(10), torch.randn(3, 4)]
    torch.library.opcheck(
        torch.ops.layersel.kth_largest_score.default,
        (xs, ys, 2, 5, torch.float32),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.layersel.sparse_extract.default,
        (xs, ys, 3, [-0.5, -0.5]),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_memory_stays_small(backend):
    """Beyond its outputs, the fused selection allocates far less than the model (fl4health: ~16 B/param)."""
    import psutil

    if backend != "compiled":
        pytest.skip("the torch twin materialises one tensor's scores at a time")
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(16)])  # 16.8M params, 67 MB
    initial = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(16)])
    select_sparse_parameters(model, initial, 0.001, L.largest_magnitude_change_scores)
    proc = psutil.Process()
    before = proc.memory_info().rss
    select_sparse_parameters(model, initial, 0.001, L.largest_magnitude_change_scores)
    assert proc.memory_info().rss - before < 0.05 * 67e6 + 2e6


# ---------------------------------------------------------------------- the drop-in exchanger


def test_exchanger_push_pull_round_trip(backend):
    F = fl4health_criteria()
    model, initial = make_pair(model_zoo(0)[0][1], 0)
    ours = SparseCooParameterExchanger(0.05, L.largest_magnitude_change_scores)
    ref = reference_exchanger(0.05, F.largest_magnitude_change_scores)
    packed, ref_packed = ours.push_parameters(model, initial), ref.push_parameters(model, initial)
    assert len(packed) == len(ref_packed)
    for a, b in zip(packed, ref_packed):
        np.testing.assert_array_equal(a, b)
    target, ref_target = make_pair(model_zoo(0)[0][1], 1)[0], make_pair(model_zoo(0)[0][1], 1)[0]
    ours.pull_parameters(packed, target)
    ref.pull_parameters(ref_packed, ref_target)
    for (k, v), (_, w) in zip(target.state_dict().items(), ref_target.state_dict().items()):
        assert torch.equal(v, w), k


def test_exchanger_rejects_bad_sparsity():
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="sparsity_level"):
            SparseCooParameterExchanger(bad, L.largest_final_magnitude_scores)


@requires_cuda
def test_cuda_matches_cpu():
    model, initial = make_pair(model_zoo(0)[1][1], 0)
    for fn in (L.largest_magnitude_change_scores, L.smallest_final_magnitude_scores):
        for sparsity in (0.001, 0.1):
            cpu = select_sparse_parameters(model, initial, sparsity, fn)
            gpu = select_sparse_parameters(model.cuda(), initial.cuda(), sparsity, fn)
            assert_same_selection(cpu, gpu)
            model, initial = model.cpu(), initial.cpu()


def run_with_env(code: str, **env: str) -> None:
    """``code`` in a fresh interpreter with ``env`` added (the CPU select reads its knobs once); it
    must print ok."""
    import os
    import subprocess
    import sys

    full = {**os.environ, **env}
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=full, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@compiled_only
def test_kth_largest_full_pass_path():
    """With no room for candidates the CPU select takes the full-pass path: same answers."""
    code = (
        "import torch, layersel_ext\n"
        "g = torch.Generator().manual_seed(2)\n"
        "for dt in (torch.float32, torch.float64, torch.int64):\n"
        "    t = [(torch.randn(70001, generator=g) * 50).to(dt), torch.full((999,), 3).to(dt)]\n"
        "    ordered = torch.sort(torch.cat(t), descending=True)[0]\n"
        "    for k in (1, 500, 1500, 71000):\n"
        "        got = torch.ops.layersel.kth_largest_score(t, t, 6, k, dt)\n"
        "        assert got.item() == ordered[k - 1].item(), (dt, k)\n"
        "print('ok')\n"
    )
    run_with_env(code, LAYERSEL_SPARSE_MAX_CANDIDATES="0")


def test_all_integer_model_matches_fl4health(backend):
    """Only integer buffers: the scores concatenate to int64 and the threshold is an exact integer."""
    F = fl4health_criteria()

    class Counters(nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("a", torch.randint(-50, 50, (40,), generator=g))
            self.register_buffer("b", torch.randint(-9, 9, (3, 5), generator=g))
            self.register_buffer("big", torch.tensor([2**40 + 1, 2**40, -(2**40) - 1]))

    model, initial = Counters(0), Counters(1)
    for fn in SCORE_FUNCTIONS:
        for sparsity in (0.02, 0.05, 0.3, 1.0):
            ref = reference_exchanger(sparsity, getattr(F, fn)).select_parameters(model, initial)
            assert_same_selection(ref, select_sparse_parameters(model, initial, sparsity, getattr(L, fn)))


@compiled_only
@pytest.mark.parametrize("max_candidates", [None, "20000"])
def test_kth_largest_sample_select_path(max_candidates):
    """The sample select (large models; forced here on small ones with LAYERSEL_SPARSE_SAMPLE_MIN=0):
    the same k-th largest as a full sort for every rank, dtype and score kind, with ties, NaN, +-0,
    constant tensors (a crowded bracket) and ranks at both ends (brackets open above or below).
    With room for only 20,000 candidates, a crowded bracket overflows a thread's region and the
    radix passes answer instead."""
    code = (
        "import torch, layersel_ext\n"
        "from layersel_ext import ops, _torch_ops\n"
        "g = torch.Generator().manual_seed(5)\n"
        "def model(dt):\n"
        "    a = torch.randn(150001, generator=g) * 50\n"
        "    a[::97] = float('nan') if dt.is_floating_point else 0\n"
        "    a[1::89] = -0.0\n"
        "    b = torch.full((70000,), 3.0)\n"
        "    c = torch.randint(-4, 4, (60000,), generator=g).float()\n"
        "    out = [t.to(dt) for t in (a, b, c)]\n"
        "    if dt == torch.float32:  # a float32 model's integer buffers, compared in float32 like the scores\n"
        "        out += [torch.randint(-30, 30, (5000,), generator=g), torch.tensor(7), torch.randint(0, 3, (9,), generator=g).int()]\n"
        "    return out\n"
        "for dt in (torch.float32, torch.float64, torch.int64, torch.int32):\n"
        "    xs, ys = model(dt), model(dt)\n"
        "    n = sum(x.numel() for x in xs)\n"
        "    sd = dt if dt.is_floating_point else torch.int64  # the op's integer score dtype\n"
        "    for kind in range(6):\n"
        "        for k in (1, 2, 137, n // 100, n // 10, n // 2, n - 5000, n - 1, n):\n"
        "            got = torch.ops.layersel.kth_largest_score(xs, ys, kind, k, sd)\n"
        "            want = _torch_ops.kth_largest_score(xs, ys, kind, k, sd)\n"
        "            assert torch.equal(got, want) or (got.isnan() and want.isnan()), (dt, kind, k, got, want)\n"
        "print('ok')\n"
    )
    env = {"LAYERSEL_SPARSE_MAX_CANDIDATES": max_candidates} if max_candidates else {}
    run_with_env(code, LAYERSEL_SPARSE_SAMPLE_MIN="0", **env)


SPARSE_SELECT_CHECK = (
    "import torch, layersel_ext\n"
    "from layersel_ext import _torch_ops\n"
    "from layersel_ext.sparse_coo import _comparison_threshold\n"
    "g = torch.Generator().manual_seed(6)\n"
    "def model(dt, shift, nan_every):\n"
    "    a = torch.randn(150001, generator=g) * 50\n"
    "    a[::nan_every] = float('nan')\n"
    "    a[1::89] = -0.0\n"
    "    a[2::61] = 0.0\n"
    "    b = torch.full((70000,), 3.0) + shift\n"
    "    c = torch.randint(-4, 4, (300, 200), generator=g).float()\n"
    "    out = [t.to(dt) for t in (a, b, c)]\n"
    "    if dt == torch.float32:  # a float32 model's integer buffers, compared in float32 like the scores\n"
    "        out += [torch.randint(-30, 30, (5000,), generator=g), torch.tensor(7), torch.randint(0, 3, (9,), generator=g).int()]\n"
    "    return out\n"
    "for dt, nan_every in [(dt, e) for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16) for e in (97, 20011)]:\n"
    "    xs, ys = model(dt, 0.0, nan_every), model(dt, 1.0, nan_every)\n"
    "    ys[1] = xs[1].clone()  # a frozen tensor: zero drift\n"
    "    n = sum(x.numel() for x in xs)\n"
    "    for kind in range(6):\n"
    "        for k in (1, 3, 41, 137, 300, n // 100, n // 10, n // 2, n - 5000, n):\n"
    "            got_v, got_i = torch.ops.layersel.sparse_select(xs, ys, kind, k, dt)\n"
    "            kth = _torch_ops.kth_largest_score(xs, ys, kind, k, dt).item()\n"
    "            thresholds = [_comparison_threshold(kth, x.dtype) for x in xs]  # as sparse_coo's two steps\n"
    "            want_v, want_i = _torch_ops.sparse_extract(xs, ys, kind, thresholds)\n"
    "            for a, b in zip(got_v, want_v):\n"
    "                assert a.dtype == b.dtype and torch.equal(a, b), (dt, kind, k)\n"
    "            for a, b in zip(got_i, want_i):\n"
    "                assert torch.equal(a, b), (dt, kind, k)\n"
    "print('ok')\n"
)


@compiled_only
@pytest.mark.parametrize("sample_min", ["0", "default"])
def test_sparse_select_equals_kth_then_extract(sample_min):
    """The one-pass op (the sample select's pass marks; LAYERSEL_SPARSE_SAMPLE_MIN=0 forces it on a
    small model) and its fallback (small models, a threshold of 0 or NaN, a missed bracket): what the
    k-th largest and sparse_extract give, for four float dtypes, every score kind, NaN (dense, or a
    few inside the bracket of a small k: never kept), +-0, zeros, ties, a frozen tensor, ranks 1..n."""
    env = {"LAYERSEL_SPARSE_SAMPLE_MIN": "0"} if sample_min == "0" else {}
    run_with_env(SPARSE_SELECT_CHECK, **env)


@compiled_only
def test_sparse_select_refuses_what_its_comparison_would_change():
    """One floating score dtype for every tensor (float32: integer tensors too, compared in float32 as
    the keys order them); anything else is refused by the op and left to the two ops by the wrapper."""
    xs = [torch.randn(5), torch.randn(3, dtype=torch.float64)]
    with pytest.raises(TypeError, match="every tensor must be"):
        torch.ops.layersel.sparse_select(xs, xs, 1, 2, torch.float32)
    assert ops.sparse_select(xs, xs, 1, 2) is None
    mixed = [torch.randn(5, dtype=torch.float64), torch.arange(6)]  # float64 scores: ints compare in float32
    with pytest.raises(TypeError, match="every tensor must be"):
        torch.ops.layersel.sparse_select(mixed, mixed, 1, 2, torch.float64)
    assert ops.sparse_select(mixed, mixed, 1, 2) is None
    with pytest.raises(TypeError, match="not floating point"):
        torch.ops.layersel.sparse_select([torch.arange(6)], [torch.arange(6)], 1, 2, torch.int64)
    assert ops.sparse_select([torch.arange(6)], [torch.arange(6)], 1, 2) is None  # integer scores: two ops
    buffers = [torch.randn(5), torch.arange(6)]  # a float32 model with an int64 buffer: one go
    assert ops.sparse_select(buffers, [torch.zeros(5), torch.zeros(6, dtype=torch.int64)], 1, 2) is not None


def select_case(dt: torch.dtype, shift: float, seed: int = 6) -> list[Tensor]:
    """NaN, +-0, zeros, ties (a constant tensor), a 2-d integer-valued tensor, a 4-d one, several
    chunks (on CUDA 4,096 elements each at this size, chunk_for_bandwidth) and a partial last step
    (1,024) in a tensor; float32: integer buffers, a 0-d one and an empty one too."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(150001, generator=g) * 50
    a[::97] = float("nan")
    a[1::89] = -0.0
    a[2::61] = 0.0
    b = torch.full((70000,), 3.0) + shift
    c = torch.randint(-4, 4, (300, 200), generator=g).float()
    out = [t.to(dt) for t in (a, b, c, torch.randn(3, 1, 2, 5, generator=g))]
    if dt == torch.float32:
        out += [torch.randint(-30, 30, (5000,), generator=g), torch.tensor(7), torch.zeros(0, 4)]
    return out


@requires_cuda
@compiled_only
@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_sparse_select_equals_cpu(dt):
    """The CUDA one-go op (the threshold from the key on the device) and the two CUDA ops give the
    CPU op's values and indices (the CPU op equals fl4health: the tests above), every kind, ranks 1..n."""
    xs, ys = select_case(dt, 0.0), select_case(dt, 1.0)
    ys[1] = xs[1].clone()  # a frozen tensor: zero drift
    gx, gy = [x.cuda() for x in xs], [y.cuda() for y in ys]
    n = sum(x.numel() for x in xs)
    for kind in range(6):
        for k in (1, 3, 41, 137, 300, n // 100, n // 10, n // 2, n - 5000, n):
            want_v, want_i = torch.ops.layersel.sparse_select(xs, ys, kind, k, dt)
            got_v, got_i = torch.ops.layersel.sparse_select(gx, gy, kind, k, dt)
            kth = ops.kth_largest_score(gx, gy, kind, k, dt)
            assert torch.equal(kth, ops.kth_largest_score(xs, ys, kind, k, dt)) or kth.isnan(), (kind, k)
            two_v, two_i = torch.ops.layersel.sparse_extract(gx, gy, kind, [float(kth)] * len(xs))
            for w, g, t in zip(want_v, got_v, two_v):
                assert g.device.type == "cuda" and torch.equal(w, g.cpu()) and torch.equal(w, t.cpu()), (kind, k)
            for w, g, t in zip(want_i, got_i, two_i):
                assert torch.equal(w, g.cpu()) and torch.equal(w, t.cpu()), (kind, k)


@requires_cuda
@compiled_only
def test_cuda_sparse_select_small_case():
    """A short run of the CUDA one-go op for compute-sanitizer (the GPU runbook): three chunks,
    a partial step, an integer buffer, ties, against the CPU op."""
    xs, ys = select_case(torch.float32, 0.0, 3), select_case(torch.float32, 1.0, 3)
    n = sum(x.numel() for x in xs)
    for k in (1, n // 100, n):
        want_v, want_i = torch.ops.layersel.sparse_select(xs, ys, 2, k, torch.float32)
        got_v, got_i = torch.ops.layersel.sparse_select(
            [x.cuda() for x in xs], [y.cuda() for y in ys], 2, k, torch.float32
        )
        assert all(torch.equal(w, g.cpu()) for w, g in zip(want_v, got_v))
        assert all(torch.equal(w, g.cpu()) for w, g in zip(want_i, got_i))
