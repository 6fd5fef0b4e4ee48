"""The benchmark tables in README.md and docs/, generated from the committed results files.

    python -m benchmarks.tables            # rewrite every generated table in place
    python -m benchmarks.tables --check    # exit 1 when a file is out of date (tests/test_doc_tables.py)

A generated table sits between two marker comments, each on a line of its own, in README.md,
CONTRIBUTING.md or docs/*.md:

    <!-- tables:NAME:begin -->
    ... (everything in between is replaced) ...
    <!-- tables:NAME:end -->

NAME is a key of ``BLOCKS``. The numbers come from ``benchmarks/results/*/results.json`` (the
benchmark runner's, one folder per machine), ``benchmarks/results/wire-cpu/wire.json``, ``mask_coding.json``,
``benchmarks/results/sharded-cpu/results.json`` and the newest ``benchmarks/results/*/fedpm_wire.json``,
and the cells are drawn by the same markdown functions that write each folder's ``results.md``
(``layersel_ext.bench.run.markdown``, ``benchmarks.wire.markdown``, ``benchmarks.sharded.markdown``,
``benchmarks.fedpm_wire.markdown``), so a table in the docs reads like
the results file it came from. The captions name the machine from the results' own metadata and
leave out dates and commits: the results files keep those, the prose does not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# The rows a fl4health user asks about first: a layer selection, a score function and sparse COO
# on a large model, a selection on a model of many small tensors, FedPM masks.
HEADLINE_ROWS = [
    ("bert_like", "select_by_percentage"),
    ("bert_like", "largest_magnitude_change_scores"),
    ("bert_like", "sparse_coo_0.01"),
    ("many_small", "select_by_threshold"),
    ("masked_mlp", "sample_masks"),
]
HEADLINE_COLUMNS = ["model", "criterion", "fl4health ms", "ours_compiled ms", "× fl4health", "equal"]

MARKER = re.compile(
    r"^(?P<begin><!-- tables:(?P<name>[A-Za-z0-9_.-]+):begin -->\n)(?P<body>.*?)^(?P<end><!-- tables:(?P=name):end -->)",
    re.DOTALL | re.MULTILINE,
)


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def machine_results() -> list[tuple[Path, dict[str, Any]]]:
    """Every benchmark runner folder (its results.json has the runner's ``device_name``), newest run first."""
    found = []
    for path in sorted(RESULTS.glob("*/results.json")):
        data = load(path)
        if "device_name" in data.get("meta", {}):
            found.append((path, data))
    return sorted(found, key=lambda pd: str(pd[1]["meta"].get("date", "")), reverse=True)


def link(target: Path, doc_dir: Path) -> str:
    """``target`` relative to the folder of the document that links it (markdown links are relative)."""
    return Path(os.path.relpath(target, doc_dir)).as_posix()


def caption(path: Path, meta: dict[str, Any], doc_dir: Path) -> str:
    build = meta.get("build", {})
    parts = [f"{meta['device']}, {meta['threads']} threads"]
    if "cores" in meta:
        parts[0] += f" on {meta['cores']} cores"
    parts.append(f"torch {meta['torch']}" + (f", Python {build['python']}" if "python" in build else ""))
    parts.append(f"median of {meta['reps']} runs" + (" (quick smoke run)" if meta.get("quick") else ""))
    if "other_cpu_cores" in meta:
        parts.append(
            f"other processes used {meta['other_cpu_cores']:.2f} cores; rows flagged: "
            f"{meta.get('busy_rows', 0)} busy, {meta.get('below_floor_rows', 0)} below floor"
        )
    else:
        parts.append("recorded without the busy-machine checks")
    return f"**`{meta['device_name']}`**: " + "; ".join(parts) + f" ([results.json]({link(path, doc_dir)}))."


def project(table: str, keep: list[str], first: tuple[str, str] | None = None) -> list[str]:
    """The columns ``keep`` of a markdown table, in that order; ``first`` = (header, value) adds a leading column."""
    lines = table.strip().splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    index = [cells[0].index(k) for k in keep]
    out = []
    for i, row in enumerate(cells):
        picked = [row[j] for j in index]
        if first is not None:
            picked.insert(0, first[0] if i == 0 else "---" if i == 1 else first[1])
        out.append("| " + " | ".join(picked) + " |" if i != 1 else "|" + "---|" * len(picked))
    return out


def headline(doc_dir: Path) -> str:
    """The newest run of each device kind (cpu, cuda), the HEADLINE_ROWS, the fl4health-facing columns,
    and the plot of the newest CPU run."""
    from layersel_ext.bench.run import markdown

    newest: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path, data in machine_results():
        newest.setdefault(data["meta"]["device"], (path, data))
    lines: list[str] = []
    captions = []
    for kind in ("cpu", "cuda"):
        if kind not in newest:
            continue
        path, data = newest[kind]
        rows = [r for key in HEADLINE_ROWS for r in data["rows"] if (r["model"], r["criterion"]) == key]
        table = project(markdown(rows), HEADLINE_COLUMNS, ("machine", f"`{data['meta']['device_name']}`"))
        lines += table if not lines else table[2:]
        captions.append(caption(path, data["meta"], doc_dir))
    text = "\n".join(lines) + "\n\n" + "\n".join(f"- {c}" for c in captions) + "\n"
    if "cpu" in newest:
        png = newest["cpu"][0].parent / "speedup.png"
        if png.exists():
            name = newest["cpu"][1]["meta"]["device_name"]
            text += f"\n![speed-up over fl4health 0.4.2 on {name}]({link(png, doc_dir)})\n"
    return text


def all_machines(doc_dir: Path) -> str:
    """Every machine's full table (as its results.md), newest run first, with its plot."""
    from layersel_ext.bench.run import markdown

    parts = []
    for path, data in machine_results():
        meta = data["meta"]
        part = f"### {meta['device_name']}\n\n{caption(path, meta, doc_dir)}\n\n{markdown(data['rows'])}\n"
        png = path.parent / "speedup.png"
        if png.exists():
            part += f"\n![speed-up over fl4health 0.4.2 on {meta['device_name']}]({link(png, doc_dir)})\n"
        parts.append(part)
    return "\n".join(parts)


def _wire_table(doc_dir: Path, stem: str, markdown: Callable[[list[dict[str, Any]], dict[str, Any]], str]) -> str:
    """A wire benchmark's table and its note from ``wire-cpu/<stem>.json``: its own rendering without
    the dated title, under a caption naming the machine and the file."""
    path = RESULTS / "wire-cpu" / f"{stem}.json"
    data = load(path)
    meta = data["meta"]
    body = markdown(data["rows"], meta).split("\n", 2)[2]  # drop the title line and the blank after it
    head = (
        f"Machine: {meta['machine']}, {meta['threads']} threads, torch {meta['torch']} "
        f"([{stem}.json]({link(path, doc_dir)})).\n\n"
    )
    return head + body


def wire(doc_dir: Path) -> str:
    """The bytes-on-the-wire table (benchmarks.wire)."""
    from benchmarks.wire import markdown

    return _wire_table(doc_dir, "wire", markdown)


def mask_coding(doc_dir: Path) -> str:
    """The coded-mask speed and size table (benchmarks.mask_coding)."""
    from benchmarks.mask_coding import markdown

    return _wire_table(doc_dir, "mask_coding", markdown)


def sharded(doc_dir: Path) -> str:
    """The sharded benchmark's table (benchmarks.sharded's rendering, caption without its date)."""
    from benchmarks.sharded import fmt_bytes, markdown

    path = RESULTS / "sharded-cpu" / "results.json"
    data = load(path)
    meta = data["meta"]
    table = markdown(data["rows"], meta).split("\n\n", 1)[1]  # the dated intro paragraph is replaced below
    head = (
        f"FSDP2 `{meta['model']}` ({meta['params'] / 1e6:.1f}M parameters, {meta['entries']} entries, "
        f"{fmt_bytes(meta['model_bytes'])} a model) on 1-D gloo meshes; machine `{meta['machine']}`, "
        f"{meta['cores']} cores, load average {meta['load_before']} before / {meta['load_after']} after; torch "
        f"{meta['torch']}; median of {meta['reps']} runs of the slowest rank "
        f"([results.json]({link(path, doc_dir)})).\n\n"
    )
    return head + table


def fedpm_wire_results() -> tuple[Path, dict[str, Any]]:
    """The newest ``benchmarks/results/*/fedpm_wire.json`` (benchmarks.fedpm_wire's)."""
    found = [(path, load(path)) for path in sorted(RESULTS.glob("*/fedpm_wire.json"))]
    if not found:
        raise SystemExit("no benchmarks/results/*/fedpm_wire.json: run `python -m benchmarks.fedpm_wire`")
    return max(found, key=lambda pd: str(pd[1]["meta"].get("when", "")))


def fedpm_caption(path: Path, meta: dict[str, Any], doc_dir: Path) -> str:
    return (
        f"Machine: `{meta['machine']}`, {meta['cores']} cores (load average {meta['load_before'][0]} before, "
        f"{meta['load_after'][0]} after); torch {meta['torch']}, flwr {meta['flwr']}, fl4health "
        f"{meta['fl4health']}; {meta['rounds']} rounds; all the federations took {meta['seconds']:.0f} s "
        f"([fedpm_wire.json]({link(path, doc_dir)}))."
    )


def fedpm_wire(doc_dir: Path) -> str:
    """Every model and client count of the newest FedPM federation run, round by round and wire by wire."""
    from benchmarks.fedpm_wire import markdown

    path, data = fedpm_wire_results()
    return fedpm_caption(path, data["meta"], doc_dir) + "\n\n" + markdown(data, title=False)


def fedpm_wire_headline(doc_dir: Path) -> str:
    """The most compact wire of the newest FedPM federation run, in rounds 1, 3 and the last."""
    from benchmarks.fedpm_wire import headline as fedpm_headline

    path, data = fedpm_wire_results()
    return fedpm_headline(data) + "\n" + fedpm_caption(path, data["meta"], doc_dir) + "\n"


BLOCKS: dict[str, Callable[[Path], str]] = {
    "headline": headline,
    "all-machines": all_machines,
    "wire": wire,
    "mask-coding": mask_coding,
    "sharded": sharded,
    "fedpm_wire": fedpm_wire,
    "fedpm_wire_headline": fedpm_wire_headline,
}


def documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def render(path: Path) -> str:
    """The document with every marked block regenerated."""
    text = path.read_text()

    def block(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise SystemExit(f"{path.relative_to(ROOT)}: unknown table {name!r} (known: {', '.join(BLOCKS)})")
        return m.group("begin") + BLOCKS[name](path.parent).rstrip("\n") + "\n" + m.group("end")

    new = MARKER.sub(block, text)
    opened = len(re.findall(r"^<!-- tables:[^:\n]+:begin -->", text, re.MULTILINE))
    closed = len(MARKER.findall(text))
    if opened != closed:
        raise SystemExit(f"{path.relative_to(ROOT)}: {opened} begin markers but {closed} complete blocks")
    return new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is out of date")
    args = p.parse_args(argv)
    stale = []
    for path in documents():
        if not path.exists():
            continue
        new = render(path)
        if new != path.read_text():
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(
            "out of date: " + ", ".join(map(str, stale)) + " (run `python -m benchmarks.tables` and commit the result)",
            file=sys.stderr,
        )
        return 1
    for name in stale:
        print(f"rewrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
