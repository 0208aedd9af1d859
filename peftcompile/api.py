"""Public API: adapt a model, switch/merge/unload adapters, summarise.

``adapt`` reads as the pipeline: capture -> match -> select -> validate -> build ->
rewrite. Everything that can fail runs before the model is touched, so a bad spec
leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from .copies import add_copies_, base_keys, drop_copies_, original, owners_for, set_original_, sync_
from . import rows
from .errors import AdapterError, AdapterTypeError, AdapterWarning
from .methods import Method, method_for, registered_methods
from .modules import BASE_ROW, ParamAdapterSet, SharedTensors, SiteAdapter, SiteAdapterSet
from .passes.capture import capture, embed_scale, is_site_module, site_kind
from .passes.match import EXPLICIT_KINDS, Site, match
from .passes.params import builtin_layer, match_parameters, param_layout, parameter_keys, stacked_parameters
from .passes.rewrite import restore_unit_, rewrite_unit_
from .spec import (ALL_LINEAR, AdapterSpec, Placement, default_targets, layer_index, matches, param_targeted,
                   pattern_matches, select_modules, select_sites)
from .state import (SHARED_ATTR, merged_sites, STATE_ATTR, ModelState, freeze_base_, owned_by, require_state, site_adapters, state_of,
                    trainable_key, trainable_modules)

__all__ = [
    "adapt",
    "set_active",
    "disabled",
    "summary",
    "merge",
    "unmerge",
    "merge_and_unload",
    "unload",
    "delete_adapter",
    "disable_adapter_layers",
    "enable_adapter_layers",
    "get_base_model_state_dict",
    "set_base_model_state_dict",
    "AdapterError",
    "adapters_of",
    "site_adapters",
    "trainable_modules",
    "SHARED_ATTR",
    "STATE_ATTR",
]


def adapters_of(model: nn.Module) -> dict[str, AdapterSpec]:
    """Adapter name -> spec for an adapted model ({} if none)."""
    st = state_of(model)
    return dict(st.specs) if st else {}


def _head_sites(model: nn.Module) -> set[str]:
    """The output head that "all-linear" leaves out (PEFT: the output embeddings)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {n for n, m in model.named_modules() if m is head}


def _error_no_sites(spec: AdapterSpec, available: Sequence[str], failures: dict[str, str]) -> AdapterError:
    msg = f"targets {spec.targets!r} matched no linear site"
    if spec.layers_to_transform is not None:
        msg += (f" in layers {list(spec.layers_to_transform)} (layers_pattern={spec.layers_pattern!r}; layer of each "
                f"site: { {n: layer_index(n, spec.layers_pattern) for n in sorted(set(available))[:6]} })")
    msg += f". Available sites: {sorted(set(available))}"
    if failures:
        plain = {k or "<root>": v for k, v in failures.items() if not v.startswith("HF modules")}
        if plain:
            msg += f". Modules that could not be traced whole (their direct F.linear calls are not visible): {plain}"
    return AdapterError(msg + ". Fix: pass target names from that list (suffixes, a regex or 'all-linear'; "
                              "nn.Embedding and nn.Conv1d/2d/3d sites are listed, and adapted, for explicit targets "
                              "only).")


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def _reserved_names() -> frozenset[str]:
    """Attribute names of the adapter containers: an adapter called ``keys`` or ``training``
    would shadow them (nn.ModuleDict refuses it only after other sites were changed)."""
    probe = SiteAdapterSet("s", "linear", "weight", 1, 1)
    return frozenset(dir(probe)) | frozenset(vars(probe)) | frozenset(dir(nn.ModuleDict()))


def check_adapter_name(name: object) -> str:
    """Raise AdapterError unless ``name`` can name an adapter (also names from config files)."""
    if not isinstance(name, str):
        raise AdapterTypeError(f"adapter name must be a str, got {name!r}")
    if not _NAME.fullmatch(name):
        raise AdapterError(f"adapter name {name!r} must be letters, digits, '_' or '-' (no '.', no spaces); "
                           f"e.g. 'default', 'task-a'")
    if name == BASE_ROW:
        raise AdapterError(f"adapter name {name!r} means 'no adapter' in adapter_names=[...] (mixed-adapter batches); "
                           f"pick another name, e.g. 'base_adapter'")
    if name in _reserved_names():
        raise AdapterError(f"adapter name {name!r} is an attribute of the adapter containers (nn.ModuleDict); "
                           f"pick another name, e.g. {name + '_adapter'!r}")
    return name


def _peft_wrapped(model: nn.Module) -> list[str]:
    return [n or "<root>" for n, m in model.named_modules() if type(m).__module__.split(".")[0] == "peft"]


def _tied_sites(model: nn.Module, sites: Sequence[tuple[str, str, str, str]]) -> dict[str, str]:
    """Site -> why its weight is shared, so that merging into it would change another module
    too. ``sites``: (name, host path, weight attribute, kind)."""
    names_of: dict[int, list[str]] = defaultdict(list)
    for n, p in model.named_parameters(remove_duplicate=False):
        names_of[id(p)].append(n)
    out = {}
    for name, host_path, weight_attr, kind in sites:
        host = model.get_submodule(host_path)
        own = f"{host_path}.{weight_attr}" if host_path else weight_attr
        others = [n for n in names_of.get(id(getattr(host, weight_attr)), []) if n != own]
        if others:
            out[name] = f"its weight is tied to {others[:3]}"
        elif kind == "functional" and site_kind(host) is None and type(host).__module__.startswith("torch.nn"):
            out[name] = f"its weight belongs to a {type(host).__name__}, which uses it too"
    return out


def _site_entries(sites: Sequence[Site]) -> list[tuple[str, str, str, str]]:
    return [(s.name, s.host_path, s.weight_attr, s.kind) for s in sites]


def _unreachable_sites(model: nn.Module, sites: Sequence[Site]) -> dict[str, str]:
    """Sites whose owner never calls them as modules (it reads their weight directly)."""
    out = {}
    for s in sites:
        parent, _, _ = s.host_path.rpartition(".")
        owner = model.get_submodule(parent) if s.host_path else None
        if isinstance(owner, nn.MultiheadAttention) and s.kind != "functional":
            out[s.name] = ("nn.MultiheadAttention reads its out_proj weight directly (F.multi_head_attention_forward)"
                           ", so an adapter there would never run")
    return out


