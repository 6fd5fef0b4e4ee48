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
from layersel_ext import ops
from layersel_ext import parameter_selection_criteria as psc
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
    out = psc._batched_device_to_host(cuda)
    for t, a in zip(tensors, out):
        ref = t.numpy()
        assert a.dtype == ref.dtype and a.shape == ref.shape and np.array_equal(a, ref)
        assert a.flags.writeable
    # twice the same tensor, and a single empty one
    again = psc._batched_device_to_host([cuda[0], cuda[0]])
    assert np.array_equal(again[0], again[1]) and not np.shares_memory(again[0], again[1])
    (empty,) = psc._batched_device_to_host([cuda[2]])
    assert empty.shape == (0, 3) and empty.dtype == np.float16
