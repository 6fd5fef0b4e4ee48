"""The benchmark against fl4health 0.4.2 (``python -m layersel_ext bench``): the runner (``run``) and
the model zoo (``zoo``). Shipped inside the package so that it runs after a plain ``pip install``;
from a checkout ``python -m benchmarks.run`` and ``./dev.sh bench`` run the same code."""
