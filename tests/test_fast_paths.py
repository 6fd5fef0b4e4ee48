"""The per-tensor fast paths: tensor headers made in C++ (``_C.detach_all``, ``_C.views_like``,
``_C.flatten_dense``) and
the batched device-to-host transfer of layer selection. Each must give exactly what the slow path
it replaces gives (detach(); a slice and a view; ``t.cpu().numpy()``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from torch import nn

import layersel_ext as L
from layersel_ext import _host, ops
from layersel_ext._loader import COMPILED

needs_compiled = pytest.mark.skipif(COMPILED is None, reason="compiled module not loaded")


def odd_tensors(device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 4, generator=g),
        torch.tensor(7, dtype=torch.int64),  # 0-d
        torch.zeros(0, 3, dtype=torch.float16),  # empty, 2-d
        torch.randn(5, generator=g) > 0,  # bool
        torch.randn(2, 3, generator=g).to(torch.float64),
        torch.randint(-9, 9, (2, 2, 2), generator=g),
        torch.randn(4, generator=g).to(torch.complex64),
        torch.randn(6, 2, generator=g)[:, 1],  # a strided view
    ]


@needs_compiled
def test_detach_all_is_detach():
    layer = nn.Linear(4, 3)
    bn = nn.BatchNorm1d(3)
    tensors = [layer.weight, layer.bias, bn.running_mean, bn.num_batches_tracked, *odd_tensors()]
    out = COMPILED.detach_all(tensors)
    for t, d in zip(tensors, out):
        ref = t.detach()
        assert type(d) is torch.Tensor and not d.requires_grad and d.grad_fn is None
        assert (d.dtype, d.shape, d.stride(), d.storage_offset()) == (
            ref.dtype,
            ref.shape,
            ref.stride(),
            ref.storage_offset(),
        )
        assert d.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        assert torch.equal(d, ref)
    # the version counter is shared, as detach()'s: an in-place update of the source is seen
    w = COMPILED.detach_all([layer.weight])[0]
    before = w._version
    with torch.no_grad():
        layer.weight.add_(1)
    assert w._version == before + 1
    # and the header holds its own reference to the storage (p.data = ... swaps the parameter's)
    kept = w.clone()
    layer.weight.data = torch.zeros(3, 4)
    assert torch.equal(w, kept)


@needs_compiled
def test_detach_all_leaves_subclasses_and_sparse_to_detach():
    sparse = torch.eye(3).to_sparse()
    out = COMPILED.detach_all([sparse])[0]
    assert out.is_sparse and torch.equal(out.to_dense(), torch.eye(3))


@needs_compiled
def test_views_like_equals_slice_and_view():
    like = odd_tensors()
    like = [t for t in like if t.dtype != torch.complex64] + [like[6]]  # interleaved dtypes, in any order
    buffers = {}
    for t in like:
        buffers.setdefault(t.dtype, []).append(t.reshape(-1))
    flat = [torch.cat(parts) for parts in buffers.values()][::-1]  # buffer order does not matter
    ops.set_backend("torch")
    try:
        slow = ops.split_grouped(flat, like)
    finally:
        ops.set_backend("compiled")
    fast = ops.split_grouped(flat, like)
    assert len(fast) == len(slow) == len(like)
    for f, s, t in zip(fast, slow, like):
        assert (
            (f.dtype, f.shape, f.stride())
            == (s.dtype, s.shape, s.stride())
            == (t.dtype, t.shape, t.contiguous().stride())
        )
        assert torch.equal(f, s) and torch.equal(f, t)
        if f.numel():
            assert f.data_ptr() == s.data_ptr()  # a view of the buffer, not a copy


@needs_compiled
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_flatten_dense_equals_torchs(device):
    """_C.flatten_dense is torch's flatten_dense_tensors: contiguous tensors (offset views, 0-d,
    empty) through flat headers, a transposed one and one needing grad through reshape."""
    base = torch.randn(40, device=device)
    leaf = torch.randn(3, device=device, requires_grad=True)
    for dtype in (torch.float32, torch.float64, torch.int64):
        ts = [
            t.to(dtype)
            for t in (
                torch.randn(3, 4, device=device),
                torch.tensor(2.0, device=device),
                torch.zeros(0, 5, device=device),
                torch.randn(4, 3, device=device).t(),
            )
        ] + [base.to(dtype)[7:19].view(3, 4)]
        want = torch._C._nn.flatten_dense_tensors(ts)
        got = COMPILED.flatten_dense(ts)
        assert got.dtype == want.dtype and torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(COMPILED.flatten_dense([leaf, base]), torch.cat([leaf.view(-1), base]))
    one = torch.randn(3, 4, device=device)
    assert COMPILED.flatten_dense([one]).data_ptr() == one.data_ptr()  # one tensor: a view, as torch's


@needs_compiled
def test_views_like_refuses_a_layout_that_does_not_add_up():
    with pytest.raises(RuntimeError, match="no buffer of dtype"):
        COMPILED.views_like([torch.zeros(3)], [torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(RuntimeError, match="too small"):
        COMPILED.views_like([torch.zeros(3)], [torch.zeros(2, 2)])
    with pytest.raises(RuntimeError, match="holds 5 elements, the tensors 3"):
        COMPILED.views_like([torch.zeros(5)], [torch.zeros(3)])


def _mixed_model() -> nn.Module:
    """Float32 and float64 parameters, an int64 buffer, a 0-d and an empty buffer."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2).double())
    model.register_buffer("scalar", torch.tensor(2.5))
    model.register_buffer("empty", torch.zeros(0, 2))
    return model


