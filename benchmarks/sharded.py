"""Sharded selection on CPU: ``python -m benchmarks.sharded [--ranks 1 2 4] [--out DIR | --commit-results]``.

Spawns 1, 2 and 4 gloo ranks on 127.0.0.1; every rank holds an FSDP2 (``fully_shard``) copy of a
bert_like model and its start-of-round copy, and times, for layer selection and sparse COO selection:

* ``sharded``: layersel_ext called on the sharded models (what ``_sharded_scores`` and ``_sharded_select``
  do: all-reduced drift sums / radix histograms, then only the selected data gathered);
* ``gather_all``: what one does without it: ``full_tensor()`` of every state_dict entry of both
  models, ``load_state_dict(..., assign=True)`` into an unsharded skeleton, the unsharded function.

Per (ranks, function, method): the call time (the slowest rank's, median over reps, every rep
starting after a barrier), bytes communicated per rank (ours counted by wrapping torch.distributed's
collectives: each collective's input bytes as ``sent``, an all-gather's output / an all-reduce's
tensor as ``received``; gather_all computed from the shard layout, since ``full_tensor()`` goes
through functional collectives that the wrapper does not see), the peak resident-memory growth of
the first call (the largest rank's), and whether both methods returned the same arrays on every rank.
Results: ``results.json``, ``results.md`` and ``sharded.png`` (matplotlib permitting) in
``benchmarks/out/sharded-<device-name>/`` (git-ignored) or, with ``--commit-results``,
``benchmarks/results/sharded-cpu/``. Several ranks share the machine's cores: on a 2-core box
4 ranks are oversubscribed, and the times say more about that than about the method.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layersel_ext.bench import zoo
from layersel_ext.bench.run import PeakRSS, checkout_root, device_name

ROOT = checkout_root() or Path.cwd()
MODEL_ARGS = {"layers": 4, "d": 384, "vocab": 12000}  # ~13M parameters: a few minutes in all on 2 cores


def model_factory() -> nn.Module:
    return zoo.bert_like(**MODEL_ARGS)


# ---------------------------------------------------------------------------------------------- per rank


class CountBytes:
    """Wrap torch.distributed's all_reduce / all_gather / broadcast: calls and bytes sent / received."""

    NAMES = (
        "all_reduce",
        "all_gather",
        "broadcast",
        "all_gather_into_tensor",
        "all_gather_single",
        "all_gather_object",
    )

    def __enter__(self) -> Counter:
        import torch.distributed as dist

        self.counts: Counter = Counter()
        self.saved = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}

        def wrap(name: str, fn: Callable) -> Callable:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                # The in-place single-tensor all-gather the library uses counts as an all_gather.
                single = name in ("all_gather_into_tensor", "all_gather_single")
                self.counts["all_gather" if single else name] += 1
                if name == "all_gather":
                    self.counts["sent"] += args[1].numel() * args[1].element_size()
                    self.counts["received"] += sum(t.numel() * t.element_size() for t in args[0])
                elif single:
                    self.counts["sent"] += args[1].numel() * args[1].element_size()
                    self.counts["received"] += args[0].numel() * args[0].element_size()
                elif name in ("all_reduce", "broadcast"):
                    self.counts["sent"] += args[0].numel() * args[0].element_size()
                    self.counts["received"] += args[0].numel() * args[0].element_size()
                return fn(*args, **kwargs)

            return wrapped

        for n, fn in self.saved.items():
            setattr(dist, n, wrap(n, fn))
        return self.counts

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        for n, fn in self.saved.items():
            setattr(dist, n, fn)


