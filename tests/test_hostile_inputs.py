"""What a hostile tester found (issue 12): racing writers, swapped storages, extreme drifts,
8-bit and bool scores, odd state_dict entries, odd arguments. Each case: a fix and this test."""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fl4health_criteria
from torch import nn

import layersel_ext as L
from layersel_ext import _torch_ops, ops
from layersel_ext._score_kinds import ScoreKind
from layersel_ext.sparse_coo import select_sparse_parameters

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# ------------------------------------------------------------------------------ memory safety

RACE = """
    import threading, time, torch, layersel_ext as L
    from torch import nn
    from layersel_ext.sparse_coo import select_sparse_parameters
    L.set_backend("{backend}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512), nn.Linear(512, 64))
    initial = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512), nn.Linear(512, 64))
    stop = threading.Event()

    def racer():
        with torch.no_grad():
            while not stop.is_set():
                for p in model.parameters():
                    {racer}

    def call():
        {call}

    t = threading.Thread(target=racer)
    t.start()
    calls, deadline = 0, time.monotonic() + 3.0
    try:
        while time.monotonic() < deadline or calls < 20:
            call()
            calls += 1
    finally:
        stop.set()
        t.join()
    print("ok", calls)
"""


def survives_race(backend_name: str, racer: str, call: str) -> None:
    """Runs ``call`` for 3 s (and 20 calls at least) while another thread runs ``racer`` on each parameter
    ``p``, in a subprocess: a crash (heap corruption, use after free) fails the test instead of pytest."""
    if backend_name == "compiled" and ops.backend() != "compiled":
        pytest.skip("compiled module not loaded")
    r = run_python(RACE.format(backend=backend_name, racer=racer, call=call))
    assert r.returncode == 0 and r.stdout.startswith("ok"), (r.returncode, r.stdout, r.stderr[-3000:])


@pytest.mark.parametrize("backend_name", ["compiled", "torch"])
def test_sparse_selection_survives_a_racing_in_place_writer(backend_name):
    """The weights change between the counting and the writing pass: the answer may be stale,
    memory is never corrupted."""
    survives_race(
        backend_name,
        racer="p.add_(torch.randn_like(p))",
        call="""values, (indices, shapes, names) = select_sparse_parameters(
            model, initial, 0.3, L.largest_magnitude_change_scores)
        for v, i, s in zip(values, indices, shapes):
            assert len(v) == len(i) and (i >= 0).all() and (i < s).all()""",
    )


@pytest.mark.parametrize("backend_name", ["compiled", "torch"])
def test_scores_survive_a_thread_swapping_storages(backend_name):
    """``p.data = ...`` from another thread while the kernels read p: they hold the old storage."""
    survives_race(
        backend_name,
        racer="p.data = torch.randn(p.shape)",
        call="""s = L.largest_magnitude_change_scores(model, initial)
        d = L.layer_drift_norms(model, initial)
        assert len(s) == len(d) == 6""",
    )


def test_state_items_hold_their_own_storage():
    from layersel_ext._model_state import state_items

    layer = nn.Linear(3, 2)
    before = [t for _, t in state_items(layer)]
    weight = before[0].clone()
    layer.weight.data = torch.zeros(2, 3)  # swaps the parameter's storage
    assert torch.equal(before[0], weight)  # ours still reads the old one
    assert not before[0].requires_grad