@needs_compiled
def test_held_state_is_a_sequence_of_the_state_dicts_tensors():
    """The compiled walk's HeldTensors read as the list of state_dict() tensors: detached headers on
    the same storages, Python's indexing (negative from the end, IndexError past it), numels, dtypes."""
    from layersel_ext import _model_state

    model = _mixed_model()
    names, held = _model_state.state_lists(model)
    expected = list(model.state_dict().items())
    assert isinstance(held, ops.HELD) and names == [n for n, _ in expected] and len(held) == len(expected)
    for got, (_, ref) in zip(held, expected):
        assert type(got) is torch.Tensor and not got.requires_grad
        assert (got.dtype, got.shape, got.stride(), got.data_ptr()) == (
            ref.dtype,
            ref.shape,
            ref.stride(),
            ref.data_ptr(),
        )
    assert held[-1].data_ptr() == expected[-1][1].data_ptr() and held[0].shape == expected[0][1].shape
    with pytest.raises(IndexError):
        held[len(held)]
    with pytest.raises(IndexError):
        held[-len(held) - 1]
    assert held.numels() == [t.numel() for _, t in expected] == ops.numels(held)
    assert held.dtypes() == [t.dtype for _, t in expected] == ops.dtypes(held)


@needs_compiled
def test_numpy_all_is_numpy():
    """_C.numpy_all's arrays are t.numpy()'s: dtype, shape, strides, the same memory, writeable;
    each keeps its memory alive (its tensor gone, its parameter's storage swapped) and, as after
    t.numpy(), the storage under it can no longer be resized. Held tensors give the same arrays."""
    import gc

    tensors = [t for t in odd_tensors() if t.dtype != torch.bfloat16]
    tensors += [torch.randn(4, 5).t(), torch.randn(3, 2)[1:], torch.zeros(0), torch.randn(2, 3, dtype=torch.complex128)]
    tensors += [torch.arange(6, dtype=dt).view(2, 3) for dt in (torch.uint8, torch.int8, torch.int16, torch.int32)]
    tensors += [torch.randn(5).half(), torch.tensor(True)]
    for t, a in zip(tensors, COMPILED.numpy_all(tensors)):
        ref = t.numpy()
        assert (a.dtype, a.shape, a.strides) == (ref.dtype, ref.shape, ref.strides)
        assert np.array_equal(a, ref) and a.flags.writeable and a.flags.aligned
        if t.numel():
            assert a.ctypes.data == t.data_ptr()
    t = torch.zeros(3)
    (a,) = COMPILED.numpy_all([t])
    a[1] = 5  # zero copy both ways
    assert t[1] == 5
    with pytest.raises(RuntimeError, match="not resizable"):
        t.resize_(1000)
    layer = nn.Linear(3, 2)
    (w,) = COMPILED.numpy_all([layer.weight.detach()])
    kept = w.copy()
    layer.weight.data = torch.zeros(2, 3)
    del layer
    gc.collect()
    assert np.array_equal(w, kept)
    from layersel_ext import _model_state

    model = _mixed_model()
    _, held = _model_state.state_lists(model)
    keep = [4, 0, -1, 2]
    picked = ops.take(held, keep)
    assert isinstance(picked, ops.HELD) and len(picked) == 4 and picked[2].data_ptr() == held[-1].data_ptr()
    with pytest.raises(IndexError):
        ops.take(held, [len(held)])
    for a, b in zip(COMPILED.numpy_all(picked), COMPILED.numpy_all([held[i] for i in keep])):
        assert (a.dtype, a.shape, a.strides, a.ctypes.data) == (b.dtype, b.shape, b.strides, b.ctypes.data)


