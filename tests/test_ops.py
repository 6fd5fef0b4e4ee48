"""Each op: compiled CPU kernel vs its pure-torch twin vs float64 torch, opcheck, determinism, CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import requires_cuda

from layersel_ext import _bits, _loader, _torch_ops, ops

CHUNK = 1 << 16
EDGE_SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 555, 33333, 3 * CHUNK + 7]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64,
              torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]  # fmt: skip
compiled_only = pytest.mark.skipif(_loader.COMPILED is None, reason="compiled module not loaded")


def rand(n: int, dtype: torch.dtype, gen: torch.Generator, device: str = "cpu") -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(n, generator=gen).to(dtype).to(device)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(lo, hi, (n,), generator=gen).to(dtype).to(device)


def lists(sizes, dtypes, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    xs = [rand(n, dt, gen, device) for n, dt in zip(sizes, dtypes)]
    ys = [rand(n, dt, gen, device) for n, dt in zip(sizes, dtypes)]
    return xs, ys


def float64_drift(x: torch.Tensor, y: torch.Tensor) -> float:
    d = (x - y).float().double()
    return float((d * d).sum())


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_drift_sq_norms_against_float64(dtype, backend):
    xs, ys = lists(EDGE_SIZES, [dtype] * len(EDGE_SIZES))
    got = ops.drift_sq_norms(xs, ys)
    assert got.dtype == torch.float64 and got.shape == (len(xs),)
    for g, x, y in zip(got.tolist(), xs, ys):
        assert g == pytest.approx(float64_drift(x, y), rel=1e-6, abs=0.0)


def test_drift_sq_norms_thousands_of_tensors(backend):
    sizes = [(i * 37) % 300 for i in range(3000)]
    dtypes = [ALL_DTYPES[i % len(ALL_DTYPES)] for i in range(3000)]
    xs, ys = lists(sizes, dtypes, seed=3)
    got = ops.drift_sq_norms(xs, ys).tolist()
    for g, x, y in zip(got, xs, ys):
        assert g == pytest.approx(float64_drift(x, y), rel=1e-6)


def test_drift_sq_norms_non_contiguous(backend):
    x = torch.randn(64, 70).t()
    y = torch.randn(70, 64)[:, ::1]
    got = ops.drift_sq_norms([x, x[::2]], [y, y[::2]])
    assert got.tolist() == pytest.approx([float64_drift(x, y), float64_drift(x[::2], y[::2])], rel=1e-6)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_drift_sq_bounds_hold_the_exact_sums(dtype):
    # Large tensors: float32 row sums, within the stated error of drift_sq_norms; small ones: its numbers.
    big, chunk = _torch_ops._BOUND_MIN, _torch_ops._CHUNK
    sizes = [1, 555, big - 1, big, big + 1, chunk, 2 * chunk + _torch_ops._BOUND_ROW + 3]
    xs, ys = lists(sizes, [dtype] * len(sizes), seed=5)
    if dtype.is_floating_point:  # magnitudes over many decades, their squares finite in float32
        decades = min(torch.finfo(dtype).max, torch.finfo(torch.float32).max) ** 0.25
        xs[-1] = xs[-1] * torch.logspace(-1, 1, xs[-1].numel(), base=decades).to(dtype)
    exact = _torch_ops.drift_sq_norms(xs, ys)
    est, err = _torch_ops.drift_sq_bounds(xs, ys)
    for e, g, r, n in zip(exact.tolist(), est.tolist(), err.tolist(), sizes):
        if n < big:
            assert r == 0.0 and g == e
        else:
            assert 0 < r < 1e-4 and abs(g - e) <= r * e


def test_torch_selection_from_bounds_equals_the_exact_one(monkeypatch):
    # Thresholds on and beside every drift, and equal drifts of large tensors: the bounds leave these
    # unsettled, and the exact drifts of those entries decide, as they do without bounds.
    from torch import nn

    import layersel_ext as L

    g = torch.Generator().manual_seed(2)
    big = _torch_ops._CHUNK + 100  # more than one pass, a short last row
    model, initial = nn.Module(), nn.Module()
    for name, scale in (("a", 1e-3), ("b", 1e-3), ("c", 2e-3), ("frozen", 0.0), ("d", 1e-3)):
        start = torch.randn(big, generator=g)
        initial.register_buffer(name, start)
        model.register_buffer(name, start + scale * torch.randn(big, generator=g))
    model.b.copy_(model.a - initial.a + initial.b)  # b drifts as a (up to float32 rounding)
    model.d.copy_(initial.d + (model.a - initial.a))  # d drifts exactly as a: a tie
    model.register_buffer("small", torch.ones(7))
    initial.register_buffer("small", torch.zeros(7))
    monkeypatch.setattr(ops, "_backend", "torch")

    def both(select, *args):
        got = select(*args, model, initial)
        with monkeypatch.context() as m:
            m.setattr(ops, "drift_sq_bounds", lambda xs, ys: None)  # the exact drifts throughout
            want = select(*args, model, initial)
        assert got[1] == want[1]
        for a, b in zip(got[0], want[0]):
            np.testing.assert_array_equal(a, b)

    assert ops.drift_sq_bounds([model.a], [initial.a]) is not None
    for normalize in (True, False):
        drifts = L.layer_drift_norms(model, initial, normalize).values()
        for d in sorted(drifts):
            for t in (d, np.nextafter(d, 0.0), np.nextafter(d, 1.0), d * (1 + 1e-5), d * (1 - 1e-5)):
                if t > 0:
                    for more in (True, False):
                        both(L.select_layers_by_threshold, float(t), normalize, more)
        for p in (0.2, 0.4, 0.6, 0.8, 1.0):
            for more in (True, False):
                both(L.select_layers_by_percentage, p, normalize, more)


@compiled_only
def test_drift_precision_over_many_terms():
    # 2**24 terms of 1.0 (16.7M): a float32 accumulator stalls at 2**24; ours is exact.
    x = torch.ones(1 << 24)
    y = torch.zeros(1 << 24)
    assert torch.ops.layersel.drift_sq_norms([x, x[:12345]], [y, y[:12345]]).tolist() == [float(1 << 24), 12345.0]


@compiled_only
def test_drift_bits_identical_across_runs_and_thread_counts():
    xs, ys = lists([5 * CHUNK + 3, 1000, CHUNK], [torch.float32, torch.float16, torch.float64], seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = torch.ops.layersel.drift_sq_norms(xs, ys)
        b = torch.ops.layersel.drift_sq_norms(xs, ys)
        torch.set_num_threads(1)
        c = torch.ops.layersel.drift_sq_norms(xs, ys)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b) and torch.equal(a, c)


@compiled_only
def test_parallel_regions_use_two_threads():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _loader.COMPILED.cpu_threads_used(64) == 2, "built without OpenMP? at::parallel_for ran on one thread"
    finally:
        torch.set_num_threads(before)


@compiled_only
def test_bool_tensors_are_refused():
    with pytest.raises(TypeError, match="Bool"):
        torch.ops.layersel.drift_sq_norms([torch.ones(3, dtype=torch.bool)], [torch.ones(3, dtype=torch.bool)])


@pytest.mark.parametrize("kind", range(6))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_scores_against_torch(kind, dtype, backend):
    xs, ys = lists(EDGE_SIZES, [dtype] * len(EDGE_SIZES), seed=kind)
    got = ops.scores(xs, ys, kind)
    for g, x, y in zip(got, xs, ys):
        want = torch.empty_like(x)
        _torch_ops.score_into(kind, x, y, want)
        assert g.dtype == x.dtype and g.shape == x.shape
        assert torch.equal(g, want)


@pytest.mark.parametrize("kind", [2, 3])
def test_torch_magnitude_change_is_minus_then_abs_bit_for_bit(kind):
    """The torch backend's one-pass |x - y| (smooth L1 with beta 0) is torch's (x - y).abs() in float32, on
    NaN, infinities, signed zeros, subnormals and overflowing differences too."""
    special = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38, 1.0, -2.5]
    x = torch.tensor([a for a in special for _ in special], dtype=torch.float32)
    y = torch.tensor([b for _ in special for b in special], dtype=torch.float32)
    x, y = torch.cat([x, torch.randn(70_000)]), torch.cat([y, torch.randn(70_000)])
    got = torch.empty_like(x)
    _torch_ops.score_into(kind, x, y, got)
    want = (x - y).abs()
    if kind == 3:
        want = -want
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@compiled_only
@pytest.mark.parametrize("kind", range(6))
def test_scores_mixed_dtypes_one_buffer_per_dtype(kind):
    dts = [torch.float32, torch.int64, torch.float32, torch.float16, torch.int64]
    xs, ys = lists([10, 3, CHUNK + 1, 7, 0], dts, seed=9)
    buffers = torch.ops.layersel.scores(xs, ys, kind)
    assert [b.dtype for b in buffers] == [torch.float32, torch.int64, torch.float16]
    ref = _torch_ops.scores(xs, ys, kind)
    assert all(torch.equal(a, b) for a, b in zip(buffers, ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sample_masks_compiled_equals_torch_twin(dtype):
    if _loader.COMPILED is None:
        pytest.skip("compiled module not loaded")
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 3, CHUNK - 1, CHUNK + 2, 555, 0, 33333]
    scores = [(torch.randn(n, generator=gen) * 3).to(dtype) for n in sizes]
    scores[1] = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=dtype)
    for seed in (0, 1, 2**40 + 17, 2**64 - 1):
        a = torch.ops.layersel.sample_masks(scores, seed - 2**64 if seed >= 2**63 else seed, torch.int64)
        b = _torch_ops.sample_masks(scores, seed, torch.int64)
        assert torch.equal(a, b), seed
    assert a[1:4].tolist() == [1, 0, 0]  # +inf always, -inf and NaN never


@compiled_only
def test_sample_masks_independent_of_thread_count():
    scores = [torch.randn(3 * CHUNK + 5), torch.randn(17)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = torch.ops.layersel.sample_masks(scores, 11, torch.uint8)
        a_bits = torch.ops.layersel.sample_mask_bits(scores, 11)
        torch.set_num_threads(1)
        b = torch.ops.layersel.sample_masks(scores, 11, torch.uint8)
        b_bits = torch.ops.layersel.sample_mask_bits(scores, 11)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b) and torch.equal(a_bits, b_bits)


def test_philox_known_answers_through_python():
    """Random123 kat_vectors for philox4x32-10, through the torch twin used as the oracle."""
    kats = [
        ([0, 0, 0, 0], (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF), [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], (0xA4093822, 0x299F31D0),
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]  # fmt: skip
    for ctr, key, want in kats:
        got = _torch_ops.philox4x32_10(torch.tensor([ctr], dtype=torch.int64), key)
        assert got[0].tolist() == want


@compiled_only
def test_sample_masks_refuses_bool_and_integer_scores():
    with pytest.raises(TypeError, match="bool"):
        torch.ops.layersel.sample_masks([torch.zeros(3)], 0, torch.bool)
    with pytest.raises(TypeError, match="floating"):
        torch.ops.layersel.sample_masks([torch.zeros(3, dtype=torch.int64)], 0, torch.int64)
    with pytest.raises(TypeError, match="floating"):
        torch.ops.layersel.sample_mask_bits([torch.zeros(3, dtype=torch.int64)], 0)


@compiled_only
def test_opcheck_every_op():
    xs, ys = lists([10, 0, 7], [torch.float32, torch.float32, torch.int64], seed=1)
    torch.library.opcheck(torch.ops.layersel.drift_sq_norms.default, (xs, ys))
    for kind in range(6):
        torch.library.opcheck(torch.ops.layersel.scores.default, (xs, ys, kind))
    torch.library.opcheck(
        torch.ops.layersel.sample_masks.default, ([torch.randn(9), torch.randn(2, 3)], 5, torch.int64)
    )
    torch.library.opcheck(torch.ops.layersel.sample_mask_bits.default, ([torch.randn(9), torch.randn(2, 3)], 5, True))
    torch.library.opcheck(
        torch.ops.layersel.sample_masks.default, ([torch.randn(9), torch.randn(2, 3)], 5, torch.uint8, True, [40, 3])
    )
    torch.library.opcheck(torch.ops.layersel.score_fingerprint.default, ([torch.randn(9), torch.randn(2, 3)], [40, 3]))


def _shard_pieces(full: list[torch.Tensor], cuts: list[tuple[int, int, int]]):
    """Pieces of the flat concatenation of ``full`` (tensor, start, stop) with their stream counters."""
    bases = np.cumsum([0] + [t.numel() for t in full])
    return [full[t].reshape(-1)[a:b] for t, a, b in cuts], [int(bases[t]) + a for t, a, b in cuts]


# Pieces that cut Philox blocks (4), SIMD groups (32 / 64) and chunks (65,536) anywhere, out of order.
_CUTS = [(2, 5, 70001), (0, 0, 1), (2, 70001, 3 * CHUNK + 7), (1, 3, 33333), (0, 1, 3), (2, 0, 5), (1, 0, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sample_masks_counters_give_the_unsharded_masks(dtype, backend):
    """Pieces of a model sampled with their unsharded stream indices (``counters``) give exactly the
    unsharded masks, in any order and wherever they are cut; their fingerprints add up (mod 2**64)."""
    gen = torch.Generator().manual_seed(9)
    full = [(torch.randn(n, generator=gen) * 3).to(dtype) for n in (3, 33333, 3 * CHUNK + 7)]
    pieces, counters = _shard_pieces(full, _CUTS)
    flat = torch.cat([t.reshape(-1) for t in full])
    for seed in (0, 77, 2**63 + 5):
        want = ops.sample_masks(full, seed, torch.uint8)
        got = ops.sample_masks(pieces, seed, torch.uint8, counters=counters)
        assert torch.equal(got, torch.cat([want[c : c + p.numel()] for p, c in zip(pieces, counters)])), seed
    assert torch.equal(
        ops.sample_masks(full, 5, torch.int32, counters=[0, 3, 33336]), ops.sample_masks(full, 5, torch.int32)
    )
    whole = int(ops.score_fingerprint(full)) % 2**64
    assert whole == _torch_ops.score_fingerprint(full)
    assert sum(int(ops.score_fingerprint([p], [c])) for p, c in zip(pieces, counters)) % 2**64 == whole
    # key_by_scores with counters: the key of the pieces' own fingerprint and count.
    key = _torch_ops.key_from_scores(3, int(ops.score_fingerprint(pieces, counters)) % 2**64, flat.numel())
    assert torch.equal(ops.sample_masks(pieces, 3, torch.uint8, True, counters),
                       ops.sample_masks(pieces, key, torch.uint8, counters=counters))  # fmt: skip


def test_sample_masks_bad_counters_are_refused(backend):
    scores = [torch.randn(4), torch.randn(3)]
    with pytest.raises(ValueError, match="2 tensors"):
        ops.sample_masks(scores, 1, torch.uint8, counters=[0])
    with pytest.raises(ValueError, match="counter #1 is -1"):
        ops.sample_masks(scores, 1, torch.uint8, counters=[0, -1])
    with pytest.raises(ValueError, match="counter #0 is"):
        ops.score_fingerprint(scores, counters=[2**62 - 3, 0])


# --------------------------------------------------------------------------- CUDA (skipped without a GPU)


@requires_cuda
@compiled_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cuda_drift_matches_cpu(dtype):
    xs, ys = lists(EDGE_SIZES, [dtype] * len(EDGE_SIZES), seed=2)
    cpu = torch.ops.layersel.drift_sq_norms(xs, ys)
    cuda = torch.ops.layersel.drift_sq_norms([x.cuda() for x in xs], [y.cuda() for y in ys])
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-6, atol=0)
    assert torch.equal(cuda, torch.ops.layersel.drift_sq_norms([x.cuda() for x in xs], [y.cuda() for y in ys]))


@requires_cuda
@compiled_only
@pytest.mark.parametrize("kind", range(6))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cuda_scores_match_cpu(kind, dtype):
    xs, ys = lists(EDGE_SIZES, [dtype] * len(EDGE_SIZES), seed=kind)
    cpu = torch.ops.layersel.scores(xs, ys, kind)
    cuda = torch.ops.layersel.scores([x.cuda() for x in xs], [y.cuda() for y in ys], kind)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, cuda))


@requires_cuda
@compiled_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_masks_bit_equal_to_cpu(dtype):
    gen = torch.Generator().manual_seed(4)
    scores = [(torch.randn(n, generator=gen) * 4).to(dtype) for n in EDGE_SIZES]
    for seed in (0, 123456789, 2**62 + 3):
        cpu = torch.ops.layersel.sample_masks(scores, seed, torch.uint8)
        cuda = torch.ops.layersel.sample_masks([s.cuda() for s in scores], seed, torch.uint8)
        assert torch.equal(cpu, cuda.cpu()), seed


@requires_cuda
@compiled_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_masks_with_counters_equal_cpu(dtype):
    gen = torch.Generator().manual_seed(9)
    full = [(torch.randn(n, generator=gen) * 3).to(dtype) for n in (3, 33333, 3 * CHUNK + 7)]
    pieces, counters = _shard_pieces(full, _CUTS)
    for key_by_scores in (False, True):
        cpu = torch.ops.layersel.sample_masks(pieces, 41, torch.uint8, key_by_scores, counters)
        cuda = torch.ops.layersel.sample_masks([p.cuda() for p in pieces], 41, torch.uint8, key_by_scores, counters)
        assert torch.equal(cpu, cuda.cpu()), key_by_scores
    cpu_fp = torch.ops.layersel.score_fingerprint(pieces, counters)
    cuda_fp = torch.ops.layersel.score_fingerprint([p.cuda() for p in pieces], counters)
    assert cuda_fp.device.type == "cuda" and torch.equal(cpu_fp, cuda_fp.cpu())
    assert torch.equal(
        torch.ops.layersel.score_fingerprint([torch.zeros(0, device="cuda")]).cpu(), torch.zeros(1, dtype=torch.int64)
    )


@requires_cuda
@compiled_only
def test_cuda_opcheck():
    xs = [torch.randn(10, device="cuda"), torch.randn(0, device="cuda")]
    ys = [torch.randn(10, device="cuda"), torch.randn(0, device="cuda")]
    torch.library.opcheck(torch.ops.layersel.drift_sq_norms.default, (xs, ys))
    torch.library.opcheck(torch.ops.layersel.scores.default, (xs, ys, 3))
    torch.library.opcheck(torch.ops.layersel.sample_masks.default, (xs, 5, torch.uint8))


@compiled_only
@pytest.mark.parametrize("isa", ["portable", "avx2", "best"])
def test_sample_masks_every_cpu_isa_gives_the_same_bits(isa):
    """The portable, AVX2 and AVX-512 mask paths (bytes and bits) are bit-identical to the torch twin."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, layersel_ext\n"
        "from layersel_ext import _bits, _torch_ops\n"
        "g = torch.Generator().manual_seed(1)\n"
        "s = [(torch.randn(n, generator=g) * 4).to(dt) for n, dt in "
        "[(70001, torch.float32), (3, torch.float32), (999, torch.float16), (130, torch.float64), (64, torch.bfloat16)]]\n"
        "for seed in (0, 77, 2**40 + 1):\n"
        "    for dt in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):\n"
        "        a = torch.ops.layersel.sample_masks(s, seed, dt)\n"
        "        assert torch.equal(a, _torch_ops.sample_masks(s, seed, dt)), (seed, dt)\n"
        "    bits = torch.ops.layersel.sample_mask_bits(s, seed)\n"
        "    assert torch.equal(bits, _bits.pack_bits(_torch_ops.sample_masks(s, seed, torch.uint8))), seed\n"
        "print('ok')\n"
    )
    env = {**os.environ, "LAYERSEL_CPU_ISA": isa}
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# --------------------------------------------------------------------------- CUDA correctness fixes (issue 11)