def _odd_state_models() -> list[nn.Module]:
    """Modules whose state_dict walk has corners: None parameters and buffers, non-persistent buffers,
    empty and nested children, a None child, a hook, an overridden _save_to_state_dict, extra state."""

    class Extra(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def get_extra_state(self):
            return {"step": 1}

        def set_extra_state(self, state) -> None:
            pass

    class Saves(nn.Linear):
        def _save_to_state_dict(self, destination, prefix, keep_vars):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            destination.pop(prefix + "bias")

    odd = nn.Module()
    odd.register_parameter("p", None)
    odd.register_buffer("kept", torch.arange(3))
    odd.register_buffer("skipped", torch.ones(2), persistent=False)
    odd.register_buffer("missing", None)
    odd.add_module("empty", nn.Sequential())
    odd.add_module("gone", None)
    odd.add_module("deep", nn.Sequential(nn.Sequential(nn.Linear(3, 1, bias=False), nn.BatchNorm1d(1))))
    hooked = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    hooked[1]._register_state_dict_hook(lambda module, state, prefix, meta: state.pop(prefix + "bias"))
    return [odd, hooked, nn.Sequential(nn.Linear(2, 2), Saves(2, 3)), nn.Sequential(Extra()), nn.Module()]


@pytest.mark.parametrize("which", range(5))
def test_state_walk_twins_give_state_dict(which, backend):
    """The C++ walk (_C.state_items, compiled backend) and the Python one (_collect) give
    state_dict()'s names and storages, detached; each hands customised modules to state_dict()."""
    from layersel_ext import _model_state

    model = _odd_state_models()[which]
    helpers = ops.compiled_helpers()
    if helpers is not None:  # the hook, _save_to_state_dict and extra state go to state_dict()
        bases = _model_state._BASE_STATE_DICT, _model_state._BASE_SAVE, _model_state._BASE_EXTRA_STATE
        assert (helpers.state_items(model, *bases) is None) == (which in (1, 2, 3))
    expected = list(model.state_dict().items())
    tensors_only = all(isinstance(v, torch.Tensor) for _, v in expected)
    if not tensors_only:
        with pytest.raises(TypeError, match="not a tensor"):
            _model_state.state_lists(model)
        return
    names, tensors = _model_state.state_lists(model)
    assert names == [n for n, _ in expected]
    for t, (_, ref) in zip(tensors, expected):
        assert t.data_ptr() == ref.data_ptr() and t.shape == ref.shape and not t.requires_grad
    assert [n for n, _ in _model_state.state_items(model)] == names


def test_state_walk_follows_an_ordered_dicts_order_and_refuses_non_tensors(backend):
    """An OrderedDict of parameters (older pickles) iterates in its own order, which state_dict()
    follows; a non-tensor buffer fails as state_dict() fails on it (both walks hand both to it)."""
    from collections import OrderedDict

    from layersel_ext import _model_state

    m = nn.Linear(2, 2)
    m._parameters = OrderedDict(m._parameters)
    m._parameters.move_to_end("weight")
    assert _model_state.state_lists(m)[0] == list(m.state_dict()) == ["bias", "weight"]
    odd = nn.Linear(2, 2)
    odd._buffers["x"] = 3
    with pytest.raises(AttributeError, match="'int' object has no attribute 'detach'"):
        odd.state_dict()  # what fl4health's own call meets
    with pytest.raises(AttributeError, match="'int' object has no attribute 'detach'"):
        _model_state.state_lists(odd)


# ------------------------------------------------------------------------------ drift numerics


def fl4health_drift(a: torch.Tensor, b: torch.Tensor) -> float:
    F = fl4health_criteria()
    return float(F._calculate_drift_norm(a, b, False))


class One(nn.Module):
    def __init__(self, t: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("t", t)


def our_drift(a: torch.Tensor, b: torch.Tensor) -> float:
    return L.layer_drift_norms(One(a), One(b), normalize=False)["t"]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1023, 1024, 1025, 65536, 65537])
def test_drift_squares_underflow_per_element_as_fl4health(n, backend):
    # 1e-30 squared underflows to 0 in float32 for every element, whatever the length; one element
    # is its absolute value (torch's norm of one element), in fl4health and here.
    a = torch.full((n,), 1e-30)
    want = np.float32(1e-30) if n == 1 else 0.0
    assert our_drift(a, torch.zeros(n)) == want == fl4health_drift(a, torch.zeros(n))


@pytest.mark.parametrize("value", [1e-30, 3.3, 1e19, 3e38, float("inf"), float("nan")])
def test_one_element_drift_is_the_absolute_value(value, backend):
    for shape in ((), (1,), (1, 1)):
        a, z = torch.full(shape, value), torch.zeros(shape)
        ours, ref = our_drift(a, z), fl4health_drift(a, z)
        assert (ours == ref) or (np.isnan(ours) and np.isnan(ref)), (shape, ours, ref)


@pytest.mark.parametrize("value", [1e19, 3e38])
def test_drift_squares_overflow_to_inf_as_fl4health(value, backend):
    a = torch.full((4,), value)
    z = torch.zeros(4)
    assert our_drift(a, z) == fl4health_drift(a, z) == float("inf")