def gather_all_bytes(model: nn.Module, world: int) -> tuple[int, int]:
    """(sent, received) per rank by full_tensor() of every DTensor entry: an all-gather of equal,
    padded pieces (torch.chunk's split, the largest piece)."""
    from torch.distributed.tensor import DTensor

    sent = received = 0
    for t in model.state_dict().values():
        if isinstance(t, DTensor):
            rows = t.shape[0]
            piece = -(-rows // world) * (t.numel() // max(rows, 1)) * t.element_size()
            sent, received = sent + piece, received + world * piece
    return sent, received


def gathered(model: nn.Module, skeleton: nn.Module) -> nn.Module:
    from torch.distributed.tensor import DTensor

    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    skeleton.load_state_dict(state, assign=True)
    return skeleton


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def rank_main(rank: int, world: int, port: int, reps: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import layersel_ext as L

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (world,))
    full, full0 = zoo.trained_pair(model_factory, "cpu", seed=0)
    sharded, sharded0 = copy.deepcopy(full), copy.deepcopy(full0)
    for m in (sharded, sharded0):
        for child in reversed(list(m.modules())):  # innermost first, as FSDP2 wants
            if child is not m and any(True for _ in child.parameters(recurse=False)):
                fully_shard(child, mesh=mesh)
        fully_shard(m, mesh=mesh)
    del full, full0
    skeleton, skeleton0 = model_factory(), model_factory()
    functions: dict[str, Callable[[nn.Module, nn.Module], Any]] = {
        "select_layers_by_percentage(0.3)": lambda m, m0: L.select_layers_by_percentage(0.3, True, True, m, m0),
        # Most of the model selected: what the gather of selected layers costs in bytes and memory.
        "select_layers_by_percentage(0.9)": lambda m, m0: L.select_layers_by_percentage(0.9, True, True, m, m0),
        "select_sparse_parameters(0.01)": lambda m, m0: L.select_sparse_parameters(
            m, m0, 0.01, L.largest_magnitude_change_scores
        ),
        "select_sparse_parameters(0.1)": lambda m, m0: L.select_sparse_parameters(
            m, m0, 0.1, L.largest_magnitude_change_scores
        ),
    }
    methods: dict[str, Callable[[Callable], Callable[[], Any]]] = {
        "sharded": lambda fn: lambda: fn(sharded, sharded0),
        "gather_all": lambda fn: lambda: fn(gathered(sharded, skeleton), gathered(sharded0, skeleton0)),
    }
    rows = []
    for fname, fn in functions.items():
        outputs = {}
        for method, make in methods.items():
            call = make(fn)
            dist.barrier()
            with PeakRSS() as mem, CountBytes() as counts:
                outputs[method] = call()
            times = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            if method == "gather_all":
                s0, r0 = gather_all_bytes(sharded, world)
                s1, r1 = gather_all_bytes(sharded0, world)
                sent, received = s0 + s1, r0 + r1
            else:
                sent, received = counts["sent"], counts["received"]
            collectives = {k: v for k, v in counts.items() if k not in ("sent", "received")}
            rows.append({"function": fname, "method": method, "times_s": times, "peak_mb": mem.growth_mb,
                         "sent_bytes": sent, "received_bytes": received, "collectives": collectives})  # fmt: skip
        equal = same(outputs["sharded"], outputs["gather_all"])
        for r in rows[-2:]:
            r["equal"] = equal
    Path(folder, f"rank{rank}.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_world(world: int, reps: int) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(rank_main, args=(world, free_port(), reps, folder), nprocs=world, join=True)
        per_rank = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]
    rows = []
    for i, first in enumerate(per_rank[0]):
        ranks = [pr[i] for pr in per_rank]
        slowest = [max(r["times_s"][j] for r in ranks) for j in range(reps)]
        rows.append({
            "ranks": world, "function": first["function"], "method": first["method"],
            "ms": 1e3 * statistics.median(slowest), "ms_min": 1e3 * min(slowest),
            "sent_bytes_per_rank": max(r["sent_bytes"] for r in ranks),
            "received_bytes_per_rank": max(r["received_bytes"] for r in ranks),
            "peak_mb_max_rank": max(r["peak_mb"] for r in ranks),
            "collectives": first["collectives"], "equal_on_every_rank": all(r["equal"] for r in ranks),
        })  # fmt: skip
    return rows


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = (
        "| ranks | function | method | ms / call | sent / rank | received / rank | peak MB (max rank) "
        "| collectives | equal |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        coll = ", ".join(f"{k} {v}" for k, v in sorted(r["collectives"].items())) or "–"
        if r["method"] == "gather_all":
            coll = "full_tensor() per entry"
        lines.append(
            f"| {r['ranks']} | {r['function']} | {r['method']} | {r['ms']:.1f} | {fmt_bytes(r['sent_bytes_per_rank'])} "
            f"| {fmt_bytes(r['received_bytes_per_rank'])} | {r['peak_mb_max_rank']:.0f} | {coll} "
            f"| {'yes' if r['equal_on_every_rank'] else '**NO**'} |"
        )
    intro = (
        f"Sharded selection, {meta['model']} ({meta['params'] / 1e6:.1f}M parameters, {meta['entries']} entries, "
        f"{fmt_bytes(meta['model_bytes'])} a model), FSDP2 on 1-D gloo meshes; machine: {meta['machine']}, "
        f"{meta['cores']} cores, load average {meta['load_before']} before / {meta['load_after']} after; "
        f"torch {meta['torch']}; {meta['reps']} reps (median of the slowest rank), {meta['date']}.\n\n"
    )
    return intro + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    functions = list(dict.fromkeys(r["function"] for r in rows))
    fig, axes = plt.subplots(2, len(functions), figsize=(4.2 * len(functions), 7), squeeze=False)
    for j, fname in enumerate(functions):
        for method, color in (("sharded", "tab:blue"), ("gather_all", "tab:gray")):
            sel = [r for r in rows if r["function"] == fname and r["method"] == method]
            ranks = [r["ranks"] for r in sel]
            axes[0][j].plot(ranks, [r["ms"] for r in sel], "o-", color=color, label=method)
            axes[1][j].plot(ranks, [r["received_bytes_per_rank"] / 2**20 for r in sel], "o-", color=color, label=method)
        axes[0][j].set_title(fname, fontsize=9)
        axes[0][j].set_ylabel("ms per call (slowest rank)")
        axes[1][j].set_ylabel("MB received per rank")
        axes[1][j].set_yscale("log")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xlabel("gloo ranks")
            ax.set_xticks(sorted({r["ranks"] for r in rows}))
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", help="output folder (default benchmarks/out/sharded-<device-name>/)")
    p.add_argument("--commit-results", action="store_true", help="write benchmarks/results/sharded-cpu/")
    args = p.parse_args(argv)
    if args.commit_results:
        folder = ROOT / "benchmarks" / "results" / "sharded-cpu"
    else:
        folder = Path(args.out) if args.out else ROOT / "benchmarks" / "out" / f"sharded-{device_name('cpu')}"
    folder.mkdir(parents=True, exist_ok=True)
    model = model_factory()
    machine = device_name("cpu")
    meta: dict[str, Any] = {
        "model": "bert_like(" + ", ".join(f"{k}={v}" for k, v in MODEL_ARGS.items()) + ")",
        "params": sum(t.numel() for t in model.state_dict().values()),
        "entries": len(model.state_dict()),
        "model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        "machine": machine, "cores": os.cpu_count(), "torch": torch.__version__, "reps": args.reps,
        "load_before": round(os.getloadavg()[0], 2), "date": datetime.date.today().isoformat(),
    }  # fmt: skip
    del model
    rows = []
    for world in args.ranks:
        t0 = time.monotonic()
        rows += run_world(world, args.reps)
        print(f"{world} rank(s): {time.monotonic() - t0:.0f} s", file=sys.stderr)
    meta["load_after"] = round(os.getloadavg()[0], 2)
    (folder / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, meta)
    (folder / "results.md").write_text(table)
    plot(rows, folder / "sharded.png", f"{meta['model']} on {machine} ({meta['cores']} cores), gloo")
    print(table)
    print(f"-> {folder}", file=sys.stderr)
    return 0 if all(r["equal_on_every_rank"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
