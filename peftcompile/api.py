"""Public API: adapt a model, switch/merge/unload adapters, summarise.

``adapt`` reads as the pipeline: capture -> match -> select -> validate -> build ->
rewrite. Everything that can fail runs before the model is touched, so a bad spec
leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from .methods import method_for
from .modules import SharedTensors, SiteAdapter, SiteAdapters
from .passes.capture import capture
from .passes.match import Site, match
from .passes.rewrite import restore_unit_, rewrite_unit_
from .spec import AdapterSpec, Placement, select_modules, select_sites

__all__ = [
    "adapt",
    "set_active",
    "disabled",
    "summary",
    "merge",
    "unmerge",
    "merge_and_unload",
    "AdapterError",
    "adapters_of",
    "site_adapters",
]

SHARED_ATTR = "peftcompile_shared"
STATE_ATTR = "_peftcompile_state"


class AdapterError(ValueError):
    """Bad spec, bad model or bad adapter file; the model is left unchanged."""


@dataclass
class _State:
    """What adapt() remembers on the model (plain data: deep-copies and pickles)."""

    specs: dict[str, AdapterSpec] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    units: set[str] = field(default_factory=set)
    requires_grad: dict[str, bool] = field(default_factory=dict)


def _state(model: nn.Module) -> _State | None:
    from .distributed import unwrap  # state lives on the model under DDP/FSDP1/compile wrappers

    return unwrap(model).__dict__.get(STATE_ATTR)


def site_adapters(model: nn.Module) -> Iterator[tuple[nn.Module, str, SiteAdapters]]:
    """(host module, attribute, SiteAdapters) for every adapted site."""
    for host in model.modules():
        for attr, child in host.named_children():
            if isinstance(child, SiteAdapters):
                yield host, attr, child


def adapters_of(model: nn.Module) -> dict[str, AdapterSpec]:
    """Adapter name -> spec for an adapted model ({} if none)."""
    st = _state(model)
    return dict(st.specs) if st else {}


def _head_sites(model: nn.Module) -> set[str]:
    """The output head that "all-linear" leaves out (PEFT: the output embeddings)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {n for n, m in model.named_modules() if m is head}


def _error_no_sites(spec: AdapterSpec, available: Sequence[str], failures: dict[str, str]) -> AdapterError:
    msg = f"targets {spec.targets!r} matched no linear site. Available sites: {sorted(set(available))}"
    if failures:
        plain = {k or "<root>": v for k, v in failures.items() if not v.startswith("HF modules")}
        if plain:
            msg += f". Modules that could not be traced whole (their direct F.linear calls are not visible): {plain}"
    return AdapterError(msg + ". Fix: pass target names from that list (suffixes, a regex or 'all-linear').")


def _groups(method, sites: list[Site]) -> dict[str, list[Site]]:
    g: dict[str, list[Site]] = defaultdict(list)
    for s in sites:
        g[method.group_key(s.name)].append(s)
    return g


