"""``python -m benchmarks.run [args]`` from a checkout (what ``./dev.sh bench`` runs): the runner
itself ships inside the package as ``layersel_ext.bench.run`` (``python -m layersel_ext bench``)."""

from __future__ import annotations

import sys

from layersel_ext.bench.run import main

if __name__ == "__main__":
    sys.exit(main())
