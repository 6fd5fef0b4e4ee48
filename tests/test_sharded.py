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
import re
import socket
import sys
import time
import traceback
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

    names = ["all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object", "broadcast",
             "broadcast_object_list", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
             "gather", "scatter", "reduce", "barrier", "send", "recv"]  # fmt: skip
    counts: Counter = Counter()
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def shim(name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            # The in-place single-tensor all-gather the library uses counts as an all_gather.
            single = name in ("all_gather_into_tensor", "all_gather_single")
            counts["all_gather" if single else name] += 1
            if name == "all_gather" or single:
                counts["all_gather_bytes"] += args[1].numel() * args[1].element_size()
            elif name == "all_reduce":
                counts["all_reduce_bytes"] += args[0].numel() * args[0].element_size()
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

    def __init__(self, rows: int, *cols: int) -> None:
        super().__init__()
        self.weight_scores = nn.Parameter(torch.randn(rows, *cols))
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
    from layersel_ext import _shard_layout

    try:
        from fl4health.parameter_exchange import parameter_selection_criteria as F
    except ImportError:
        F = None

    assert _shard_layout.has_dtensor(list(sharded.state_dict().values())), f"{label}: nothing is sharded"
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
                # fl4health's float32 drift is within its accumulation error of ours (README): a threshold
                # equal to one of our drifts may fall on either side of fl4health's (the transformer's does).
                if F is not None and thr not in drifts:
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


def _distributed_pair(mesh):
    """(full, full0, sharded, sharded0) with distribute_tensor's Shard(1), Shard(0) and Replicate entries
    beside a plain one (1.bias, frozen)."""
    from torch.distributed.tensor import Replicate, Shard

    torch.manual_seed(2)
    full0 = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    full = copy.deepcopy(full0)
    _perturb(full, 3, frozen=("1.bias",))
    placements = {"0.weight": Shard(1), "0.bias": Replicate(), "1.weight": Shard(0), "2.weight": Replicate(),
                  "2.bias": Shard(0)}  # fmt: skip
    sharded = _distribute(copy.deepcopy(full), mesh, placements)
    sharded0 = _distribute(copy.deepcopy(full0), mesh, placements)
    return full, full0, sharded, sharded0


def _case_distribute_tensor(rank: int, world: int, mesh) -> None:
    full, full0, sharded, sharded0 = _distributed_pair(mesh)
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

    torch.manual_seed(3)
    full = nn.Sequential(_Masked(5, 7), nn.ReLU(), _Masked(3, 5), _Masked(1, 3))
    sharded = _fully_shard(copy.deepcopy(full), mesh)
    _check_masks(full, sharded, rank, world, "fsdp")


def _check_masks(full: nn.Module, sharded: nn.Module, rank: int, world: int, label: str) -> None:
    """Seeded and unseeded masks (two dtypes) and the compact wire's packed masks of the sharded model
    equal the unsharded model's on every rank, with the collectives of per-shard sampling: the mask
    bytes gathered once (never the scores), and one all-reduce: the ranks' agreement check, which
    for an unseeded draw also carries rank 0's seed and the fingerprints."""
    import layersel_ext.parameter_selection_criteria as L
    from layersel_ext import wire

    n = sum(p.numel() for name, p in full.state_dict().items() if name.endswith("_scores"))
    for dtype in (np.int64, np.int8):
        want = L.select_scores_and_sample_masks(full, None, seed=1234, mask_dtype=dtype)
        with _count_collectives() as counts:
            got = L.select_scores_and_sample_masks(sharded, None, seed=1234, mask_dtype=dtype)
        _check_selection(got, want, f"{label} masks seed {dtype.__name__} [{world}]")
        assert counts["all_gather"] == counts["all_reduce"] == 1 and counts["broadcast"] == 0, dict(counts)
        assert counts["all_gather_bytes"] <= n + 64 * len(got[0]), f"{label}: gathered {dict(counts)} for {n} masks"
    # Unseeded, ranks seeded differently: every rank uses rank 0's draw (and the whole fingerprint).
    torch.manual_seed(100 + rank)
    with _count_collectives() as counts:
        got = L.select_scores_and_sample_masks(sharded, None)
    torch.manual_seed(100)
    want = L.select_scores_and_sample_masks(full, None)
    _check_selection(got, want, f"{label} masks unseeded [{world}]")
    assert counts["all_gather"] == 1 and counts["all_reduce"] == 1 and counts["broadcast"] == 0, dict(counts)
    torch.manual_seed(7 + rank)
    got_wire = wire.sample_masks_packed(sharded)
    torch.manual_seed(7)
    want_wire = wire.sample_masks_packed(full)
    assert len(got_wire) == len(want_wire), label
    assert all(_same_array(a, b) for a, b in zip(got_wire, want_wire)), f"{label}: packed masks differ"


def _case_masks_distributed(rank: int, world: int, mesh) -> None:
    """Masks of distribute_tensor entries: Shard(1) and Shard(2) (a shard's elements are not
    consecutive in the unsharded tensor: one stream piece per leading index), Shard(0), Replicate,
    and a plain score tensor beside them."""
    from torch.distributed.tensor import Replicate, Shard

    torch.manual_seed(4)
    full = nn.Sequential(_Masked(5, 7), _Masked(4, 3, 5), _Masked(4, 3, 5), _Masked(2, 9))
    placements = {"0.weight_scores": Shard(1), "0.bias_scores": Replicate(), "1.weight_scores": Shard(2),
                  "1.bias_scores": Shard(0), "2.weight_scores": Shard(1), "3.weight_scores": Replicate()}  # fmt: skip
    sharded = _distribute(copy.deepcopy(full), mesh, placements)
    _check_masks(full, sharded, rank, world, "distribute_tensor")


def _fl4health_exchanger():
    """fl4health's SparseCooParameterExchanger class, or None where fl4health's exchanger cannot be imported."""
    try:
        from fl4health.parameter_exchange.sparse_coo_parameter_exchanger import SparseCooParameterExchanger
    except ImportError:
        return None
    return SparseCooParameterExchanger


def _check_sparse(got, want, label: str) -> None:
    """Two sparse COO selections are identical: names, and every values / indices / shapes array."""
    (values, (indices, shapes, names)), (w_values, (w_indices, w_shapes, w_names)) = got, want
    assert names == w_names, f"{label}: names {names} != {w_names}"
    for kind, a, b in (("values", values, w_values), ("indices", indices, w_indices), ("shapes", shapes, w_shapes)):
        assert len(a) == len(b) == len(names), f"{label}: {len(a)} {kind} arrays for {len(names)} names"
        for n, x, y in zip(names, a, b):
            assert _same_array(x, np.asarray(y)), f"{label}: {kind} of {n} differ"


SMALL_FNS = ("largest_magnitude_change_scores", "smallest_increase_in_magnitude_scores")


def _compare_sparse(sharded, sharded0, full, full0, label: str, fns=None) -> None:
    """select_sparse_parameters on the sharded pair == on the full pair (ours), == fl4health's exchanger;
    every score function (ours, fl4health's, and a custom one that returns our sharded scores), k = 1
    up to every score (ties at the threshold included)."""
    import layersel_ext.parameter_selection_criteria as L
    from layersel_ext import SparseCooParameterExchanger, select_sparse_parameters

    try:
        from fl4health.parameter_exchange import parameter_selection_criteria as F
    except ImportError:
        F = None
    Ref = _fl4health_exchanger()
    total = sum(t.numel() for t in full.state_dict().values())
    for fname in fns or L.SCORE_FUNCTION_NAMES:
        for sparsity in (1 / total, 0.01, 0.1, 0.5, 1.0):
            tag = f"{label} sparse {fname} {sparsity:.4g}"
            want = select_sparse_parameters(full, full0, sparsity, getattr(L, fname))
            _check_sparse(select_sparse_parameters(sharded, sharded0, sparsity, getattr(L, fname)), want, tag)
            if F is not None:
                fn = getattr(F, fname)
                _check_sparse(SparseCooParameterExchanger(sparsity, fn).select_parameters(sharded, sharded0), want, tag)
                if Ref is not None:
                    _check_sparse(want, Ref(sparsity, fn).select_parameters(full, full0), f"{tag} fl4health")
    # A custom score function (scores as given): ours wrapped, so it returns DTensors for a sharded model.
    custom = lambda m, i: L.smallest_increase_in_magnitude_scores(m, i)
    for sparsity in (0.2, 0.7):
        want = select_sparse_parameters(full, full0, sparsity, custom)
        _check_sparse(select_sparse_parameters(sharded, sharded0, sparsity, custom), want, f"{label} custom {sparsity}")


def _case_sparse_models(rank: int, world: int, mesh) -> None:
    """Sparse COO on the FSDP2 models (uneven shards, ties, frozen layers, plain BatchNorm buffers) and on
    distribute_tensor's Shard(0) / Shard(1) / Replicate entries beside plain ones."""
    torch.manual_seed(0)
    full0 = _mlp()
    full = copy.deepcopy(full0)
    _perturb(full, 1, frozen=("3.weight", "3.bias"))
    with torch.no_grad():  # ties: every element of 4.* and 2.bias moved by exactly 0.25
        for name in ("4.weight", "4.bias", "2.bias"):
            full.get_parameter(name).copy_(full0.get_parameter(name) + 0.25)
    _compare_sparse(*_fsdp_pair(full, full0, mesh), full, full0, f"fsdp_mlp[{world}]")
    full, full0, sharded, sharded0 = _drifted_fsdp_models(_convnet, 1, mesh, frozen=("3.weight",))
    _compare_sparse(sharded, sharded0, full, full0, f"fsdp_convnet_bn[{world}]")
    full, full0, sharded, sharded0 = _distributed_pair(mesh)
    _compare_sparse(sharded, sharded0, full, full0, f"distribute_tensor[{world}]")
    # initial_model unsharded beside a sharded model, and the other way round.
    _compare_sparse(sharded, full0, full, full0, f"distribute_tensor_plain_initial[{world}]", SMALL_FNS)
    _compare_sparse(full, sharded0, full, full0, f"distribute_tensor_plain_model[{world}]", SMALL_FNS)


class _Dtypes(nn.Module):
    """Every score dtype at once, with -0.0, +0.0, +-inf and NaN among the values."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40])
        w = torch.randn(9, 7, generator=g)
        w.view(-1)[: special.numel()] = special
        self.w32 = nn.Parameter(w)
        self.w64 = nn.Parameter(torch.randn(5, 6, generator=g, dtype=torch.float64))
        self.w16 = nn.Parameter(torch.randn(7, 3, generator=g).half())
        self.register_buffer("counts", torch.randint(-4, 5, (6, 5), generator=g))
        self.register_buffer("zeros", torch.tensor([0.0, -0.0, 0.0, -0.0]))


def _case_sparse_dtypes(rank: int, world: int, mesh) -> None:
    """float16 / float64 / int64 scores, +-0.0, +-inf and NaN (every NaN ranks above +inf) exactly as
    unsharded; all-integer models (an exact integer threshold); bfloat16 refused alike."""
    from torch.distributed.tensor import Replicate, Shard

    import layersel_ext.parameter_selection_criteria as L
    from layersel_ext import select_sparse_parameters

    full0 = _Dtypes()
    full = copy.deepcopy(full0)
    _perturb(full, 8, frozen=("zeros",))
    placements = {"w32": Shard(1), "w64": Shard(0), "w16": Replicate()}
    sharded, sharded0 = (_distribute(copy.deepcopy(m), mesh, placements) for m in (full, full0))
    _compare_sparse(sharded, sharded0, full, full0, f"dtypes[{world}]")
    # float16 and integer scores alone (float16, and int64 with an exact integer threshold).
    for keep in (("w16",), ("counts",)):
        part, part0 = (_only(m, keep) for m in (full, full0))
        s, s0 = (_only(m, keep) for m in (sharded, sharded0))
        if keep == ("counts",):  # the buffer sharded by hand: distribute_tensor works on parameters here
            s, s0 = (_distribute_buffer(m, "counts", mesh, Shard(1)) for m in (s, s0))
        _compare_sparse(s, s0, part, part0, f"dtypes{keep}[{world}]")
    # The radix select's other paths: keys made 7 scores at a time, candidates never kept (every digit
    # reads all the scores again).
    from layersel_ext import _sharded_select

    saved = _sharded_select._CHUNK, _sharded_select._MAX_CANDIDATES
    _sharded_select._CHUNK, _sharded_select._MAX_CANDIDATES = 7, 0
    try:
        _compare_sparse(sharded, sharded0, full, full0, f"dtypes small chunks[{world}]", SMALL_FNS)
    finally:
        _sharded_select._CHUNK, _sharded_select._MAX_CANDIDATES = saved
    # NaN scores rank first: k within the NaNs gives a NaN threshold, which selects nothing.
    want = select_sparse_parameters(full, full0, 1 / 300, L.largest_final_magnitude_scores)
    assert want[1][2] == [], want
    _check_sparse(select_sparse_parameters(sharded, sharded0, 1 / 300, L.largest_final_magnitude_scores), want, "nan")
    bf16, bf16_0 = (_distribute(copy.deepcopy(nn.Linear(6, 5)).bfloat16(), mesh, {"weight": Shard(0)}) for _ in (0, 1))
    with pytest.raises(TypeError, match="bfloat16"):
        select_sparse_parameters(bf16, bf16_0, 0.5, L.largest_final_magnitude_scores)


def _only(model: nn.Module, keep: tuple[str, ...]) -> nn.Module:
    """A copy of ``model`` with only the entries named in ``keep`` (parameters and buffers)."""
    out = copy.deepcopy(model)
    for name in list(out._parameters):
        if name not in keep:
            del out._parameters[name]
    for name in list(out._buffers):
        if name not in keep:
            del out._buffers[name]
    return out


def _distribute_buffer(model: nn.Module, name: str, mesh, placement) -> nn.Module:
    from torch.distributed.tensor import distribute_tensor

    model._buffers[name] = distribute_tensor(model._buffers[name], mesh, [placement])
    return model


def _case_transformer(rank: int, world: int, mesh) -> None:
    """A small transformer (embedding, encoder layers, LayerNorm, head) under FSDP2: every function."""
    from models import transformer

    full, full0, sharded, sharded0 = _drifted_fsdp_models(lambda: transformer(16), 6, mesh, frozen=("0.weight",))
    _compare_all(sharded, sharded0, full, full0, f"fsdp_transformer[{world}]")
    fns = ("largest_final_magnitude_scores", "largest_magnitude_change_scores", "smallest_increase_in_magnitude_scores")
    _compare_sparse(sharded, sharded0, full, full0, f"fsdp_transformer[{world}]", fns)


def _case_sparse_collectives(rank: int, world: int, mesh) -> None:
    """Per sparse call: the ranks' agreement check and one all-reduce per radix digit (3 for float32
    scores), two all-gathers (counts, entries), nothing else; at most 1 MB beside the selected
    entries' bytes."""
    import layersel_ext.parameter_selection_criteria as L
    from layersel_ext import select_sparse_parameters

    _, _, sharded, sharded0 = _drifted_fsdp_models(_convnet, 5, mesh)
    entries = len(sharded.state_dict())
    for sparsity in (0.01, 0.3, 1.0):
        with _count_collectives() as counts:
            values, (indices, _shapes, _names) = select_sparse_parameters(
                sharded, sharded0, sparsity, L.largest_magnitude_change_scores
            )
        others = {k: v for k, v in counts.items() if k not in ("all_reduce", "all_gather") and "bytes" not in k}
        assert counts["all_reduce"] == 4 and counts["all_gather"] == 2 and not others, f"{sparsity}: {dict(counts)}"
        selected = sum(v.nbytes + i.nbytes for v, i in zip(values, indices))
        sent = counts["all_reduce_bytes"] + counts["all_gather_bytes"]
        assert sent <= 2**20 + selected + 128 * entries + 64, f"{sparsity}: {sent} bytes for {selected}: {dict(counts)}"


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
    from layersel_ext import _agreement

    _, _, sharded, sharded0 = _drifted_fsdp_models(_convnet, 5, mesh)
    entries = len(sharded.state_dict())
    ctor = L.LayerSelectionFunctionConstructor(1e-3, 0.5)
    for label, call in [
        ("by_percentage", lambda: ctor.select_by_percentage()(sharded, sharded0)),
        ("by_threshold", lambda: ctor.select_by_threshold()(sharded, sharded0)),
        ("by_percentage 1.0", lambda: L.select_layers_by_percentage(1.0, False, True, sharded, sharded0)),
        ("by_threshold none", lambda: L.select_layers_by_threshold(1e30, True, True, sharded, sharded0)),
    ]:
        with _count_collectives() as counts:
            arrays, _names = call()
        others = {k: v for k, v in counts.items() if k not in ("all_reduce", "all_gather") and "bytes" not in k}
        # The ranks' agreement check and the drift sums: two all-reduces.
        assert counts["all_reduce"] == 2 and counts["all_gather"] <= 1 and not others, f"{label}: {dict(counts)}"
        # Only the selected layers travel: the send buffer holds at most the selected layers' bytes
        # (each piece 64-byte aligned).
        assert counts["all_gather_bytes"] <= sum(a.nbytes + 64 for a in arrays) + 64, f"{label}: {dict(counts)}"
    with _count_collectives() as counts:
        L.layer_drift_norms(sharded, sharded0)
    agreement = 8 * _agreement.WORDS
    assert dict(counts) == {"all_reduce": 2, "all_reduce_bytes": 8 * entries + agreement}, f"drift: {dict(counts)}"
    with _count_collectives() as counts:
        L.largest_increase_in_magnitude_scores(sharded, sharded0)
        L.largest_final_magnitude_scores(sharded, None)
    assert not counts, f"scores: {dict(counts)}"