@requires_cuda
@compiled_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_cuda_drift_misaligned_view_equals_aligned_copy(dtype):
    gen = torch.Generator().manual_seed(9)
    big = [rand(3 * CHUNK + 40, dtype, gen, "cuda") for _ in range(2)]
    for offset in (0, 1, 3):
        a, b = big[0][offset : offset + 3 * CHUNK + 7], big[1][offset : offset + 3 * CHUNK + 7]
        got = torch.ops.layersel.drift_sq_norms([a, a.clone()], [b, b.clone()])
        assert got[0].item() == got[1].item()
        cpu = torch.ops.layersel.drift_sq_norms([a.cpu()], [b.cpu()])
        assert np.float32(got[0].item()) == np.float32(cpu[0].item())


@requires_cuda
@compiled_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.int16, torch.int32, torch.int64])
def test_cuda_drift_large_differences(dtype):
    if dtype.is_floating_point:
        a = torch.tensor([1.8e19, -3.0e19, 7.0, 1e-30], dtype=dtype)
    else:
        info = torch.iinfo(dtype)
        a = torch.tensor([info.max, info.min, 7, -7], dtype=dtype)
    b = torch.flip(a, [0])
    cpu = torch.ops.layersel.drift_sq_norms([a], [b])
    cuda = torch.ops.layersel.drift_sq_norms([a.cuda()], [b.cuda()])
    assert np.float32(cuda.item()) == np.float32(cpu.item())