def _check_stacked_targets(model: nn.Module, spec: AdapterSpec) -> None:
    """A target naming a stacked (3-D) expert parameter, or the module holding them, is refused with
    ``target_parameters`` as the fix (linear targets cannot reach them)."""
    stacked = [(k, k.rpartition(".")[0]) for k in stacked_parameters(model)]
    for pat in spec.targets or ():
        hit = [k for k, owner in stacked if param_targeted(k, (pat,)) or matches(owner, (pat,))]
        if hit:
            raise AdapterError(
                f"target {pat!r} names stacked expert parameters {hit[:4]} (or the "
                f"{type(model.get_submodule(hit[0].rpartition('.')[0])).__name__} holding them), which are not linear "
                f"layers: a module that reads a parameter itself is adapted through target_parameters. Fix: "
                f"AdapterSpec(..., target_parameters={sorted({k.rpartition('.')[2] for k in hit})}) and remove "
                f"{pat!r} from targets")


def _check_target_patterns(model: nn.Module, spec: AdapterSpec, sites: set[str], chosen: list[str]) -> None:
    """Each listed target must reach a site: a name that only reaches other modules (LayerNorm,
    MultiheadAttention, a Conv2d subclass) is an error, one that reaches nothing a warning."""
    if isinstance(spec.targets, str):
        return
    modules = [n for n, _ in model.named_modules() if n]
    for pat in spec.targets:
        if any(matches(n, (pat,)) for n in chosen):
            continue
        params = [k for k, _, _, p in parameter_keys(model) if p.dim() >= 2 and param_targeted(k, (pat,))
                  and not matches(k.rpartition(".")[0], (pat,))]
        if params and not any(matches(n, (pat,)) for n in modules):
            raise AdapterError(
                f"target {pat!r} names parameters {params[:4]}, not modules: a module that reads a parameter itself "
                f"(e.g. MoE experts stored as one tensor) is adapted through target_parameters. Fix: "
                f"AdapterSpec(..., target_parameters=[{pat!r}]) and remove {pat!r} from targets")
        others = [n for n in modules if matches(n, (pat,)) and n not in sites]
        if others:
            kinds = sorted({type(model.get_submodule(n)).__name__ for n in others})
            raise AdapterError(
                f"target {pat!r} names {kinds} module(s) {others[:4]}, which peftcompile cannot adapt (it adapts "
                f"nn.Linear, F.linear on a parameter, HF Conv1D, and nn.Embedding / nn.Conv1d / nn.Conv2d / "
                f"nn.Conv3d with LoRA; subclasses of those are not adapted). Fix: remove {pat!r} from targets, or "
                f"target the linear layers inside it (parameters it reads itself, such as stacked MoE experts: "
                f"target_parameters=[...])"
            )
        warnings.warn(f"target {pat!r} matched no site of {type(model).__name__}; check the spelling",
                      AdapterWarning, stacklevel=4)


def _overlaps(a: str, b: str) -> bool:
    """Module paths ``a`` and ``b`` are one module, or one contains the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _groups(method: Method, sites: list[Site]) -> dict[str, list[Site]]:
    g: dict[str, list[Site]] = defaultdict(list)
    for s in sites:
        g[method.group_key(s.name)].append(s)
    return g


@dataclass
class AdaptPlan:
    """Everything ``adapt`` will attach, built and checked without touching the model."""

    name: str
    spec: AdapterSpec
    sites: dict[str, Site]  # chosen site name -> its first occurrence
    all_sites: list[Site]  # every site of the model (a unit's graph is rewritten with all its sites)
    occurrences: dict[str, list[Site]]  # site name -> every call of it
    adapters: dict[str, SiteAdapter]
    shared: dict[str, SharedTensors]


def adapter_dtype(base: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype of new adapter tensors on a base weight of dtype ``base``: float32 on a
    float16/bfloat16 base with ``autocast_adapter_dtype`` (PEFT's default: low-precision
    adapters train poorly and round their small deltas), else the base's own dtype."""
    return torch.float32 if autocast_adapter_dtype and base in (torch.float16, torch.bfloat16) else base


