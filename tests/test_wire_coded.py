"""layersel_ext.wire_coded: FedPM masks coded against the server's θ are lossless, near the ideal
size, refuse a prior the server does not hold, and survive hostile streams."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEVICES, fl4health_strategies
from test_wire import assert_same_arrays, masked_model

import layersel_ext as L
import layersel_ext.fl4health as lf
from layersel_ext import wire, wire_coded
from layersel_ext.wire_coded import CodedMaskPacker

pytestmark = pytest.mark.skipif(wire_coded.COMPILED is None, reason="the coder is in the compiled module")

SHAPES = [(30, 20), (), (0,), (7,), (64,), (65,), (4, 3, 3, 3), (129,), (2, 0, 3), (40, 50)]


def random_theta(rng: np.random.Generator, shape: tuple[int, ...], certain: float, dtype=np.float64) -> np.ndarray:
    """Probabilities as FedPM's server sends them: mostly exactly 0 or 1, the rest in between."""
    u = rng.random(shape)
    theta = np.where(u < certain, (rng.random(shape) < 0.5).astype(float), rng.choice([0.5, 1 / 3, 0.25, 0.9], shape))
    return np.asarray(theta, dtype=dtype)


def sampled(rng: np.random.Generator, theta: list[np.ndarray], flip: float = 0.0, dtype=np.int64) -> list[np.ndarray]:
    out = []
    for t in theta:
        m = rng.random(t.shape) < t
        m ^= (rng.random(t.shape) < flip) & ((t == 0) | (t == 1))  # exceptions: bits the prior calls certain
        out.append(m.astype(dtype))
    return out


def send_theta(theta: list[np.ndarray], names: list[str]) -> tuple[CodedMaskPacker, CodedMaskPacker]:
    """A server that sent θ and a client that received it."""
    server, client = CodedMaskPacker("server"), CodedMaskPacker("client")
    arrays, got = client.unpack_parameters(server.pack_parameters(theta, names))
    assert got == names
    assert_same_arrays(arrays, theta)
    return server, client


def ideal_bytes(theta: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """The sum of -log2 q(bit) under the coder's model (θ quantized to 15 bits; certain elements
    contradict their prior with probability 2**-15), in bytes."""
    bits = 0.0
    for t, m in zip(theta, masks):
        q = np.floor(t.astype(np.float64).ravel() * 2**15 + 0.5)
        p1 = np.where(q == 0, 2.0**-15, np.where(q == 2**15, 1 - 2.0**-15, q / 2**15))
        b = m.ravel().astype(bool)
        bits += float(-np.log2(np.where(b, p1, 1 - p1)).sum())
    return bits / 8


def coded_bytes(packed: list[np.ndarray]) -> int:
    return packed[4].nbytes + packed[2].nbytes  # the blocks and their sizes


@pytest.mark.parametrize("certain", [0.0, 0.6, 0.95, 1.0])
@pytest.mark.parametrize("flip", [0.0, 0.001])
@pytest.mark.parametrize("theta_dtype", [np.float64, np.float32])
def test_masks_round_trip_coded_near_the_ideal_size(certain, flip, theta_dtype):
    rng = np.random.default_rng(int(certain * 100) + int(flip * 1e4))
    names = [f"layer{i}.weight_scores" for i in range(len(SHAPES))]
    theta = [random_theta(rng, s, certain, theta_dtype) for s in SHAPES]
    server, client = send_theta(theta, names)
    masks = sampled(rng, theta, flip)
    packed = client.pack_parameters(masks, names)
    assert packed[0][5] == wire.FORM_CODED
    arrays, got = server.unpack_parameters(packed)
    assert got == names
    assert_same_arrays(arrays, masks)
    assert coded_bytes(packed) <= 1.01 * ideal_bytes(theta, masks) + 64


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16, np.uint32, np.uint64])
def test_every_mask_dtype_comes_back(dtype):
    rng = np.random.default_rng(1)
    names = ["a", "b", "c"]
    theta = [random_theta(rng, s, 0.8) for s in [(50, 40), (3,), (200,)]]
    server, client = send_theta(theta, names)
    masks = sampled(rng, theta, dtype=dtype)
    assert_same_arrays(server.unpack_parameters(client.pack_parameters(masks, names))[0], masks)


