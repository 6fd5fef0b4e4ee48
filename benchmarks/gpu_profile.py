"""Where the time goes on a GPU (the runbook's last step): wall-clock medians of 7 calls after
3 warm-ups for the rows that are far from their floor, a torch.profiler table (by self CPU time)
for three of them, and this machine's pinned D2H and D2D copy rates (the floors that the benchmark
table's read-only floor does not include: layer selection and sparse COO return host arrays).

    python benchmarks/gpu_profile.py > profile.txt     # from a checkout with the extension built
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.getcwd())
import layersel_ext as L
from layersel_ext.bench import zoo


def case(name, fn, prof=False):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    print(f"##### {name}: median {statistics.median(ts):.2f} ms, min {min(ts):.2f}", flush=True)
    if prof:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            fn()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50), flush=True)


def rows(mname: str, model: torch.nn.Module, initial: torch.nn.Module) -> None:
    case(f"{mname} threshold", lambda: L.select_layers_by_threshold(1e-6, True, True, model, initial), prof=True)
    case(f"{mname} percentage", lambda: L.select_layers_by_percentage(0.5, True, True, model, initial))
    case(f"{mname} lmc scores", lambda: L.largest_magnitude_change_scores(model, initial))
    case(f"{mname} drift norms", lambda: L.layer_drift_norms(model, initial))
    if mname == "bert_like":
        case(
            f"{mname} sparse 0.01",
            lambda: L.select_sparse_parameters(model, initial, 0.01, L.largest_magnitude_change_scores),
            prof=True,
        )


def main() -> None:
    for mname in ["bert_like", "many_small"]:
        rows(mname, *zoo.trained_pair(zoo.LAYER_MODELS[mname], "cuda"))
    torch.manual_seed(0)
    m = zoo.masked_mlp().cuda()
    case("masked_mlp masks", lambda: L.select_scores_and_sample_masks(m, None), prof=True)
    # The transfer and copy floors on this machine
    x = torch.empty(119 * 2**20, dtype=torch.uint8, device="cuda")
    h = torch.empty_like(x, device="cpu").pin_memory()
    case("D2H pinned 119 MiB", lambda: h.copy_(x, non_blocking=True))
    y = torch.empty(440 * 2**20, dtype=torch.uint8, device="cuda")
    z = torch.empty_like(y)
    case("D2D copy 440 MiB", lambda: z.copy_(y))


if __name__ == "__main__":
    main()