def plan_adapt(model: nn.Module, spec: AdapterSpec, name: str = "default", *,
               placement: Placement | None = None, autocast_adapter_dtype: bool = True) -> AdaptPlan:
    """Capture, match, select, validate and build the new adapter modules (pure: the model
    is only read). Raises :class:`AdapterError` for anything ``adapt`` could not honour."""
    if not isinstance(spec, AdapterSpec):
        raise TypeError(f"spec must be a peftcompile.AdapterSpec, got {type(spec).__name__}")
    if not isinstance(autocast_adapter_dtype, bool):
        raise AdapterTypeError(f"autocast_adapter_dtype must be True or False, got {autocast_adapter_dtype!r}")
    if placement is not None:
        spec = spec.with_placement(placement)
    placement = spec.placement
    defaulted = spec.targets is None
    spec = _peft_resolved(model, spec)
    if spec.targets is None:  # PEFT's default for the architecture, recorded in the adapter's spec
        found = default_targets(model, spec.method)
        if spec.target_parameters and found == ALL_LINEAR:
            found = ()  # PEFT: with target_parameters and no default for the model, no module targets
        spec = dataclasses.replace(spec, targets=found)
    st = state_of(model)
    check_adapter_name(name)
    wrapped = _peft_wrapped(model)
    if wrapped:
        raise AdapterError(
            f"{type(model).__name__} is already wrapped by PEFT ({wrapped[:3]}); adapting it again would adapt PEFT's "
            f"own adapter layers too. Fix: peft_model.merge_and_unload() (or .get_base_model()) first, and load a PEFT "
            f"adapter into the plain base with peftcompile.load_peft_adapter"
        )
    if st and name in st.specs:
        raise AdapterError(
            f"an adapter named {name!r} already exists on {type(model).__name__}; "
            f"pick another name, or merge_and_unload first. Existing: {sorted(st.specs)}"
        )
    if st:
        merged = sorted({n for _, _, c in site_adapters(model) for n in c.merged})
        if merged:
            raise AdapterError(
                f"adapter(s) {merged} are merged into the base weights; adapt makes {name!r} the active adapter, "
                f"which would leave them merged but inactive. Fix: peftcompile.unmerge(model) first"
            )
    method = method_for(spec.method)

    # capture + match
    cap = capture(model)
    # nn.Embedding and nn.ConvNd sites only for explicit targets (PEFT's "all-linear" leaves them out)
    all_sites = match(cap, explicit=spec.targets != ALL_LINEAR)
    by_name: dict[str, list[Site]] = defaultdict(list)
    for s in all_sites:
        by_name[s.name].append(s)
    firsts = [v[0] for v in by_name.values()]
    unreachable = _unreachable_sites(model, firsts)
    tied = _tied_sites(model, _site_entries(firsts))
    candidates = [n for n in by_name if n not in unreachable]
    # "all-linear" leaves out the head and sites whose weight is shared (PEFT: tied heads)
    skip = _head_sites(model) | (set(tied) if spec.targets == ALL_LINEAR else set())
    tmods = select_modules((n for n, _ in model.named_modules()), spec.trainable) if spec.trainable is not None else []
    if spec.targets == ALL_LINEAR:  # PEFT: modules_to_save are never targets
        skip |= {s.name for s in firsts if any(_overlaps(s.host_path, t) for t in tmods)}
    chosen = select_sites(candidates, spec, skip)
    psites = _param_sites(model, method, spec, by_name, cap)
    if spec.targets != ALL_LINEAR:
        bad = [n for n in select_sites(list(unreachable), spec, set())]
        if bad:
            raise AdapterError(f"cannot adapt {bad}: {unreachable[bad[0]]}. Fix: exclude {bad}")
        if chosen or psites:
            _check_target_patterns(model, spec, set(by_name), chosen)
        else:  # nothing to adapt: a target naming stacked expert parameters (or their module) says why
            _check_stacked_targets(model, spec)
    if not chosen and not psites:
        raise _error_no_sites(spec, candidates, cap.failures)
    if spec.targets == ALL_LINEAR or defaulted:
        _warn_unadapted_parameters(model, spec, psites)
    for n in chosen:
        if n in tied:
            warnings.warn(f"{n}: {tied[n]}; the adapter runs correctly, but merge() will refuse this site "
                          f"(it would change the shared weight). Untie the weight to merge it.",
                          AdapterWarning, stacklevel=3)
    if placement is not None:
        missing = sorted(set(placement.sites) - set(by_name))
        if missing:
            raise AdapterError(f"placement names sites this model does not have: {missing}")

    # validate every chosen site
    first = {n: by_name[n][0] for n in chosen}
    check_explicit_sites(model, method, list(first.values()))
    _check_patterns_used(spec, [*chosen, *psites])
    cfg_of = {n: spec.config_for(n) for n in [*chosen, *psites]}
    problems = [f"{n}: {why}" for n in psites for why in [method.param_form.check(cfg_of[n])] if why]
    for n, s in first.items():
        why = site_check(model, method, cfg_of[n], s)
        if why:
            problems.append(f"{n}: {why}")
    groups: dict[str, list[Site]] = {}
    if method.shares:
        groups = _groups(method, list(first.values()))
        for key, members in groups.items():
            shapes = {_share_shape(model, m) for m in members}
            if len(shapes) > 1:
                problems.append(
                    f"group {key!r} has sites of different shapes "
                    f"{[(m.name, *_share_shape(model, m)) for m in members]}; its tensors are shared, so its members "
                    f"need one shape (and embedding / conv members one kind and weight shape): exclude the odd ones"
                )
            cfgs = {cfg_of[m.name] for m in members}
            if len(cfgs) > 1:
                problems.append(
                    f"group {key!r} shares tensors across {[m.name for m in members]}, but rank_pattern/alpha_pattern "
                    f"give them different configs {sorted(map(repr, cfgs))}; give every member of a group the same "
                    f"r and alpha"
                )
    if problems:
        raise AdapterError(f"cannot apply {spec.method!r}:\n  " + "\n  ".join(problems))
    if spec.trainable is not None:
        if not tmods:
            raise AdapterError(
                f"trainable={spec.trainable!r} matched no module of {type(model).__name__}; pass module names "
                f"(suffixes such as 'classifier', or a regex), e.g. from model.named_modules()"
            )
        adapted = set(first) | ({c.site for _, _, c in site_adapters(model)} if st else set())
        hosts = {s.host_path for s in firsts if s.name in adapted} | {s.host_path for s in psites.values()}
        path_of = {id(m): n for n, m in model.named_modules()}
        hosts |= {path_of[id(h)] for h, _, c in (site_adapters(model) if st else ()) if c.kind == "param"}
        clash = sorted({t for t in tmods for h in hosts if _overlaps(h, t)})
        if clash:
            raise AdapterError(
                f"trainable={spec.trainable!r} selects {clash[:4]}, which hold adapted sites: the module would be "
                f"trained fully and adapted at once (and saved twice). Fix: exclude those sites, or make only the "
                f"modules without sites trainable"
            )

    # build the new modules (detached from the model)
    shared: dict[str, SharedTensors] = {}
    group_of: dict[str, tuple[SharedTensors, int]] = {}
    for key, members in groups.items():
        if len(members) == 1:
            warnings.warn(
                f"{spec.method.name}: group {key!r} has a single site ({members[0].name}); sharing needs >= 2 "
                f"layers, so it gets an unshared adapter (its pool has just its own k ranks)",
                stacklevel=3,
            )
        w = members[0].weight(model)
        sh = SharedTensors(cfg_of[members[0].name], key, members[0].in_features, members[0].out_features,
                           [m.name for m in members], adapter_dtype(w.dtype, autocast_adapter_dtype), w.device)
        shared[key] = sh
        for m in members:
            group_of[m.name] = (sh, len(members))
    new: dict[str, SiteAdapter] = {}
    for n, s in first.items():
        w = s.weight(model)
        sh, nm = group_of.get(n, (None, 1))
        host = model.get_submodule(s.host_path)
        new[n] = SiteAdapter(cfg_of[n], n, name, s.in_features, s.out_features,
                             adapter_dtype(w.dtype, autocast_adapter_dtype), w.device, sh, nm,
                             embedding_options(host) if s.kind == "embedding" else None,
                             conv_options(host) if s.kind == "conv" else None)
    for n, s in psites.items():
        w = s.weight(model)
        new[n] = SiteAdapter(cfg_of[n], n, name, s.in_features, s.out_features,
                             adapter_dtype(w.dtype, autocast_adapter_dtype), w.device,
                             param=param_layout(model.get_submodule(s.host_path), w))
    no_bias = [n for n, s in first.items() if new[n].delta_bias() is not None
               and _site_bias(model.get_submodule(s.host_path), s) is None]
    if no_bias:  # PEFT warns here too: the adapter runs, but merge() will refuse those sites
        warnings.warn(f"{no_bias[:4]}: the adapter's delta has a bias term but the base layer has no bias, "
                      f"so these sites cannot be merged (merge() will refuse)", AdapterWarning, stacklevel=3)
    if placement is not None:
        _warm_start(new, shared, placement)
    return AdaptPlan(name, spec, {**first, **psites}, all_sites, {**by_name, **{n: [] for n in psites}}, new, shared)