def test_a_large_mostly_certain_message_costs_a_few_bytes():
    """Ten million elements in about a hundred bytes, which the default decoding limits accept: a
    coded layer may decode to as much as the θ the server sent for it, whatever the message's size."""
    rng = np.random.default_rng(2)
    names = ["big", "small"]
    theta = [random_theta(rng, (10_000_000,), 1.0), random_theta(rng, (1000,), 0.0)]
    server, client = send_theta(theta, names)
    masks = sampled(rng, theta)
    packed = client.pack_parameters(masks, names)
    assert_same_arrays(server.unpack_parameters(packed)[0], masks)
    ideal = ideal_bytes(theta, masks)
    assert coded_bytes(packed) <= 1.01 * ideal + 64, (coded_bytes(packed), ideal)
    assert coded_bytes(packed) * 1000 < 10_001_000 / 8  # a thousandth of the bitmap


def test_without_a_prior_it_is_the_bitmap_form():
    rng = np.random.default_rng(3)
    names = ["a", "b"]
    masks = [rng.integers(0, 2, (10, 3)).astype(np.int64), rng.integers(0, 2, (5,)).astype(np.int64)]
    first_round = CodedMaskPacker("client").pack_parameters(masks, names)
    assert_same_arrays(first_round, wire.CompactMaskPacker().pack_parameters(masks, names))
    assert_same_arrays(CodedMaskPacker("server").unpack_parameters(first_round)[0], masks)


def test_layers_without_a_usable_prior_go_as_bits():
    rng = np.random.default_rng(4)
    names = ["coded", "other_shape", "scores", "missing", "coded_too"]
    theta = [
        random_theta(rng, (40, 30), 0.9),
        random_theta(rng, (6, 5), 0.9),  # the client's mask is (5, 6)
        rng.normal(size=(8,)),  # not probabilities (initial parameters that are scores)
        random_theta(rng, (9,), 0.9),
        random_theta(rng, (300,), 0.5).astype(np.float32),
    ]
    server, client = send_theta(theta[:3] + theta[4:], names[:3] + names[4:])
    assert set(client.priors) == {"coded", "other_shape", "coded_too"}
    mask_theta = [theta[0], theta[1].reshape(5, 6), (theta[2] > 0).astype(float), theta[3], theta[4]]
    masks = sampled(rng, mask_theta)
    packed = client.pack_parameters(masks, names)
    assert packed[0][5] == wire.FORM_CODED
    assert [e[-2] for e in _entries(packed[1])] == [1, 0, 0, 0, 1]
    assert_same_arrays(server.unpack_parameters(packed)[0], masks)


def _entries(meta: np.ndarray) -> list[list[int]]:
    values, pos, out = meta.tolist(), 1, []
    for _ in range(values[0]):
        ndim = values[pos + 1]
        out.append(values[pos : pos + 4 + ndim])
        pos += 4 + ndim
    return out


def test_a_prior_the_server_does_not_hold_is_refused_naming_the_layer():
    rng = np.random.default_rng(5)
    names = ["layer.a", "layer.b"]
    theta = [random_theta(rng, (20, 20), 0.7), random_theta(rng, (50,), 0.7)]
    server, client = send_theta(theta, names)
    packed = client.pack_parameters(sampled(rng, theta), names)
    # the server moved on a round: its θ differs in one element
    later = [t.copy() for t in theta]
    later[1][7] = 0.125 if later[1][7] != 0.125 else 0.25
    server.pack_parameters(later, names)
    with pytest.raises(ValueError, match="'layer.b' was coded with another prior.*another round's or another layer's"):
        server.unpack_parameters(packed)
    # another layer's θ of the same shape
    server.pack_parameters([theta[0], theta[0].ravel()[:50].copy()], names)
    with pytest.raises(ValueError, match="'layer.b' was coded with another prior"):
        server.unpack_parameters(packed)
    with pytest.raises(ValueError, match="'layer.a' was coded with a prior this side does not hold"):
        CodedMaskPacker("server").unpack_parameters(packed)
    with pytest.raises(ValueError, match="patch\\(wire='coded'\\)"):
        wire.unpack(packed)