def test_drift_total_above_float32_max_is_inf(backend):
    # Each square is finite in float32 (1e37), their sum is not: fl4health's float32 norm gives inf.
    a = torch.full((100,), 1e37**0.5 * 1.0)
    z = torch.zeros(100)
    assert fl4health_drift(a, z) == float("inf")
    assert our_drift(a, z) == float("inf")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int16, torch.int32, torch.int64])
def test_drift_large_differences_every_dtype(dtype, backend):
    if dtype.is_floating_point:
        a = torch.tensor([1.8e19, -3.0e19, 7.0], dtype=dtype)
    else:
        info = torch.iinfo(dtype)
        a = torch.tensor([info.max, info.min, 12345 % info.max], dtype=dtype)
    b = torch.flip(a, [0])
    assert our_drift(a, b) == pytest.approx(fl4health_drift(a, b), rel=1e-6)


def test_drift_same_bits_for_misaligned_views_lengths_and_threads(backend):
    g = torch.Generator().manual_seed(0)
    big_a, big_b = torch.randn(3 * 65536 + 40, generator=g), torch.randn(3 * 65536 + 40, generator=g)
    want = None
    for offset in (0, 1, 2, 3, 5):  # storage offsets of 4..20 bytes: misaligned for 16-byte loads
        a, b = big_a[offset : offset + 3 * 65536 + 7], big_b[offset : offset + 3 * 65536 + 7]
        got = ops.drift_sq_norms([a, a.clone()], [b, b.clone()])
        assert got[0].item() == got[1].item()  # the view and an aligned copy of the same data
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one = ops.drift_sq_norms([a], [b])
        finally:
            torch.set_num_threads(previous)
        assert one[0].item() == got[0].item()
        if offset == 0:
            want = got[0].item()
    assert want is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_drift_rounded_to_float32_is_the_same_on_both_backends(dtype):
    if ops.backend() != "compiled":
        pytest.skip("compiled module not loaded")
    g = torch.Generator().manual_seed(1)
    sizes = [1, 15, 16, 17, 1025, 65537, 200_003]
    xs = [(torch.randn(n, generator=g) * 100).to(dtype) for n in sizes]
    ys = [(torch.randn(n, generator=g) * 100).to(dtype) for n in sizes]
    compiled = torch.ops.layersel.drift_sq_norms(xs, ys).numpy().astype(np.float32)
    twin = _torch_ops.drift_sq_norms(xs, ys).numpy().astype(np.float32)
    np.testing.assert_array_equal(compiled, twin)


# ------------------------------------------------------------------------------ sparse selection


def test_meta_initial_model_is_refused_by_the_torch_backend_too(backend):
    m = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="meta"):
        select_sparse_parameters(m, copy.deepcopy(m).to("meta"), 0.5, L.largest_increase_in_magnitude_scores)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_kth_largest_of_small_integer_scores(dtype, backend):
    x = torch.tensor([5, 100, 7, 0, 100, 3], dtype=dtype)
    for k in range(1, 7):
        want = torch.sort(x, descending=True)[0][k - 1]
        got = ops.kth_largest_score([x], [], 0, k, dtype)
        assert got.dtype == dtype and got.item() == want.item()
    x8 = torch.tensor([5, 200, 7], dtype=torch.uint8)
    assert ops.kth_largest_score([x8], [], 0, 1, torch.uint8).item() == 200