def _peft_resolved(model: nn.Module, spec: AdapterSpec) -> AdapterSpec:
    """The spec with PEFT's own target rewrite applied (``PeftFormat.resolve_targets``: PEFT 0.21
    maps "all-linear" and v4 expert names on transformers-5 MoE models to target_parameters, with
    rank/alpha patterns for fused experts), so that our sites are PEFT's. Regex targets and
    placements are taken as written."""
    fmt = method_for(spec.method).peft
    if fmt is None or fmt.resolve_targets is None or spec.placement is not None:
        return spec
    if isinstance(spec.targets, str) and spec.targets != ALL_LINEAR:
        return spec
    got = fmt.resolve_targets(model, spec.method, spec.targets, spec.target_parameters)
    if got is None:
        return spec
    targets, params, rank_add, alpha_add = got
    if spec.targets is None and not params:
        return spec  # PEFT raises here (no target at all); ours takes the default below
    # PEFT adds its keys to the config's own patterns (after them; an equal key takes PEFT's value)
    rank = {**(spec.rank_pattern or {}), **rank_add}
    alpha = {**(spec.alpha_pattern or {}), **alpha_add}
    return dataclasses.replace(spec, targets=ALL_LINEAR if spec.targets == ALL_LINEAR else tuple(targets or ()),
                               target_parameters=params or None, rank_pattern=rank or None, alpha_pattern=alpha or None)


def _param_sites(model: nn.Module, method: Method, spec: AdapterSpec, by_name: Mapping[str, list[Site]],
                 cap) -> dict[str, Site]:
    """The parameter sites of ``spec.target_parameters``, every one checked (AdapterError naming the
    parameter and the fix); the model is only read."""
    if not spec.target_parameters:
        return {}
    found = match_parameters(model, spec.target_parameters)
    names = [s.name for s in found]
    if method.param_form is None:
        have = sorted(n for n, m in registered_methods().items() if m.param_form is not None)
        raise AdapterError(
            f"{method.name}: cannot adapt parameter targets {names[:4] or list(spec.target_parameters)}: the method "
            f"has no form on a weight the module reads itself (e.g. [experts, out, in] MoE experts; PEFT adapts them "
            f"with LoRA only). Methods that do: {have}. Fix: use LoRA for them, or remove target_parameters")
    if not found:
        stacked = stacked_parameters(model)
        raise AdapterError(
            f"target_parameters={list(spec.target_parameters)} matched no parameter of {type(model).__name__} "
            f"(PEFT's rule: '<module>.<param>' equals a name or ends with '.<name>'). "
            + (f"Stacked (3-D) parameters here: {stacked[:6]}" if stacked else "It has no 3-D (stacked expert) parameter"))
    for t in spec.target_parameters:
        if not any(param_targeted(n, (t,)) for n in names):
            warnings.warn(f"target_parameters entry {t!r} matched no parameter of {type(model).__name__}; check the "
                          f"spelling", AdapterWarning, stacklevel=4)
    weights = {(s.host_path, s.weight_attr): n for n, occ in by_name.items() for s in occ[:1] if s.kind != "param"}
    units = [u for u in cap.units if not u.is_site]
    problems = []
    for s in found:
        host = model.get_submodule(s.host_path)
        p = getattr(host, s.weight_attr)
        rel = None
        if p.dim() not in (2, 3):
            problems.append(f"{s.name} is {p.dim()}-D: parameter targets must be 2-D [out, in] or 3-D "
                            f"[experts, out, in] (as PEFT's)")
        elif not s.host_path:
            problems.append(f"{s.name} is registered on the top-level module, which cannot host its adapter (PEFT "
                            f"refuses it too); wrap the model or move the parameter into a submodule")
        elif is_site_module(host) or (s.host_path, s.weight_attr) in weights:
            site = weights.get((s.host_path, s.weight_attr), s.host_path)
            problems.append(f"{s.name} is the weight of the linear site {site!r} ({type(host).__name__}); adapt it "
                            f"as a module: targets=[{site!r}] instead of target_parameters")
        elif builtin_layer(host):
            problems.append(f"{s.name} belongs to the torch.nn layer {s.host_path!r} ({type(host).__name__}), whose "
                            f"forward is not a per-expert linear; parameter targets are for modules that read their "
                            f"own stacked or 2-D weights (MoE experts, routers)")
        elif not p.is_floating_point():
            problems.append(f"{s.name} is {p.dtype}; only floating-point parameters can take a delta")
        else:
            for u in units:
                if u.path and not s.host_path.startswith(u.path + "."):
                    continue
                rel = s.host_path[len(u.path) + 1:] if u.path else s.host_path
                if not any(n.op == "call_module" and n.target == rel for n in u.graph.nodes):
                    problems.append(f"{s.name}: its module {s.host_path!r} is traced into the graph of "
                                    f"{u.path or '<root>'!r}, which would bypass the adapter; target a parameter of "
                                    f"a module that is called as a module")
                    break
    if problems:
        raise AdapterError("cannot adapt target_parameters:\n  " + "\n  ".join(problems))
    return {s.name: s for s in found}


def _warn_unadapted_parameters(model: nn.Module, spec: AdapterSpec, psites: Mapping[str, Site]) -> None:
    """"all-linear" and default targets reach linear calls only: name the stacked (3-D) expert
    parameters, and the 2-D weights their routers read inside untraced forwards, that stay unadapted."""
    left = [k for k in stacked_parameters(model) if k not in psites]
    if not left:
        return
    owners = {k.rpartition(".")[0].rpartition(".")[0] for k in left}  # the MoE blocks (experts' parents)
    routers = [k for k, path, _, p in parameter_keys(model) if p.dim() == 2 and k not in psites
               and path.rpartition(".")[0] in owners and not is_site_module(model.get_submodule(path))
               and not any(True for _ in model.get_submodule(path).children())]
    fix = sorted({k.rpartition(".")[2] for k in left}) + sorted({".".join(r.split(".")[-2:]) for r in routers})
    what = "all-linear" if spec.targets == ALL_LINEAR else f"the default targets {list(spec.targets)}"
    warnings.warn(
        f"{what} left {len(left)} stacked expert parameter(s) unadapted, e.g. {left[:3]}"
        + (f", and router weight(s) read inside untraced forwards, e.g. {routers[:2]}" if routers else "")
        + f": they are not linear layers. Fix: AdapterSpec(..., target_parameters={fix}) (LoRA)",
        AdapterWarning, stacklevel=4)


