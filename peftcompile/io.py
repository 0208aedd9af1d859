"""Adapter checkpoints: our safetensors + JSON format, and PEFT checkpoints of the methods
that declare a PEFT format (:class:`~peftcompile.methods.PeftFormat`).

Directory layout (as PEFT's): ``adapter_model.safetensors`` with keys
``<site>.<param>`` (and ``shared.<group>.<param>`` for tensors a group shares, stored
once) and ``adapter_config.json`` with the spec, the sites and their shapes.
Everything is checked before the model is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from .api import (apply_plan_, check_adapter_name, check_explicit_sites, plan_adapt, set_active, site_check,
                  without_merged_biases)
from .distributed import copy_into_, require_unsharded, unwrap, unwrapped, write_checkpoint
from .errors import AdapterError, AdapterTypeError, AdapterWarning
from .methods import method_for, registered_methods
from .methods.registry import ANY
from .passes.capture import capture, is_conv_site
from .passes.match import match
from .passes.params import match_parameters, parameter_keys
from .spec import AdapterSpec, exact_targets, param_targeted, select_modules
from .copies import checkpoint_params
from .state import (merged_sites, split_trainable_key, trainable_key, require_state, shared_key, shared_of, site_adapters, site_key, state_of,
                    owned_params, trainable_params)

__all__ = ["save_adapters", "load_adapters", "load_peft_adapter", "read_weights", "tensor_mismatch", "WEIGHTS_NAME",
           "CONFIG_NAME", "CHECKPOINT_KEYS"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "peftcompile/1"
#: The keys of the config save_adapters writes (readers refuse others).
CHECKPOINT_KEYS = frozenset({"format", "adapter", "spec", "sites", "groups", "weights_sha256"})


def _layout(model: nn.Module, name: str) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    """({site: [in, out]}, {group: members}) of adapter ``name``, as the config records them."""
    sites = {c.site: [c[name].in_features, c[name].out_features] for _, _, c in site_adapters(model) if name in c}
    groups = {g: list(sh.members) for g, sh in shared_of(model, name).items()}
    return sites, groups


def save_adapters(model: nn.Module, path: str | Path, name: str | None = None, *,
                  format: str = "peftcompile") -> Path:
    """Write one adapter (default: the only active one) to the directory ``path``.

    Wrapped (DDP, FSDP1, torch.compile) and FSDP2-sharded models work; with a process group
    every rank must call it: shards are gathered and rank 0 writes (``peftcompile.distributed``).

    ``format="peft"`` writes PEFT's own layout (``base_model.model.<site>.<PEFT key>`` and a
    PEFT ``adapter_config.json``) for methods that declare a PEFT format (LoRA, GraLoRA), so
    ``PeftModel.from_pretrained`` and serving stacks that read PEFT LoRA load it; the sites
    are written as an exact-match regex in ``target_modules``.

    Atomic as a unit: the config records the sha256 of the weights file, both are written
    to temporary siblings and moved into place weights first, and the previous weights stay
    next to them (``adapter_model.safetensors.prev``) until the new config is in place, so
    an interrupted save leaves the previous checkpoint loadable (:func:`load_adapters`
    falls back to it) and never a silent mix of new weights and an old config.
    """
    with unwrapped(model, writeback=False) as inner:
        return _save_adapters(inner, path, name, format)


def _save_adapters(model: nn.Module, path: str | Path, name: str | None, format: str) -> Path:
    st = require_state(model)
    if name is None:
        if len(st.active) != 1:
            raise AdapterError(
                f"save_adapters needs name=... when {len(st.active)} adapters are active ({list(st.active)}); "
                f"this model has {sorted(st.specs)}"
            )
        name = st.active[0]
    if name not in st.specs:
        raise AdapterError(f"no adapter named {name!r}; this model has {sorted(st.specs)}")
    tensors = {k: v.detach() for k, v in without_merged_biases(model, checkpoint_params(model, name)).items()}
    meta = sorted(k for k, v in tensors.items() if v.is_meta)
    if meta:
        raise AdapterError(f"adapter {name!r} has tensors on the meta device ({meta[:3]}); materialise the model "
                           f"(to_empty + load weights) before saving")
    sites, groups = _layout(model, name)
    if format not in ("peftcompile", "peft"):
        raise AdapterError(f"format must be 'peftcompile' or 'peft', got {format!r}")
    if format == "peft":
        tensors, cfg = _peft_checkpoint(model, st.specs[name], name, tensors, sites)
    else:
        cfg = {"format": FORMAT, "adapter": name, "spec": st.specs[name].to_dict(), "sites": sites, "groups": groups}
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterError(f"cannot save adapters to {path}: it is a file, not a directory; pass a folder path")
    # gathers shards, checks the ranks agree, rank 0 writes (one process: just writes)
    return write_checkpoint(path, tensors, cfg, lambda p, t, c: _write_checkpoint(p, t, c, peft_layout=format == "peft"))


def _peft_checkpoint(model: nn.Module, spec: AdapterSpec, name: str, tensors: dict[str, torch.Tensor],
                     sites: Mapping[str, list[int]]) -> tuple[dict[str, torch.Tensor], dict]:
    """Our tensors and spec in PEFT's layout (validated first: AdapterError if not expressible)."""
    method = method_for(spec.method)
    fmt = method.peft
    if fmt is None or fmt.write_config is None:
        have = sorted(n for n, m in registered_methods().items() if m.peft is not None and m.peft.write_config)
        raise AdapterError(f"adapter {name!r} ({spec.method.name}) has no PEFT format; format='peft' supports {have}. "
                           f"Use the default format")
    patterns = {k: dict(getattr(spec, k)) for k in ("rank_pattern", "alpha_pattern") if getattr(spec, k)}
    inexpressible = sorted(k for k in patterns if k not in fmt.options)
    if inexpressible:
        raise AdapterError(f"adapter {name!r} ({spec.method.name}) uses {inexpressible}, which PEFT's "
                           f"{fmt.peft_type} config does not have; save with the default format")
    if (spec.bias or "none") not in fmt.options.get("bias", ("none",)):
        raise AdapterError(f"adapter {name!r} ({spec.method.name}) trains biases (bias={spec.bias!r}), which PEFT's "
                           f"{fmt.peft_type} format does not store; save with the default format")
    ours_to_peft = {ours: suffix for suffix, ours in fmt.keys.items()}
    embedding_to_peft = {ours: suffix for suffix, ours in fmt.embedding_keys.items()}
    embedding_sites = {c.site for _, _, c in site_adapters(model) if c.kind == "embedding"}
    # PEFT stores a conv site's factors as conv weights (LoRA: A [r, C_in, *k], B [out, r, 1, ...])
    kernels = {c.site: tuple(host.kernel_size) for host, _, c in site_adapters(model) if c.kind == "conv"}
    # PEFT's layer for this method must exist at each site kind (PEFT's GraLoRA has no Embedding / Conv layer:
    # its from_pretrained would raise, or our keys would be read as a linear layer's)
    no_layer = [(kind, [c.site for _, _, c in site_adapters(model) if c.kind == kind and c.site in sites])
                for kind, has in (("embedding", bool(fmt.embedding_keys)), ("conv", fmt.conv_shape is not None))
                if not has]
    no_layer = [(kind, found) for kind, found in no_layer if found]
    if no_layer:
        kind, found = no_layer[0]
        layer = {"embedding": "nn.Embedding", "conv": "nn.Conv1d/2d/3d"}[kind]
        raise AdapterError(f"adapter {name!r} ({spec.method.name}) adapts {layer} site(s) {found[:4]}, but PEFT's "
                           f"{fmt.peft_type} has no {layer} layer, so PeftModel could not load it. Fix: save with the "
                           f"default format (pc.load_adapters reads it), or leave those sites out of the adapter")
    param_sites = [c.site for _, _, c in site_adapters(model) if c.kind == "param" and c.site in sites]
    module_of = _peft_param_modules(model, param_sites)
    out = {}
    for site in sites:
        for param, suffix in (embedding_to_peft if site in embedding_sites else ours_to_peft).items():
            key = site_key(site, param)
            if key in tensors:
                t = tensors.pop(key)
                if site in kernels and fmt.conv_shape is not None:
                    t = t.reshape(fmt.conv_shape(param, tuple(t.shape), kernels[site]))
                out[f"base_model.model.{module_of.get(site, site)}.{suffix}"] = t
    # trainable modules: PEFT's modules_to_save, stored under the module's own name; biases of
    # the bias= option under their parameter's name (PEFT's base_layer.bias where PEFT wraps a site)
    modules = set()
    in_modules = trainable_params(model, spec.trainable)
    # PEFT's wrappers per module: one at a module site, one ParamWrapper per targeted parameter
    wraps = Counter({s: 1 for s in sites if s not in module_of})
    wraps.update(s.rpartition(".")[0] for s in module_of)
    for key in list(tensors):
        module, param = split_trainable_key(key)
        if module is None:
            continue
        if key in in_modules:
            modules.add(module)
        else:  # each wrapped module on the path adds its wrappers' .base_layer
            parts = module.split(".")
            module = ".".join(part + ".base_layer" * wraps[".".join(parts[:i + 1])] for i, part in enumerate(parts))
        # a root-level parameter (bias="all" on a module whose own bias is a parameter) has no module part
        out[".".join(p for p in ("base_model.model", module, param) if p)] = tensors.pop(key)
    if tensors:
        raise AdapterError(f"adapter {name!r}: tensors {sorted(tensors)[:4]} have no PEFT key; save with the "
                           f"default format")
    cfg = {"peft_type": fmt.peft_type, "task_type": None, "inference_mode": True, "bias": spec.bias or "none",
           "fan_in_fan_out": False, "modules_to_save": sorted(modules) or None, "layers_to_transform": None,
           "layers_pattern": None,
           "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
           "target_modules": exact_targets(s for s in sites if s not in module_of) if len(module_of) < len(sites)
           else [],  # no module targets: [] (an empty regex would match PEFT's root module)
           **fmt.write_config(spec.method),
           **patterns}  # PEFT matches rank/alpha patterns by the same rule as ours
    if module_of:
        cfg["target_parameters"] = sorted(module_of)
    return out, cfg


