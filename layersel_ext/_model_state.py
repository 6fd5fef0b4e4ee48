"""Reading a model's state_dict entries, and matching two models' entries by name.

``state_items`` returns exactly what ``model.state_dict().items()`` would (names, order, detached
tensors on the same storage), without building the OrderedDict and running the state_dict machinery:
for a model of 2,000 small tensors that is most of fl4health's per-call cost. The tensors are
detached, as state_dict()'s are: each holds its own reference to the storage, so a kernel keeps
reading valid memory even if another thread swaps a parameter's storage (``p.data = ...``) meanwhile
(with the compiled backend, the walk and the detach are one C++ call: ``_C.state_items``). A model that customises its state_dict (hooks,
overridden ``state_dict`` / ``_save_to_state_dict``, extra state) goes through the real
``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from . import ops

_BASE_STATE_DICT = nn.Module.state_dict
_BASE_SAVE = nn.Module._save_to_state_dict
_BASE_EXTRA_STATE = nn.Module.get_extra_state


def _customised(module: nn.Module) -> bool:
    cls = type(module)
    return (
        cls.state_dict is not _BASE_STATE_DICT
        or cls._save_to_state_dict is not _BASE_SAVE
        or cls.get_extra_state is not _BASE_EXTRA_STATE
        or bool(module._state_dict_hooks)
        or bool(getattr(module, "_state_dict_pre_hooks", None))
    )


def _collect(module: nn.Module, prefix: str, out: list[tuple[str, Tensor]]) -> bool:
    if _customised(module):
        return False
    for name, param in module._parameters.items():
        if param is not None:
            if not isinstance(param, Tensor):
                return False  # state_dict() runs, and the entry is refused by name
            out.append((prefix + name, param))
    non_persistent = module._non_persistent_buffers_set
    for name, buf in module._buffers.items():
        if buf is not None and name not in non_persistent:
            if not isinstance(buf, Tensor):
                return False
            out.append((prefix + name, buf))
    for name, child in module._modules.items():
        if child is not None and not _collect(child, prefix + name + ".", out):
            return False
    return True


def _detached(items: list[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    tensors = [t for _, t in items]
    helpers = ops.compiled_helpers()
    if helpers is not None:
        detached = helpers.detach_all(tensors)
    else:
        detached = [t.detach() for t in tensors]
    return [(name, t) for (name, _), t in zip(items, detached)]


def state_lists(model: nn.Module) -> tuple[list[str], Sequence[Tensor]]:
    """``state_items`` as (names, tensors). With the compiled backend the walk and the detach are one
    C++ call (``_C.state_items``, ``_collect``'s twin), which returns None where ``state_dict()`` must run;
    its tensors stay held in C++ (``ops.HELD``: the ops take them without a Python tensor per entry)
    unless one is a tensor subclass (a DTensor), when they come as a list."""
    helpers = ops.compiled_helpers()
    if helpers is not None and isinstance(model, nn.Module):
        walked = helpers.state_items(model, _BASE_STATE_DICT, _BASE_SAVE, _BASE_EXTRA_STATE)
        if walked is not None:
            return walked
    items = state_items(model)
    return [n for n, _ in items], [t for _, t in items]


def state_items(model: nn.Module) -> list[tuple[str, Tensor]]:
    """``list(model.state_dict().items())``, fast, detached; a non-tensor entry is refused by name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    items: list[tuple[str, Tensor]] = []
    # Defensive: a repeated name (not possible for plain modules) is left to state_dict()'s rules.
    if _collect(model, "", items) and len({n for n, _ in items}) == len(items):
        return _detached(items)
    items = list(model.state_dict().items())
    for name, value in items:
        if not isinstance(value, Tensor):
            raise TypeError(
                f"layer {name!r}: the state_dict entry is a {type(value).__name__}, not a tensor "
                "(extra state or a quantized module's packed parameters); layersel_ext selects tensors "
                "only, and fl4health fails on such an entry too"
            )
    return items


def paired_state(
    model: nn.Module, initial_model: nn.Module | None, what: str
) -> tuple[list[str], Sequence[Tensor], Sequence[Tensor]]:
    """Names and tensors of both models, matched by name (KeyError naming the first missing one).

    Shapes, dtypes and devices are checked by the kernels themselves (one pass in C++, not three
    Python walks over 2,000 tensors); ``_checks.explain_failure`` turns their refusal into an error
    naming the layer.
    """
    if initial_model is None:
        raise ValueError(f"{what} needs initial_model (the model at the start of the round), got None")
    names, xs = state_lists(model)
    if not names:
        raise ValueError(f"{what}: the model has no state_dict entries (an empty model)")
    initial_names, ys = state_lists(initial_model)
    if initial_names == names:  # the usual case: a deep copy, same order
        return names, xs, ys
    initial = dict(zip(initial_names, ys))
    missing = [n for n in names if n not in initial]
    if missing:
        raise KeyError(f"{what}: layer {missing[0]!r} is in model but not in initial_model ({len(missing)} missing)")
    name_set = set(names)
    extra = [n for n in initial if n not in name_set]
    if extra:
        raise KeyError(f"{what}: layer {extra[0]!r} is in initial_model but not in model ({len(extra)} extra)")
    return names, xs, [initial[n] for n in names]


def single_state(model: nn.Module, what: str) -> tuple[list[str], Sequence[Tensor]]:
    names, xs = state_lists(model)
    if not names:
        raise ValueError(f"{what}: the model has no state_dict entries (an empty model)")
    return names, xs