def site_check(model: nn.Module, method: Method, cfg, s: Site) -> str | None:
    """The method's own ``check_site`` on a site's linear shape (an nn.Embedding's in = num_embeddings, an
    nn.ConvNd's in = C_in * prod(kernel_size), the conv as a linear on unfolded patches), or None."""
    why = method.check_site(cfg, s.in_features, s.out_features)
    if why and s.kind == "conv":
        conv = model.get_submodule(s.host_path)
        why += (f" (at a {type(conv).__name__}, in_features = in_channels * prod(kernel_size) = "
                f"{conv.in_channels} * {'*'.join(map(str, conv.kernel_size))})")
    elif why and s.kind == "embedding":
        why += " (at an nn.Embedding, in_features = num_embeddings, out_features = embedding_dim)"
    return why


def _share_shape(model: nn.Module, s: Site) -> tuple:
    """What must agree across a group sharing tensors: the linear shape and, at the explicit kinds, the
    layer kind and its weight's shape (a conv's kernel: the pool's rows are filters of that layout)."""
    if s.kind not in EXPLICIT_KINDS:
        return (s.in_features, s.out_features)
    return (s.in_features, s.out_features, s.kind, tuple(s.weight(model).shape))


def embedding_options(emb: nn.Embedding) -> dict:
    """The ``F.embedding`` options of an embedding site that its adapter's lookup uses too (as
    PEFT's), and ``scale``: the subclass's ``embed_scale`` that multiplies its output (None if none)."""
    return {"padding_idx": emb.padding_idx, "scale_grad_by_freq": emb.scale_grad_by_freq, "sparse": emb.sparse,
            "scale": embed_scale(emb)}


def conv_options(conv: nn.Module) -> dict:
    """What an ``nn.Conv1d/2d/3d`` site's adapter convolves with: PEFT's lora_A takes the base's
    kernel_size, stride and padding (the rest is checked to be the default by check_explicit_sites)."""
    return {"kernel_size": tuple(conv.kernel_size), "stride": tuple(conv.stride),
            "padding": conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)}


def check_explicit_sites(model: nn.Module, method: Method, sites: Sequence[Site]) -> None:
    """The checks of the sites only explicit targets reach (nn.Embedding, nn.Conv1d/2d/3d), before
    any change: AdapterError naming the sites and the fix."""
    _check_embedding_sites(model, method, [s for s in sites if s.kind == "embedding"])
    _check_conv_sites(model, method, [s for s in sites if s.kind == "conv"])


def _require_form(method: Method, hook: str, kind: str, names: Sequence[str]) -> None:
    """A site kind beyond linear needs the method's form for it (registry hook ``hook``)."""
    if getattr(method, hook) is None:
        have = sorted(n for n, m in registered_methods().items() if getattr(m, hook) is not None)
        raise AdapterError(f"{method.name}: cannot adapt {kind} site(s) {list(names)[:4]} (the method has no {kind} "
                           f"form; methods that have one: {have}). Fix: remove them from targets, or adapt them with "
                           f"one of {have} in a second adapter")


def _check_conv_sites(model: nn.Module, method: Method, sites: Sequence[Site]) -> None:
    """Conv targets need a method with a ``conv`` hook, and a conv whose delta PEFT's form (a first
    conv with the base's kernel_size, stride and padding only, then a 1x1 conv) gives exactly: PEFT's
    first conv has no dilation and pads with zeros (a dilated or reflect-padded base would get an
    adapter whose merge differs from its forward, or a shape error), and grouped convs cannot merge."""
    if not sites:
        return
    _require_form(method, "conv", "nn.Conv1d/2d/3d", [s.name for s in sites])
    for s in sites:
        conv = model.get_submodule(s.host_path)
        bad = []
        if conv.groups != 1:
            bad.append(f"groups={conv.groups} (PEFT cannot merge a grouped conv's adapter)")
        if any(d != 1 for d in conv.dilation):
            bad.append(f"dilation={tuple(conv.dilation)} (PEFT's conv adapter ignores dilation: its delta is not "
                       f"a delta of this conv's weight)")
        if conv.padding_mode != "zeros":
            bad.append(f"padding_mode={conv.padding_mode!r} (PEFT's conv adapter pads with zeros, so its merge "
                       f"would differ from its forward)")
        if bad:
            raise AdapterError(f"cannot adapt {type(conv).__name__} site {s.name!r}: {'; '.join(bad)}. Fix: remove "
                               f"{s.name!r} from targets (exclude=[{s.name!r}])")


def _check_embedding_sites(model: nn.Module, method: Method, sites: Sequence[Site]) -> None:
    """Embedding targets need a method with an ``embed`` hook, and no ``max_norm`` (F.embedding would
    renormalise the adapter's factor in place)."""
    if not sites:
        return
    _require_form(method, "embed", "nn.Embedding", [s.name for s in sites])
    renorm = [s.name for s in sites if model.get_submodule(s.host_path).max_norm is not None]
    if renorm:
        raise AdapterError(f"cannot adapt nn.Embedding site(s) {renorm[:4]} with max_norm set: F.embedding would "
                           f"renormalise the adapter's tensors in place. Fix: remove them from targets")
    sparse = [s.name for s in sites if model.get_submodule(s.host_path).sparse]
    if sparse:  # the adapter's lookup would give its factor a sparse gradient the low-rank math cannot take
        raise AdapterError(f"cannot adapt nn.Embedding site(s) {sparse[:4]} with sparse=True: the adapter's backward "
                           f"through a sparse lookup fails in torch (PEFT's LoRA fails the same way). Fix: set "
                           f"sparse=False on the embedding, or remove it from targets")


def _check_patterns_used(spec: AdapterSpec, chosen: Sequence[str]) -> None:
    """PEFT warns about rank/alpha patterns that match no targeted site: a typo there would
    silently train every site at the default rank."""
    for what in ("rank_pattern", "alpha_pattern"):
        unused = [p for p in getattr(spec, what) or {} if not any(pattern_matches(p, n) for n in chosen)]
        if unused:
            warnings.warn(f"{what} keys {unused} match no adapted site; sites there keep the method's default. "
                          f"Adapted sites look like {list(chosen)[:3]}", AdapterWarning, stacklevel=4)