def _peft_param_modules(model: nn.Module, params: Sequence[str]) -> dict[str, str]:
    """Parameter site -> PEFT's module key for its ``ParamWrapper``: the wrappers of one module nest
    in the order its parameters were registered, the first innermost, and each level inside adds
    ``.base_layer`` (e.g. ``experts.base_layer`` for gate_up_proj under ``experts`` for down_proj)."""
    by_host: dict[str, list[str]] = defaultdict(list)
    wanted = set(params)
    for key, path, _, _ in parameter_keys(model):
        if key in wanted:
            by_host[path].append(key)
    return {key: path + ".base_layer" * (len(keys) - 1 - i) for path, keys in by_host.items()
            for i, key in enumerate(keys)}


PREV_SUFFIX = ".prev"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_tmp(file: Path, data: bytes) -> None:
    """One temporary file of a checkpoint (a seam the crash-safety tests cut through)."""
    file.write_bytes(data)


def _write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], cfg: dict, *, peft_layout: bool = False) -> None:
    """Weights and config (full CPU tensors) as one unit (see save_adapters). Our config records
    the weights' sha256; a PEFT-layout config must stay PEFT's (PEFT warns on unknown keys), so
    there the weights' safetensors metadata records the config's sha256 instead. The tensors are
    serialised once, in memory, and hashed from those bytes."""
    try:
        path.mkdir(parents=True, exist_ok=True)  # here, not earlier: only the writing rank creates it
    except OSError as e:
        raise AdapterError(f"cannot create the adapter directory {path}: {e}") from None
    weights, config, prev = path / WEIGHTS_NAME, path / CONFIG_NAME, path / (WEIGHTS_NAME + PREV_SUFFIX)
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_w, tmp_c = path / (WEIGHTS_NAME + tag), path / (CONFIG_NAME + tag)
    if peft_layout:
        text = json.dumps(cfg, indent=2)
        data = save(tensors, metadata={"format": "pt", CONFIG_HASH_KEY: _sha256(text.encode())})
    else:
        data = save(tensors)
        text = json.dumps({**cfg, "weights_sha256": _sha256(data)}, indent=2)
    try:
        try:
            _write_tmp(tmp_w, data)
            _write_tmp(tmp_c, text.encode())
        except OSError as e:
            raise AdapterError(f"cannot write the adapter to {path}: {e}") from None
        if weights.exists():
            prev.unlink(missing_ok=True)
            try:
                os.link(weights, prev)
            except OSError:
                shutil.copy2(weights, prev)
        os.replace(tmp_w, weights)
        os.replace(tmp_c, config)
        prev.unlink(missing_ok=True)
    finally:
        for t in (tmp_w, tmp_c):
            t.unlink(missing_ok=True)


