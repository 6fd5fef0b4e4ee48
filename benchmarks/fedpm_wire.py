"""FedPM in real federations, per round and per wire: the bytes each client sends, bits per mask element,
and whether the aggregated models are bitwise equal across the wires.

    python -m benchmarks.fedpm_wire [--modes fedpm_mlp fedpm_cnn] [--clients 2 4] [--rounds 5] [--out DIR]

For each masked model and client count, ``examples.federated_rounds.run_wire_comparison`` runs the same
federation (a Flower server with fl4health's ``FedPmServer`` and ``FedPm``, the clients training the
scores of fl4health's masked layers for an epoch a round, all processes on loopback) with fl4health
alone and once per wire of ``layersel_ext.fl4health.WIRES``. Bytes are those of the serialized Flower
``FitRes`` parameters (every array as .npy bytes); bits per parameter count all of a message's bytes,
framing included, over its mask elements. Writes ``fedpm_wire.json`` and ``fedpm_wire.md`` into
``--out`` (default ``benchmarks/results/<machine>/``, the machine as the benchmark runner names it).
Exits 1 when a federation fails or the aggregated models differ across wires in any round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def meta_of(args: argparse.Namespace, seconds: float, load_before: tuple[float, ...]) -> dict[str, Any]:
    from importlib.metadata import version

    import torch

    from layersel_ext.bench.run import device_name
    from layersel_ext.fl4health import WIRES

    return {
        "machine": device_name("cpu"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": version("flwr"),
        "fl4health": version("fl4health"),
        "wires": list(WIRES),
        "rounds": args.rounds,
        "seconds": round(seconds, 1),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }


def markdown(data: dict[str, Any], title: bool = True) -> str:
    """Every model and client count as ``examples.federated_rounds.wire_table``, with its caption."""
    from examples.federated_rounds import wire_table

    meta = data["meta"]
    parts = []
    if title:
        parts.append(f"# FedPM in real federations, per round and wire ({meta['machine']}, {meta['when']})\n")
    for s in data["results"]:
        seconds = ", ".join(f"{label} {run['seconds']:.0f} s" for label, run in s["runs"].items())
        parts.append(
            f"**`{s['mode']}`, {s['clients']} clients** ({s['mask_elements']:,} mask elements; wall time: "
            f"{seconds}):\n\n{wire_table(s)}"
        )
    parts.append(NOTE)
    return "\n".join(parts)


NOTE = (
    "Bytes: the serialized Flower `FitRes` parameters a client sends in the round (the mean over the "
    "clients); bpp: those bytes' bits over the mask elements, framing included; ×: how many times fewer "
    "bytes than fl4health alone (unpatched, whose masks are other samples: scipy's). Models equal: the "
    "theta arrays the server sends back after the round are bitwise equal on every layersel_ext wire. "
    "±inf scores held: the share of the scores the clients hold at the start of the round that are "
    "+-inf (theta 0 or 1: the mask is fixed). Ideal bpp: the sum of -log2 q(bit) over the sent bits, q "
    "the theta the server last sent quantized to 15 bits as the coded wire does (kept off 0 and 1 by "
    "2**-15), a layer without one (round 1) or not worth "
    "coding as a bitmap; no framing. Train loss: the clients' mean cross-entropy over the round's epoch "
    "(10 classes: chance is ln 10 = 2.303)."
)


def headline(data: dict[str, Any]) -> str:
    """A short table: per model and client count, the most compact wire (the last of WIRES) in rounds
    1, 3 and the last (bits per mask element; from round 3 on also how many times fewer bytes than
    fl4health), and whether the models were equal every round."""
    wire = data["meta"]["wires"][-1]
    last = data["meta"]["rounds"]
    shown = [1, 3, last] if last > 3 else list(range(1, last + 1))
    fewer = shown[1:]
    head = ["model", "clients", "wire", *(f"bpp round {r}" for r in shown)]
    head += [*(f"× fewer bytes, round {r}" for r in fewer), "models equal every round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in data["results"]:
        by_round = {row["round"]: row["runs"].get(wire) for row in s["table"]}
        cells = [f"`{s['mode']}`", str(s["clients"]), f"`{wire}`"]
        cells += [f"{by_round[r]['bpp']:.3f}" if by_round.get(r) else "–" for r in shown]
        cells += [f"{by_round[r]['x_fewer_than_fl4health']:.0f}×" if by_round.get(r) else "–" for r in fewer]
        cells.append("yes" if s["aggregates_identical_every_round"] else "NO")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from examples.federated_rounds import WIRE_MODES, run_wire_comparison, summarize_wires, wire_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=WIRE_MODES, default=list(WIRE_MODES))
    p.add_argument("--clients", nargs="+", type=int, default=[2, 4])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    t0 = time.monotonic()
    results = []
    for mode in args.modes:
        for clients in args.clients:
            summary = summarize_wires(run_wire_comparison(mode, clients, args.rounds), mode, clients, args.rounds)
            print(f"{mode}, {clients} clients:\n{wire_table(summary)}", flush=True)
            results.append(summary)
    data = {"meta": meta_of(args, time.monotonic() - t0, load_before), "results": results}
    out = args.out or ROOT / "benchmarks" / "results" / data["meta"]["machine"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "fedpm_wire.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "fedpm_wire.md").write_text(markdown(data))
    print(f"written: {out / 'fedpm_wire.json'}, {out / 'fedpm_wire.md'}")
    ok = all(s["all_completed"] and s["aggregates_identical_every_round"] for s in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
