"""Adapter checkpoints: our safetensors + JSON format, and PEFT LoRA/GraLoRA checkpoints.

Directory layout (as PEFT's): ``adapter_model.safetensors`` with keys
``<site>.<param>`` (and ``shared.<group>.<param>`` for tensors a group shares, stored
once) and ``adapter_config.json`` with the spec, the sites and their shapes.
Everything is checked before the model is touched.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .api import SHARED_ATTR, AdapterError, _require, _state, adapt, site_adapters
from .distributed import copy_into_, require_unsharded, unwrap, unwrapped, write_checkpoint
from .methods import GraLoRA, LoRA, MethodConfig, method_for
from .passes.capture import capture
from .passes.match import match
from .spec import AdapterSpec, select_modules

__all__ = ["save_adapters", "load_adapters", "load_peft_adapter", "adapter_state", "tensor_mismatch",
           "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "peftcompile/1"


def adapter_state(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Key -> parameter of adapter ``name``, keyed as save_adapters writes them:
    ``<site>.<param>`` and ``shared.<group>.<param>`` (a group's tensors once)."""
    out: dict[str, nn.Parameter] = {}
    for _, _, cont in site_adapters(model):
        if name in cont:
            out.update({f"{cont.site}.{p}": t for p, t in cont[name]._parameters.items()})
    shared = getattr(model, SHARED_ATTR, None)
    if shared is not None and name in shared:
        for sh in shared[name].values():
            out.update({f"shared.{sh.group}.{p}": t for p, t in sh._parameters.items()})
    return out


