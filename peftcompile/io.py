"""Adapter checkpoints: our safetensors + JSON format, and PEFT checkpoints of the methods
that declare a PEFT format (:class:`~peftcompile.methods.PeftFormat`).

Directory layout (as PEFT's): ``adapter_model.safetensors`` with keys
``<site>.<param>`` (and ``shared.<group>.<param>`` for tensors a group shares, stored
once) and ``adapter_config.json`` with the spec, the sites and their shapes.
Everything is checked before the model is touched.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .api import adapt
from .errors import AdapterError
from .methods import MethodConfig, method_for, registered_methods
from .passes.capture import capture
from .passes.match import match
from .spec import AdapterSpec
from .state import (checkpoint_params, require_state, shared_key, shared_of, site_adapters, site_key, state_of,
                    trainable_params)

__all__ = ["save_adapters", "load_adapters", "load_peft_adapter", "tensor_mismatch", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "peftcompile/1"


def _layout(model: nn.Module, name: str) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    """({site: [in, out]}, {group: members}) of adapter ``name``, as the config records them."""
    sites = {c.site: [c[name].in_features, c[name].out_features] for _, _, c in site_adapters(model) if name in c}
    groups = {g: list(sh.members) for g, sh in shared_of(model, name).items()}
    return sites, groups


def save_adapters(model: nn.Module, path: str | Path, name: str | None = None) -> Path:
    """Write one adapter (default: the active one) to the directory ``path``."""
    st = require_state(model)
    name = name or st.active[0]
    if name not in st.specs:
        raise AdapterError(f"no adapter named {name!r}; this model has {sorted(st.specs)}")
    tensors = checkpoint_params(model, name)
    sites, groups = _layout(model, name)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path / WEIGHTS_NAME))
    cfg = {"format": FORMAT, "adapter": name, "spec": st.specs[name].to_dict(), "sites": sites, "groups": groups}
    (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    return path


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise AdapterError(f"adapter weights not found: {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{file} is not a readable safetensors file ({e}); save it with save_adapters") from None


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise AdapterError(f"adapter config not found: {file}")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file} is not valid JSON ({e})") from None


def _expected(model: nn.Module, cfg: MethodConfig, sites: list[str]) -> tuple[dict[str, tuple], dict[str, list[str]]]:
    """Tensor key -> shape the model needs for ``cfg`` at ``sites``; and the groups."""
    by_name = {s.name: s for s in match(capture(model))}
    missing = [s for s in sites if s not in by_name]
    if missing:
        raise AdapterError(
            f"the adapter names sites this {type(model).__name__} does not have: {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; it was saved from another model"
        )
    m = method_for(cfg)
    groups: dict[str, list[str]] = defaultdict(list)
    if m.shares:
        for s in sites:
            groups[m.group_key(s)].append(s)
    n_of = {s: len(mem) for mem in groups.values() for s in mem}
    shapes = {}
    for s in sites:
        site = by_name[s]
        why = m.check_site(cfg, site.in_features, site.out_features)
        if why:
            raise AdapterError(f"{s}: {why}")
        for p, shp in m.shapes(cfg, site.in_features, site.out_features, n_of.get(s, 1)).items():
            shapes[site_key(s, p)] = tuple(shp)
    for g, mem in groups.items():
        site = by_name[mem[0]]
        for p, shp in m.shared_shapes(cfg, site.in_features, site.out_features, len(mem)).items():
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
    why = tensor_mismatch(shapes, {k: tuple(t.shape) for k, t in tensors.items()})
    if why:
        raise AdapterError(f"{source} does not fit this model/spec ({why}); load it into the model and "
                           f"spec it was saved from")


def _install(model: nn.Module, name: str, spec: AdapterSpec, sites: list[str],
             tensors: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    shapes, groups = _expected(model, spec.method, sites)
    shapes.update({k: tuple(t.shape) for k, t in trainable_params(model, spec.trainable).items()})
    _check_tensors(tensors, shapes, source)
    st = state_of(model)
    if st is not None and name in st.specs:
        have = {c.site for _, _, c in site_adapters(model) if name in c}
        if (st.specs[name].method, st.specs[name].trainable) != (spec.method, spec.trainable) or have != set(sites):
            raise AdapterError(
                f"adapter {name!r} on the model has {st.specs[name].method!r} at {len(have)} sites; {source} has "
                f"{spec.method!r} at {len(sites)} sites; load it under another name"
            )
    else:
        adapt(model, AdapterSpec(spec.method, tuple(sites), trainable=spec.trainable), name)
    own = checkpoint_params(model, name)
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(tensors[k])
    return model


def load_adapters(model: nn.Module, path: str | Path, name: str | None = None) -> nn.Module:
    """Load an adapter written by save_adapters (adapting the model if needed).

    If ``model`` already has an adapter of that name with the same spec and sites, its
    weights are replaced in place (no retrace, no recompile).
    """
    path = Path(path)
    cfg = _read_json(path / CONFIG_NAME)
    if cfg.get("format") != FORMAT:
        raise AdapterError(f"{path / CONFIG_NAME} is not a peftcompile adapter config; for PEFT use load_peft_adapter")
    tensors = _read_safetensors(path / WEIGHTS_NAME)
    spec = AdapterSpec.from_dict(cfg["spec"])
    name = name or cfg["adapter"]
    sites = list(cfg["sites"])
    _, groups = _expected(model, spec.method, sites)
    if groups != {g: list(m) for g, m in cfg.get("groups", {}).items()}:
        raise AdapterError(
            f"{path}: shared tensors were saved for groups {sorted(cfg.get('groups', {}))} but the sites group "
            f"as {sorted(groups)} on this model"
        )
    return _install(model, name, spec, sites, tensors, str(path))


def _peft_formats() -> dict[str, tuple[str, object]]:
    """PEFT ``peft_type`` -> (method name, its PeftFormat), from the registry."""
    return {m.peft.peft_type: (n, m.peft) for n, m in registered_methods().items() if m.peft is not None}


# PEFT options that change the math; loading them as the plain method would be silently wrong.
_PEFT_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}


def load_peft_adapter(model: nn.Module, peft_dir: str | Path, name: str = "default") -> nn.Module:
    """Load an adapter written by PEFT's ``save_pretrained`` (the methods with a PEFT format).

    Outputs then equal PEFT's ``PeftModel`` on the same base model and inputs.
    """
    peft_dir = Path(peft_dir)
    c = _read_json(peft_dir / CONFIG_NAME)
    ptype = str(c.get("peft_type", "")).upper()
    formats = _peft_formats()
    if ptype not in formats:
        raise AdapterError(f"{peft_dir}: PEFT type {ptype!r} is not supported; supported: {sorted(formats)}")
    for opt, plain in _PEFT_UNSUPPORTED.items():
        if c.get(opt) not in (None, plain):
            raise AdapterError(f"{peft_dir}: PEFT option {opt}={c[opt]!r} is not supported by peftcompile")
    fmt = formats[ptype][1]
    try:
        cfg = fmt.read_config(c)
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{peft_dir / CONFIG_NAME}: cannot read the {ptype} config ({type(e).__name__}: {e})") from None
    suffixes = fmt.keys
    raw = _read_safetensors(peft_dir / WEIGHTS_NAME)
    tensors, sites = {}, []
    for key, t in raw.items():
        k = key.removeprefix("base_model.model.")
        for suf, ours in suffixes.items():
            if k.endswith("." + suf):
                site = k[: -len(suf) - 1]
                tensors[site_key(site, ours)] = t
                if site not in sites:
                    sites.append(site)
                break
        else:
            raise AdapterError(f"{peft_dir}: unexpected tensor {key!r} for PEFT type {ptype}")
    return _install(model, name, AdapterSpec(cfg, tuple(sites)), sites, tensors, str(peft_dir))