@pytest.mark.parametrize("fn", list(L.SCORE_FUNCTION_NAMES))
def test_eight_bit_models_match_fl4health(fn, backend):
    F = fl4health_criteria()
    from fl4health.parameter_exchange.sparse_coo_parameter_exchanger import SparseCooParameterExchanger as Ref

    class Bytes(nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("u", torch.randint(0, 256, (30,), generator=g).to(torch.uint8))
            self.register_buffer("s", torch.randint(-128, 128, (4, 5), generator=g).to(torch.int8))
            self.register_buffer("only_u", torch.randint(0, 256, (7,), generator=g).to(torch.uint8))

    for model, initial in ((Bytes(0), Bytes(1)), (Bytes(2), Bytes(2))):
        for sparsity in (0.02, 0.1, 0.3, 0.7, 1.0):
            ref = Ref(sparsity, getattr(F, fn)).select_parameters(model, initial)
            ours = select_sparse_parameters(model, initial, sparsity, getattr(L, fn))
            assert ours[1][2] == ref[1][2]
            for a, b in zip(ref[0] + ref[1][0] + ref[1][1], ours[0] + ours[1][0] + ours[1][1]):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(a, b)


def test_bool_custom_scores_select_as_fl4health(backend):
    fl4health_criteria()
    from fl4health.parameter_exchange.sparse_coo_parameter_exchanger import SparseCooParameterExchanger as Ref

    def positive(model, initial_model):
        return {n: t > 0 for n, t in model.state_dict().items()}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))
    for sparsity in (0.1, 0.5, 0.9):
        ref = Ref(sparsity, positive).select_parameters(model, None)
        ours = select_sparse_parameters(model, None, sparsity, positive)
        assert ours[1][2] == ref[1][2]
        for a, b in zip(ref[0] + ref[1][0], ours[0] + ours[1][0]):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ clear errors


def test_sparse_buffer_is_refused_by_name(backend):
    m = nn.Linear(3, 2)
    m.register_buffer("adjacency", torch.eye(3).to_sparse())
    m0 = copy.deepcopy(m)
    with pytest.raises(TypeError, match=r"layer 'adjacency' is a torch.sparse_coo tensor"):
        L.select_layers_by_percentage(0.5, True, True, m, m0)
    with pytest.raises(TypeError, match=r"layer 'adjacency' is a torch.sparse_coo tensor"):
        L.largest_final_magnitude_scores(m, None)
    with pytest.raises(TypeError, match=r"layer 'adjacency' is a torch.sparse_coo tensor"):
        select_sparse_parameters(m, m0, 0.5, L.largest_magnitude_change_scores)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_quantized_buffer_is_refused_by_name_in_sparse_selection(backend):
    """A qint8 buffer: torch has no type promotion for it, so the sparse selection names the layer
    before promoting the score dtypes, as the other functions do; custom qint8 scores too."""
    m = nn.Linear(3, 2)
    m.register_buffer("q", torch.quantize_per_tensor(torch.rand(4), 0.1, 0, torch.qint8))
    m0 = copy.deepcopy(m)
    for fn in (L.largest_magnitude_change_scores, L.largest_final_magnitude_scores):
        with pytest.raises(TypeError, match=r"select_sparse_parameters: layer 'q': dtype torch.qint8 is not supported"):
            select_sparse_parameters(m, m0, 0.5, fn)

    def quantized_scores(model, initial_model):
        return {"weight": torch.quantize_per_tensor(torch.rand(2, 3), 0.1, 0, torch.qint8), "bias": torch.rand(2)}

    with pytest.raises(TypeError, match=r"layer 'weight': the scores' dtype torch.qint8 is not supported"):
        select_sparse_parameters(nn.Linear(3, 2), None, 0.5, quantized_scores)


def test_non_tensor_state_entry_is_refused_by_name():
    class WithExtra(nn.Linear):
        def get_extra_state(self):
            return {"step": 3}

        def set_extra_state(self, state):
            pass

    m = WithExtra(3, 2)
    with pytest.raises(TypeError, match=r"layer '_extra_state': the state_dict entry is a dict, not a tensor"):
        L.select_layers_by_threshold(0.1, True, True, m, copy.deepcopy(m))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsupported_integer_dtypes_name_the_layer(dtype, backend):
    m = nn.Linear(3, 2)
    m.register_buffer("counter", torch.zeros(4, dtype=dtype))
    with pytest.raises(TypeError, match=rf"layer 'counter': dtype {dtype} is not supported"):
        L.layer_drift_norms(m, copy.deepcopy(m))
    with pytest.raises(TypeError, match=rf"layer 'counter': dtype {dtype} is not supported"):
        L.largest_final_magnitude_scores(m, None)


def test_complex_is_refused_without_a_false_claim(backend):
    m = nn.Linear(3, 2).to(torch.complex64)
    with pytest.raises(TypeError, match=r"not supported by layersel_ext \(fl4health takes the real part"):
        L.layer_drift_norms(m, copy.deepcopy(m))


