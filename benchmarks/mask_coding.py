"""FedPM mask coding speed and size (``patch(wire="coded")``), against sampling the masks.

    python -m benchmarks.mask_coding [--out DIR] [--quick]

A 24.6M-element message shaped like BERT-base's large matrices, with θ (the server's Bernoulli
parameters, the prior) in four regimes: "round 3" (90% of θ exactly 0 or 1, the rest 1/2: two
clients that disagreed there, whose bits go as they are), "round 3, 4 clients" (58% certain, the rest
1/4, 1/2 or 3/4, as in the 4-client federations), "all uncertain" (θ = 1/3 everywhere: about 0.92
bits an element, every one a symbol) and "all certain" (θ exactly 0 or 1). The scores are logit(θ), as the client
holds them after ``FedPmExchanger.pull_parameters``; the masks are sampled from them.

Columns: sampling the masks into a bitmap (``ops.sample_mask_bits``, what the coded client does
anyway); the prior (quantizing θ, once per round on each side); encoding (``wire_coded.encode_bits``
from the bitmap), decoding to the bitmap (``_C.mask_decode``) and the whole unpacking
(``CodedMaskPacker.unpack_parameters``: to the int64 masks fl4health's strategy sums), each on all
threads and on one (the per-core rates); the coded bytes against the ideal (the sum of -log2 q(bit)
under the coder's model). Medians after a warm-up; sampling, encoding and decoding are timed in
turn, round after round, so that other jobs on the machine slow them alike, and (enc + dec) / sample
is the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.wire import median_ms, write_results

SHAPES = [(3072, 768)] * 8 + [(768, 768)] * 8 + [(30522, 32)]  # 24.6M elements
QUICK_SHAPES = [(300, 200)] * 4
# name: (share of θ exactly 0 or 1, the values of the rest, drawn evenly)
REGIMES = {
    "round 3": (0.9, (0.5,)),
    "round 3, 4 clients": (0.58, (0.25, 0.5, 0.75)),
    "all uncertain": (0.0, (1 / 3,)),
    "all certain": (1.0, (0.5,)),
}


def theta_for(rng: np.random.Generator, shape: tuple[int, ...], certain: float, rest: tuple[float, ...]) -> np.ndarray:
    return np.where(rng.random(shape) < certain, (rng.random(shape) < 0.5).astype(np.float64), rng.choice(rest, shape))


def ideal_bytes(theta: list[np.ndarray], bits: np.ndarray) -> float:
    flat = np.unpackbits(bits, count=sum(t.size for t in theta), bitorder="little").astype(bool)
    q = np.floor(np.concatenate([t.ravel() for t in theta]) * 2**15 + 0.5)
    p1 = np.where(q == 0, 2.0**-15, np.where(q == 2**15, 1 - 2.0**-15, q / 2**15))
    return float(-np.log2(np.where(flat, p1, 1 - p1)).sum()) / 8


def mask_bytes(packed: list[np.ndarray]) -> int:
    """The bytes a stream spends on the masks: the coded blocks and their sizes, and any bitmap."""
    from layersel_ext.wire import FORM_CODED

    return (
        int(packed[2].nbytes + packed[3].nbytes + packed[4].nbytes) if packed[0][5] == FORM_CODED else packed[2].nbytes
    )


def row(
    regime: str, certain: float, rest: tuple[float, ...], shapes: list[tuple[int, ...]], reps: int
) -> dict[str, Any]:
    from layersel_ext import ops, wire_coded
    from layersel_ext.wire import _DTYPE_CODES

    rng = np.random.default_rng(0)
    names = [f"layer{i}.weight_scores" for i in range(len(shapes))]
    theta = [theta_for(rng, s, certain, rest) for s in shapes]
    scores = [torch.logit(torch.from_numpy(t)).float() for t in theta]
    server, client = wire_coded.CodedMaskPacker("server"), wire_coded.CodedMaskPacker("client")
    client.unpack_parameters(server.pack_parameters(theta, names))
    bits = ops.sample_mask_bits(scores, 7, key_by_scores=False).numpy()
    code = _DTYPE_CODES[np.dtype(np.int64)]
    encode = partial(wire_coded.encode_bits, bits, names, shapes, code, client.priors)
    packed = encode()
    n = sum(math.prod(s) for s in shapes)
    n_certain = int(sum(((t == 0) | (t == 1)).sum() for t in theta))
    threads = torch.get_num_threads()
    out: dict[str, Any] = {
        "regime": regime,
        "elements": n,
        "certain": n_certain,
        "threads": threads,
        "prior_ms": median_ms(wire_coded.priors_of, theta, names, reps=reps),
        "bitmap_bytes": bits.nbytes,
        "coded_bytes": mask_bytes(packed),
        "ideal_bytes": ideal_bytes(theta, bits),
    }
    coded = [server.priors[name] for name in names]
    to_bits = partial(
        ops.COMPILED.mask_decode,
        torch.from_numpy(packed[4]),
        packed[2][1:].tolist(),
        int(packed[2][0]),
        [p.q for p in coded],
        [p.words for p in coded],
    )
    # The three the ratio compares are timed in turn; the unpacking (its fresh int64 arrays' page
    # faults would slow whatever runs next) on its own.
    sample = partial(ops.sample_mask_bits, scores, 7)
    rounds = interleaved_ms({"sample_ms": sample, "encode_ms": encode, "decode_bits_ms": to_bits}, reps)
    out.update({key: statistics.median(ms) for key, ms in rounds.items()})
    # A round's three calls ran within tens of ms of each other, so their ratio holds under other jobs'
    # load as it comes and goes; the median over rounds.
    out["coding_per_sample"] = statistics.median(
        (e + d) / s for s, e, d in zip(rounds["sample_ms"], rounds["encode_ms"], rounds["decode_bits_ms"])
    )
    out["decode_ms"] = median_ms(server.unpack_parameters, packed, reps=reps)
    torch.set_num_threads(1)
    try:
        timed = {
            key: statistics.median(ms)
            for key, ms in interleaved_ms({"encode_ms": encode, "decode_bits_ms": to_bits}, reps).items()
        }
        timed["decode_ms"] = median_ms(server.unpack_parameters, packed, reps=reps)
    finally:
        torch.set_num_threads(threads)
    out.update({f"{key}_1t": ms for key, ms in timed.items()})
    return out


def interleaved_ms(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Each function's ms in each of ``reps`` rounds that call them all in turn, after a warm-up call
    each: other jobs on the machine then slow them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(1e3 * (time.perf_counter() - t0))
    return times


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# FedPM mask coding ({meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, {meta['when']})",
        "",
        (
            "| θ | elements | bpp | coded / ideal | coded − ideal B | sample ms | prior ms | encode ms | "
            "decode ms | (enc + dec) / sample | to int64 ms | encode M/s/core | decode M/s/core |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        enc, dec = r["encode_ms"], r["decode_bits_ms"]
        lines.append(
            f"| {r['regime']} | {r['elements'] / 1e6:.1f}M | {8 * r['coded_bytes'] / r['elements']:.4f} | "
            f"{r['coded_bytes'] / max(r['ideal_bytes'], 1e-9):.3f} | {r['coded_bytes'] - r['ideal_bytes']:.0f} | "
            f"{r['sample_ms']:.1f} | {r['prior_ms']:.1f} | {enc:.1f} | {dec:.1f} | "
            f"{r['coding_per_sample']:.2f} | {r['decode_ms'] - dec:.1f} | "
            f"{r['elements'] / r['encode_ms_1t'] / 1e3:,.0f} | {r['elements'] / r['decode_bits_ms_1t'] / 1e3:,.0f} |"
        )
    lines += [
        "",
        (
            "Encode: from the sampled bitmap to the coded stream; decode: from the stream back to the bitmap; "
            "to int64: the rest of the server's unpacking, expanding the bits to the int64 masks fl4health's "
            "strategy sums (as the compact wire's decoding must too). (enc + dec) / sample: the median of the "
            "ratios of rounds that time the three in turn. Rates per core are one-thread runs over "
            "all elements. Prior: quantizing θ, once per round on each side. Ideal: the sum of -log2 q(bit) "
            "under the coder's model (a contradicted certain element has probability 2^-15)."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--quick", action="store_true", help="a small message, 2 repetitions (a smoke test)")
    args = p.parse_args(argv)
    shapes, reps = (QUICK_SHAPES, 2) if args.quick else (SHAPES, args.reps)
    rows = [row(regime, certain, rest, shapes, reps) for regime, (certain, rest) in REGIMES.items()]
    write_results(rows, markdown, args.out, "mask_coding")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
