"""Sharded state (FSDP2 ``fully_shard``, ``distribute_tensor``) on 2 and 3 CPU ranks with gloo.

Every rank compares every function's result with the unsharded result computed in the same process
from the full tensors (ours, and fl4health's where cheap), and counts the collectives per call.
One spawn per world size runs all cases; a failing rank fails the test with its traceback, and
every wait is bounded (gloo timeout, join deadline).
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

JOIN_TIMEOUT_S = 150  # the whole spawn (imports on a loaded 2-core machine included)
GLOO_TIMEOUT_S = 60  # a rank waiting on a failed peer gives up after this


# ---------------------------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _check_selection(got, want, label: str) -> None:
    arrays, names = got
    want_arrays, want_names = want
    assert names == want_names, f"{label}: names {names} != {want_names}"
    for n, a, b in zip(names, arrays, want_arrays):
        assert isinstance(a, np.ndarray), f"{label}: {n} is a {type(a)}"
        assert _same_array(a, np.asarray(b)), f"{label}: layer {n} differs"


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _same_array(a.contiguous().numpy(), b.contiguous().numpy())


@contextmanager
def _count_collectives() -> Iterator[Counter]:
    """Count calls to torch.distributed's collectives (the library looks them up at call time)."""
    import torch.distributed as dist

    names = ["all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
             "broadcast_object_list", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
             "gather", "scatter", "reduce", "barrier", "send", "recv"]  # fmt: skip
    counts: Counter = Counter()
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def shim(name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            counts[name] += 1
            if name == "all_gather":
                counts["all_gather_bytes"] += args[1].numel() * args[1].element_size()
            return fn(*args, **kwargs)

        return wrapped

    for n, fn in saved.items():
        setattr(dist, n, shim(n, fn))
    try:
        yield counts
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)


def _perturb(model: nn.Module, seed: int, frozen: tuple[str, ...] = ()) -> None:
    """Random drift on every entry except ``frozen`` (zero drift); integer buffers move by 3."""
    g = torch.Generator().manual_seed(seed)
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name, t in state.items():
            if name in frozen:
                continue
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.1)
            else:
                t.add_(3)


def _mlp() -> nn.Module:
    # Linear(7, 5): 5 rows on 2 ranks (3, 2) and 3 ranks (2, 2, 1); Linear(5, 3)'s bias is one
    # element per rank on 3 ranks; Linear(3, 1)'s weight is one row (ranks 1, 2 hold nothing).
    return nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 1), nn.Linear(3, 1))


def _convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 3, bias=False), nn.BatchNorm2d(4),
        nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