def _adapter_tensors(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors to save incl. trainable modules, {site: [in, out]}, {group: members}) of one adapter."""
    sites = {c.site: [c[name].in_features, c[name].out_features] for _, _, c in site_adapters(model) if name in c}
    shared = getattr(model, SHARED_ATTR, None)
    groups = ({sh.group: list(sh.members) for sh in shared[name].values()}
              if shared is not None and name in shared else {})
    tensors: dict[str, torch.Tensor] = dict(adapter_state(model, name))
    st = _state(model)
    tensors.update(_trainable_tensors(model, st.specs[name].trainable if st and name in st.specs else None))
    return tensors, sites, groups


def _trainable_tensors(model: nn.Module, patterns) -> dict[str, torch.Tensor]:
    """``trainable.<module>.<param>`` for the modules a spec keeps trainable."""
    if patterns is None:
        return {}
    names = select_modules((n for n, _ in model.named_modules()), patterns)
    return {f"trainable.{n}.{p}": t for n in names for p, t in model.get_submodule(n).named_parameters()}


def save_adapters(model: nn.Module, path: str | Path, name: str | None = None) -> Path:
    """Write one adapter (default: the active one) to the directory ``path``.

    Wrapped (DDP, FSDP1, torch.compile) and FSDP2-sharded models work; with a process group
    every rank must call it: shards are gathered and rank 0 writes (see ``peftcompile.distributed``).
    """
    with unwrapped(model, writeback=False) as inner:
        return _save_adapters(inner, path, name)


def _save_adapters(model: nn.Module, path: str | Path, name: str | None = None) -> Path:
    st = _require(model)
    name = name or st.active[0]
    if name not in st.specs:
        raise AdapterError(f"no adapter named {name!r}; this model has {sorted(st.specs)}")
    tensors, sites, groups = _adapter_tensors(model, name)
    cfg = {"format": FORMAT, "adapter": name, "spec": st.specs[name].to_dict(), "sites": sites, "groups": groups}
    # gathers shards, checks ranks agree, writes once (rank 0) and atomically
    return write_checkpoint(path, tensors, cfg, WEIGHTS_NAME, CONFIG_NAME)


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
            shapes[f"{s}.{p}"] = tuple(shp)
    for g, mem in groups.items():
        site = by_name[mem[0]]
        for p, shp in m.shared_shapes(cfg, site.in_features, site.out_features, len(mem)).items():
            shapes[f"shared.{g}.{p}"] = tuple(shp)
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
    shapes.update({k: tuple(t.shape) for k, t in _trainable_tensors(model, spec.trainable).items()})
    _check_tensors(tensors, shapes, source)
    st = _state(model)
    if st is not None and name in st.specs:
        have = {c.site for _, _, c in site_adapters(model) if name in c}
        if (st.specs[name].method, st.specs[name].trainable) != (spec.method, spec.trainable) or have != set(sites):
            raise AdapterError(
                f"adapter {name!r} on the model has {st.specs[name].method!r} at {len(have)} sites; {source} has "
                f"{spec.method!r} at {len(sites)} sites; load it under another name"
            )
    else:
        require_unsharded(model, f"adding adapter {name!r} (adapt before fully_shard)")
        adapt(model, AdapterSpec(spec.method, tuple(sites), trainable=spec.trainable), name)
    own, _, _ = _adapter_tensors(model, name)
    with torch.no_grad():
        for k, t in own.items():
            copy_into_(t, tensors[k])  # a DTensor shard keeps its own slice
    return model


def load_adapters(model: nn.Module, path: str | Path, name: str | None = None) -> nn.Module:
    """Load an adapter written by save_adapters (adapting the model if needed).

    If ``model`` already has an adapter of that name with the same spec and sites, its
    weights are replaced in place (no retrace, no recompile). Wrapped and FSDP2-sharded
    models work: each rank reads the full tensors and keeps its shard (any world size).
    """
    with unwrapped(model, writeback=True) as inner:
        _load_adapters(inner, path, name)
    return model


def _load_adapters(model: nn.Module, path: str | Path, name: str | None = None) -> nn.Module:
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


# PEFT checkpoint formats: config reader and key suffix -> our parameter name.
def _peft_lora(c: dict) -> MethodConfig:
    return LoRA(r=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)))


def _peft_gralora(c: dict) -> MethodConfig:
    return GraLoRA(r=int(c["r"]), k=int(c["gralora_k"]), alpha=float(c["alpha"]),
                   hybrid_r=int(c.get("hybrid_r", 0)), dropout=float(c.get("gralora_dropout", 0.0)))


_PEFT_FORMATS: dict[str, tuple[Callable[[dict], MethodConfig], dict[str, str]]] = {
    "LORA": (_peft_lora, {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}),
    "GRALORA": (
        _peft_gralora,
        {"gralora_A": "gralora_A", "gralora_B": "gralora_B",
         "gralora_A_general.weight": "gralora_A_hybrid", "gralora_B_general.weight": "gralora_B_hybrid"},
    ),
}
# LoRA options that change the math; loading them as plain LoRA would be silently wrong.
_PEFT_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}


def load_peft_adapter(model: nn.Module, peft_dir: str | Path, name: str = "default") -> nn.Module:
    """Load a LoRA or GraLoRA adapter written by PEFT's ``save_pretrained``.

    Outputs then equal PEFT's ``PeftModel`` on the same base model and inputs.
    """
    model = unwrap(model)
    peft_dir = Path(peft_dir)
    c = _read_json(peft_dir / CONFIG_NAME)
    ptype = str(c.get("peft_type", "")).upper()
    if ptype not in _PEFT_FORMATS:
        raise AdapterError(f"{peft_dir}: PEFT type {ptype!r} is not supported; supported: {sorted(_PEFT_FORMATS)}")
    for opt, plain in _PEFT_UNSUPPORTED.items():
        if c.get(opt) not in (None, plain):
            raise AdapterError(f"{peft_dir}: PEFT option {opt}={c[opt]!r} is not supported by peftcompile")
    make_cfg, suffixes = _PEFT_FORMATS[ptype]
    cfg = make_cfg(c)
    raw = _read_safetensors(peft_dir / WEIGHTS_NAME)
    tensors, sites = {}, []
    for key, t in raw.items():
        k = key.removeprefix("base_model.model.")
        for suf, ours in suffixes.items():
            if k.endswith("." + suf):
                site = k[: -len(suf) - 1]
                tensors[f"{site}.{ours}"] = t
                if site not in sites:
                    sites.append(site)
                break
        else:
            raise AdapterError(f"{peft_dir}: unexpected tensor {key!r} for PEFT type {ptype}")
    return _install(model, name, AdapterSpec(cfg, tuple(sites)), sites, tensors, str(peft_dir))