def _case_direct_ops(rank: int, world: int, mesh) -> None:
    """``torch.ops.layersel.*`` called on lists of DTensors (Shard(1), Shard(0), Replicate and plain
    entries; and an FSDP2 MLP with uneven and empty shards) return on every rank what they return for
    the unsharded tensors: the same bits (the drift sums up to float64 summation order)."""
    from layersel_ext import ops

    assert ops.enable_dtensor_ops()
    L = torch.ops.layersel
    torch.manual_seed(5)
    full_mlp, full_mlp0 = _mlp(), _mlp()
    pairs = [_distributed_pair(mesh), (full_mlp, full_mlp0, *_fsdp_pair(full_mlp, full_mlp0, mesh))]
    for full, full0, sharded, sharded0 in pairs:
        fx, fy = list(full.state_dict().values()), list(full0.state_dict().values())
        sx, sy = list(sharded.state_dict().values()), list(sharded0.state_dict().values())
        n = sum(t.numel() for t in fx)
        torch.testing.assert_close(L.drift_sq_norms(sx, sy), L.drift_sq_norms(fx, fy), rtol=1e-13, atol=0)
        for kind in range(6):
            got, want = L.scores(sx, sy, kind), L.scores(fx, fy, kind)
            assert len(got) == len(want) and all(_same_tensor(a, b) for a, b in zip(got, want)), kind
            for k in (1, n // 3, n):
                assert _same_tensor(L.kth_largest_score(sx, sy, kind, k, torch.float32),
                                    L.kth_largest_score(fx, fy, kind, k, torch.float32)), (kind, k)  # fmt: skip
            gv, gi = L.sparse_select(sx, sy, kind, n // 4, torch.float32)
            wv, wi = L.sparse_select(fx, fy, kind, n // 4, torch.float32)
            assert all(map(_same_tensor, gv, wv)) and all(map(_same_tensor, gi, wi)), kind
            gv, gi = L.sparse_extract(sx, sy, kind, [0.05] * len(sx))
            wv, wi = L.sparse_extract(fx, fy, kind, [0.05] * len(fx))
            assert all(map(_same_tensor, gv, wv)) and all(map(_same_tensor, gi, wi)), kind
        for key_by_scores in (False, True):
            assert _same_tensor(L.sample_masks(sx, 99, torch.int32, key_by_scores),
                                L.sample_masks(fx, 99, torch.int32, key_by_scores))  # fmt: skip
            assert _same_tensor(L.sample_mask_bits(sx, -5, key_by_scores), L.sample_mask_bits(fx, -5, key_by_scores))
        assert _same_tensor(L.score_fingerprint(sx), L.score_fingerprint(fx))
        with pytest.raises(NotImplementedError, match="counters"):
            L.sample_masks(sx, 1, torch.uint8, False, [0] * len(sx))
        # The ops' own argument errors, raised on every rank before any collective (no rank left waiting).
        with pytest.raises(ValueError, match=r"k must be in \[1, "):
            L.kth_largest_score(sx, sy, 2, n + 1, torch.float32)
        with pytest.raises(ValueError, match="initial tensors"):
            L.drift_sq_norms(sx, sy[:-1])
        with pytest.raises(TypeError, match="mask dtype"):
            L.sample_masks(sx, 1, torch.uint16)
        with pytest.raises(TypeError, match="sparse_select"):
            L.sparse_select(sx, sy, 2, 3, torch.float64)
        with pytest.raises(TypeError, match="not floating point"):  # a bad entry whose shard may be empty here
            L.sample_masks([*sx, sx[0].to(torch.int64)], 1, torch.uint8, True)


def _case_nccl_smoke(rank: int, world: int, mesh) -> None:
    """The NCCL path (a CUDA mesh, run where a GPU exists): FSDP2 models on the GPU give the arrays of
    the same models unsharded on the CPU, for layer selection, sparse COO, masks and a direct op."""
    import layersel_ext.parameter_selection_criteria as L
    from layersel_ext import select_sparse_parameters

    torch.manual_seed(11)
    full0 = _mlp()
    full = copy.deepcopy(full0)
    _perturb(full, 12)
    sharded, sharded0 = _fully_shard(copy.deepcopy(full).cuda(), mesh), _fully_shard(copy.deepcopy(full0).cuda(), mesh)
    _check_selection(L.select_layers_by_percentage(0.5, True, True, sharded, sharded0),
                     L.select_layers_by_percentage(0.5, True, True, full, full0), "nccl layers")  # fmt: skip
    got = select_sparse_parameters(sharded, sharded0, 0.3, L.largest_magnitude_change_scores)
    want = select_sparse_parameters(full, full0, 0.3, L.largest_magnitude_change_scores)
    assert all(_same_array(np.asarray(a), np.asarray(b)) for a, b in zip(got[0], want[0])), "nccl sparse values"
    assert all(_same_array(np.asarray(a), np.asarray(b)) for a, b in zip(got[1][0], want[1][0])), "nccl sparse indices"
    masked = nn.Sequential(_Masked(5, 7), _Masked(3, 5))
    masked_sharded = _fully_shard(copy.deepcopy(masked).cuda(), mesh)
    _check_selection(L.select_scores_and_sample_masks(masked_sharded, None, seed=3),
                     L.select_scores_and_sample_masks(masked, None, seed=3), "nccl masks")  # fmt: skip
    xs = list(masked_sharded.state_dict().values())
    assert torch.equal(torch.ops.layersel.sample_masks(xs, 3, torch.uint8).cpu(),
                       torch.ops.layersel.sample_masks(list(masked.state_dict().values()), 3, torch.uint8))  # fmt: skip


# ---------------------------------------------------------------------------------------------- ranks that differ


def _same_error_on_every_rank(call: Callable[..., object], error: type[Exception], match: str, *args, **kwargs) -> str:
    """``call(*args, **kwargs)`` raises ``error`` on every rank with one message (compared across ranks),
    matching ``match``."""
    import torch.distributed as dist

    try:
        call(*args, **kwargs)
    except error as exc:
        message: str | None = str(exc)
    else:
        message = None
    every: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, message)
    assert all(m is not None for m in every), f"{call}: a rank did not raise {error.__name__}: {every}"
    assert len(set(every)) == 1, f"the ranks raised different messages: {every}"
    assert re.search(match, every[0]), f"{every[0]!r} does not match {match!r}"  # type: ignore[arg-type]
    return every[0]  # type: ignore[return-value]


_DIFFERENT = "the ranks called {} with different arguments or models: "


def _case_ranks_differ_in_arguments(rank: int, world: int, mesh) -> None:
    """Rank 1 passes another sparsity, percentage, threshold (selecting nothing there), flag, k or seed
    than the others: every rank raises the same ValueError naming the argument and the ranks, before
    any collective whose size depends on it (gloo would abort a rank, or a rank would wait alone)."""
    import layersel_ext.parameter_selection_criteria as L
    from layersel_ext import ops, select_sparse_parameters

    _, _, sharded, sharded0 = _drifted_fsdp_models(_convnet, 5, mesh)
    odd = rank == 1
    others = "ranks 0, 2" if world == 3 else "rank 0"
    fn = L.largest_magnitude_change_scores
    cases = [
        ("select_sparse_parameters", rf"sparsity_level: 0\.1 on {others} vs 0\.6 on rank 1",
         lambda: select_sparse_parameters(sharded, sharded0, 0.6 if odd else 0.1, fn)),
        ("select_layers_by_percentage", rf"exchange_percentage: 0\.25 on {others} vs 0\.75 on rank 1",
         lambda: L.select_layers_by_percentage(0.75 if odd else 0.25, True, True, sharded, sharded0)),
        ("select_layers_by_threshold", rf"threshold: 1e-06 on {others} vs 1e\+30 on rank 1",  # rank 1 selects nothing
         lambda: L.select_layers_by_threshold(1e30 if odd else 1e-6, True, True, sharded, sharded0)),
        ("select_layers_by_threshold", rf"select_drift_more: True on {others} vs False on rank 1",
         lambda: L.select_layers_by_threshold(1e-6, True, not odd, sharded, sharded0)),
        ("layer_drift_norms", rf"normalize: False on {others} vs True on rank 1",
         lambda: L.layer_drift_norms(sharded, sharded0, normalize=odd)),
    ]  # fmt: skip
    for what, match, call in cases:
        _same_error_on_every_rank(call, ValueError, _DIFFERENT.format(what) + "arguments differ: " + match)
    ops.enable_dtensor_ops()
    sx, sy = list(sharded.state_dict().values()), list(sharded0.state_dict().values())
    op = "layersel::kth_largest_score \\(DTensor\\)"
    _same_error_on_every_rank(lambda: torch.ops.layersel.kth_largest_score(sx, sy, 2, 7 if odd else 5, torch.float32),
                              ValueError, _DIFFERENT.format(op) + rf".*k: 5 on {others} vs 7 on rank 1")  # fmt: skip
    masked = _fully_shard(nn.Sequential(_Masked(5, 7), _Masked(3, 5)), mesh)
    _same_error_on_every_rank(lambda: L.select_scores_and_sample_masks(masked, None, seed=2 if odd else 1),
                              ValueError, rf"seed: 1 on {others} vs 2 on rank 1")  # fmt: skip


def _case_ranks_differ_in_models(rank: int, world: int, mesh) -> None:
    """Rank 1's models have the same names but another shape, dtype or placement, or one entry more;
    or its initial_model does not match its model: every rank raises the same ValueError (drift,
    layer and sparse selection, masks), naming the first layer that differs and the ranks."""
    import layersel_ext.parameter_selection_criteria as L
    from layersel_ext import select_sparse_parameters

    odd = rank == 1
    others = "ranks 0, 2" if world == 3 else "rank 0"
    torch.manual_seed(9)

    def mlp(rows: int) -> nn.Module:
        return nn.Sequential(nn.Linear(7, rows), nn.ReLU(), nn.Linear(rows, 3))

    base = mlp(5)
    wider = mlp(6 if odd else 5)
    double = copy.deepcopy(base).double() if odd else copy.deepcopy(base)
    longer = nn.Sequential(*base, nn.Linear(3, 1)) if odd else copy.deepcopy(base)
    calls = {
        "layer_drift_norms": lambda m, m0: L.layer_drift_norms(m, m0),
        "select_layers_by_percentage": lambda m, m0: L.select_layers_by_percentage(0.5, True, True, m, m0),
        "select_sparse_parameters":
            lambda m, m0: select_sparse_parameters(m, m0, 0.3, L.largest_magnitude_change_scores),
    }  # fmt: skip
    for model, match in [
        (wider, rf"global shapes differ: layer '0\.weight' \(model\): \(5, 7\) on {others} vs \(6, 7\) on rank 1"),
        (
            double,
            rf"dtypes differ: layer '0\.weight' \(model\): torch\.float32 on {others} vs torch\.float64 on rank 1",
        ),
        (longer, rf"layer names differ: 4 entries on {others} vs 6 entries on rank 1"),
    ]:
        sharded, sharded0 = _fsdp_pair(model, model, mesh)
        for what, call in calls.items():
            _same_error_on_every_rank(call, ValueError, _DIFFERENT.format(what) + ".*" + match, sharded, sharded0)
    # Rank 1 shards a layer along another dimension.
    sharded, sharded0 = (_shard_by_hand(copy.deepcopy(base), mesh, {"0.weight": int(odd)}) for _ in (0, 1))
    match = (
        rf"placements differ: layer '0\.weight' \(model\): DTensor\(Shard\(0\)\) on {others} vs DTensor\(Shard\(1\)\)"
    )
    for what, call in calls.items():
        _same_error_on_every_rank(call, ValueError, _DIFFERENT.format(what) + ".*" + match, sharded, sharded0)
    # Rank 1's initial_model is narrower than its model: its own check fails, and its peers hear of it.
    sharded, sharded0 = _fsdp_pair(base, wider, mesh)
    _same_error_on_every_rank(
        lambda: L.layer_drift_norms(sharded, sharded0), ValueError,
        rf"global shapes differ: layer '0\.weight' \(initial_model\): \(5, 7\) on {others} vs \(6, 7\) on rank 1; "
        r"rank 1: ValueError: .*shape \(5, 7\) in model but \(6, 7\) in initial_model",
    )  # fmt: skip
    # Score tensors of another dtype on rank 1 (masks: the dtype check waits for the ranks' agreement).
    masked = nn.Sequential(_Masked(5, 7), _Masked(3, 5))
    masked_sharded = _fully_shard(copy.deepcopy(masked).double() if odd else copy.deepcopy(masked), mesh)
    for seed in (4, None):
        _same_error_on_every_rank(L.select_scores_and_sample_masks, ValueError,
                                  _DIFFERENT.format("select_scores_and_sample_masks") + "dtypes differ",
                                  masked_sharded, None, seed=seed)  # fmt: skip


def _case_plain_entries_differ(rank: int, world: int, mesh) -> None:
    """Plain entries that differ across ranks (BatchNorm buffers without SyncBatchNorm, a plain score
    tensor): every function takes them from mesh rank 0, so every rank returns the unsharded answer
    of rank 0's model (the drift, the layers selected and returned, the sparse selection, the masks,
    the ops on DTensors)."""
    import layersel_ext.parameter_selection_criteria as L
    from layersel_ext import ops, select_sparse_parameters

    full, full0, sharded, sharded0 = _drifted_fsdp_models(_convnet, 1, mesh)
    state = sharded.state_dict()
    assert type(state["1.running_mean"]) is torch.Tensor
    with torch.no_grad():  # this rank's own buffers: rank 0's are the full model's
        for name in ("1.running_mean", "1.running_var", "4.running_mean"):
            state[name].add_(rank)
        state["1.num_batches_tracked"].add_(10 * rank)
    for normalize in (True, False):
        assert L.layer_drift_norms(sharded, sharded0, normalize) == L.layer_drift_norms(full, full0, normalize)
        for pct in (0.5, 1.0):
            args = (pct, normalize, True)
            _check_selection(L.select_layers_by_percentage(*args, sharded, sharded0),
                             L.select_layers_by_percentage(*args, full, full0), f"plain pct {pct}")  # fmt: skip
    _check_selection(L.select_layers_by_threshold(0.0, False, True, sharded, sharded0),
                     L.select_layers_by_threshold(0.0, False, True, full, full0), "plain threshold")  # fmt: skip
    for sparsity in (0.3, 1.0):
        fn = L.largest_final_magnitude_scores
        _check_sparse(select_sparse_parameters(sharded, sharded0, sparsity, fn),
                      select_sparse_parameters(full, full0, sparsity, fn), f"plain sparse {sparsity}")  # fmt: skip
    ops.enable_dtensor_ops()
    O = torch.ops.layersel
    sx, sy = list(sharded.state_dict().values()), list(sharded0.state_dict().values())
    fx, fy = list(full.state_dict().values()), list(full0.state_dict().values())
    got, want = O.scores(sx, sy, 0), O.scores(fx, fy, 0)
    assert all(_same_tensor(a, b) for a, b in zip(got, want)), "plain scores op"
    for a, b in zip(O.sparse_extract(sx, sy, 0, [0.5] * len(sx)), O.sparse_extract(fx, fy, 0, [0.5] * len(fx))):
        assert all(map(_same_tensor, a, b)), "plain sparse_extract op (a 0-d buffer among them)"
    # A plain score tensor beside sharded ones: rank 0's masks, seeded and keyed by the scores.
    torch.manual_seed(3)
    masked = nn.Sequential(_Masked(5, 7), _Masked(3, 5))
    sharded_masked = _distribute(copy.deepcopy(masked), mesh, {"0.weight_scores": _shard0()})
    with torch.no_grad():
        sharded_masked.get_parameter("1.weight_scores").add_(rank)
    for seed in (5, None):
        torch.manual_seed(100)
        want_masks = L.select_scores_and_sample_masks(masked, None, seed=seed)
        torch.manual_seed(100)
        _check_selection(L.select_scores_and_sample_masks(sharded_masked, None, seed=seed), want_masks,
                         f"plain masks seed {seed}")  # fmt: skip


def _shard0():
    from torch.distributed.tensor import Shard

    return Shard(0)


def _shard_by_hand(model: nn.Module, mesh, dims: dict[str, int]) -> nn.Module:
    """``model`` with the named parameters made ``Shard(dim)`` DTensors on ``mesh`` from this rank's
    ``torch.chunk`` piece: no communication, so the ranks may shard differently."""
    from torch.distributed.tensor import DTensor, Shard

    coordinate, world = mesh.get_coordinate()[0], mesh.size()
    for name, dim in dims.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        t = module._parameters[attr].detach()
        chunks = torch.chunk(t, world, dim)
        piece = chunks[coordinate] if coordinate < len(chunks) else t.narrow(dim, 0, 0)
        local = DTensor.from_local(piece, mesh, [Shard(dim)], run_check=False, shape=t.shape, stride=t.stride())
        module._parameters[attr] = nn.Parameter(local)
    return model


def _case_mesh_out_of_order(rank: int, world: int, mesh) -> None:
    """A 1-D mesh whose coordinates are not its group's ranks in order (``DeviceMesh("cpu", [1, 0])``,
    where torch's own ``full_tensor()`` gathers out of order) is refused on every rank alike."""
    from torch.distributed.device_mesh import DeviceMesh

    import layersel_ext.parameter_selection_criteria as L
    from layersel_ext import select_sparse_parameters

    for order in {(1, 0, *range(2, world)), tuple(reversed(range(world)))}:
        order = list(order)
        odd_mesh = DeviceMesh("cpu", order)
        torch.manual_seed(4)
        pair = [_shard_by_hand(nn.Linear(4, 6), odd_mesh, {"weight": 0, "bias": 0}) for _ in (0, 1)]
        match = rf"device mesh of global ranks {re.escape(str(order))}, which its process group numbers"
        _same_error_on_every_rank(L.layer_drift_norms, NotImplementedError, match, *pair)
        _same_error_on_every_rank(L.select_layers_by_percentage, NotImplementedError, match, 1.0, True, True, *pair)
        _same_error_on_every_rank(select_sparse_parameters, NotImplementedError, match, *pair, 0.5,
                                  L.largest_final_magnitude_scores)  # fmt: skip


CASES = {
    "fsdp_mlp": _case_fsdp_mlp,
    "fsdp_convnet_bn": _case_fsdp_convnet_bn,
    "distribute_tensor": _case_distribute_tensor,
    "transformer": _case_transformer,
    "masks": _case_masks,
    "masks_distributed": _case_masks_distributed,
    "shape_mismatch": _case_shape_mismatch,
    "collective_counts": _case_collective_counts,
    "direct_ops": _case_direct_ops,
    "ranks_differ_in_arguments": _case_ranks_differ_in_arguments,
    "ranks_differ_in_models": _case_ranks_differ_in_models,
    "plain_entries_differ": _case_plain_entries_differ,
    "mesh_out_of_order": _case_mesh_out_of_order,
}
SPARSE_CASES = {
    "sparse_models": _case_sparse_models,
    "sparse_dtypes": _case_sparse_dtypes,
    "sparse_collectives": _case_sparse_collectives,
}


def _worker(rank: int, world: int, port: int, cases: list[str], backend: str = "gloo") -> None:
    import logging

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # fl4health's exchanger logs a warning per constant-score tensor
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    mesh = init_device_mesh("cuda" if backend == "nccl" else "cpu", (world,))
    for case in cases:
        try:
            {**CASES, **SPARSE_CASES, "nccl_smoke": _case_nccl_smoke}[case](rank, world, mesh)
        except BaseException as exc:
            # Printed here too: when a peer then aborts first, spawn reports only the peer's signal.
            print(f"rank {rank}/{world}, case {case!r} failed:", file=sys.stderr, flush=True)
            traceback.print_exc()
            raise AssertionError(f"rank {rank}/{world}, case {case!r}: {type(exc).__name__}: {exc}") from exc
    # Every rank done with every collective, then out without tearing anything down: destroying the
    # group (or letting the interpreter's exit destroy it) while a peer's gloo or store thread still
    # finished its last transfer aborted that peer in CI runs under load ("terminate called without
    # an active exception"), even after a barrier. The test asserts the cases, not the teardown.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(world: int, cases: list[str], backend: str = "gloo") -> None:
    import torch.multiprocessing as mp

    context = mp.spawn(_worker, args=(world, _free_port(), cases, backend), nprocs=world, join=False)
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


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_sparse_matches_unsharded(world: int) -> None:
    """Sparse COO selection on `world` gloo ranks (one spawn): every rank returns the unsharded arrays."""
    _spawn(world, list(SPARSE_CASES))


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


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or not torch.distributed.is_nccl_available(), reason="needs a GPU and NCCL"
)
def test_sharded_nccl_on_every_gpu() -> None:
    """The NCCL code path on one rank per visible GPU (one GPU: a 1-rank group, which still runs every
    collective through NCCL and every tensor on the device)."""
    _spawn(torch.cuda.device_count(), ["nccl_smoke"], backend="nccl")


def test_sharded_one_rank_matches_unsharded() -> None:
    """A one-rank mesh (every local piece is the whole tensor: no gather buffer, no all-gather)."""
    _spawn(1, ["fsdp_mlp", "fsdp_convnet_bn", "distribute_tensor", "transformer", "direct_ops", "sparse_models"])