CONFIG_HASH_KEY = "peftcompile_config_sha256"


def _metadata(data: bytes) -> dict:
    """The ``__metadata__`` of safetensors bytes (8-byte little-endian header length, JSON header)."""
    try:
        n = int.from_bytes(data[:8], "little")
        return json.loads(data[8:8 + n]).get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError, AttributeError):
        return {}


def _belongs(data: bytes, cfg: dict, config_file: Path) -> bool | None:
    """Whether weights ``data`` were written with this config (None: no link recorded)."""
    if "weights_sha256" in cfg:
        return _sha256(data) == cfg["weights_sha256"]
    want = _metadata(data).get(CONFIG_HASH_KEY)
    return None if want is None else _sha256(config_file.read_bytes()) == want


def read_weights(path: Path, cfg: dict) -> dict[str, torch.Tensor]:
    """The tensors that belong to ``cfg`` (each file read once): the current weights, or the
    previous ones left by an interrupted save (with a warning); AdapterError if neither matches."""
    file, config = path / WEIGHTS_NAME, path / CONFIG_NAME
    if not file.is_file():
        raise AdapterError(f"adapter weights not found: {file}")
    data = file.read_bytes()
    if _belongs(data, cfg, config) is False:
        prev = path / (WEIGHTS_NAME + PREV_SUFFIX)
        old = prev.read_bytes() if prev.is_file() else b""
        if not (old and _belongs(old, cfg, config)):
            raise AdapterError(f"{file} does not match {config} (sha256 differs: an interrupted or mixed save); "
                               f"save the adapter again")
        warnings.warn(f"{path}: a save was interrupted after writing new weights; loading the previous, complete "
                      f"checkpoint ({prev.name}). Save again to replace it.", AdapterWarning, stacklevel=3)
        file, data = prev, old
    try:
        return load(data)
    except (SafetensorError, ValueError) as e:
        raise AdapterError(f"{file} is not a readable safetensors file ({e}); save it with save_adapters") from None


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise AdapterError(f"adapter config not found: {file}")
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise AdapterError(f"{file} holds a JSON {type(d).__name__}, not an adapter config object")
    return d