def apply_plan_(model: nn.Module, plan: AdaptPlan) -> nn.Module:
    """Attach a plan's modules, rewrite the units that gain a site, freeze, activate (the
    only step of ``adapt`` that changes the model)."""
    st = state_of(model)
    if st is None:
        st = ModelState(requires_grad={k: p.requires_grad for k, p in model.named_parameters()})
        model.__dict__[STATE_ATTR] = st
        rows.install_(model)  # adapter_names=[...] (PEFT's mixed-adapter batches)
    name = plan.name
    fresh_units: set[str] = set()  # units whose graphs gain a site: only those are rewritten
    for n, s in plan.sites.items():
        host = model.get_submodule(s.host_path)
        cont = getattr(host, s.host_attr, None)
        if not isinstance(cont, SiteAdapterSet):
            if s.kind == "param":  # the host's own forward reads W + dW (hooks), no graph to rewrite
                cont = ParamAdapterSet(n, s.weight_attr, s.in_features, s.out_features)
                cont.attach_(host)
            else:
                cont = SiteAdapterSet(n, s.kind, s.weight_attr, s.in_features, s.out_features)
            cont.__dict__["_routing"] = st.routing
            host.add_module(s.host_attr, cont)
            fresh_units |= {x.unit.path for x in plan.occurrences[n]}
        cont[name] = plan.adapters[n]
    if plan.shared:
        root = getattr(model, SHARED_ATTR, None)
        if root is None:
            root = nn.ModuleDict()
            model.add_module(SHARED_ATTR, root)
        root[name] = nn.ModuleDict({_key(k): v for k, v in plan.shared.items()})
    for unit_path in fresh_units:
        _rewrite(model, unit_path, plan.all_sites)
        st.units.add(unit_path)
    st.specs[name] = plan.spec
    add_copies_(model, name)
    freeze_base_(model)
    set_active(model, name)
    return model


def adapt(model: nn.Module, spec: AdapterSpec, name: str = "default", *,
          placement: Placement | None = None, autocast_adapter_dtype: bool = True) -> nn.Module:
    """Rewrite the chosen linear sites of ``model`` into ``base(x) + delta(x)``.

    Returns the same object (an HF model stays an HF model). Base parameters are
    frozen, the new adapter is trainable and becomes the active one. Calling again
    with another ``name`` adds a second adapter. ``placement`` (or
    ``spec.with_placement``) restricts to decided sites and warm-starts from its weights.
    ``autocast_adapter_dtype`` (PEFT's default, True): adapters on a float16/bfloat16 base
    are kept in float32 (the delta is computed in float32 and added in the base dtype).
    Plan (:func:`plan_adapt`: everything that can fail) runs before apply, so a bad spec
    leaves the model exactly as it was.
    """
    return apply_plan_(model, plan_adapt(model, spec, name, placement=placement,
                                         autocast_adapter_dtype=autocast_adapter_dtype))


def _key(group: str) -> str:
    return group.replace(".", "__")


def _container(model: nn.Module, s: Site) -> SiteAdapterSet | None:
    c = getattr(model.get_submodule(s.host_path), s.host_attr, None)
    return c if isinstance(c, SiteAdapterSet) else None


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


def set_active(model: nn.Module, names: str | Sequence[str], *, inference_mode: bool | None = None) -> None:
    """Make ``names`` the running (and trainable) adapters; others stay stored, frozen.

    The ``trainable`` modules of the active adapters' specs train with them; those of
    inactive adapters are frozen. ``inference_mode=True`` keeps ``names`` frozen while they
    run (PEFT's ``set_adapter(..., inference_mode=True)``; also what ``load_adapters`` does
    unless ``is_trainable=True``); ``False`` makes them trainable again; None keeps each
    adapter's mode."""
    from .distributed import unwrap

    model = unwrap(model)
    st = require_state(model)
    if isinstance(names, str):
        names = (names,)
    try:
        names = tuple(names)
    except TypeError:
        raise AdapterTypeError(f"names must be an adapter name or a list of names, got {names!r}") from None
    unknown = [n for n in names if n not in st.specs]
    if unknown or not names:
        raise AdapterError(f"unknown adapter(s) {unknown or names!r}; this model has {sorted(st.specs)}")
    conts = [c for _, _, c in site_adapters(model)]
    if inference_mode is not None and not isinstance(inference_mode, bool):
        raise AdapterTypeError(f"inference_mode must be True, False or None, got {inference_mode!r}")
    for cont in conts:
        if any(n in cont.merged for n in cont.active if n not in names):
            raise AdapterError(f"{cont.site}: adapter(s) {list(cont.merged)} are merged; unmerge(model) before "
                               f"switching away from a merged adapter")
    owners_for(model, names, disabled=False)  # two active adapters training one module: refused here
    if inference_mode is not None:
        st.frozen = (st.frozen | set(names)) if inference_mode else (st.frozen - set(names))
    training = {n for n in names if n not in st.frozen}
    for cont in conts:
        cont.active = tuple(n for n in names if n in cont)
        for n, a in cont.items():
            a.requires_grad_(n in training)
    for n, shared in (getattr(model, SHARED_ATTR, None) or {}).items():
        shared.requires_grad_(n in training)
    st.active = names
    adapter_ids = {id(p) for c in conts for p in c.parameters()}
    owned = {n: owned_by(model, n) for n in st.specs}  # trainable modules' and bias= parameters
    keep = {id(p) for n in training for p in owned[n].values()}
    for n, params in owned.items():
        for p in params.values():
            if id(p) not in adapter_ids:
                p.requires_grad_(id(p) in keep)
    sync_(model)  # trainable modules hold the new active adapter's own values


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block; on exit every site is as it was.

    Merged adapters are unmerged for the block and merged back on exit (exactly those
    adapters, at exactly those sites). Blocks nest. The switch lives on the model, not on
    the thread: another thread's forwards of the same model inside the block also run
    without adapters (use a deep copy per thread to serve both at once).
    """
    require_state(model)
    conts = [c for _, _, c in site_adapters(model)]
    previous = [(c, c.disabled, c.merged) for c in conts]
    if any(c.merged for c in conts):
        _check_mergeable(model)
        unmerge(model)
    for c in conts:
        c.disabled = True
    sync_(model)  # trainable modules hold their original values
    try:
        yield model
    finally:
        for c, was_disabled, was_merged in previous:
            c.disabled = was_disabled
        sync_(model)
        if any(m for _, _, m in previous):
            _merge_sites(model, {id(c): m for c, _, m in previous})


def _delta_for(cont: SiteAdapterSet, name: str, shape: torch.Size) -> torch.Tensor:
    """Adapter ``name``'s delta in the layout of the site's weight (of ``shape``): transposed for
    HF Conv1D and nn.Embedding, [out, C_in, *kernel] for a conv (its delta_weight is flattened)."""
    d = cont[name].delta_weight().to(torch.float32)
    return (d.t() if cont.transposed else d).reshape(shape)


def _check_mergeable(model: nn.Module) -> None:
    """Refuse (before any change) to merge into weights that other modules share."""
    st = require_state(model)
    path_of = {id(m): n for n, m in model.named_modules()}
    entries = [(c.site, path_of[id(host)], c.weight_attr, c.kind) for host, _, c in site_adapters(model)
               if any(n in st.active or n in c.merged for n in c)]
    tied = _tied_sites(model, entries)
    if tied:
        name, why = next(iter(tied.items()))
        raise AdapterError(
            f"cannot merge into {sorted(tied)[:4]}: {name}: {why}; merging would change that module as well. Fix: "
            f"untie the weight (e.g. model.config.tie_word_embeddings=False and clone the head's weight before adapt), "
            f"or keep the adapter unmerged"
        )


@torch.no_grad()
def _to_merge(cont: SiteAdapterSet, wanted: dict[int, tuple[str, ...]] | None) -> tuple[str, ...]:
    names = cont.active if wanted is None else wanted.get(id(cont), ())
    return tuple(n for n in names if n in cont and n not in cont.merged)


def _merged_weight(w: torch.Tensor, cont: SiteAdapterSet, names: Sequence[str]) -> torch.Tensor:
    """W with ``names`` folded in, rounded to W's dtype after each adapter (as unmerge undoes it)."""
    for n in names:
        w = (w.to(torch.float32) + _delta_for(cont, n, w.shape)).to(w.dtype)
    return w


