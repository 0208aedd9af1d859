"""Per-adapter copies of ``trainable`` modules (PEFT's ``modules_to_save``) and of the biases of
the ``bias`` option, without a wrapper.

PEFT wraps each such module (``ModulesToSaveWrapper``: the original plus one copy per
adapter), which changes the module tree and the state_dict keys. We keep the module and its
parameters where they are and swap *values*: the parameters hold the values of the adapter
that owns them now (the active, enabled adapter whose spec names the module), and the other
values -- the original and each inactive adapter's -- wait in non-persistent buffers under
``model.<COPIES_ATTR>`` (they follow ``.to()``, deep-copy with the model, and stay out of
``state_dict``). Switching is an in-place copy: no retrace, no new parameter objects, and
compiled graphs see the same tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import AdapterError
from .state import adapter_params, owned_by, require_state, site_adapters, split_trainable_key

__all__ = ["COPIES_ATTR", "BASE", "add_copies_", "sync_", "owners_for", "checkpoint_params", "set_copy_", "drop_copies_",
           "base_keys", "original", "set_original_"]

COPIES_ATTR = "peftcompile_copies"
BASE = None  # owner of the original values


def _root(model: nn.Module, create: bool = False) -> nn.Module | None:
    root = model._modules.get(COPIES_ATTR)
    if root is None and create:
        root = nn.Module()
        model.add_module(COPIES_ATTR, root)
    return root


def _slot(owner: str | None) -> str:
    return "base" if owner is BASE else f"adapter_{owner}"


def _store(model: nn.Module, owner: str | None, create: bool = False) -> nn.Module | None:
    root = _root(model, create)
    if root is None:
        return None
    s = root._modules.get(_slot(owner))
    if s is None and create:
        s = nn.Module()
        root.add_module(_slot(owner), s)
    return s


def _put(model: nn.Module, owner: str | None, key: str, value: torch.Tensor) -> None:
    _store(model, owner, create=True).register_buffer(require_state(model).copy_names[key][0],
                                                      value.detach().clone(), persistent=False)


def _get(model: nn.Module, owner: str | None, key: str) -> torch.Tensor:
    return getattr(_store(model, owner), require_state(model).copy_names[key][0])


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value; an FSDP2 shard (DTensor) is gathered (every rank calls: SPMD)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    """``p.copy_(value)`` for a whole ``value``; an FSDP2 shard keeps its own slice of it."""
    from .distributed import copy_into_

    copy_into_(p, value)


def _param(model: nn.Module, key: str) -> nn.Parameter:
    _, module, pname = require_state(model).copy_names[key]
    return model.get_submodule(module).get_parameter(pname)


def add_copies_(model: nn.Module, name: str) -> None:
    """Give adapter ``name`` its own copy of the base parameters it trains (its spec's
    ``trainable`` modules and ``bias`` option), initialised from the original values (PEFT
    copies the original module)."""
    st = require_state(model)
    with torch.no_grad():
        for key, p in owned_by(model, name).items():
            if key not in st.live:  # first adapter to own this parameter: the live values are the original
                module, pname = split_trainable_key(key)
                st.copy_names[key] = (f"t{len(st.copy_names)}", module, pname)
                _put(model, BASE, key, p)
                st.live[key] = BASE
            _put(model, name, key, _get(model, BASE, key))


def owners_for(model: nn.Module, active: tuple[str, ...], disabled: bool) -> dict[str, str | None]:
    """Trainable key -> the adapter whose values it should hold (BASE if none); AdapterError
    if two active adapters both own a parameter (one parameter cannot hold two values)."""
    st = require_state(model)
    want: dict[str, str | None] = {k: BASE for k in st.live}
    claimed: dict[str, str] = {}
    for n in active:
        for key in owned_by(model, n):
            if key in claimed and claimed[key] != n:
                raise AdapterError(
                    f"adapters {claimed[key]!r} and {n!r} both train {key.removeprefix('trainable.')} (trainable=... "
                    f"or bias=...), and one parameter holds one adapter's values; activate them one at a time "
                    f"(PEFT refuses this for modules_to_save too)")
            claimed[key] = n
            if not disabled:
                want[key] = n
    return want


def sync_(model: nn.Module) -> None:
    """Make every trainable module hold its owner's values (the outgoing owner's are saved
    to its copy first; the original never changes)."""
    st = require_state(model)
    if not st.live:
        return
    disabled = any(c.disabled for _, _, c in site_adapters(model))
    want = owners_for(model, st.active, disabled)
    with torch.no_grad():
        for key, owner in want.items():
            live = st.live[key]
            p = _param(model, key)
            # the original values never train: a step taken on them (e.g. inside disabled())
            # would be dropped at the next swap, so they get no gradient at all
            p.requires_grad_(owner is not BASE and owner not in st.frozen)
            if live == owner:
                continue
            if live is not BASE and _store(model, live) is not None:
                _get(model, live, key).copy_(_full(p))
            _set(p, _get(model, owner, key))
            st.live[key] = owner


def checkpoint_params(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Everything a checkpoint of adapter ``name`` holds: its tensors and its values of the
    trainable modules (the parameters themselves when it owns them now, else its copies)."""
    st = require_state(model)
    out: dict[str, torch.Tensor] = dict(adapter_params(model, name))
    for key, p in owned_by(model, name).items():
        out[key] = p if st.live.get(key, name) == name else _get(model, name, key)
    return out


def set_copy_(model: nn.Module, name: str, key: str, value: torch.Tensor) -> None:
    """Set adapter ``name``'s value of a key it owns (the parameter itself while it holds it)."""
    st = require_state(model)
    with torch.no_grad():
        if st.live.get(key) == name:
            _set(_param(model, key), value)
        else:
            _get(model, name, key).copy_(_full(value))


def drop_copies_(model: nn.Module, name: str | None = None) -> None:
    """Forget adapter ``name``'s copies (all copies, and the original, when None)."""
    root = _root(model)
    if root is None:
        return
    st = require_state(model)
    if name is None:
        delattr(model, COPIES_ATTR)
        st.live.clear()
        st.copy_names.clear()
        return
    root._modules.pop(_slot(name), None)
    for key, owner in list(st.live.items()):
        if owner == name:  # its values leave with it: the original is back until the next sync picks an owner
            st.live[key] = BASE
            with torch.no_grad():
                _set(_param(model, key), _get(model, BASE, key))


def base_keys(model: nn.Module) -> dict[str, str]:
    """state_dict key -> trainable key, for every parameter that has per-adapter copies."""
    return {f"{module}.{pname}".lstrip("."): key for key, (_, module, pname) in require_state(model).copy_names.items()}


def original(model: nn.Module, key: str) -> torch.Tensor | None:
    """The original (pre-adapter) value of a trainable key, or None if it has none."""
    st = require_state(model)
    return _get(model, BASE, key) if key in st.live else None


def set_original_(model: nn.Module, key: str, value: torch.Tensor, live: torch.Tensor) -> None:
    """Replace the original value (``set_base_model_state_dict``); the parameter too if it
    holds the original now."""
    st = require_state(model)
    with torch.no_grad():
        _get(model, BASE, key).copy_(value)
        if st.live[key] is BASE:
            live.copy_(value)