def _expected(model: nn.Module, spec: AdapterSpec, sites: list[str]) -> tuple[dict[str, tuple], dict[str, list[str]]]:
    """Tensor key -> shape the model needs for ``spec`` at ``sites``; and the groups."""
    by_name = {s.name: s for s in match(capture(model), explicit=True)}
    if spec.target_parameters:
        by_name.update({s.name: s for s in match_parameters(model, spec.target_parameters)})
    missing = [s for s in sites if s not in by_name]
    if missing:
        raise AdapterError(
            f"the adapter names sites this {type(model).__name__} does not have: {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; it was saved from another model"
        )
    m = method_for(spec.method)
    check_explicit_sites(model, m, [by_name[s] for s in sites])  # e.g. GraLoRA on a conv, a grouped conv
    groups: dict[str, list[str]] = defaultdict(list)
    if m.shares:
        for s in sites:
            groups[m.group_key(s)].append(s)
    n_of = {s: len(mem) for mem in groups.values() for s in mem}
    shapes = {}
    for s in sites:
        site = by_name[s]
        cfg = spec.config_for(s)
        if site.kind == "param":
            if m.param_form is None:
                raise AdapterError(f"{s}: {m.name} cannot adapt a parameter target")
            experts = site.weight(model).shape[0] if site.weight(model).dim() == 3 else 1
            for p, shp in m.param_form.shapes(cfg, site.in_features, site.out_features, experts).items():
                shapes[site_key(s, p)] = tuple(shp)
            continue
        why = site_check(model, m, cfg, site)
        if why:
            raise AdapterError(f"{s}: {why}")
        for p, shp in m.shapes(cfg, site.in_features, site.out_features, n_of.get(s, 1)).items():
            shapes[site_key(s, p)] = tuple(shp)
    for g, mem in groups.items():
        site = by_name[mem[0]]
        for p, shp in m.shared_shapes(spec.config_for(mem[0]), site.in_features, site.out_features, len(mem)).items():
            shapes[shared_key(g, p)] = tuple(shp)
    return shapes, dict(groups)


