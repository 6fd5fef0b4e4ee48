"""``python -m layersel_ext info`` (versions, build record, compiled ops, backend) and
``python -m layersel_ext bench [args]`` (the benchmark against fl4health: layersel_ext/bench/,
``python -m layersel_ext bench --help``)."""

from __future__ import annotations

import json
import platform
import sys

import torch


def info() -> int:
    import layersel_ext
    from layersel_ext import _loader, ops

    print(f"layersel_ext {layersel_ext.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'}")
    if _loader.COMPILED is not None:
        print(f"compiled module: {_loader.LOAD_REASON.removeprefix('compiled module ')}")
    else:
        print(f"compiled module: NOT loaded, the slower pure-torch backend runs ({_loader.LOAD_REASON})")
    if _loader.COMPILED is not None:
        print(f"compiled module build info: {json.dumps(_loader.COMPILED.build_info())}")
        print(
            f"CPU threads used by a parallel region: {_loader.COMPILED.cpu_threads_used(64)} "
            f"(torch.get_num_threads() = {torch.get_num_threads()})"
        )
    print("build record:", json.dumps(_loader.build_record(), indent=2) if _loader.build_record() else "none")
    print("compiled ops:")
    width = max(len(f"layersel::{op}") for op in _loader.OPS)
    for op in _loader.OPS:
        cpu = "CPU" if _loader.has_kernel(op, "CPU") else "-"
        cuda = "CUDA" if _loader.has_kernel(op, "CUDA") else "-"
        print(f"  {'layersel::' + op:<{width}}  {cpu:<4} {cuda}")
    print(f"active backend: {ops.backend()}")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] == "info":
        return info()
    if argv[0] == "bench":
        try:
            from layersel_ext.bench.run import main as bench_main
        except ImportError as exc:  # psutil (and matplotlib for the plot) are not install requirements
            print(
                f"python -m layersel_ext bench needs {exc.name or exc}: pip install psutil matplotlib "
                "(and fl4health==0.4.2 --no-deps with flwr and scipy for the reference columns)",
                file=sys.stderr,
            )
            return 2
        return bench_main(argv[1:])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