def adapt(model: nn.Module, spec: AdapterSpec, name: str = "default", *,
          placement: Placement | None = None) -> nn.Module:
    """Rewrite the chosen linear sites of ``model`` into ``base(x) + delta(x)``.

    Returns the same object (an HF model stays an HF model). Base parameters are
    frozen, the new adapter is trainable and becomes the active one. Calling again
    with another ``name`` adds a second adapter. ``placement`` (or
    ``spec.with_placement``) restricts to decided sites and warm-starts from its weights.
    """
    if not isinstance(spec, AdapterSpec):
        raise TypeError(f"spec must be a peftcompile.AdapterSpec, got {type(spec).__name__}")
    if placement is not None:
        spec = spec.with_placement(placement)
    placement = spec.placement
    st = _state(model)
    if not isinstance(name, str) or not name or "." in name:
        raise AdapterError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if st and name in st.specs:
        raise AdapterError(
            f"an adapter named {name!r} already exists on {type(model).__name__}; "
            f"pick another name, or merge_and_unload first. Existing: {sorted(st.specs)}"
        )
    method = method_for(spec.method)

    # capture + match (read-only)
    cap = capture(model)
    all_sites = match(cap)
    by_name: dict[str, list[Site]] = defaultdict(list)
    for s in all_sites:
        by_name[s.name].append(s)
    chosen = select_sites(list(dict.fromkeys(by_name)), spec, _head_sites(model))
    if not chosen:
        raise _error_no_sites(spec, list(by_name), cap.failures)
    if placement is not None:
        missing = sorted(set(placement.sites) - set(by_name))
        if missing:
            raise AdapterError(f"placement names sites this model does not have: {missing}")

    # validate every chosen site before touching anything
    first = {n: by_name[n][0] for n in chosen}
    problems = []
    for n, s in first.items():
        why = method.check_site(spec.method, s.in_features, s.out_features)
        if why:
            problems.append(f"{n}: {why}")
    groups: dict[str, list[Site]] = {}
    if method.shares:
        groups = _groups(method, list(first.values()))
        for key, members in groups.items():
            shapes = {(m.in_features, m.out_features) for m in members}
            if len(shapes) > 1:
                problems.append(
                    f"group {key!r} has sites of different shapes "
                    f"{[(m.name, m.in_features, m.out_features) for m in members]}; exclude the odd ones"
                )
    if problems:
        raise AdapterError(f"cannot apply {spec.method!r}:\n  " + "\n  ".join(problems))
    if spec.trainable is not None and not select_modules((n for n, _ in model.named_modules()), spec.trainable):
        raise AdapterError(
            f"trainable={spec.trainable!r} matched no module of {type(model).__name__}; pass module names "
            f"(suffixes such as 'classifier', or a regex), e.g. from model.named_modules()"
        )

    # build the new modules (still nothing attached)
    shared: dict[str, SharedTensors] = {}
    group_of: dict[str, tuple[SharedTensors, int]] = {}
    for key, members in groups.items():
        if len(members) == 1:
            warnings.warn(
                f"{spec.method.name}: group {key!r} has a single site ({members[0].name}); sharing needs >= 2 "
                f"layers, so it gets an unshared adapter (its pool has just its own k ranks)",
                stacklevel=2,
            )
        w = members[0].weight(model)
        sh = SharedTensors(spec.method, key, members[0].in_features, members[0].out_features,
                           [m.name for m in members], w.dtype, w.device)
        shared[key] = sh
        for m in members:
            group_of[m.name] = (sh, len(members))
    new: dict[str, SiteAdapter] = {}
    for n, s in first.items():
        w = s.weight(model)
        sh, nm = group_of.get(n, (None, 1))
        new[n] = SiteAdapter(spec.method, n, name, s.in_features, s.out_features, w.dtype, w.device, sh, nm)
    if placement is not None:
        _warm_start(new, shared, placement)

    # mutate: attach, rewrite, freeze, activate
    if st is None:
        st = _State(requires_grad={k: p.requires_grad for k, p in model.named_parameters()})
        model.__dict__[STATE_ATTR] = st
    fresh_units: set[str] = set()  # units whose graphs gain a site: only those are rewritten
    for n, s in first.items():
        host = model.get_submodule(s.host_path)
        cont = getattr(host, s.host_attr, None)
        if not isinstance(cont, SiteAdapters):
            cont = SiteAdapters(n, s.kind, s.weight_attr, s.in_features, s.out_features)
            host.add_module(s.host_attr, cont)
            fresh_units |= {x.unit.path for x in by_name[n]}
        cont[name] = new[n]
    if shared:
        root = getattr(model, SHARED_ATTR, None)
        if root is None:
            root = nn.ModuleDict()
            model.add_module(SHARED_ATTR, root)
        root[name] = nn.ModuleDict({_key(k): v for k, v in shared.items()})
    for unit_path in fresh_units:
        _rewrite(model, unit_path, all_sites)
        st.units.add(unit_path)
    st.specs[name] = spec
    _freeze_base_(model)
    set_active(model, name)
    return model


def _key(group: str) -> str:
    return group.replace(".", "__")


def _container(model: nn.Module, s: Site) -> SiteAdapters | None:
    c = getattr(model.get_submodule(s.host_path), s.host_attr, None)
    return c if isinstance(c, SiteAdapters) else None


def _rewrite(model: nn.Module, unit_path: str, sites: list[Site]) -> None:
    todo = [s for s in sites if s.unit.path == unit_path and _container(model, s) is not None]
    rewrite_unit_(todo[0].unit, todo)


def _warm_start(new: dict[str, SiteAdapter], shared: dict[str, SharedTensors], placement: Placement) -> None:
    with torch.no_grad():
        for n, mod in new.items():
            for p, t in placement.weights.get(n, {}).items():
                getattr(mod, p).copy_(t)
        for key, mod in shared.items():
            for p, t in placement.shared.get(key, {}).items():
                getattr(mod, p).copy_(t)


def _require(model: nn.Module) -> _State:
    st = _state(model)
    if st is None:
        raise AdapterError(f"{type(model).__name__} has no peftcompile adapters; call peftcompile.adapt first")
    return st


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the running (and trainable) adapters; others stay stored, frozen."""
    from .distributed import unwrap

    model = unwrap(model)
    st = _require(model)
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in st.specs]
    if unknown:
        raise AdapterError(f"unknown adapter(s) {unknown}; this model has {sorted(st.specs)}")
    for _, _, cont in site_adapters(model):
        if any(n in cont.merged for n in cont.active if n not in names):
            raise AdapterError(f"{cont.site}: unmerge before switching away from a merged adapter")
        cont.active = tuple(n for n in names if n in cont)
        for n, a in cont.items():
            a.requires_grad_(n in names)
    for n, shared in (getattr(model, SHARED_ATTR, None) or {}).items():
        shared.requires_grad_(n in names)
    st.active = names


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block (merged adapters are unmerged meanwhile)."""
    _require(model)
    merged = [(c, c.merged) for _, _, c in site_adapters(model) if c.merged]
    if merged:
        unmerge(model)
    conts = [c for _, _, c in site_adapters(model)]
    for c in conts:
        c.disabled = True
    try:
        yield model
    finally:
        for c in conts:
            c.disabled = False
        if merged:
            merge(model)


