"""AdapterSpec: which method, at which sites; and Placement, a decided set of sites."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import torch

from .errors import AdapterError, AdapterTypeError
from .methods import MethodConfig, config_from_dict, method_for

__all__ = ["AdapterSpec", "Placement", "Targets", "select_modules", "select_sites", "exact_targets",
           "default_targets", "layer_index", "param_targeted"]

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
    name, or ``"all-linear"`` (every linear site except the model's output head). ``None``
    (the default): PEFT's default targets for the method and the model's architecture
    (``model.config.model_type`` in PEFT's table, e.g. ``["q_proj", "v_proj"]`` for Llama),
    and ``"all-linear"`` where PEFT has no default (PEFT raises there).
    exclude: same forms; removes sites from the selection.
    trainable: module names (same forms: suffixes or a regex) whose own parameters stay
    trainable, e.g. a new classification head (PEFT's ``modules_to_save``): each adapter
    has its own copy of their values, swapped into the same parameters when adapters are
    switched or disabled (``peftcompile.copies``); they are saved with the adapter.
    rank_pattern / alpha_pattern: PEFT's per-site overrides of the method's ``r`` /
    ``alpha``: ``{pattern: value}``, a site takes the value of the first pattern ``p`` with
    ``re.match(rf"(.*\.)?({p})$", site)`` (PEFT's ``get_pattern_key``).
    layers_to_transform / layers_pattern: PEFT's layer filter: keep only sites whose layer
    index (the number after ``layers_pattern``, e.g. ``"layers"``; by default the first
    ``.<name>.<number>.`` in the site name) is in ``layers_to_transform`` (an int or ints).
    target_parameters: names of parameters that a module uses itself (PEFT's
    ``target_parameters``), e.g. ``["gate_up_proj", "down_proj"]`` for transformers-5 MoE
    experts stored as [experts, out, in] tensors, or a router's 2-D ``"gate.weight"``: the
    key ``<module>.<param>`` is selected when it equals a name or ends with ``.<name>``
    (PEFT's rule; ``exclude`` and the layer filters do not apply to them, as in PEFT). The
    module's own forward then runs on ``W + dW`` (one LoRA pair per expert). LoRA only.
    task_type: PEFT's task type; ``"SEQ_CLS"`` / ``"TOKEN_CLS"`` add the heads PEFT adds to
    ``modules_to_save`` (``classifier``, ``score``) and ``"QUESTION_ANS"`` adds ``qa_outputs``
    to ``trainable``; the other task types add nothing.
    bias: PEFT's ``bias`` option: ``"all"`` trains every bias of the base model (PEFT's rule:
    parameters named ``bias``), ``"lora_only"`` the biases of the adapted sites'
    modules, ``"none"`` (or None, the default) none. Unlike PEFT, where those biases are
    shared by every adapter and stay trained when adapters are disabled, each adapter gets
    its own copy of them, as for ``trainable`` (so ``disabled()`` is the base model exactly).
    """

    method: MethodConfig
    targets: Targets | None = None
    exclude: Targets | None = None
    placement: "Placement | None" = field(default=None, compare=False)
    trainable: Targets | None = None
    rank_pattern: Mapping[str, int] | None = None
    alpha_pattern: Mapping[str, float] | None = None
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    task_type: str | None = None
    bias: str | None = None
    target_parameters: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, MethodConfig):
            raise AdapterTypeError(
                f"AdapterSpec.method must be a method config such as peftcompile.LoRA(r=8, alpha=16), "
                f"got {type(self.method).__name__}"
            )
        object.__setattr__(self, "targets", _norm(self.targets, "targets"))
        object.__setattr__(self, "exclude", _norm(self.exclude, "exclude"))
        if isinstance(self.target_parameters, str):
            raise AdapterTypeError(f"AdapterSpec.target_parameters must be a list of parameter names (PEFT's rule: no "
                                   f"regex), got the string {self.target_parameters!r}; pass "
                                   f"[{self.target_parameters!r}]")
        object.__setattr__(self, "target_parameters", _norm(self.target_parameters, "target_parameters") or None)
        object.__setattr__(self, "trainable", _with_task_heads(_norm(self.trainable, "trainable"), self.task_type))
        object.__setattr__(self, "task_type", getattr(self.task_type, "value", self.task_type))
        for t in (self.targets, self.exclude, self.trainable):
            if isinstance(t, str) and t != ALL_LINEAR:
                _check_regex(t, "target pattern")
        object.__setattr__(self, "rank_pattern", self._pattern("rank_pattern", "r"))
        object.__setattr__(self, "alpha_pattern", self._pattern("alpha_pattern", "alpha"))
        object.__setattr__(self, "layers_to_transform", _norm_layers(self.layers_to_transform))
        if not (self.bias is None or isinstance(self.bias, str)) or self.bias not in BIAS_OPTIONS:
            raise AdapterError(f"AdapterSpec.bias={self.bias!r} is not one of PEFT's options {list(BIAS_OPTIONS)[1:]}")
        object.__setattr__(self, "bias", BIAS_OPTIONS[self.bias])
        lp = _norm(self.layers_pattern, "layers_pattern")
        for pat in ([lp] if isinstance(lp, str) else lp or ()):
            _check_regex(pat, "layers_pattern")
        object.__setattr__(self, "layers_pattern", lp)
        if lp and self.layers_to_transform is None:
            raise AdapterError(f"AdapterSpec.layers_pattern={lp!r} needs layers_to_transform (the layer indices to "
                               f"keep); it selects nothing by itself")

    def _pattern(self, what: str, fld: str) -> dict | None:
        """A validated copy of rank_pattern / alpha_pattern (None when empty)."""
        pat = getattr(self, what)
        if pat is None or (isinstance(pat, Mapping) and not pat):
            return None
        if not isinstance(pat, Mapping):
            raise AdapterTypeError(f"AdapterSpec.{what} must map site patterns to values, got {pat!r}")
        if fld not in {f.name for f in dataclasses.fields(self.method)}:
            raise AdapterError(f"AdapterSpec.{what}: {type(self.method).__name__} has no {fld!r} to override; "
                               f"remove {what}")
        out = {}
        for k, v in pat.items():
            if not isinstance(k, str) or not k:
                raise AdapterTypeError(f"AdapterSpec.{what} keys must be non-empty site patterns (str), got {k!r}")
            _check_regex(k, f"{what} key")
            bad = (not isinstance(v, int) or isinstance(v, bool) or v < 1) if fld == "r" else \
                (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v == 0)
            if bad:
                want = "an int >= 1" if fld == "r" else "a finite, non-zero number"
                raise AdapterError(f"AdapterSpec.{what}[{k!r}] = {v!r}: {fld} must be {want}")
            out[k] = v
        return out

    def config_for(self, site: str) -> MethodConfig:
        """The method config at ``site``: ``method`` with its rank/alpha patterns applied."""
        changes = {}
        for what, fld in (("rank_pattern", "r"), ("alpha_pattern", "alpha")):
            key = pattern_key(getattr(self, what) or {}, site)
            if key is not None:
                changes[fld] = getattr(self, what)[key]
        if not changes:
            return self.method
        try:
            return dataclasses.replace(self.method, **changes)
        except (AdapterError, ValueError, TypeError) as e:
            raise AdapterError(f"{site}: the rank/alpha pattern gives {changes}, which {type(self.method).__name__} "
                               f"refuses: {e}") from None

    def keeps_layer(self, site: str) -> bool:
        """PEFT's ``layers_to_transform`` filter (True when it is not set)."""
        if self.layers_to_transform is None:
            return True
        idx = layer_index(site, self.layers_pattern)
        return idx is not None and idx in self.layers_to_transform

    def with_placement(self, placement: "Placement") -> "AdapterSpec":
        """This spec restricted to a placement's kept sites (warm-started from its weights)."""
        if not placement.sites:
            raise AdapterError("the placement keeps no site; search again with a larger budget")
        return self.restricted(placement.sites, placement)

    def restricted(self, sites: Iterable[str], placement: "Placement | None" = None) -> "AdapterSpec":
        """This spec at exactly ``sites`` (patterns and trainable kept; target filters spent)."""
        sites = list(sites)
        params = tuple(s for s in sites if param_targeted(s, self.target_parameters)) if self.target_parameters else ()
        return dataclasses.replace(self, targets=exact_targets(s for s in sites if s not in params), exclude=None,
                                   placement=placement, layers_to_transform=None, layers_pattern=None,
                                   target_parameters=params or None)

    def to_dict(self) -> dict:
        d = {"method": self.method.to_dict(), "targets": _json_targets(self.targets),
             "exclude": _json_targets(self.exclude), "trainable": _json_targets(self.trainable)}
        for k in _OPTIONAL:
            v = getattr(self, k)
            if v is not None:
                d[k] = _json_targets(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "AdapterSpec":
        """The spec of ``to_dict``; AdapterError names what is missing or malformed."""
        if not isinstance(d, Mapping) or not isinstance(d.get("method"), Mapping):
            raise AdapterError(f"an adapter spec needs a 'method' mapping (MethodConfig.to_dict(): {{'method': <registered name>, ...}}), "
                               f"got {d!r:.200}")
        known = {"method", "targets", "exclude", "trainable", *_OPTIONAL}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AdapterError(f"unknown adapter spec field(s) {unknown}; known: {sorted(known)}")
        return cls(config_from_dict(d["method"]), d.get("targets", ALL_LINEAR), d.get("exclude"),
                   trainable=d.get("trainable"), **{k: d.get(k) for k in _OPTIONAL})


_OPTIONAL = ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "task_type", "bias",
             "target_parameters")