@requires_cuda
@compiled_only
def test_cuda_empty_lists_and_mixed_devices_give_clear_errors():
    t = torch.ones(3, device="cuda")
    with pytest.raises(ValueError, match="empty list of model tensors"):
        torch.ops.layersel.scores([], [t], 0)
    with pytest.raises(ValueError, match="tensor #0 is on cpu|is on cuda"):
        torch.ops.layersel.drift_sq_norms([torch.ones(3)], [t])
    with pytest.raises(ValueError):
        torch.ops.layersel.scores([torch.ones(3)], [t], 2)
    with pytest.raises(TypeError, match="mask dtype"):
        torch.ops.layersel.sample_masks([torch.zeros(0, device="cuda")], 0, torch.float32)


@requires_cuda
@compiled_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_cuda_unseeded_masks_equal_cpu(dtype):
    gen = torch.Generator().manual_seed(4)
    scores = [(torch.randn(n, generator=gen) * 4).to(dtype) for n in EDGE_SIZES]
    cpu = torch.ops.layersel.sample_masks(scores, 77, torch.uint8, True)
    cuda = torch.ops.layersel.sample_masks([s.cuda() for s in scores], 77, torch.uint8, True)
    assert torch.equal(cpu, cuda.cpu())


@requires_cuda
@compiled_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
def test_cuda_mask_bits_equal_cpu(dtype):
    """The CUDA bitmap kernel: the CPU kernel's bits and the CUDA mask bytes packed, for tensors that
    start and end inside 32-bit words and 128-element warp groups, empty ones, several chunks, totals
    whose last word is partial (the tail launch) or whole, seeded and keyed by the scores."""
    gen = torch.Generator().manual_seed(9)
    cases = [EDGE_SIZES, [5, 0, 3 * CHUNK + 27, 0, 1], [32], [100], [64 * 1024 + 31, 9], [7, 0], [45], [50]]
    # a tail across tensors with empty ones between, a last whole word partly past the end, no
    # element at all, many tensors sharing each word
    cases += [[13, 0, 0, 4], [0, 100, 0, 0, 17, 0], [60], [0, 0], [1] * 200]
    for sizes in cases:
        scores = [(torch.randn(n, generator=gen) * 3).to(dtype) for n in sizes]
        on_gpu = [s.cuda() for s in scores]
        for seed, key_by_scores in ((5, False), (-3, True)):
            cpu = torch.ops.layersel.sample_mask_bits(scores, seed, key_by_scores)
            cuda = torch.ops.layersel.sample_mask_bits(on_gpu, seed, key_by_scores)
            packed = _bits.pack_bits(torch.ops.layersel.sample_masks(on_gpu, seed, torch.uint8, key_by_scores))
            assert cuda.device.type == "cuda" and cuda.shape == cpu.shape, sizes
            assert torch.equal(cpu, cuda.cpu()) and torch.equal(packed, cuda), (sizes, seed)


