"""The main job: layersel_ext vs fl4health 0.4.2 vs plain torch vs the memory-bandwidth floor.

    python -m layersel_ext bench [--quick] [--device cpu|cuda] [--reps 7] [--no-big] [--only REGEX]
                                 [--out DIR | --commit-results]
    (from a checkout also: python -m benchmarks.run ..., ./dev.sh bench ...)

Every row is timed side by side in one process: warm-up, then the median of --reps runs per
backend; ratios are taken from those medians. 'floor' is torch.dot over the bytes the row must
read (measured in the same run); '% floor' = floor / ours. Peak memory is the growth of host RSS
(sampled) or, on CUDA, torch.cuda.max_memory_allocated above the start. Each row also checks
that our answer equals fl4health's. Writes a markdown table to stdout, and results.md,
results.json and speedup.png into the results folder.

Results folder: --out DIR; by default benchmarks/out/<device-name>/ in a checkout (ignored by
git) or ./layersel_ext-bench/<device-name>/ elsewhere. The committed tables in
benchmarks/results/<device-name>/ are written only on purpose, with --commit-results (a full run on
a quiet machine), so that a smoke run never overwrites them.

A loaded machine makes readings slow or meaningless, so the runner watches for it: the 1-minute
load average before and after the run goes into the JSON (a warning when it is above half the
cores before the start; after the run it includes this run's own threads), and during every row it
measures the CPU time that *other* processes took (system busy time minus ours, in cores). A row
is flagged 'busy' when others took more than half the cores on average while it ran (on 2 cores:
one competing process running flat out, enough to make every parallel region wait for a thread
that shares its core, up to 2x slower), and 'below floor' when a reading is faster than the
memory-bandwidth floor measured beside it ('% floor' above 100%: the floor itself was disturbed,
the reading is not valid as it stands), and 'unstable' when the slowest of a column's timed runs took
more than UNSTABLE_SPREAD times its fastest (a reading that a scheduler's time slice or a burst of
other work decided). Flags appear in the JSON rows and a 'flags' column. A --quick run withholds its
ratios (prints 'rerun') for flagged rows, and all of them when the machine was busy: a smoke run on a
shared machine must not pass for a measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

import layersel_ext as L
from layersel_ext import _masks, ops

from . import zoo

SCORE_FUNCTIONS = list(L.SCORE_FUNCTION_NAMES)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PeakRSS:
    """Peak growth of this process's resident memory while the block runs (sampled every 0.5 ms)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0

    def __enter__(self) -> PeakRSS:  # noqa: PYI034
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


BUSY_LOAD_PER_CORE = 0.5  # "busy": other work above half the cores (see the module docstring)
CORES = os.cpu_count() or 1