@needs_compiled
def test_ops_take_held_state_as_they_take_lists():
    """Every op that reads a model gives through _C.call_op (held tensors) what torch.ops gives for
    the same tensors in lists, and refuses the same calls with the same error type and message."""
    from layersel_ext import _model_state

    model, initial = _mixed_model(), _mixed_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    _, xs = _model_state.state_lists(model)
    _, ys = _model_state.state_lists(initial)
    lx, ly = list(xs), list(ys)
    assert torch.equal(ops.drift_sq_norms(xs, ys), ops.drift_sq_norms(lx, ly))
    for kind in range(6):
        for a, b in zip(ops.scores(xs, ys, kind), ops.scores(lx, ly, kind)):
            assert a.dtype == b.dtype and torch.equal(a, b)
        kth = ops.kth_largest_score(xs, ys, kind, 5, torch.float64)
        assert torch.equal(kth, ops.kth_largest_score(lx, ly, kind, 5, torch.float64))
        thresholds = [0.5] * len(lx)
        for got, want in zip(
            ops.sparse_extract(xs, ys, kind, thresholds), ops.sparse_extract(lx, ly, kind, thresholds)
        ):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    floats = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))  # float32 beside an int64 buffer: one go
    _, fx = _model_state.state_lists(floats)
    got, want = ops.sparse_select(fx, None, 0, 7), ops.sparse_select(list(fx), None, 0, 7)
    assert got is not None and want is not None
    assert all(torch.equal(a, b) for a, b in zip(got[0] + got[1], want[0] + want[1]))
    other = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(3), nn.Linear(3, 2).double())
    other.register_buffer("scalar", torch.tensor(2.5))
    other.register_buffer("empty", torch.zeros(0, 2))
    _, zs = _model_state.state_lists(other)
    for call in (lambda a, b: ops.drift_sq_norms(a, b), lambda a, b: ops.scores(a, b, 2)):
        with pytest.raises(ValueError) as by_held:
            call(xs, zs)
        with pytest.raises(ValueError) as by_list:
            call(lx, list(zs))
        assert str(by_held.value) == str(by_list.value) and "shape" in str(by_held.value)
    with pytest.raises(ValueError, match="got 11 model tensors but 1 initial"):
        ops.drift_sq_norms(xs, [torch.zeros(1)])


@needs_compiled
def test_call_op_converts_as_torch_ops_and_leaves_torch_function_to_it():
    """_C.call_op converts arguments by the op's schema (the same error naming the argument, the
    schema's defaults for trailing ones); a TorchFunctionMode still sees the ops of a public
    function (held tensors then go to torch.ops as a list), with the same answer."""
    from torch.overrides import TorchFunctionMode

    from layersel_ext import _model_state

    model = _mixed_model()
    _, held = _model_state.state_lists(model)
    for call in (
        lambda: COMPILED.call_op("scores", held, held, "x"),
        lambda: torch.ops.layersel.scores(list(held), list(held), "x"),
    ):
        with pytest.raises(RuntimeError, match="argument 'kind'"):
            call()
    scores = [torch.randn(3, 4), torch.randn(5)]
    assert torch.equal(
        COMPILED.call_op("sample_masks", scores, 7, torch.uint8),
        torch.ops.layersel.sample_masks(scores, 7, torch.uint8),
    )
    with pytest.raises(TypeError, match="missing argument 'seed'"):
        COMPILED.call_op("sample_masks", scores)
    seen: list[str] = []

    class Seen(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    initial = _mixed_model()
    want = L.layer_drift_norms(model, initial)
    with Seen():
        got = L.layer_drift_norms(model, initial)
    assert list(got) == list(want) and np.array_equal(list(got.values()), list(want.values()), equal_nan=True)
    assert any("drift_sq_norms" in f for f in seen)


@needs_compiled
def test_call_op_releases_the_gil():
    """Like torch.ops, _C.call_op lets other Python threads run while the kernel runs (a client's
    network threads keep going during selection). With a switch interval of a minute the main
    thread gives the GIL up only where a call releases it: the other thread, ready to run once
    ``go`` is set, runs only inside such a call."""
    import sys
    import threading

    from layersel_ext import _model_state

    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
    _, xs = _model_state.state_lists(model)
    ran: list[bool] = []
    started, go = threading.Event(), threading.Event()

    def other() -> None:
        started.set()
        go.wait()
        ran.append(True)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(60)
    thread = threading.Thread(target=other)
    try:
        thread.start()
        started.wait()
        go.set()  # from here the other thread needs the GIL, and only a releasing call gives it up
        for _ in range(5000):
            ops.drift_sq_norms(xs, xs)
            if ran:
                break
        ran_during_a_call = bool(ran)
    finally:
        go.set()
        sys.setswitchinterval(interval)
        thread.join()
    assert ran_during_a_call


def test_scores_through_both_backends_agree_on_many_small_tensors(backend):
    torch.manual_seed(1)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)) for _ in range(40)])
    initial = nn.Sequential(*[nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)) for _ in range(40)])
    got = L.largest_magnitude_change_scores(model, initial)
    sd, sd0 = model.state_dict(), initial.state_dict()
    assert list(got) == list(sd)
    for name, s in got.items():
        assert s.dtype == sd[name].dtype and s.shape == sd[name].shape
        assert torch.equal(s, (sd[name] - sd0[name]).abs())


@requires_cuda
def test_batched_device_to_host_equals_cpu_numpy():
    tensors = [t for t in odd_tensors() if t.dtype != torch.bfloat16]
    cuda = [t.cuda() for t in tensors]
    out = _host.batched_device_to_host(cuda)
    for t, a in zip(tensors, out):
        ref = t.numpy()
        assert a.dtype == ref.dtype and a.shape == ref.shape and np.array_equal(a, ref)
        assert a.flags.writeable
    # twice the same tensor, and a single empty one
    again = _host.batched_device_to_host([cuda[0], cuda[0]])
    assert np.array_equal(again[0], again[1]) and not np.shares_memory(again[0], again[1])
    (empty,) = _host.batched_device_to_host([cuda[2]])
    assert empty.shape == (0, 3) and empty.dtype == np.float16