class MaskedScores(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight_scores = nn.Parameter(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_mask_dtypes_on_every_backend(dtype, backend):
    masks, _ = L.select_scores_and_sample_masks(MaskedScores(), None, seed=3, mask_dtype=dtype)
    want, _ = L.select_scores_and_sample_masks(MaskedScores(), None, seed=3)
    assert masks[0].dtype == torch.empty(0, dtype=dtype).numpy().dtype
    np.testing.assert_array_equal(masks[0].astype(np.int64), want[0])


def test_mask_dtype_none_is_refused():
    with pytest.raises(TypeError, match="mask_dtype must be an integer dtype, got None"):
        L.select_scores_and_sample_masks(MaskedScores(), None, mask_dtype=None)


@pytest.mark.parametrize("seed", [1.7, "12", True, np.float64(3.0)])
def test_non_integer_seeds_are_refused(seed):
    with pytest.raises(TypeError, match="seed must be an integer"):
        L.select_scores_and_sample_masks(MaskedScores(), None, seed=seed)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_out_of_range_seeds_are_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        L.select_scores_and_sample_masks(MaskedScores(), None, seed=seed)


def test_numpy_integer_seed_is_accepted():
    a, _ = L.select_scores_and_sample_masks(MaskedScores(), None, seed=np.int64(9))
    b, _ = L.select_scores_and_sample_masks(MaskedScores(), None, seed=9)
    np.testing.assert_array_equal(a[0], b[0])


def test_score_outputs_can_be_resized_like_fl4health(backend):
    F = fl4health_criteria()
    m = nn.Sequential(nn.Linear(300, 300), nn.Linear(300, 4000))  # > 8 MB: the cached-block path
    for ours, ref in ((L.largest_final_magnitude_scores(m, None), F.largest_final_magnitude_scores(m, None)),):
        for name in ("0.weight", "1.weight", "1.bias"):
            want = ref[name].clone().reshape(-1)
            got = ours[name]
            got.resize_(got.numel() + 1000)
            assert torch.equal(got[: want.numel()], want)
            got.resize_(3)
            assert torch.equal(got, want[:3])


def test_torch_backend_reuses_only_released_output_blocks(monkeypatch):
    # The torch twin of the compiled output cache: an output block comes back once nothing holds it
    # (no tensor, view or numpy array of it), and never while a caller still holds any of those.
    monkeypatch.delenv("LAYERSEL_OUTPUT_CACHE_MB", raising=False)
    monkeypatch.setattr(_torch_ops, "_OUTPUT_BLOCKS", _torch_ops._OutputBlocks())  # no blocks of other tests
    m = nn.Linear(1000, 3000)  # 12 MB of weights: above the cache's smallest block
    monkeypatch.setattr(ops, "_backend", "torch")
    first = L.largest_final_magnitude_scores(m, None)["weight"]
    held = first.numpy()  # a numpy array of the output keeps its block in use
    want = held.copy()
    address = first.data_ptr()
    del first
    second = L.largest_final_magnitude_scores(m, None)["weight"]
    assert second.data_ptr() != address
    second.fill_(-1.0)
    np.testing.assert_array_equal(held, want)
    del held, second
    third = L.largest_final_magnitude_scores(m, None)["weight"]
    assert third.data_ptr() == address  # the smallest idle block that fits: the first one
    assert torch.equal(third, m.weight.detach().abs())
    monkeypatch.setenv("LAYERSEL_OUTPUT_CACHE_MB", "0")  # the cache off: fresh memory, same answer
    del third
    off = L.largest_final_magnitude_scores(m, None)["weight"]
    assert off.data_ptr() != address and torch.equal(off, m.weight.detach().abs())


# ------------------------------------------------------------------------------ torch.compile


def test_ops_wrappers_compile_with_fullgraph():
    if ops.backend() != "compiled":
        pytest.skip("compiled module not loaded")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(100, generator=g), torch.randn(3, 7, generator=g)]
    ys = [torch.randn(100, generator=g), torch.randn(3, 7, generator=g)]

    def body(xs, ys):
        return (
            ops.drift_sq_norms(xs, ys),
            ops.scores(xs, ys, ScoreKind.LARGEST_MAGNITUDE_CHANGE),
            ops.sample_masks(xs, 5, torch.int64),
            ops.sample_masks(xs, 5, torch.int64, key_by_scores=True),
            ops.sample_mask_bits(xs, 5),
            ops.kth_largest_score(xs, ys, ScoreKind.SMALLEST_MAGNITUDE_CHANGE, 10, torch.float32),
        )

    eager = body(xs, ys)
    torch._dynamo.reset()
    compiled = torch.compile(body, fullgraph=True, backend="eager")(xs, ys)
    assert torch.equal(compiled[0], eager[0])
    assert all(torch.equal(a, b) for a, b in zip(compiled[1], eager[1]))
    assert torch.equal(compiled[2], eager[2]) and torch.equal(compiled[3], eager[3])
    assert torch.equal(compiled[4], eager[4]) and torch.equal(compiled[5], eager[5])


# Each torch.ops.layersel op called directly (not through the wrappers) in a fullgraph trace: its
# fake kernel must describe it (sparse_extract's outputs have data-dependent sizes).
_DIRECT_OPS = {
    "drift_sq_norms": lambda xs, ys: torch.ops.layersel.drift_sq_norms(xs, ys),
    "scores": lambda xs, ys: torch.ops.layersel.scores(xs, ys, ScoreKind.LARGEST_INCREASE_IN_MAGNITUDE),
    "sample_masks": lambda xs, ys: torch.ops.layersel.sample_masks(xs, 7, torch.uint8, True),
    "sample_mask_bits": lambda xs, ys: torch.ops.layersel.sample_mask_bits(xs, 7, True),
    "score_fingerprint": lambda xs, ys: torch.ops.layersel.score_fingerprint(xs),
    "kth_largest_score": lambda xs, ys: torch.ops.layersel.kth_largest_score(
        xs, ys, ScoreKind.SMALLEST_FINAL_MAGNITUDE, 5, torch.float32
    ),
    "sparse_extract": lambda xs, ys: torch.ops.layersel.sparse_extract(
        xs, ys, ScoreKind.LARGEST_MAGNITUDE_CHANGE, [0.5, 0.5]
    ),
    "sparse_select": lambda xs, ys: torch.ops.layersel.sparse_select(
        xs, ys, ScoreKind.LARGEST_MAGNITUDE_CHANGE, 9, torch.float32
    ),
}


def test_direct_ops_cover_every_registered_op():
    from layersel_ext import _loader

    assert set(_DIRECT_OPS) == set(_loader.OPS)


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for part in out for t in _flatten(part)]