@torch.no_grad()
def _merge_sites(model: nn.Module, wanted: dict[int, tuple[str, ...]] | None = None, *, safe: bool = False) -> None:
    """Fold adapters into W: ``wanted[id(site set)]`` names per site (default: the active ones).
    ``safe``: first check every merged weight is finite, writing none if one is not (the
    weights are computed twice rather than held: holding them would double the model's memory)."""
    todo = [(host, c, _to_merge(c, wanted)) for host, _, c in site_adapters(model)]
    todo = [(host, c, names) for host, c, names in todo if names]
    for host, cont, names in todo:
        with_bias = [n for n in names if cont[n].delta_bias() is not None]
        if with_bias and not isinstance(_site_bias(host, cont), torch.Tensor):
            raise AdapterError(f"{cont.site}: adapter(s) {with_bias} have a bias term but the base "
                               f"layer has no bias to merge it into (PEFT refuses this too); nothing was merged. "
                               f"Keep the adapter unmerged")
    if safe:
        for host, cont, names in todo:
            w, b = getattr(host, cont.weight_attr), _site_bias(host, cont)
            if not bool(torch.isfinite(_merged_weight(w, cont, names)).all()) or (
                    b is not None and not bool(torch.isfinite(_merged_bias(b, cont, names, +1)).all())):
                raise AdapterError(f"{cont.site}: merging adapter(s) {list(names)} gives NaN/inf weights; "
                                   f"nothing was merged. Check the adapter's tensors (training diverged?)")
    for host, cont, names in todo:
        w, b = getattr(host, cont.weight_attr), _site_bias(host, cont)
        w.copy_(_merged_weight(w, cont, names))
        if b is not None:
            b.copy_(_merged_bias(b, cont, names, +1))
        cont.merged = cont.merged + names


def _site_bias(host: nn.Module, cont: SiteAdapterSet) -> torch.Tensor | None:
    """The base bias an adapter's constant term merges into (the host's ``bias`` next to W)."""
    b = getattr(host, "bias", None) if cont.weight_attr == "weight" else None
    return b if isinstance(b, torch.Tensor) else None


def _merged_bias(b: torch.Tensor, cont: SiteAdapterSet, names: Sequence[str], sign: int) -> torch.Tensor:
    for n in names:
        d = cont[n].delta_bias()
        if d is not None:
            b = (b.to(torch.float32) + sign * d.to(torch.float32)).to(b.dtype)
    return b