#: AdapterSpec.bias values (PEFT's ``bias``) -> the stored form
BIAS_OPTIONS = {None: None, "none": None, "all": "all", "lora_only": "lora_only"}

#: PEFT's task types -> the heads its PeftModelFor<task> adds to modules_to_save.
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",), "CAUSAL_LM": (), "SEQ_2_SEQ_LM": (), "FEATURE_EXTRACTION": ()}


def _with_task_heads(trainable: Targets | None, task_type: object) -> Targets | None:
    if task_type is None:
        return trainable
    task = getattr(task_type, "value", task_type)  # peft.TaskType is a str enum
    if task not in TASK_HEADS:
        raise AdapterError(f"AdapterSpec.task_type={task_type!r} is not one of PEFT's task types {sorted(TASK_HEADS)}")
    heads = TASK_HEADS[task]
    if not heads:
        return trainable
    if isinstance(trainable, str):
        raise AdapterError(f"AdapterSpec.task_type={task!r} adds the heads {list(heads)} to trainable, which is a regex "
                           f"({trainable!r}); pass trainable as a list of module names")
    return tuple(dict.fromkeys((*(trainable or ()), *heads)))


def _check_regex(t: str, what: str) -> None:
    try:
        re.compile(t)
    except re.error as e:
        raise AdapterError(f"{what} {t!r} is not a valid regex: {e}") from None