@pytest.mark.parametrize("op", sorted(_DIRECT_OPS))
def test_each_op_compiles_with_fullgraph(op):
    if ops.backend() != "compiled" or (op, "CPU") not in ops._KERNELS:
        pytest.skip("no compiled CPU kernel")
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available")
    try:
        dynamo = importlib.import_module("torch._dynamo")
    except (ImportError, RuntimeError) as exc:  # e.g. a Python that this torch's dynamo does not support
        pytest.skip(f"torch.compile is not available: {exc}")
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(100, generator=g), torch.randn(3, 7, generator=g)]
    ys = [torch.randn(100, generator=g), torch.randn(3, 7, generator=g)]
    fn = _DIRECT_OPS[op]
    eager = _flatten(fn(xs, ys))
    dynamo.reset()
    with dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = _flatten(torch.compile(fn, fullgraph=True, backend="eager")(xs, ys))
    assert len(compiled) == len(eager)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))


def test_public_score_function_compiles_with_fullgraph():
    """The state walk traces under torch.compile (the C++ detach is for eager calls only)."""
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available")
    if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14):
        # torch 2.6's dynamo stops earlier, at list.count in _shard_layout.has_dtensor, with or without
        # the C++ detach: a full graph of a public function is checked where dynamo gets through.
        pytest.skip("dynamo before torch 2.14 cannot trace the whole state walk (checked on 2.14)")
    try:
        dynamo = importlib.import_module("torch._dynamo")
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"torch.compile is not available: {exc}")
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))

    def fn(x):
        return x + sum(v.float().sum() for v in L.largest_final_magnitude_scores(m, None).values())

    x = torch.ones(2)
    dynamo.reset()
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="eager")(x), fn(x))