class _Masked(nn.Module):
    """A FedPM masked layer by structure (owns ``weight_scores``)."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.weight_scores = nn.Parameter(torch.randn(rows, cols))
        self.bias_scores = nn.Parameter(torch.randn(rows))


def _drifted_fsdp_models(factory, seed: int, mesh, frozen: tuple[str, ...] = ()):
    """(full, full0, sharded, sharded0): a model after a round, at its start, and their FSDP2 copies."""
    torch.manual_seed(seed)
    full0 = factory()
    full = copy.deepcopy(full0)
    _perturb(full, seed + 1, frozen=frozen)
    return (full, full0, *_fsdp_pair(full, full0, mesh))


def _fsdp_pair(full: nn.Module, full0: nn.Module, mesh) -> tuple[nn.Module, nn.Module]:
    """FSDP2-sharded copies of (model, initial_model)."""
    return _fully_shard(copy.deepcopy(full), mesh), _fully_shard(copy.deepcopy(full0), mesh)


def _fully_shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(True for _ in child.parameters(recurse=False)):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ---------------------------------------------------------------------------------------------- checks (every rank)


def _compare_all(sharded: nn.Module, sharded0: nn.Module, full: nn.Module, full0: nn.Module, label: str) -> None:
    """Every layer-selection and score function: sharded result == unsharded result (ours and fl4health's)."""
    import layersel_ext.parameter_selection_criteria as L
    from layersel_ext import _sharded

    try:
        from fl4health.parameter_exchange import parameter_selection_criteria as F
    except ImportError:
        F = None

    assert _sharded.has_dtensor(list(sharded.state_dict().values())), f"{label}: nothing is sharded"
    for normalize in (True, False):
        want = L.layer_drift_norms(full, full0, normalize)
        got = L.layer_drift_norms(sharded, sharded0, normalize)
        assert got == want, f"{label}: layer_drift_norms(normalize={normalize}) {got} != {want}"
        drifts = sorted(set(want.values()))
        thresholds = [drifts[len(drifts) // 3], drifts[-1] / 2 + 1e-9, 1e-12]
        for more in (True, False):
            for pct in (0.2, 0.5, 1.0):
                args = (pct, normalize, more)
                want_sel = L.select_layers_by_percentage(*args, full, full0)
                got = L.select_layers_by_percentage(*args, sharded, sharded0)
                _check_selection(got, want_sel, f"{label} pct{args}")
                if F is not None:
                    ref = F.select_layers_by_percentage(*args, full, full0)
                    _check_selection(want_sel, ref, f"{label} F pct{args}")
            for thr in thresholds:
                args = (thr, normalize, more)
                want_sel = L.select_layers_by_threshold(*args, full, full0)
                _check_selection(L.select_layers_by_threshold(*args, sharded, sharded0), want_sel, f"{label} thr{args}")
                if F is not None:
                    _check_selection(want_sel, F.select_layers_by_threshold(*args, full, full0), f"{label} F thr{args}")
    ctor = L.LayerSelectionFunctionConstructor(thresholds[0], 0.4, normalize=True, select_drift_more=True)
    for make in (ctor.select_by_threshold, ctor.select_by_percentage):
        _check_selection(make()(sharded, sharded0), make()(full, full0), f"{label} {make.__name__}")

    from torch.distributed.tensor import DTensor

    shard_state = sharded.state_dict()
    for fname in L.SCORE_FUNCTION_NAMES:
        fn = getattr(L, fname)
        init = sharded0 if "change" in fname or "increase" in fname else None
        got = fn(sharded, init)
        want = fn(full, full0 if init is not None else None)
        assert list(got) == list(want), f"{label} {fname}: names"
        for n, s in got.items():
            x = shard_state[n]
            if isinstance(x, DTensor):
                assert isinstance(s, DTensor), f"{label} {fname}: {n} is not a DTensor"
                assert s.placements == x.placements and s.device_mesh == x.device_mesh, f"{label} {fname}: {n} layout"
                assert s.shape == x.shape and s.stride() == x.stride(), f"{label} {fname}: {n} global shape/stride"
                s = s.full_tensor()
            else:
                assert type(s) is torch.Tensor, f"{label} {fname}: {n} should stay a plain tensor"
            assert _same_tensor(s, want[n]), f"{label} {fname}: {n} differs"
            if F is not None:
                ref = getattr(F, fname)(full, full0 if init is not None else None)[n]
                assert _same_tensor(s, ref), f"{label} {fname}: {n} differs from fl4health"


def _case_fsdp_mlp(rank: int, world: int, mesh) -> None:
    torch.manual_seed(0)
    full0 = _mlp()
    full = copy.deepcopy(full0)
    # Layer 3 frozen (zero drift); 4.weight and 2.bias (3 elements each, +0.25 everywhere) tie.
    _perturb(full, 1, frozen=("3.weight", "3.bias"))
    with torch.no_grad():
        full.get_submodule("4").weight.copy_(full0.get_submodule("4").weight + 0.25)
        full.get_submodule("4").bias.copy_(full0.get_submodule("4").bias + 0.25)
        full.get_submodule("2").bias.copy_(full0.get_submodule("2").bias + 0.25)
    sharded, sharded0 = _fsdp_pair(full, full0, mesh)
    _compare_all(sharded, sharded0, full, full0, f"fsdp_mlp[{world}]")


def _case_fsdp_convnet_bn(rank: int, world: int, mesh) -> None:
    full, full0, sharded, sharded0 = _drifted_fsdp_models(_convnet, 1, mesh, frozen=("3.weight",))
    state = sharded.state_dict()
    assert type(state["1.running_mean"]) is torch.Tensor, "BatchNorm buffers should stay plain under FSDP2"
    _compare_all(sharded, sharded0, full, full0, f"fsdp_convnet_bn[{world}]")


def _distribute(model: nn.Module, mesh, placements: dict[str, object]) -> nn.Module:
    from torch.distributed.tensor import distribute_tensor

    for name, placement in placements.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[attr] = nn.Parameter(distribute_tensor(module._parameters[attr].detach(), mesh, [placement]))
    return model


def _case_distribute_tensor(rank: int, world: int, mesh) -> None:
    from torch.distributed.tensor import Replicate, Shard

    torch.manual_seed(2)
    full0 = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    full = copy.deepcopy(full0)
    _perturb(full, 3, frozen=("1.bias",))
    placements = {"0.weight": Shard(1), "0.bias": Replicate(), "1.weight": Shard(0), "2.weight": Replicate(),
                  "2.bias": Shard(0)}  # fmt: skip
    sharded = _distribute(copy.deepcopy(full), mesh, placements)
    sharded0 = _distribute(copy.deepcopy(full0), mesh, placements)
    _compare_all(sharded, sharded0, full, full0, f"distribute_tensor[{world}]")
    # initial_model unsharded beside a sharded model: the plain entries are narrowed to the shards.
    _compare_all(sharded, full0, full, full0, f"distribute_tensor_plain_initial[{world}]")
    # A plain model beside a sharded initial_model: drift narrows the model to the shards; scores
    # stay plain (the initial entries are gathered).
    import layersel_ext.parameter_selection_criteria as L

    assert L.layer_drift_norms(full, sharded0) == L.layer_drift_norms(full, full0)
    _check_selection(L.select_layers_by_percentage(0.5, True, True, full, sharded0),
                     L.select_layers_by_percentage(0.5, True, True, full, full0), "plain model")  # fmt: skip
    got = L.largest_increase_in_magnitude_scores(full, sharded0)
    want = L.largest_increase_in_magnitude_scores(full, full0)
    assert all(type(v) is torch.Tensor and _same_tensor(v, want[n]) for n, v in got.items()), "plain model scores"


def _case_masks(rank: int, world: int, mesh) -> None:
    import layersel_ext.parameter_selection_criteria as L

    torch.manual_seed(3)
    full = nn.Sequential(_Masked(5, 7), nn.ReLU(), _Masked(3, 5), _Masked(1, 3))
    sharded = _fully_shard(copy.deepcopy(full), mesh)
    want = L.select_scores_and_sample_masks(full, None, seed=1234)
    with _count_collectives() as counts:
        got = L.select_scores_and_sample_masks(sharded, None, seed=1234)
    _check_selection(got, want, f"masks seed [{world}]")
    assert counts["all_gather"] == 1 and counts["broadcast"] == 0, f"masks seeded: {dict(counts)}"
    # Unseeded, ranks seeded differently: every rank uses rank 0's draw.
    torch.manual_seed(100 + rank)
    with _count_collectives() as counts:
        got = L.select_scores_and_sample_masks(sharded, None)
    torch.manual_seed(100)
    want = L.select_scores_and_sample_masks(full, None)
    _check_selection(got, want, f"masks unseeded [{world}]")
    assert counts["all_gather"] == 1 and counts["broadcast"] == 1, f"masks unseeded: {dict(counts)}"


def _case_sparse_refused(rank: int, world: int, mesh) -> None:
    import layersel_ext.parameter_selection_criteria as L
    from layersel_ext import SparseCooParameterExchanger, select_sparse_parameters

    _, _, sharded, sharded0 = _drifted_fsdp_models(_mlp, 4, mesh)
    for call in (
        lambda: select_sparse_parameters(sharded, sharded0, 0.3, L.largest_magnitude_change_scores),
        lambda: SparseCooParameterExchanger(0.3, L.largest_final_magnitude_scores).select_parameters(sharded),
        lambda: select_sparse_parameters(sharded, sharded0, 0.3, lambda m, i: L.largest_final_magnitude_scores(m, i)),
    ):
        refused = r"layer '0\.weight'.*sharded sparse COO selection is not supported"
        with pytest.raises(NotImplementedError, match=refused):
            call()


def _case_shape_mismatch(rank: int, world: int, mesh) -> None:
    import layersel_ext.parameter_selection_criteria as L

    torch.manual_seed(6)
    wider = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3), nn.Linear(3, 1), nn.Linear(3, 1))
    sharded, sharded_wider = _fsdp_pair(_mlp(), wider, mesh)
    mismatch = r"layer '0\.weight': shape \(5, 7\) in model but \(6, 7\) in initial_model"  # global shapes
    for call in (
        lambda: L.layer_drift_norms(sharded, sharded_wider),
        lambda: L.largest_magnitude_change_scores(sharded, sharded_wider),
    ):
        with pytest.raises(ValueError, match=mismatch):
            call()


def _case_collective_counts(rank: int, world: int, mesh) -> None:
    import layersel_ext.parameter_selection_criteria as L

    _, _, sharded, sharded0 = _drifted_fsdp_models(_convnet, 5, mesh)
    ctor = L.LayerSelectionFunctionConstructor(1e-3, 0.5)
    for label, call in [
        ("by_percentage", lambda: ctor.select_by_percentage()(sharded, sharded0)),
        ("by_threshold", lambda: ctor.select_by_threshold()(sharded, sharded0)),
        ("by_percentage 1.0", lambda: L.select_layers_by_percentage(1.0, False, True, sharded, sharded0)),
        ("by_threshold none", lambda: L.select_layers_by_threshold(1e30, True, True, sharded, sharded0)),
    ]:
        with _count_collectives() as counts:
            arrays, _names = call()
        others = {k: v for k, v in counts.items() if k not in ("all_reduce", "all_gather", "all_gather_bytes")}
        assert counts["all_reduce"] == 1 and counts["all_gather"] <= 1 and not others, f"{label}: {dict(counts)}"
        # Only the selected layers travel: the send buffer holds at most the selected layers' bytes
        # (each piece 64-byte aligned).
        assert counts["all_gather_bytes"] <= sum(a.nbytes + 64 for a in arrays) + 64, f"{label}: {dict(counts)}"
    with _count_collectives() as counts:
        L.layer_drift_norms(sharded, sharded0)
    assert dict(counts) == {"all_reduce": 1}, f"layer_drift_norms: {dict(counts)}"
    with _count_collectives() as counts:
        L.largest_increase_in_magnitude_scores(sharded, sharded0)
        L.largest_final_magnitude_scores(sharded, None)
    assert not counts, f"scores: {dict(counts)}"


CASES = {
    "fsdp_mlp": _case_fsdp_mlp,
    "fsdp_convnet_bn": _case_fsdp_convnet_bn,
    "distribute_tensor": _case_distribute_tensor,
    "masks": _case_masks,
    "sparse_refused": _case_sparse_refused,
    "shape_mismatch": _case_shape_mismatch,
    "collective_counts": _case_collective_counts,
}


def _worker(rank: int, world: int, port: int, cases: list[str]) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    try:
        mesh = init_device_mesh("cpu", (world,))
        for case in cases:
            try:
                CASES[case](rank, world, mesh)
            except BaseException as exc:
                raise AssertionError(f"rank {rank}/{world}, case {case!r}: {type(exc).__name__}: {exc}") from exc
    finally:
        dist.destroy_process_group()


def _spawn(world: int, cases: list[str]) -> None:
    import torch.multiprocessing as mp

    context = mp.spawn(_worker, args=(world, _free_port(), cases), nprocs=world, join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
            for p in context.processes:
                p.join(5)
            pytest.fail(f"{world} ranks did not finish {cases} in {JOIN_TIMEOUT_S} s")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_matches_unsharded(world: int) -> None:
    """All cases on `world` gloo ranks (one spawn): any rank's failure fails the test with its traceback."""
    _spawn(world, list(CASES))


def test_no_dtensor_import() -> None:
    """Importing layersel_ext and calling it on plain models never imports torch.distributed.tensor."""
    import subprocess

    code = (
        "import sys, torch, copy\n"
        "by_torch = 'torch.distributed.tensor' in sys.modules\n"  # (a torch that imports it itself)
        "import layersel_ext as L\n"
        "m = torch.nn.Linear(3, 2); m0 = copy.deepcopy(m)\n"
        "L.select_layers_by_percentage(0.5, True, True, m, m0); L.largest_final_magnitude_scores(m, None)\n"
        "assert by_torch or 'torch.distributed.tensor' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