def _norm_layers(v: object) -> tuple[int, ...] | None:
    if v is None:
        return None
    vals = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    try:
        vals = tuple(vals)
    except TypeError:
        vals = None
    if vals is None or not vals or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in vals):
        raise AdapterTypeError(f"AdapterSpec.layers_to_transform must be a layer index or a non-empty list of "
                               f"indices (ints >= 0), got {v!r}")
    return vals


def param_targeted(key: str, names: Sequence[str]) -> bool:
    """PEFT's rule for a parameter key ``<module>.<param>`` and ``target_parameters``."""
    return key in names or any(key.endswith(f".{t}") for t in names)


def pattern_matches(pattern: str, site: str) -> bool:
    """PEFT's rule for one rank/alpha pattern key: ``re.match(rf"(.*\.)?({p})$", site)``."""
    return re.match(rf"(.*\.)?({pattern})$", site) is not None


def pattern_key(patterns: Mapping[str, object], site: str) -> str | None:
    """The first key of a rank/alpha pattern that applies to ``site`` (PEFT's ``get_pattern_key``), or None."""
    return next((p for p in patterns if pattern_matches(p, site)), None)


def layer_index(site: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The layer number of a site name as PEFT reads it for ``layers_to_transform``: the
    first number after one of ``layers_pattern`` (or, without it, the first
    ``.<name>.<number>.``); None if the name has none."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", site)
    else:
        m = None
        for pat in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", site)
            if m is not None:
                break
    return None if m is None else int(m.group("idx"))


def default_targets(model: object, method: MethodConfig) -> Targets:
    """PEFT's default targets for ``method`` on the model's architecture (its
    ``config.model_type``), or ``"all-linear"`` where PEFT has none (plain modules,
    architectures not in PEFT's table, methods PEFT does not have)."""
    fmt = method_for(method).peft
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    found = fmt.default_targets(model_type) if fmt and fmt.default_targets and isinstance(model_type, str) else None
    return tuple(found) if found else ALL_LINEAR


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
        if not spec.keeps_layer(n):
            continue
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