def without_merged_biases(model: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` (an adapter's checkpoint tensors) with the merged lora_bias terms (s * b_B) taken
    out of the base biases the adapter trains and holds now (bias="lora_only" / "all"): merge wrote
    them into those biases."""
    path_of = {id(m): n for n, m in model.named_modules()}
    out = dict(params)
    for host, _, cont in site_adapters(model):
        b = _site_bias(host, cont)
        key = trainable_key(path_of[id(host)], "bias")
        if cont.merged and b is not None and out.get(key) is b:
            with torch.no_grad():
                out[key] = _merged_bias(b, cont, tuple(reversed(cont.merged)), -1)
    return out


def merge(model: nn.Module, *, safe_merge: bool = False) -> None:
    """Fold the active adapters into the base weights (their deltas then stop running).

    Already merged adapters are left as they are (with a warning if nothing is left to
    merge). Refused for sites whose weight is shared with another module (tied heads,
    ``F.linear`` on an embedding's weight). ``safe_merge``: compute every merged weight
    first and refuse, before writing any, if one is not finite (PEFT's option)."""
    _check_mergeable(model)
    if not any(_to_merge(c, None) for _, _, c in site_adapters(model)):
        warnings.warn("all active adapters are already merged; nothing to do", AdapterWarning, stacklevel=2)
        return
    _merge_sites(model, safe=safe_merge)


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Take merged adapters back out of the base weights (fp32: exact to ~1e-6; bf16/fp16:
    within one ulp of the larger of |W| and |W + dW|, since W is rounded to its dtype after each step)."""
    require_state(model)
    if not any(c.merged for _, _, c in site_adapters(model)):
        warnings.warn("no adapter is merged; nothing to unmerge", AdapterWarning, stacklevel=2)
        return
    for host, _, cont in site_adapters(model):
        w, b = getattr(host, cont.weight_attr), _site_bias(host, cont)
        for n in reversed(cont.merged):
            w.copy_((w.to(torch.float32) - _delta_for(cont, n, w.shape)).to(w.dtype))
            if b is not None:
                b.copy_(_merged_bias(b, cont, [n], -1))
        cont.merged = ()


def merge_and_unload(model: nn.Module, *, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapters and remove every trace of peftcompile.

    The returned (same) model has exactly the original ``state_dict`` keys, its class
    forwards and its original ``requires_grad`` flags, so ``save_pretrained`` writes a
    plain checkpoint. A DDP / torch.compile wrapper is unwrapped (the inner model is
    returned); an FSDP-sharded model is refused with the fix (save, then merge unsharded).
    ``safe_merge`` (PEFT's option): refuse, before writing any weight or removing anything,
    if a merged weight would be NaN/inf (as :func:`merge`).
    """
    from .distributed import require_unsharded, unwrap

    require_unsharded(model, "merge_and_unload")
    model = unwrap(model)
    st = require_state(model)
    _check_mergeable(model)
    _merge_sites(model, safe=safe_merge)
    _remove_all(model, st)
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and every tensor it owns (shared group tensors included).

    Refused while it is merged. If it was active, the remaining active adapters stay
    active; if none remain, the first remaining adapter becomes active (PEFT's behaviour).
    Deleting the last adapter is :func:`unload`."""
    st = require_state(model)
    if name not in st.specs:
        raise AdapterError(f"no adapter named {name!r}; this model has {sorted(st.specs)}")
    merged = merged_sites(model, name)
    if merged:
        raise AdapterError(f"adapter {name!r} is merged at {merged[:3]}; peftcompile.unmerge(model) before deleting it")
    if len(st.specs) == 1:
        unload(model)
        return
    remaining_active = tuple(n for n in st.active if n != name) or (next(n for n in st.specs if n != name),)
    for _, _, cont in site_adapters(model):
        if name in cont:
            del cont[name]
            cont.active = tuple(n for n in cont.active if n != name)
    root = getattr(model, SHARED_ATTR, None)
    if root is not None and name in root:
        del root[name]
    spec = st.specs.pop(name)
    drop_copies_(model, name)
    set_active(model, remaining_active)
    if spec.trainable is not None or spec.bias is not None:  # they train only with an active adapter that owns them
        freeze_base_(model)
        set_active(model, remaining_active)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the original model, its forwards, state_dict keys
    and ``requires_grad`` flags, as before the first ``adapt``. Refused while merged (use
    :func:`merge_and_unload`, or :func:`unmerge` first)."""
    st = require_state(model)
    merged = merged_sites(model)
    if merged:
        raise AdapterError(f"adapters are merged at {merged[:3]}; unload() would leave their deltas in the weights. "
                           f"Fix: peftcompile.unmerge(model) first, or merge_and_unload(model) to keep them")
    _remove_all(model, st)
    return model


def _remove_all(model: nn.Module, st: ModelState) -> None:
    rows.remove_(model)
    for host, attr, cont in list(site_adapters(model)):
        if isinstance(cont, ParamAdapterSet):
            cont.detach_(host)
        delattr(host, attr)
    if hasattr(model, SHARED_ATTR):
        delattr(model, SHARED_ATTR)
    drop_copies_(model)  # trainable modules keep the values they hold (PEFT keeps the active copy)
    for path in st.units:
        restore_unit_(model.get_submodule(path))
    for k, p in model.named_parameters():
        if k in st.requires_grad:
            p.requires_grad_(st.requires_grad[k])
    del model.__dict__[STATE_ATTR]


def disable_adapter_layers(model: nn.Module) -> None:
    """Run the base model until :func:`enable_adapter_layers` (persistent :func:`disabled`).
    Refused while merged (the deltas are inside the weights)."""
    require_state(model)
    merged = merged_sites(model)
    if merged:
        raise AdapterError(f"adapters are merged at {merged[:3]}; unmerge(model) before disabling them")
    for _, _, c in site_adapters(model):
        c.disabled = True
    sync_(model)


def enable_adapter_layers(model: nn.Module) -> None:
    """Undo :func:`disable_adapter_layers`."""
    require_state(model)
    for _, _, c in site_adapters(model):
        c.disabled = False
    sync_(model)


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state_dict (original keys, no adapter tensors), with merged adapters
    taken out of the weights (computed, the model is not changed)."""
    require_state(model)
    adapter_ids = {id(t) for _, _, c in site_adapters(model) for t in c.state_dict(keep_vars=True).values()}
    root = getattr(model, SHARED_ATTR, None)
    if root is not None:
        adapter_ids |= {id(t) for t in root.state_dict(keep_vars=True).values()}
    out = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items() if id(v) not in adapter_ids}
    copied = base_keys(model)
    for sd_key, key in copied.items():
        out[sd_key] = original(model, key).detach()  # not an adapter's trained values
    path_of = {id(m): n for n, m in model.named_modules()}
    for host, _, cont in site_adapters(model):
        if cont.merged:
            key = f"{path_of[id(host)]}.{cont.weight_attr}".lstrip(".")
            w = out[key].to(torch.float32)
            for n in reversed(cont.merged):
                w = w - _delta_for(cont, n, w.shape)
            out[key] = w.to(out[key].dtype)
            bkey = f"{path_of[id(host)]}.bias".lstrip(".")
            if _site_bias(host, cont) is not None and bkey not in copied:  # lora_bias merged into the base bias
                out[bkey] = _merged_bias(out[bkey], cont, tuple(reversed(cont.merged)), -1)
    return out


def set_base_model_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load base weights (original keys) into an adapted model; adapters are kept. Every key
    and shape is checked first; refused while merged."""
    require_state(model)
    if any(c.merged for _, _, c in site_adapters(model)):
        raise AdapterError("adapters are merged into the base weights; unmerge(model) before replacing them")
    own = get_base_model_state_dict(model)
    missing = sorted(set(own) - set(state_dict))
    extra = sorted(set(state_dict) - set(own))
    wrong = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        raise AdapterError(f"state_dict does not fit the base model: missing {missing[:4]}, unexpected {extra[:4]}, "
                           f"shape mismatch {wrong[:4]}")
    live = model.state_dict(keep_vars=True)
    copied = base_keys(model)
    with torch.no_grad():
        for k, v in state_dict.items():
            if k in copied:
                set_original_(model, copied[k], v, live[k])
            else:
                live[k].copy_(v)


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
            lines.append(f"  params {info['params']:,} (a plain rank-r A/B pair at these sites: {info['baseline_params']:,})")
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
    st = require_state(model)
    sites: dict[str, list[str]] = defaultdict(list)
    info: dict[str, dict] = {}
    for name, spec in st.specs.items():
        info[name] = {"method": repr(spec.method), "active": name in st.active, "params": 0,
                      "baseline_params": 0}
    seen = set()
    for _, _, cont in site_adapters(model):
        for name, a in cont.items():
            sites[name].append(cont.site)
            i = info[name]
            i["params"] += sum(p.numel() for p in a.parameters())
            i["baseline_params"] += a.cfg.r * (a.in_features + a.out_features)
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