@requires_cuda
@compiled_only
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("kind", range(6))
def test_cuda_integer_sparse_selection_matches_cpu(dtype, kind):
    xs, ys = lists(EDGE_SIZES[1:], [dtype] * (len(EDGE_SIZES) - 1), seed=kind)
    total = sum(x.numel() for x in xs)
    for k in (1, total // 100 + 1, total // 3):
        cpu = ops.kth_largest_score(xs, ys, kind, k, dtype)
        cuda = ops.kth_largest_score([x.cuda() for x in xs], [y.cuda() for y in ys], kind, k, dtype)
        assert torch.equal(cpu, cuda.cpu())
        thresholds = [float(cpu.item())] * len(xs)
        cv, ci = torch.ops.layersel.sparse_extract(xs, ys, kind, thresholds)
        gv, gi = torch.ops.layersel.sparse_extract([x.cuda() for x in xs], [y.cuda() for y in ys], kind, thresholds)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cv, gv))
        assert all(torch.equal(a, b.cpu()) for a, b in zip(ci, gi))


@compiled_only
def test_empty_lists_through_the_ops():
    # A list with no tensor at all cannot be dispatched (torch's NotImplementedError); the wrappers
    # answer it, and an empty model beside a non-empty initial list reaches the kernel.
    assert ops.drift_sq_norms([], []).shape == (0,)
    assert ops.scores([], None, 0) == []
    assert torch.ops.layersel.scores([], [torch.ones(3)], 0) == []
    with pytest.raises(ValueError, match="got 0 model tensors but 1 initial tensors"):
        torch.ops.layersel.drift_sq_norms([], [torch.ones(3)])
    with pytest.raises(TypeError, match="mask dtype"):
        torch.ops.layersel.sample_masks([torch.zeros(0)], 1, torch.float32)