def tensor_mismatch(expected: Mapping[str, tuple], got: Mapping[str, tuple], *, got_as: str = "file ",
                    expected_as: str = "model", missing_as: str = "missing tensors",
                    extra_as: str = "unexpected tensors", extra_problems: Sequence[str] = (),
                    n: int = 8) -> str | None:
    """Why a set of named tensor shapes does not fit the expected one (None if it fits)."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = [f"{k}: {got_as}{tuple(got[k])} vs {expected_as} {tuple(expected[k])}"
             for k in expected if k in got and tuple(got[k]) != tuple(expected[k])]
    parts = []
    if wrong:
        parts.append("shape mismatch: " + "; ".join(wrong[:n]))
    parts += list(extra_problems)
    if missing:
        parts.append(f"{missing_as}: {missing[:n]}")
    if extra:
        parts.append(f"{extra_as}: {extra[:n]}")
    return " | ".join(parts) or None


def _check_tensors(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple], source: str) -> None:
    not_float = [f"{k} ({t.dtype})" for k, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        raise AdapterError(f"{source}: adapter tensors must be floating point, got {not_float[:4]}; casting them "
                           f"would hide a wrong file")
    why = tensor_mismatch(shapes, {k: tuple(t.shape) for k, t in tensors.items()})
    if why:
        raise AdapterError(f"{source} does not fit this model/spec ({why}); load it into the model and "
                           f"spec it was saved from")


def _install(model: nn.Module, name: str, spec: AdapterSpec, sites: list[str],
             tensors: Mapping[str, torch.Tensor], source: str, is_trainable: bool | None = None,
             activate: bool | None = None, expected: tuple[dict, dict] | None = None,
             autocast_adapter_dtype: bool = True) -> nn.Module:
    check_adapter_name(name)
    for arg, v in (("is_trainable", is_trainable), ("activate", activate)):
        if v is not None and not isinstance(v, bool):
            raise AdapterTypeError(f"{arg} must be True or False, got {v!r}")
    st0 = state_of(model)
    existed = st0 is not None and name in st0.specs
    previous = tuple(n for n in (st0.active if st0 else ()) if n != name)
    if activate is None:
        activate = not previous
    shapes, groups = expected or _expected(model, spec, sites)
    shapes = dict(shapes)
    shapes.update({k: tuple(t.shape) for k, t in owned_params(model, spec, sites).items()})
    _check_tensors(tensors, shapes, source)
    on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise AdapterError(
            f"{type(model).__name__} has parameters on the meta device ({on_meta[:3]}); loaded adapter weights would "
            f"be lost by to_empty(). Fix: materialise the model (to_empty + load its weights) before load_adapters"
        )
    st = state_of(model)
    if st is not None and name in st.specs:
        have = {c.site for _, _, c in site_adapters(model) if name in c}
        old = st.specs[name]
        if (old.trainable != spec.trainable or old.bias != spec.bias or have != set(sites)
                or any(old.config_for(s) != spec.config_for(s) for s in sites)):
            raise AdapterError(
                f"adapter {name!r} on the model has {old.method!r} at {len(have)} sites; {source} has "
                f"{spec.method!r} at {len(sites)} sites (or other per-site ranks/alphas); load it under another name"
            )
        merged = merged_sites(model, name)
        if merged:
            raise AdapterError(
                f"adapter {name!r} is merged into the base weights ({merged[:3]}); replacing its tensors now would "
                f"make a later unmerge() subtract the wrong delta. Fix: peftcompile.unmerge(model) first"
            )
    else:
        require_unsharded(model, f"adding adapter {name!r} (adapt before fully_shard)")
        # exact names: a recorded site "fc" must not also select "sub.fc"
        plan = plan_adapt(model, spec.restricted(sites), name, autocast_adapter_dtype=autocast_adapter_dtype)
        if set(plan.sites) != set(sites):
            raise AdapterError(f"{source}: sites {sorted(set(sites) - set(plan.sites))[:4]} cannot be adapted on "
                               f"this {type(model).__name__}")
        apply_plan_(model, plan)
    own = checkpoint_params(model, name)
    with torch.no_grad():
        for k, t in own.items():
            copy_into_(t, tensors[k])  # a DTensor shard keeps its own slice
    st = state_of(model)
    if is_trainable is None:
        is_trainable = existed and name not in st.frozen
    st.frozen = (st.frozen - {name}) if is_trainable else (st.frozen | {name})
    set_active(model, (name,) if activate else previous or (name,))
    return model


def load_adapters(model: nn.Module, path: str | Path, name: str | None = None, *,
                  is_trainable: bool | None = None, activate: bool | None = None,
                  autocast_adapter_dtype: bool = True) -> nn.Module:
    """Load an adapter written by save_adapters (adapting the model if needed).

    As in PEFT: a new adapter is loaded for inference (frozen) unless ``is_trainable=True``
    (weights loaded into an existing adapter keep its mode unless ``is_trainable`` is given);
    into a model without adapters it becomes the active one (``PeftModel.from_pretrained``),
    into a model that has adapters it does not switch the active adapter
    (``PeftModel.load_adapter``) unless ``activate=True``.
    If ``model`` already has an adapter of that name with the same spec and sites, its
    weights are replaced in place (no retrace, no recompile). Wrapped and FSDP2-sharded
    models work: each rank reads the full tensors and keeps its shard (any world size).
    A new adapter's tensors follow :func:`~peftcompile.adapt`'s ``autocast_adapter_dtype``
    (float32 on a 16-bit base by default, as PEFT), whatever dtype the file holds.
    """
    with unwrapped(model, writeback=True) as inner:
        _load_adapters(inner, path, name, is_trainable, activate, autocast_adapter_dtype)
    return model


def _load_adapters(model: nn.Module, path: str | Path, name: str | None, is_trainable: bool | None,
                   activate: bool | None, autocast_adapter_dtype: bool = True) -> nn.Module:
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter directory not found: {path} (save_adapters writes a directory with "
                           f"{WEIGHTS_NAME} and {CONFIG_NAME})")
    file = path / CONFIG_NAME
    cfg = _read_json(file)
    if "peft_type" in cfg:
        raise AdapterError(f"{file} is a PEFT adapter config; load it with peftcompile.load_peft_adapter")
    if cfg.get("format") != FORMAT:
        raise AdapterError(f"{file} is not a peftcompile adapter config (format {cfg.get('format')!r}, expected "
                           f"{FORMAT!r}); for PEFT use load_peft_adapter")
    missing = [k for k in ("adapter", "spec", "sites") if k not in cfg]
    if missing:
        raise AdapterError(f"{file} misses the key(s) {missing}; save the adapter again with save_adapters")
    if not isinstance(cfg["sites"], (dict, list)) or not isinstance(cfg.get("groups", {}), dict):
        raise AdapterError(f"{file}: 'sites' must map site names to [in, out] and 'groups' group names to members")
    try:
        spec = AdapterSpec.from_dict(cfg["spec"])
    except AdapterError as e:
        raise AdapterError(f"{file}: {e}") from None
    name = name or cfg["adapter"]
    sites = list(cfg["sites"])
    if not all(isinstance(s_, str) for s_ in sites):
        raise AdapterError(f"{file}: site names must be strings, got {sites[:4]}")
    tensors = read_weights(path, cfg)
    expected = _expected(model, spec, sites)  # captures the model: once per load
    groups = expected[1]
    if groups != {g: list(m) for g, m in cfg.get("groups", {}).items()}:
        raise AdapterError(
            f"{path}: shared tensors were saved for groups {sorted(cfg.get('groups', {}))} but the sites group "
            f"as {sorted(groups)} on this model"
        )
    return _install(model, name, spec, sites, tensors, str(path), is_trainable, activate, expected,
                    autocast_adapter_dtype)


def _peft_formats() -> dict[str, tuple[str, object]]:
    """PEFT ``peft_type`` -> (method name, its PeftFormat), from the registry."""
    return {m.peft.peft_type: (n, m.peft) for n, m in registered_methods().items() if m.peft is not None}


def _check_peft_options(c: dict, options: Mapping[str, object], source: Path) -> None:
    """Only what is implemented exactly: a PEFT field we do not know, or a value that changes
    the math (DoRA, rsLoRA, aLoRA, rank patterns, bias training, ...), is refused by name."""
    unknown = sorted(k for k in c if k not in options)
    if unknown:
        raise AdapterError(f"{source}: PEFT config field(s) {unknown} are not supported by peftcompile (loading the "
                           f"adapter without them could give wrong outputs)")
    for k, allowed in options.items():
        if allowed is ANY or k not in c:
            continue
        v = c[k]
        if not any(v == a or (a in ({}, [], None) and not v) for a in allowed):
            raise AdapterError(f"{source}: PEFT option {k}={v!r} is not supported by peftcompile "
                               f"(supported: {list(allowed)}); loading it as plain weights would be silently wrong")


def _check_base_copies(model: nn.Module, copies: Mapping[str, torch.Tensor], source: Path) -> None:
    """The base weights PEFT stored beside an embedding adapter must be the model's own: PEFT would
    overwrite the model's weight with them, which loading an adapter here never does."""
    modules = dict(model.named_modules())
    for path, t in copies.items():
        w = getattr(modules.get(path), "weight", None)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(t.shape):
            raise AdapterError(f"{source}: base weight {path!r}.base_layer.weight has no match of shape "
                               f"{tuple(t.shape)} in {type(model).__name__}")
        if not torch.equal(w.detach().cpu(), t.to(w.dtype)):
            raise AdapterError(f"{source}: the checkpoint carries a base weight for {path!r} that differs from the "
                               f"model's (PEFT would replace the model's weight with it). Load it into the base model "
                               f"it was trained on, or copy that weight in first")