def test_quantization_is_the_documented_integer_rule():
    theta = np.array([0.0, 1.0, 0.5, 2.0**-16, 2.0**-16 - 2.0**-40, 1 - 2.0**-16, 0.3, 1 / 3], np.float64)
    prior = wire_coded.prior_of(theta)
    q = prior.q.numpy().view(np.uint16)
    assert q.tolist() == np.floor(theta * 2**15 + 0.5).astype(np.int64).tolist()
    assert q[3] == 1 and q[4] == 0 and q[5] == 2**15  # exactly half a step rounds up
    for bad in ([0.5, np.nan], [1.5], [-0.0001], [np.inf]):
        assert wire_coded.prior_of(np.array(bad)) is None
    assert wire_coded.prior_of(np.array([1, 0])) is None  # integers are not θ
    # float32 θ gives the prior its float64 values give
    t32 = np.random.default_rng(6).random(1000).astype(np.float32)
    assert wire_coded.prior_of(t32).fingerprint == wire_coded.prior_of(t32.astype(np.float64)).fingerprint


_MASK64 = (1 << 64) - 1


def reference_prior(theta: np.ndarray) -> tuple[bool, np.ndarray, np.ndarray, int]:
    """``_C.mask_prior`` by its definition (csrc/common/mask_coder.h, fingerprint.h), in numpy: q, the
    certain/expected/half bit words and the fingerprint; elements that are not probabilities count as 0."""
    t = np.asarray(theta).reshape(-1).astype(np.float64)  # exact for float32
    n, nw = t.size, -(-t.size // 64)
    good = (t >= 0) & (t <= 1)
    q = np.floor(np.where(good, t, 0.0) * 2**15 + 0.5).astype(np.int64)
    padded = np.full(nw * 64, -1, np.int64)
    padded[:n] = q
    rows = [(padded == 0) | (padded == 2**15), padded == 2**15, padded == 2**14]
    words = np.stack([np.packbits(r.reshape(nw, 64), axis=1, bitorder="little").view("<u8").reshape(nw) for r in rows])
    g = np.arange(n, dtype=np.uint64)
    lane_weights = ((((g % 64) * np.uint64(0x9E3779B9)) & np.uint64(0xFFFFFFFF)) ^ np.uint64(0x85EBCA6B)) | np.uint64(1)
    terms = (q.astype(np.uint64) + np.uint64(1)) * lane_weights * (np.uint64(2) * (g // np.uint64(64)) + np.uint64(1))
    f = int(terms.sum(dtype=np.uint64)) ^ ((n * 0x9E3779B97F4A7C15) & _MASK64)
    f ^= f >> 31
    f = (f * 0xBF58476D1CE4E5B9) & _MASK64
    f ^= f >> 29
    return bool(good.all()), q.astype(np.uint16), words.view(np.int64), f - (1 << 64) if f >> 63 else f


def prior_cases() -> list[np.ndarray]:
    """θ of both dtypes and awkward lengths: probabilities with runs of 0, 1 and 1/2 and the
    quantization's ties, then the same with NaN, ±inf, negatives, -0.0, subnormals and values above 1."""
    rng = np.random.default_rng(21)
    cases = []
    for dtype in (np.float32, np.float64):
        info = np.finfo(dtype)
        ks = np.arange(2**15, dtype=np.float64)
        ties = ((ks + 0.5) / 2**15).astype(dtype)
        special = np.array(
            [np.nan, np.inf, -np.inf, -1.0, -0.0, 1.5, 2.0, info.max, info.tiny, info.smallest_subnormal, -info.tiny],
            dtype,
        )
        special = np.concatenate([special, np.nextafter(ties[:4], dtype(2)), np.nextafter(np.ones(1, dtype), 2)])
        for n in (0, 1, 63, 64, 65, 1000, 64 * 256 + 1, 70001):
            t = rng.random(n).astype(dtype)
            u = rng.random(n)
            t[u < 0.3] = 0.0
            t[(u >= 0.3) & (u < 0.45)] = 1.0
            t[(u >= 0.45) & (u < 0.5)] = 0.5
            tie = (u >= 0.5) & (u < 0.6)
            t[tie] = rng.choice(np.concatenate([ties, np.nextafter(ties, dtype(0))]), int(tie.sum()))
            cases.append(t.copy())
            bad = rng.random(n) < 0.05
            t[bad] = rng.choice(special, int(bad.sum()))
            cases.append(t)
    return cases


def assert_prior_is_the_reference(theta: np.ndarray, got: tuple) -> None:
    ok, q, words, fingerprint = reference_prior(theta)
    got_ok, got_q, got_words, got_fingerprint = got
    assert got_ok == ok
    assert np.array_equal(np.asarray(got_q).view(np.uint16), q)
    assert np.array_equal(np.asarray(got_words), words)
    assert got_fingerprint == fingerprint


def test_the_prior_is_its_definition_bit_for_bit():
    """q, the three bit words, the fingerprint and the verdict of ``_C.mask_prior`` (its SIMD path where
    the CPU has one) against the numpy definition, for float32 and float64 θ with every special value."""
    for theta in prior_cases():
        ok, q, words, fingerprint = wire_coded.COMPILED.mask_prior(torch.from_numpy(theta))
        assert_prior_is_the_reference(theta, (ok, q.numpy(), words.numpy(), fingerprint))


def run_at_isa(isa: str, code: str, *args: Path) -> None:
    """Runs ``code`` with ``args`` in a fresh Python whose SIMD level LAYERSEL_CPU_ISA caps (each
    process reads it once)."""
    env = {**os.environ, "LAYERSEL_CPU_ISA": isa}
    argv = [sys.executable, "-c", code, *map(str, args)]
    r = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_the_prior_is_the_same_on_every_cpu_isa(isa, tmp_path):
    """The portable and AVX2 prior loops (LAYERSEL_CPU_ISA caps the level) give the definition's bits."""
    cases = prior_cases()
    np.savez(tmp_path / "theta.npz", *cases)
    code = (
        "import sys, numpy as np, torch\n"
        "from layersel_ext import wire_coded\n"
        "cases = np.load(sys.argv[1])\n"
        "out = {}\n"
        "for k in cases.files:\n"
        "    ok, q, words, fp = wire_coded.COMPILED.mask_prior(torch.from_numpy(cases[k]))\n"
        "    out[k + '_q'], out[k + '_words'], out[k + '_meta'] = q.numpy(), words.numpy(), np.array([ok, fp])\n"
        "np.savez(sys.argv[2], **out)\n"
    )
    run_at_isa(isa, code, tmp_path / "theta.npz", tmp_path / "prior.npz")
    got = np.load(tmp_path / "prior.npz")
    for i, theta in enumerate(cases):
        k = f"arr_{i}"
        ok, fp = got[k + "_meta"].tolist()
        assert_prior_is_the_reference(theta, (bool(ok), got[k + "_q"], got[k + "_words"], fp))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_coding_equals_coding_the_reference_masks(device):
    model = masked_model(device)
    names_scores = [(n, p.detach().cpu()) for n, p in model.state_dict().items() if n.endswith("_scores")]
    rng = np.random.default_rng(7)
    theta = [random_theta(rng, tuple(s.shape), 0.8) for _, s in names_scores]
    names = [n for n, _ in names_scores]
    server, client = send_theta(theta, names)
    masks, mask_names = L.select_scores_and_sample_masks(model, None, seed=11)
    assert mask_names == names
    got = wire_coded.sample_masks_coded(model, client, seed=11)
    assert_same_arrays(got, client.pack_parameters(masks, names))
    assert_same_arrays(server.unpack_parameters(got)[0], masks)


def _mutations(rng: np.random.Generator, packed: list[np.ndarray]):
    """Streams derived from a valid coded one: arrays dropped or swapped, bytes flipped, numbers changed."""
    yield packed[: rng.integers(0, len(packed))]
    i = int(rng.integers(1, 5))
    a = packed[i]
    yield packed[:i] + [a[: rng.integers(0, max(a.size, 1))]] + packed[i + 1 :]
    if a.size:
        b = a.copy()
        k = int(rng.integers(0, b.size))
        if b.dtype == np.uint8:
            b[k] ^= np.uint8(1 << int(rng.integers(0, 8)))
        else:
            b[k] = rng.choice([-1, 0, 1, 2, 3, 64, 2**31, 2**40, 2**62, -(2**62), int(b[k]) + 1, int(b[k]) - 1])
        yield packed[:i] + [b] + packed[i + 1 :]
    yield packed[:i] + [np.frombuffer(rng.bytes(int(rng.integers(0, 64))), np.uint8)] + packed[i + 1 :]
    payload = packed[4].copy()
    if payload.size:
        payload[rng.integers(0, payload.size, 3)] = rng.integers(0, 256, 3)
        yield packed[:4] + [payload] + packed[5:]


def _decode_mutations(rng: np.random.Generator, server: CodedMaskPacker, valid: list, names, masks) -> int:
    """Mutations of a valid stream decode to ValueError or to masks of the right names, shapes and
    values; returns how many were decoded."""
    cases = 0
    for stream in _mutations(rng, valid):
        cases += 1
        try:
            arrays, got = server.unpack_parameters(stream)
        except ValueError:
            continue
        assert got == names and [a.shape for a in arrays] == [m.shape for m in masks]
        assert all(set(np.unique(a)) <= {0, 1} for a in arrays)
    return cases


def test_fuzzed_streams_give_value_errors_never_anything_else():
    rng = np.random.default_rng(2027)
    cases = 0
    for round_ in range(600):
        names = [f"n{i}" for i in range(1 + round_ % 4)]
        shapes = [SHAPES[(round_ + i) % len(SHAPES)] for i in range(len(names))]
        theta = [random_theta(rng, s, 0.7) for s in shapes]
        server, client = send_theta(theta, names)
        masks = sampled(rng, theta, flip=0.01)
        valid = client.pack_parameters(masks, names)
        if valid[0][5] == wire.FORM_CODED:
            cases += _decode_mutations(rng, server, valid, names, masks)
    names, _, masks, server, client = lane_message(33)  # a block with lanes
    valid = client.pack_parameters(masks, names)
    for _ in range(40):
        cases += _decode_mutations(rng, server, valid, names, masks)
    assert cases >= 900, cases


def lane_message(seed: int = 31):
    """A block with enough uncertain elements (and information in them) to code them in lanes, a
    layer boundary inside it, and exceptions."""
    rng = np.random.default_rng(seed)
    names = ["big", "tail"]
    values = [0.25, 1 / 3, 0.75, 0.9, 0.0, 1.0, 0.5]
    theta = [rng.choice(values, (700, 1001)), rng.choice([0.3, 0.0, 0.5], (12345,)).astype(np.float32)]
    server, client = send_theta(theta, names)
    masks = sampled(rng, theta, flip=0.001)
    return names, theta, masks, server, client


def test_blocks_with_many_uncertain_elements_code_them_in_lanes():
    """A block with enough uncertain elements codes them in 64 rANS lanes (the SIMD loops where the
    CPU has them): lossless, near the ideal, and a corrupt lane stream is refused."""
    names, theta, masks, server, client = lane_message()
    packed = client.pack_parameters(masks, names)
    assert packed[0][5] == wire.FORM_CODED
    assert packed[2].tolist()[0] >= 713_045  # one block
    assert packed[4][:2].tolist() == [1, 0]  # its first word: it has lanes
    assert_same_arrays(server.unpack_parameters(packed)[0], masks)
    assert coded_bytes(packed) <= 1.01 * ideal_bytes(theta, masks) + 64
    # the word saying lanes, the lane word count, lane states, lane words (a flipped raw bit at the
    # end would be a valid stream: those bits go as they are)
    for at in (0, 1, 2, 9, 10, 200, 1000, packed[4].size // 2):
        bad = packed[4].copy()
        bad[at] ^= np.uint8(0x10)
        with pytest.raises(ValueError, match="corrupt|coded masks"):
            server.unpack_parameters(packed[:4] + [bad] + packed[5:])


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_lane_blocks_are_the_same_bytes_on_every_cpu_isa(isa, tmp_path):
    """The scalar and AVX2 lane loops (LAYERSEL_CPU_ISA caps the level) write this process's stream
    (AVX-512's where the CPU has it) and decode it."""
    names, theta, masks, _, client = lane_message(32)
    packed = client.pack_parameters(masks, names)
    np.savez(tmp_path / "in.npz", *theta, *masks, *packed[:-1])
    code = (
        "import sys, numpy as np\n"
        "from layersel_ext.wire_coded import CodedMaskPacker\n"
        "z = np.load(sys.argv[1]); a = [z[f'arr_{i}'] for i in range(len(z.files))]\n"
        "theta, masks, packed = a[:2], a[2:4], a[4:]\n"
        "names = ['big', 'tail']\n"
        "server, client = CodedMaskPacker('server'), CodedMaskPacker('client')\n"
        "client.unpack_parameters(server.pack_parameters(theta, names))\n"
        "mine = client.pack_parameters(masks, names)\n"
        "hint = mine[-1]\n"
        "got, _ = server.unpack_parameters(packed + [hint])\n"
        "assert all(np.array_equal(g, m) for g, m in zip(got, masks))\n"
        "np.savez(sys.argv[2], *mine)\n"
    )
    run_at_isa(isa, code, tmp_path / "in.npz", tmp_path / "out.npz")
    got = np.load(tmp_path / "out.npz")
    assert_same_arrays([got[f"arr_{i}"] for i in range(len(got.files))], packed)


def test_coded_masks_of_the_form_before_lanes_are_refused_by_name():
    rng = np.random.default_rng(12)
    names = ["w"]
    theta = [random_theta(rng, (4000,), 0.9)]
    server, client = send_theta(theta, names)
    packed = client.pack_parameters(sampled(rng, theta), names)
    old = [packed[0].copy(), *packed[1:]]
    old[0][5] = 5
    with pytest.raises(ValueError, match="form 5, which an older layersel_ext writes.*same layersel_ext version"):
        server.unpack_parameters(old)


def test_a_short_message_cannot_make_the_server_allocate_more_than_its_model():
    rng = np.random.default_rng(8)
    names = ["w"]
    theta = [random_theta(rng, (1000,), 1.0)]
    server, client = send_theta(theta, names)
    packed = client.pack_parameters(sampled(rng, theta), names)
    meta = packed[1].copy()
    meta[3] = 2**40  # claims a huge layer: no prior of that shape, refused before anything is allocated
    with pytest.raises(ValueError, match="another prior"):
        server.unpack_parameters([packed[0], meta, *packed[2:]])
    tight = CodedMaskPacker("server", max_decoded_bytes=4000)
    tight.pack_parameters(theta, names)
    with pytest.raises(ValueError, match="max_decoded_bytes=4,000"):
        tight.unpack_parameters(packed)


def larger_masked_model() -> torch.nn.Module:
    """Large enough (about 9,000 scores) for coding to beat the bitmap."""
    from fl4health.model_bases.masked_layers.masked_linear import MaskedLinear

    torch.manual_seed(4)
    return torch.nn.Sequential(MaskedLinear(100, 80), MaskedLinear(80, 10))


def test_federated_rounds_give_the_compact_wire_aggregates_bit_for_bit():
    """Three FedPM rounds through fl4health's exchanger and strategy: the coded wire's aggregates
    equal the compact wire's, every round, and from the second round on it sends fewer bytes."""
    fl4health_strategies()
    from fl4health.parameter_exchange.fedpm_exchanger import FedPmExchanger
    from fl4health.strategies.fedpm import FedPm

    runs: dict[str, list] = {}
    sizes: dict[str, list[int]] = {}
    for w in ("compact", "coded"):
        lf.unpatch()
        lf.patch(wire=w)
        try:
            strategy = FedPm()
            clients = [(FedPmExchanger(), larger_masked_model()) for _ in range(2)]
            runs[w], sizes[w] = [], []
            for round_ in range(3):
                pushed = []
                for k, (exchanger, model) in enumerate(clients):
                    torch.manual_seed(100 * round_ + k)
                    pushed.append((exchanger.push_parameters(model), 1))
                sizes[w].append(sum(a.nbytes for a in pushed[0][0]))
                aggregated = strategy.aggregate_bayesian(pushed)
                strategy.reset_beta_priors()
                runs[w].append(aggregated)
                back = strategy.parameter_packer.pack_parameters(list(aggregated.values()), list(aggregated))
                for exchanger, model in clients:
                    exchanger.pull_parameters(back, model)
        finally:
            lf.unpatch()
    for a, b in zip(runs["compact"], runs["coded"]):
        assert list(a) == list(b)
        assert_same_arrays(list(b.values()), list(a.values()))
    assert sizes["coded"][0] == sizes["compact"][0]  # the first round has no θ yet: bitmaps
    assert all(c < p for c, p in zip(sizes["coded"][1:], sizes["compact"][1:])), sizes


def test_without_the_compiled_module_it_sends_bitmaps_and_refuses_coded_streams(monkeypatch):
    rng = np.random.default_rng(9)
    names = ["w"]
    theta = [random_theta(rng, (4000,), 0.9)]
    server, client = send_theta(theta, names)
    masks = sampled(rng, theta)
    coded = client.pack_parameters(masks, names)
    assert coded[0][5] == wire.FORM_CODED
    monkeypatch.setattr(wire_coded, "COMPILED", None)
    assert_same_arrays(client.pack_parameters(masks, names), wire.CompactMaskPacker().pack_parameters(masks, names))
    with pytest.raises(ValueError, match="needs layersel_ext's compiled module"):
        server.unpack_parameters(coded)


def test_patch_coded_wire_installs_packers_per_side():
    fl4health_strategies()
    from fl4health.parameter_exchange.fedpm_exchanger import FedPmExchanger
    from fl4health.parameter_exchange.sparse_coo_parameter_exchanger import SparseCooParameterExchanger
    from fl4health.strategies.fedpm import FedPm

    from layersel_ext.wire_coo import CompactCooPacker

    with lf.patched("coded"):
        client, server = FedPmExchanger().parameter_packer, FedPm().parameter_packer
        assert isinstance(client, CodedMaskPacker) and client.side == "client"
        assert isinstance(server, CodedMaskPacker) and server.side == "server"
        assert isinstance(SparseCooParameterExchanger(0.1, lambda *a: None).parameter_packer, CompactCooPacker)
    assert not isinstance(FedPmExchanger().parameter_packer, CodedMaskPacker)
