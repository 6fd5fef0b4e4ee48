"""How far fl4health's float32 drift norms are from ours (the exact-accumulation definition), per layer.

    python -m benchmarks.drift_vs_fl4health [--model bert_like|resnet_like|many_small]

fl4health computes ``torch.linalg.norm((t1 - t2).float())`` with a float32 accumulator, whose error
grows with the layer size and whose last bits depend on the CPU's vector width. Ours squares each
element in float32 as fl4health does, sums the squares in float64 and rounds the total to float32
before the square root. This prints, for one zoo model pair, how many layers differ and by how many
float32 ulps — the bound quoted in the README.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from layersel_ext.bench import zoo


def ulps(a: np.float32, b: np.float32) -> int:
    ia, ib = np.array([a], np.float32).view(np.int32)[0], np.array([b], np.float32).view(np.int32)[0]
    return abs(int(ia) - int(ib))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="bert_like")
    args = parser.parse_args()
    from fl4health.parameter_exchange import parameter_selection_criteria as F

    import layersel_ext as L

    model, initial = zoo.trained_pair(getattr(zoo, args.model), "cpu")
    ours = L.layer_drift_norms(model, initial, normalize=False)
    ref_state, init_state = model.state_dict(), initial.state_dict()
    diffs, exact_ulps = [], []
    for name, value in ours.items():
        a, b = ref_state[name], init_state[name]
        ref = np.float32(F._calculate_drift_norm(a, b, False))
        diffs.append((ulps(np.float32(value), ref), a.numel(), name))
        d = (a - b).float().double()
        exact = np.float32(float(torch.sqrt((d * d).sum())))  # float64 throughout, rounded once
        exact_ulps.append(ulps(np.float32(value), exact))
    diffs.sort(reverse=True)
    differ = [d for d in diffs if d[0] > 0]
    print(f"{args.model}: {len(diffs)} entries, {len(differ)} differ from fl4health's float32 norm")
    print(
        f"  > 100 ulps: {sum(d[0] > 100 for d in diffs)}; max {diffs[0][0]} ulps ({diffs[0][2]}, {diffs[0][1]:,} elements)"
    )
    for d in diffs[:5]:
        print(f"  {d[0]:>7} ulps  {d[1]:>11,}  {d[2]}")
    print(f"ours vs a float64 reference: max {max(exact_ulps)} ulps, {sum(u > 0 for u in exact_ulps)} entries differ")


if __name__ == "__main__":
    main()