class OtherCPU:
    """CPU used by other processes while the block runs, in cores (system-wide busy time minus this
    process's own user + system time, over the wall time). /proc/stat ticks are 10 ms: a block of
    100 ms on 2 cores reads to about 0.1 core."""

    def __enter__(self) -> OtherCPU:  # noqa: PYI034
        self.proc = psutil.Process()
        self.t0, self.sys0, self.me0 = time.monotonic(), self._busy(), self._mine()
        return self

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        total = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"))
        return total - t.idle - getattr(t, "iowait", 0.0)

    def _mine(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def __exit__(self, *exc: object) -> None:
        wall = max(time.monotonic() - self.t0, 1e-9)
        self.seconds = wall
        self.cores = max(0.0, (self._busy() - self.sys0) - (self._mine() - self.me0)) / wall


def busy_cores_limit() -> float:
    return BUSY_LOAD_PER_CORE * CORES


UNSTABLE_SPREAD = 1.5  # slowest / fastest timed run of one column above this: the row is 'unstable'
TIMED = ("fl4health", "ours_compiled", "ours_torch", "plain_torch")  # the columns a ratio is taken from
COLUMNS = """Columns: fl4health / ours_compiled / ours_torch / plain_torch ms: median time of one call with
fl4health 0.4.2, layersel_ext's compiled kernels, layersel_ext's pure-torch fallback, and the same
computation written in plain torch; floor ms: torch.dot over the bytes the row must read (the memory
bandwidth floor, measured beside it); % floor: floor / ours; x fl4health: fl4health / ours (ours =
compiled when built, else torch); equal: our answer equals fl4health's; peak MB: memory growth during
the first call; flags: busy (other processes used more than half the cores while the row ran),
below floor (a reading faster than the floor: disturbed), unstable (a column's slowest run took more
than UNSTABLE_SPREAD x its fastest)."""


SLOW_S = 3.0  # a first call slower than this is timed once (fl4health's sparse selection: ~40 s)


def time_it(fn: Callable[[], Any], device: str, reps: int) -> tuple[float, float, Any, float]:
    """(median seconds, peak memory growth in MB, output, slowest / fastest timed run). The first call
    is the warm-up and the memory measurement; a call slower than SLOW_S is not repeated (spread 1)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        out = fn()
        sync(device)
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else mem.growth_mb
    if first > SLOW_S:
        return first, peak, out, 1.0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak, out, max(times) / max(min(times), 1e-12)


def with_backend(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        previous = ops.backend()
        ops.set_backend(name)  # type: ignore[arg-type]
        try:
            return fn()
        finally:
            ops.set_backend(previous)

    return run


def same_layers(a: tuple, b: tuple) -> bool:
    return a[1] == b[1] and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a[0], b[0]))


def same_scores(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def same_mask_layout(a: tuple, b: tuple) -> bool:
    return a[1] == b[1] and all(
        x.dtype == np.asarray(y).dtype and x.size == np.asarray(y).size for x, y in zip(a[0], b[0])
    )


def floor_fn(nbytes: int, device: str) -> Callable[[], Any]:
    """torch.dot over two float32 buffers holding `nbytes` in all: the memory-read floor."""
    n = max(1, nbytes // 8)
    a = torch.ones(n, device=device)
    b = torch.ones(n, device=device)
    return lambda: torch.dot(a, b)


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class Bench:
    def __init__(self, device: str, reps: int, fl4health: Any) -> None:
        self.device, self.reps, self.F = device, reps, fl4health
        self.rows: list[dict[str, Any]] = []
        self.has_compiled = L._loader.COMPILED is not None

    def row(
        self,
        model: str,
        criterion: str,
        impls: dict[str, Callable[[], Any]],
        floor_bytes: int,
        check: Callable[[Any, Any], bool] | None,
        progress: str,
    ) -> None:
        print(f"  {progress} {model} / {criterion}", file=sys.stderr, flush=True)
        result: dict[str, Any] = {"model": model, "criterion": criterion, "device": self.device}
        outputs = {}
        with OtherCPU() as others:
            for name, fn in impls.items():
                sec, mem, outputs[name], spread = time_it(fn, self.device, self.reps)
                result[f"{name}_ms"] = sec * 1e3
                result[f"{name}_peak_mb"] = mem
                result[f"{name}_spread"] = round(spread, 2)
            floor_s, _, _, _ = time_it(floor_fn(floor_bytes, self.device), self.device, self.reps)
        result["floor_ms"] = floor_s * 1e3
        result["other_cpu_cores"] = round(others.cores, 2)
        if check is not None and "fl4health" in outputs:
            result["equal_to_fl4health"] = bool(
                all(check(outputs["fl4health"], outputs[k]) for k in ("ours_compiled", "ours_torch") if k in outputs)
            )
        ours = result.get("ours_compiled_ms", result.get("ours_torch_ms"))
        if "fl4health_ms" in result and ours:
            result["speedup_vs_fl4health"] = result["fl4health_ms"] / ours
        if ours:
            result["pct_of_floor"] = 100.0 * result["floor_ms"] / ours
        result["below_floor"] = result.get("pct_of_floor", 0.0) > 100.0
        result["busy"] = others.cores > busy_cores_limit()
        result["flags"] = flags(result)
        if result["flags"]:
            print(f"      flagged: {', '.join(result['flags'])}", file=sys.stderr, flush=True)
        self.rows.append(result)


def flags(row: dict[str, Any]) -> list[str]:
    out = []
    if row.get("below_floor"):
        out.append(f"below floor ({row['pct_of_floor']:.1f}%)")
    if row.get("busy"):
        out.append(f"busy ({row['other_cpu_cores']:.1f} other cores)")
    spreads = {c: row[f"{c}_spread"] for c in TIMED if row.get(f"{c}_spread", 1.0) > UNSTABLE_SPREAD}
    if spreads:
        out.append("unstable (" + ", ".join(f"{c} runs {v:.1f}x apart" for c, v in spreads.items()) + ")")
    return out


def layer_rows(bench: Bench, name: str, factory: Callable[[], torch.nn.Module], step: list[int], total: int) -> None:
    F, dev = bench.F, bench.device
    model, initial = zoo.trained_pair(factory, dev)
    nbytes = model_bytes(model)
    xs, ys = list(model.state_dict().values()), list(initial.state_dict().values())

    def impls(ref: Callable[[], Any] | None, ours: Callable[[], Any], plain: Callable[[], Any] | None) -> dict:
        d: dict[str, Callable[[], Any]] = {}
        if ref is not None and F is not None:
            d["fl4health"] = ref
        if plain is not None:
            d["plain_torch"] = plain
        d["ours_torch"] = with_backend("torch", ours)
        if bench.has_compiled:
            d["ours_compiled"] = with_backend("compiled", ours)
        return d

    def tick() -> str:
        step[0] += 1
        return f"[{step[0]}/{total}]"

    # Drift norms alone: the kernel vs the per-layer loop vs foreach vs the floor.
    foreach = lambda: torch._foreach_norm(torch._foreach_sub([x.float() for x in xs], [y.float() for y in ys]))
    per_layer = (lambda: [F._calculate_drift_norm(x, y, True) for x, y in zip(xs, ys)]) if F else None
    bench.row(
        name,
        "drift_norms_kernel",
        impls(per_layer, lambda: ops.drift_sq_norms(xs, ys), foreach),
        2 * nbytes,
        None,
        tick(),
    )
    for crit, ref_name, arg in [
        ("select_by_threshold", "select_layers_by_threshold", 1e-6),
        ("select_by_percentage", "select_layers_by_percentage", 0.5),
    ]:
        ref = (lambda r=ref_name, a=arg: getattr(F, r)(a, True, True, model, initial)) if F else None
        ours = lambda r=ref_name, a=arg: getattr(L, r)(a, True, True, model, initial)
        bench.row(name, crit, impls(ref, ours, None), 2 * nbytes, same_layers, tick())
    score_functions = {"many_small": SCORE_FUNCTIONS[2:3], "stack_1b": []}.get(name, SCORE_FUNCTIONS)
    for fn in score_functions:
        ref = (lambda f=fn: getattr(F, f)(model, initial)) if F else None
        ours = lambda f=fn: getattr(L, f)(model, initial)
        plain = (
            (lambda: torch._foreach_abs(torch._foreach_sub(xs, ys)))
            if fn == "largest_magnitude_change_scores"
            else None
        )
        reads = nbytes if "final" in fn else 2 * nbytes
        bench.row(name, fn, impls(ref, ours, plain), reads, same_scores, tick())
    if name in SPARSE_MODELS:
        for sparsity in (0.01, 0.1):
            ref_ex = (lambda s=sparsity: _fl4health_sparse(s).select_parameters(model, initial)) if F else None
            ours = lambda s=sparsity: L.select_sparse_parameters(model, initial, s, L.largest_magnitude_change_scores)
            bench.row(name, f"sparse_coo_{sparsity:g}", impls(ref_ex, ours, None), 2 * nbytes, same_sparse, tick())


SPARSE_MODELS = ("bert_like", "resnet_like", "bert_tiny")


def _fl4health_sparse(sparsity: float) -> Any:
    import logging

    from fl4health.parameter_exchange import parameter_selection_criteria as F
    from fl4health.parameter_exchange.sparse_coo_parameter_exchanger import SparseCooParameterExchanger

    logging.getLogger("flwr").setLevel(logging.ERROR)
    return SparseCooParameterExchanger(sparsity, F.largest_magnitude_change_scores)


def same_sparse(a: tuple, b: tuple) -> bool:
    (av, (ai, ash, an)), (bv, (bi, bsh, bn)) = a, b
    return an == bn and all(
        x.dtype == y.dtype and np.array_equal(x, y) for p, q in ((av, bv), (ai, bi), (ash, bsh)) for x, y in zip(p, q)
    )


def mask_rows(bench: Bench, name: str, factory: Callable[[], torch.nn.Module], step: list[int], total: int) -> None:
    F, dev = bench.F, bench.device
    torch.manual_seed(0)
    model = factory().to(dev)
    _, scores = _masks.masked_score_tensors(model)
    nbytes = sum(s.numel() * s.element_size() for s in scores)

    def plain() -> list:
        with torch.no_grad():
            return [torch.bernoulli(torch.sigmoid(s)).to(torch.int64).cpu().numpy() for s in scores]

    impls: dict[str, Callable[[], Any]] = {}
    if F is not None:
        impls["fl4health"] = lambda: F.select_scores_and_sample_masks(model, None)
    impls["plain_torch"] = plain
    impls["ours_torch"] = with_backend("torch", lambda: L.select_scores_and_sample_masks(model, None))
    if bench.has_compiled:
        impls["ours_compiled"] = with_backend("compiled", lambda: L.select_scores_and_sample_masks(model, None))
    step[0] += 1
    bench.row(name, "sample_masks", impls, nbytes, same_mask_layout, f"[{step[0]}/{total}]")


def device_name(device: str) -> str:
    if device == "cuda":
        raw = torch.cuda.get_device_name(0)
    else:
        raw = "cpu-" + next(
            (
                line.split(":", 1)[1]
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor() or "unknown",
        )
    return re.sub(r"[^A-Za-z0-9]+", "-", raw).strip("-").lower()[:60]


def markdown(rows: list[dict[str, Any]], withhold: str | None = None) -> str:
    """The table. withhold: 'all' prints 'rerun' for every ratio (a quick run on a busy machine),
    'flagged' for the flagged rows' ratios; None prints them all."""
    cols = ["fl4health", "ours_compiled", "ours_torch", "plain_torch"]
    head = (
        "| model | criterion | "
        + " | ".join(f"{c} ms" for c in cols)
        + " | floor ms | % floor | × fl4health | equal | peak MB fl4h / ours | flags |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{r[c + '_ms']:.2f}" if c + "_ms" in r else "–" for c in cols]
        ours_mem = r.get("ours_compiled_peak_mb", r.get("ours_torch_peak_mb", float("nan")))
        mem = f"{r.get('fl4health_peak_mb', float('nan')):.0f} / {ours_mem:.0f}"
        eq = {True: "yes", False: "**NO**"}.get(r.get("equal_to_fl4health"), "–")
        spd = f"{r['speedup_vs_fl4health']:.1f}×" if "speedup_vs_fl4health" in r else "–"
        if withhold == "all" or (withhold == "flagged" and r.get("flags")):
            spd = "rerun"
        lines.append(
            f"| {r['model']} | {r['criterion']} | "
            + " | ".join(cells)
            + f" | {r['floor_ms']:.2f} | {r.get('pct_of_floor', 0):.0f}% | {spd} | {eq} | {mem} | "
            + (", ".join(r.get("flags", [])) or "–")
            + " |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "speedup_vs_fl4health" in r]
    if not rows:
        return
    labels = [f"{r['model']}\n{r['criterion'].replace('_scores', '')}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(rows)), 5.5))
    x = np.arange(len(rows))
    for i, (key, color) in enumerate(
        [("ours_compiled_ms", "tab:blue"), ("ours_torch_ms", "tab:orange"), ("plain_torch_ms", "tab:gray")]
    ):
        vals = [r["fl4health_ms"] / r[key] if key in r else np.nan for r in rows]
        ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=key.replace("_ms", ""), color=color)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up over fl4health 0.4.2 (×, log scale)")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=75, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def checkout_root() -> Path | None:
    """The repository this package runs from (an in-place build or `pip install -e`), else None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks" / "results").is_dir() and (root / "setup.py").is_file() else None


def results_folder(out: str | None, commit_results: bool, dev_name: str) -> Path:
    root = checkout_root()
    if out is not None:
        return Path(out)
    if commit_results:
        if root is None:
            raise SystemExit("--commit-results writes into a checkout's benchmarks/results/: run from a checkout")
        return root / "benchmarks" / "results" / dev_name
    return root / "benchmarks" / "out" / dev_name if root is not None else Path.cwd() / "layersel_ext-bench" / dev_name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, epilog=COLUMNS, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small models, 3 reps: a smoke run that checks the output, not a result to publish; about 45 s "
        "on 2 CPU cores sharing them with one other busy process (44 s measured), up to ~80 s on a busier machine",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None, help="timed runs per backend (median; default 7, quick 3)")
    p.add_argument(
        "--no-big", action="store_true", help="leave out the 1B-parameter stack (included when >16 GB are free)"
    )
    p.add_argument("--only", default=None, help="regex on model names")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        default=None,
        help="results folder (default: benchmarks/out/<device-name> in a checkout, ignored by git; "
        "./layersel_ext-bench/<device-name> elsewhere)",
    )
    where.add_argument(
        "--commit-results",
        action="store_true",
        help="write into the committed benchmarks/results/<device-name>/ (a full run on a quiet machine, on purpose)",
    )
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    dev_name = device_name(args.device)
    out = results_folder(args.out, args.commit_results, dev_name)
    if args.commit_results and args.quick:
        print("warning: --commit-results with --quick: the committed table becomes a smoke run's", file=sys.stderr)
    try:
        from fl4health.parameter_exchange import parameter_selection_criteria as F
    except ImportError as exc:
        print(f"fl4health not importable ({exc}): reference columns left empty", file=sys.stderr)
        F = None

    layer_models = dict(zoo.QUICK_LAYER_MODELS if args.quick else zoo.LAYER_MODELS)
    masked_models = dict(zoo.QUICK_MASKED_MODELS if args.quick else zoo.MASKED_MODELS)
    if not args.quick and not args.no_big:
        avail_gb = psutil.virtual_memory().available / 2**30
        if avail_gb > 16:
            layer_models["stack_1b"] = zoo.big_stack
        else:
            print(f"skipping stack_1b: {avail_gb:.0f} GB available, needs ~16", file=sys.stderr)
    if F is None:
        masked_models = {}  # the masked layers come from fl4health
    if args.only:
        layer_models = {k: v for k, v in layer_models.items() if re.search(args.only, k)}
        masked_models = {k: v for k, v in masked_models.items() if re.search(args.only, k)}
    total = sum({"many_small": 4, "stack_1b": 3}.get(k, 9) + 2 * (k in SPARSE_MODELS) for k in layer_models)
    total += len(masked_models)

    load_before = os.getloadavg()
    if load_before[0] > busy_cores_limit():
        print(
            f"WARNING: the machine is busy: 1-minute load average {load_before[0]:.1f} on {CORES} cores "
            f"(above {BUSY_LOAD_PER_CORE} per core); readings will be slow and rows taken while others run "
            "are flagged 'busy'. Benchmark on a quiet machine for results to publish.",
            file=sys.stderr,
        )
    bench = Bench(args.device, reps, F)
    step = [0]
    t0 = time.time()
    with OtherCPU() as others:
        for name, factory in layer_models.items():
            layer_rows(bench, name, factory, step, total)
            gc.collect()  # the model pair goes with the call's frame
        for name, factory in masked_models.items():
            mask_rows(bench, name, factory, step, total)
            gc.collect()
    load_after = os.getloadavg()

    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": args.device,
        "device_name": dev_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cores": CORES,
        "backend_loaded": L._loader.LOAD_REASON,
        "build": L.build_record(),
        "reps": reps,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(time.time() - t0, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],  # includes this run's own threads
        "other_cpu_cores": round(others.cores, 2),  # other processes, averaged over the whole run
        "busy_threshold_cores": busy_cores_limit(),
        "busy_rows": sum(bool(r["busy"]) for r in bench.rows),
        "below_floor_rows": sum(bool(r["below_floor"]) for r in bench.rows),
    }
    busy_machine = load_before[0] > busy_cores_limit() or bool(meta["busy_rows"]) or others.cores > busy_cores_limit()
    meta["ratios_withheld"] = ("all" if busy_machine else "flagged") if args.quick else None
    table = markdown(bench.rows)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": bench.rows}, indent=2) + "\n")
    (out / "results.md").write_text(
        f"# {dev_name} ({args.device}, {meta['threads']} threads, torch {meta['torch']}, {meta['date']})\n\n"
        f"Load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f} on {CORES} cores; other "
        f"processes used {others.cores:.2f} cores on average during the run.\n\n{table}\n"
    )
    plot(bench.rows, out / "speedup.png", f"layersel_ext vs fl4health 0.4.2 — {dev_name}, {meta['date']}")
    print(markdown(bench.rows, meta["ratios_withheld"]))
    print(f"\n{COLUMNS}")
    if meta["ratios_withheld"] == "all":
        print("\nmachine busy, rerun: a --quick run on a busy machine prints no ratios (the JSON keeps the timings)")
    elif meta["ratios_withheld"] and any(r["flags"] for r in bench.rows):
        print("\nflagged rows print 'rerun' for their ratio: their timings were disturbed")
    print(f"\nresults: {out}/results.json, results.md, speedup.png ({meta['seconds']} s)")
    print(
        f"load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f} (1 min, {CORES} cores; after "
        f"includes this run); other processes used {others.cores:.2f} cores on average during the run",
        file=sys.stderr,
    )
    if meta["busy_rows"] or others.cores > busy_cores_limit():
        print(
            f"WARNING: the machine was busy: {meta['busy_rows']} of {len(bench.rows)} rows taken while other "
            f"processes used more than {busy_cores_limit():.1f} cores; do not publish these numbers",
            file=sys.stderr,
        )
    if meta["below_floor_rows"]:
        print(
            f"WARNING: {meta['below_floor_rows']} row(s) read faster than the memory-bandwidth floor measured beside "
            "them (% floor > 100): the floor or the reading was disturbed; rerun those rows",
            file=sys.stderr,
        )
    mismatches = [r for r in bench.rows if r.get("equal_to_fl4health") is False]
    if mismatches:
        print(f"MISMATCH with fl4health in {len(mismatches)} row(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