def _peft_param_names(model: nn.Module, c: dict, source: Path) -> dict[str, str]:
    """PEFT wrapper module key -> parameter site, for the config's ``target_parameters``."""
    tp = c.get("target_parameters") or ()
    if isinstance(tp, str) or not all(isinstance(t, str) and t for t in tp):
        raise AdapterError(f"{source / CONFIG_NAME}: target_parameters must be a list of parameter names, got {tp!r}")
    if not tp:
        return {}
    keys = [k for k, _, _, p in parameter_keys(model) if param_targeted(k, tuple(tp))]
    return {module: key for key, module in _peft_param_modules(model, keys).items()}


def load_peft_adapter(model: nn.Module, peft_dir: str | Path, name: str = "default", *,
                      is_trainable: bool | None = None, activate: bool | None = None,
                      autocast_adapter_dtype: bool = True) -> nn.Module:
    """Load an adapter written by PEFT's ``save_pretrained`` (the methods with a PEFT format).

    Outputs then equal PEFT's ``PeftModel`` on the same base model and inputs.
    """
    model = unwrap(model)
    peft_dir = Path(peft_dir)
    c = _read_json(peft_dir / CONFIG_NAME)
    ptype = str(c.get("peft_type", "")).upper()
    formats = _peft_formats()
    if ptype not in formats:
        raise AdapterError(f"{peft_dir}: PEFT type {ptype!r} is not supported; supported: {sorted(formats)}")
    fmt = formats[ptype][1]
    _check_peft_options(c, fmt.options, peft_dir / CONFIG_NAME)
    try:
        cfg = fmt.read_config(c)
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{peft_dir / CONFIG_NAME}: cannot read the {ptype} config ({type(e).__name__}: {e})") from None
    suffixes = {**fmt.keys, **fmt.embedding_keys}  # PEFT names an embedding site's factors lora_embedding_A/B
    raw = read_weights(peft_dir, c)
    to_save = c.get("modules_to_save") or None
    if to_save is not None and (isinstance(to_save, str) or not all(isinstance(m, str) and m for m in to_save)):
        raise AdapterError(f"{peft_dir / CONFIG_NAME}: modules_to_save must be a list of module names, got {to_save!r}")
    saved = set(select_modules((n for n, _ in model.named_modules()), tuple(to_save))) if to_save else set()
    tensors, sites = {}, []
    site_params: list[tuple[str, str]] = []  # (site, our param) of each adapter tensor read
    base_copies: dict[str, torch.Tensor] = {}
    bias = c.get("bias", "none")
    for key, t in raw.items():
        k = key.removeprefix("base_model.model.")
        if fmt.embedding_keys and k.endswith(".base_layer.weight"):
            # PEFT saves the base weight of a targeted embedding too (save_embedding_layers="auto")
            base_copies[k[: -len(".base_layer.weight")]] = t
            continue
        for suf, ours in suffixes.items():
            if k.endswith("." + suf):
                site = k[: -len(suf) - 1]
                tensors[site_key(site, ours)] = t
                site_params.append((site, ours))
                if site not in sites:
                    sites.append(site)
                break
        else:
            module = next((m for m in saved if k.startswith(m + ".")), None)
            if module is None and bias != "none" and "bias" in k.rpartition(".")[2]:
                # PEFT's bias="all"/"lora_only": the base biases it trained (base_layer.* where it wraps a site)
                owner, _, param = k.rpartition(".")
                owner = ".".join(part for part in owner.split(".") if part != "base_layer")  # PEFT's wrappers, nested
                tensors[trainable_key(owner, param)] = t
                continue
            if module is None:
                raise AdapterError(f"{peft_dir}: unexpected tensor {key!r} for PEFT type {ptype}"
                                   + (f" (modules_to_save {to_save} select {sorted(saved)} on this model)"
                                      if to_save else ""))
            tensors[trainable_key(module, k[len(module) + 1:])] = t
    _check_base_copies(model, base_copies, peft_dir)
    params = _peft_param_names(model, c, peft_dir)
    for module, site in params.items():  # PEFT keys a parameter's LoRA by its (nested) wrapper module
        if module in sites:
            sites[sites.index(module)] = site
            for ours in set(suffixes.values()):
                if site_key(module, ours) in tensors:
                    tensors[site_key(site, ours)] = tensors.pop(site_key(module, ours))
    try:
        spec = AdapterSpec(cfg, tuple(s for s in sites if s not in params.values()),
                           target_parameters=tuple(s for s in sites if s in params.values()) or None,
                           rank_pattern=c.get("rank_pattern") or None,
                           alpha_pattern=c.get("alpha_pattern") or None,
                           trainable=tuple(sorted(saved)) if saved else None, bias=bias)
    except AdapterError as e:
        raise AdapterError(f"{peft_dir / CONFIG_NAME}: {e}") from None
    expected = _expected(model, spec, sites)  # captures the model: once per load
    _from_peft_conv_layout_(model, fmt, tensors, site_params, expected[0], peft_dir)
    return _install(model, name, spec, sites, tensors, str(peft_dir), is_trainable, activate, expected,
                    autocast_adapter_dtype=autocast_adapter_dtype)


def _from_peft_conv_layout_(model: nn.Module, fmt, tensors: dict[str, torch.Tensor],
                            site_params: Sequence[tuple[str, str]], shapes: Mapping[str, tuple], source: Path) -> None:
    """Reshape (in place in ``tensors``) the factors PEFT stores as conv weights at nn.Conv1d/2d/3d
    sites into our linear-site shapes; a tensor of another shape is an error naming both layouts."""
    modules = dict(model.named_modules())
    for site, param in site_params:
        conv = modules.get(site)
        key = site_key(site, param)
        if conv is None or not is_conv_site(conv) or key not in shapes or fmt.conv_shape is None:
            continue
        want = shapes[key]
        peft_shape = tuple(fmt.conv_shape(param, want, tuple(conv.kernel_size)))
        t = tensors[key]
        if tuple(t.shape) != peft_shape:
            raise AdapterError(f"{source}: tensor for {key!r} has shape {tuple(t.shape)}, but the "
                               f"{type(conv).__name__} {site!r} of this model needs {peft_shape} in PEFT's layout; "
                               f"load it into the model it was trained on")
        tensors[key] = t.reshape(want)