def _delta_for(cont: SiteAdapters, name: str) -> torch.Tensor:
    d = cont[name].delta_weight().to(torch.float32)
    return (d.t() if cont.transposed else d)


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold the active adapters into the base weights (their deltas then stop running)."""
    _require(model)
    for host, _, cont in site_adapters(model):
        w = getattr(host, cont.weight_attr)
        for n in cont.active:
            if n in cont.merged:
                continue
            w.copy_((w.to(torch.float32) + _delta_for(cont, n)).to(w.dtype))
            cont.merged = cont.merged + (n,)


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Take merged adapters back out of the base weights."""
    _require(model)
    for host, _, cont in site_adapters(model):
        w = getattr(host, cont.weight_attr)
        for n in reversed(cont.merged):
            w.copy_((w.to(torch.float32) - _delta_for(cont, n)).to(w.dtype))
        cont.merged = ()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and remove every trace of peftcompile.

    The returned (same) model has exactly the original ``state_dict`` keys, its class
    forwards and its original ``requires_grad`` flags, so ``save_pretrained`` writes a
    plain checkpoint. A DDP / torch.compile wrapper is unwrapped (the inner model is
    returned); an FSDP-sharded model is refused with the fix (save, then merge unsharded).
    """
    from .distributed import require_unsharded, unwrap

    require_unsharded(model, "merge_and_unload")
    model = unwrap(model)
    st = _require(model)
    merge(model)
    for host, attr, _ in list(site_adapters(model)):
        delattr(host, attr)
    if hasattr(model, SHARED_ATTR):
        delattr(model, SHARED_ATTR)
    for path in st.units:
        restore_unit_(model.get_submodule(path))
    for k, p in model.named_parameters():
        if k in st.requires_grad:
            p.requires_grad_(st.requires_grad[k])
    del model.__dict__[STATE_ATTR]
    return model


def trainable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules the adapters' specs keep trainable (``AdapterSpec.trainable``), by name."""
    st = _state(model)
    names = [n for n, _ in model.named_modules()]
    out: dict[str, nn.Module] = {}
    for spec in (st.specs.values() if st else ()):
        if spec.trainable is not None:
            out.update({n: model.get_submodule(n) for n in select_modules(names, spec.trainable)})
    return out


def _freeze_base_(model: nn.Module) -> None:
    """Freeze everything but adapters and the specs' ``trainable`` modules."""
    adapter_params = {id(p) for _, _, c in site_adapters(model) for p in c.parameters()}
    shared = getattr(model, SHARED_ATTR, None)
    if shared is not None:
        adapter_params |= {id(p) for p in shared.parameters()}
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)
    for m in trainable_modules(model).values():
        for p in m.parameters():
            if id(p) not in adapter_params:
                p.requires_grad_(True)


@dataclass
class Summary:
    """What summary() reports; str() gives a table."""

    adapters: dict[str, dict]
    sites: dict[str, list[str]]
    adapter_params: int
    trainable_params: int
    total_params: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        lines = []
        for name, info in self.adapters.items():
            lines.append(f"adapter {name!r}: {info['method']} ({'active' if info['active'] else 'inactive'})")
            lines.append(f"  params {info['params']:,} (LoRA at the same r: {info['lora_params_same_r']:,})")
            for g, gi in info.get("groups", {}).items():
                lines.append(f"  group {g}: L={gi['L']} effective rank/site={gi['effective_rank']}")
            for s in self.sites[name]:
                lines.append(f"  - {s}")
        lines.append(
            f"adapter params: {self.adapter_params:,} | trainable: {self.trainable_params:,} / "
            f"{self.total_params:,} ({self.trainable_percent:.4f}%)"
        )
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Sites adapted (qualified names), parameter counts and trainable % per adapter."""
    st = _require(model)
    sites: dict[str, list[str]] = defaultdict(list)
    info: dict[str, dict] = {}
    for name, spec in st.specs.items():
        info[name] = {"method": repr(spec.method), "active": name in st.active, "params": 0,
                      "lora_params_same_r": 0}
    seen = set()
    for _, _, cont in site_adapters(model):
        for name, a in cont.items():
            sites[name].append(cont.site)
            i = info[name]
            i["params"] += sum(p.numel() for p in a.parameters())
            i["lora_params_same_r"] += a.cfg.r * (a.in_features + a.out_features)
            if a.shared is not None:
                g = i.setdefault("groups", {})
                g[a.group] = {"L": a.n_members, "effective_rank": a.cfg.effective_rank(a.n_members)}
                if id(a.shared) not in seen:
                    seen.add(id(a.shared))
                    i["params"] += sum(p.numel() for p in a.shared.parameters())
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = sum(i["params"] for i in info.values())
    return Summary(info, dict(sites), adapter, trainable, total)
