"""AdapterSpec: which method, at which sites; and Placement, a decided set of sites."""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import torch

from .errors import AdapterError, AdapterTypeError
from .methods import MethodConfig, config_from_dict

__all__ = ["AdapterSpec", "Placement", "Targets", "select_modules", "select_sites", "exact_targets"]

Targets = Union[str, Sequence[str]]
ALL_LINEAR = "all-linear"


def _norm(t: Targets | None, what: str) -> Targets | None:
    if t is None or isinstance(t, str):
        return t
    try:
        t = tuple(t)
    except TypeError:
        raise AdapterTypeError(f"AdapterSpec.{what} must be a str or a list of str, got {t!r}") from None
    bad = [x for x in t if not isinstance(x, str) or not x]
    if bad:
        raise AdapterTypeError(
            f"AdapterSpec.{what} must hold non-empty module names (str), got {bad!r} in {list(t)!r}"
        )
    return t


def exact_targets(names: Iterable[str]) -> str:
    """A ``targets`` regex that selects exactly these site names (no suffix matching: ``fc``
    must not also select ``sub.fc``). Used for sites recorded in placements and checkpoints."""
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


@dataclass(frozen=True)
class AdapterSpec:
    """What to adapt and how.

    targets: a list of name suffixes (PEFT style: ``["q_proj", "v_proj"]`` matches
    ``model.layers.0.self_attn.q_proj``), a regex string matched against the full site
    name, or ``"all-linear"`` (every linear site except the model's output head).
    exclude: same forms; removes sites from the selection.
    trainable: module names (same forms: suffixes or a regex) whose own parameters stay
    trainable and are trained in place, e.g. a new classification head (PEFT's
    ``modules_to_save``, without the per-adapter copy). They are saved with the adapter.
    """

    method: MethodConfig
    targets: Targets = ALL_LINEAR
    exclude: Targets | None = None
    placement: "Placement | None" = field(default=None, compare=False)
    trainable: Targets | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, MethodConfig):
            raise AdapterTypeError(
                f"AdapterSpec.method must be a method config such as peftcompile.LoRA(r=8, alpha=16), "
                f"got {type(self.method).__name__}"
            )
        object.__setattr__(self, "targets", _norm(self.targets, "targets"))
        object.__setattr__(self, "exclude", _norm(self.exclude, "exclude"))
        object.__setattr__(self, "trainable", _norm(self.trainable, "trainable"))
        if self.targets is None:
            raise AdapterTypeError("AdapterSpec.targets must be 'all-linear', a regex or a list of module names, not None")
        for t in (self.targets, self.exclude, self.trainable):
            if isinstance(t, str) and t != ALL_LINEAR:
                try:
                    re.compile(t)
                except re.error as e:
                    raise AdapterError(f"target pattern {t!r} is not a valid regex: {e}") from None

    def with_placement(self, placement: "Placement") -> "AdapterSpec":
        """This spec restricted to a placement's kept sites (warm-started from its weights)."""
        if not placement.sites:
            raise AdapterError("the placement keeps no site; search again with a larger budget")
        return AdapterSpec(self.method, exact_targets(placement.sites), None, placement, self.trainable)

    def to_dict(self) -> dict:
        return {"method": self.method.to_dict(), "targets": _json_targets(self.targets),
                "exclude": _json_targets(self.exclude), "trainable": _json_targets(self.trainable)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "AdapterSpec":
        """The spec of ``to_dict``; AdapterError names what is missing or malformed."""
        if not isinstance(d, Mapping) or not isinstance(d.get("method"), Mapping):
            raise AdapterError(f"an adapter spec needs a 'method' mapping (MethodConfig.to_dict(): {{'method': <registered name>, ...}}), "
                               f"got {d!r:.200}")
        unknown = sorted(set(d) - {"method", "targets", "exclude", "trainable"})
        if unknown:
            raise AdapterError(f"unknown adapter spec field(s) {unknown}; known: method, targets, exclude, trainable")
        return cls(config_from_dict(d["method"]), d.get("targets", ALL_LINEAR), d.get("exclude"),
                   trainable=d.get("trainable"))


def _json_targets(t: Targets | None):
    return list(t) if isinstance(t, tuple) else t


def matches(name: str, t: Targets) -> bool:
    if isinstance(t, str):
        return re.fullmatch(t, name) is not None
    for pat in t:
        if name == pat or name.endswith("." + pat):
            return True
        if any(c in pat for c in "*?[") and fnmatch.fnmatchcase(name, pat):
            return True
    return False


def select_modules(names: Iterable[str], patterns: Targets) -> list[str]:
    """Module names matching ``patterns`` (suffix list or regex), e.g. ``spec.trainable``."""
    return [n for n in names if n and matches(n, patterns)]


def select_sites(names: Iterable[str], spec: AdapterSpec, head: set[str]) -> list[str]:
    """The site names the spec chooses; ``head`` are excluded by ``"all-linear"``."""
    out = []
    for n in names:
        if spec.targets == ALL_LINEAR:
            if n in head:
                continue
        elif not matches(n, spec.targets):
            continue
        if spec.exclude is not None and spec.exclude != ALL_LINEAR and matches(n, spec.exclude):
            continue
        out.append(n)
    return out


@dataclass
class Placement:
    """A decided set of sites (e.g. by the DiffoRA search) that ``adapt`` accepts.

    sites: kept site names; gates: every candidate site -> gate value;
    weights: optional searched adapter tensors {site: {param: tensor}} to warm-start from;
    shared: optional group tensors {group: {param: tensor}} (methods that share, e.g. RaSA).
    The heatmap of the gates is ``peftcompile.diffora.plot_placement(placement, path)``.
    """

    sites: list[str]
    gates: dict[str, float] = field(default_factory=dict)
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    shared: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def save(self, path: str | Path, *, weights: bool = True) -> None:
        """Write sites and gates as JSON. With ``weights`` (default) and searched tensors
        present, they go to a safetensors file next to it (``<path stem>.safetensors``,
        named in the JSON) so ``load`` restores the warm start too."""
        path = Path(path)
        d: dict = {"sites": list(self.sites), "gates": self.gates}
        if weights and (self.weights or self.shared):
            from safetensors.torch import save_file

            side = path.with_suffix(".safetensors")
            if side == path:
                raise ValueError(f"{path}: name the placement file *.json (weights go to {side.name})")
            flat = {f"{_W}{s}.{p}": t for s, ts in self.weights.items() for p, t in ts.items()}
            flat.update({f"{_S}{g}.{p}": t for g, ts in self.shared.items() for p, t in ts.items()})
            tmp = side.with_name(f".{side.name}.tmp")
            save_file({k: t.detach().contiguous().cpu() for k, t in flat.items()}, str(tmp))
            os.replace(tmp, side)  # atomic: a reader never sees a half-written file
            d["weights_file"] = side.name
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(d, indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "Placement":
        path = Path(path)
        d = json.loads(path.read_text())
        if not isinstance(d, dict) or "sites" not in d:
            raise ValueError(f"{path} is not a placement file (expected JSON with 'sites' and 'gates')")
        p = cls(list(d["sites"]), {k: float(v) for k, v in d.get("gates", {}).items()})
        if d.get("weights_file"):
            from safetensors.torch import load_file

            side = path.parent / d["weights_file"]
            if not side.is_file():
                raise FileNotFoundError(f"{path} names weights file {side}, which does not exist; copy it along")
            for key, t in load_file(str(side)).items():
                # params have no dots; site and group names do
                (prefix, store) = (_W, p.weights) if key.startswith(_W) else (_S, p.shared)
                owner, _, param = key[len(prefix):].rpartition(".")
                store.setdefault(owner, {})[param] = t
        return p


_W, _S = "weights.", "shared."
