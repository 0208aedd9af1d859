"""One owner for the adapter state of a model.

What ``adapt`` leaves on a model, and the only code that reads or writes it:

* ``model.__dict__[STATE_ATTR]``: a :class:`ModelState` (plain data: deep-copies and
  pickles): the adapters' specs, the active ones, the rewritten units, the original
  ``requires_grad`` flags;
* one :class:`~peftcompile.modules.SiteAdapterSet` child per adapted site (on the module
  that owns W), holding one :class:`~peftcompile.modules.SiteAdapter` per adapter;
* ``model.<SHARED_ATTR>[adapter][group]``: tensors a group of sites shares (stored once).

One key scheme names every adapter tensor, in checkpoints and in ONNX graph inputs alike:
``<site>.<param>``, ``shared.<group>.<param>`` and ``trainable.<module>.<param>`` (modules the
spec trains fully). :func:`adapter_params`, :func:`trainable_params` (and ``copies.checkpoint_params`` on top)
are the only walks that build these keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from torch import nn

from .errors import AdapterError
from .modules import RowRouting, SharedTensors, SiteAdapterSet
from .spec import AdapterSpec, param_targeted, select_modules

__all__ = [
    "ModelState",
    "SHARED_ATTR",
    "STATE_ATTR",
    "state_of",
    "require_state",
    "site_adapters",
    "merged_sites",
    "shared_of",
    "site_key",
    "shared_key",
    "trainable_key",
    "split_trainable_key",
    "adapter_params",
    "trainable_params",
    "bias_params",
    "owned_params",
    "owned_by",
    "adapter_sites",
    "trainable_modules",
    "freeze_base_",
]

SHARED_ATTR = "peftcompile_shared"
STATE_ATTR = "_peftcompile_state"
OURS = "peftcompile"  # every attribute peftcompile adds to a model starts with this


@dataclass
class ModelState:
    """What adapt() remembers on the model (plain data: deep-copies and pickles)."""

    specs: dict[str, AdapterSpec] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    units: set[str] = field(default_factory=set)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    frozen: set[str] = field(default_factory=set)  # adapters in inference mode: active but not trainable
    # per-adapter copies of trainable modules (copies.py): trainable key -> the adapter whose
    # values the parameter holds now (None: the original); key -> (buffer, module, param)
    live: dict[str, str | None] = field(default_factory=dict)
    copy_names: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    routing: RowRouting = field(default_factory=RowRouting)  # mixed-adapter batches; every site set reads it


def state_of(model: nn.Module) -> ModelState | None:
    """The model's adapter state, or None if it has no peftcompile adapters. The state lives
    on the model itself, also under DDP / FSDP1 / torch.compile wrappers (unwrapped here)."""
    from .distributed import unwrap

    return unwrap(model).__dict__.get(STATE_ATTR)


def require_state(model: nn.Module) -> ModelState:
    st = state_of(model)
    if st is None:
        raise AdapterError(f"{type(model).__name__} has no peftcompile adapters; call peftcompile.adapt first")
    return st


def site_adapters(model: nn.Module) -> Iterator[tuple[nn.Module, str, SiteAdapterSet]]:
    """(host module, attribute, SiteAdapterSet) for every adapted site."""
    for host in model.modules():
        for attr, child in host.named_children():
            if isinstance(child, SiteAdapterSet):
                yield host, attr, child


def merged_sites(model: nn.Module, name: str | None = None) -> list[str]:
    """Sites where adapter ``name`` (any adapter if None) is folded into the base weight."""
    return sorted(c.site for _, _, c in site_adapters(model) if (name in c.merged if name else c.merged))


def shared_of(model: nn.Module, name: str) -> dict[str, SharedTensors]:
    """Group name -> the shared tensors of adapter ``name`` ({} if it shares none)."""
    root = getattr(model, SHARED_ATTR, None)
    if root is None or name not in root:
        return {}
    return {sh.group: sh for sh in root[name].values()}


def site_key(site: str, param: str) -> str:
    return f"{site}.{param}"


def shared_key(group: str, param: str) -> str:
    return f"shared.{group}.{param}"


def trainable_key(module: str, param: str) -> str:
    return f"trainable.{module}.{param}"


def split_trainable_key(key: str) -> tuple[str | None, str | None]:
    """(module, param) of a ``trainable.<module>.<param>`` key, split at the last dot (so
    ``module.param`` is the parameter's full path); (None, None) for other keys."""
    if not key.startswith("trainable."):
        return None, None
    module, _, param = key.removeprefix("trainable.").rpartition(".")
    return module, param


def adapter_params(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Key -> parameter of adapter ``name``: ``<site>.<param>`` and ``shared.<group>.<param>``."""
    out: dict[str, nn.Parameter] = {}
    for _, _, cont in site_adapters(model):
        if name in cont:
            out.update({site_key(cont.site, p): t for p, t in cont[name]._parameters.items()})
    for group, sh in shared_of(model, name).items():
        out.update({shared_key(group, p): t for p, t in sh._parameters.items()})
    return out


def trainable_params(model: nn.Module, patterns) -> dict[str, nn.Parameter]:
    """``trainable.<module>.<param>`` for the modules ``patterns`` (a spec's ``trainable``) select."""
    if patterns is None:
        return {}
    names = select_modules((n for n, _ in model.named_modules()), patterns)
    return {trainable_key(n, p): t for n in names for p, t in model.get_submodule(n).named_parameters()}


def bias_params(model: nn.Module, bias: str | None, sites: Iterable[str],
                target_parameters: Sequence[str] | None = None) -> dict[str, nn.Parameter]:
    """``trainable.<module>.bias`` for PEFT's ``bias`` option (a spec's ``bias``): "all": every
    base parameter named ``bias`` (PEFT 0.21: ``n == "bias" or n.endswith(".bias")``; not
    ``in_proj_bias`` or ``gate_up_proj_bias``); "lora_only": the biases of the adapted
    ``sites``' own modules (a parameter site's, of ``target_parameters``: its module's, as
    PEFT's ParamWrapper.bias); None: none."""
    if bias is None:
        return {}
    if bias == "all":
        return {trainable_key(*n.rpartition(".")[::2]): p for n, p in model.named_parameters()
                if n.rpartition(".")[2] == "bias" and not any(x.startswith(OURS) for x in n.split("."))}
    out = {}
    for s in sites:
        if target_parameters and param_targeted(s, target_parameters):
            s = s.rpartition(".")[0]  # <module>.<param>: the module's bias
        try:
            b = model.get_submodule(s).get_parameter("bias")
        except AttributeError:  # not a module (a functional site on another attribute), or no bias
            continue
        out[trainable_key(s, "bias")] = b
    return out


def owned_params(model: nn.Module, spec: AdapterSpec, sites: Iterable[str]) -> dict[str, nn.Parameter]:
    """Base parameters an adapter with ``spec`` at ``sites`` trains with a copy of its own
    (:mod:`peftcompile.copies`): its ``trainable`` modules' and its ``bias`` option's."""
    out = trainable_params(model, spec.trainable)
    out.update(bias_params(model, spec.bias, sites, spec.target_parameters))
    return out


def adapter_sites(model: nn.Module, name: str) -> list[str]:
    """The sites adapter ``name`` is attached to."""
    return [c.site for _, _, c in site_adapters(model) if name in c]


def owned_by(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """:func:`owned_params` of adapter ``name`` on the model ({} for an unknown name)."""
    st = require_state(model)
    return owned_params(model, st.specs[name], adapter_sites(model, name)) if name in st.specs else {}


def trainable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules the adapters' specs keep trainable (``AdapterSpec.trainable``), by name."""
    st = state_of(model)
    names = [n for n, _ in model.named_modules()]
    out: dict[str, nn.Module] = {}
    for spec in (st.specs.values() if st else ()):
        if spec.trainable is not None:
            out.update({n: model.get_submodule(n) for n in select_modules(names, spec.trainable)})
    return out


def freeze_base_(model: nn.Module) -> None:
    """Freeze everything but adapters and the base parameters adapters own copies of
    (``trainable`` modules, ``bias``); :func:`~peftcompile.api.set_active` narrows the latter
    to the training adapters'."""
    adapter_ids = {id(p) for _, _, c in site_adapters(model) for p in c.parameters()}
    shared = getattr(model, SHARED_ATTR, None)
    if shared is not None:
        adapter_ids |= {id(p) for p in shared.parameters()}
    for p in model.parameters():
        if id(p) not in adapter_ids:
            p.requires_grad_(False)
    for name in require_state(model).specs:
        for p in owned_by(model, name).values():
            if id(p) not in adapter_ids:
                p.requires_grad_(True)
