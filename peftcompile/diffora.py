"""DiffoRA: choose adapter sites by differentiable search (arXiv 2502.08905, reconstructed).

Every candidate site (the sites ``spec`` selects) gets the spec's adapter and a gate
logit g_c; its delta is scaled by sigmoid(g_c). Adapter weights and gates are trained
alternately (first-order DARTS: weights on training batches, gates on validation
batches, see :mod:`peftcompile.passes.placement`), then the top ``budget`` fraction of
sites by gate value is kept. The result is a :class:`~peftcompile.spec.Placement`
that ``adapt(model, spec, placement=p)`` accepts; the kept sites then start from their
searched weights (DiffoRA's weight sharing).

The user's model is never modified: the search runs on ``copy.deepcopy(model)``
(memory: one extra copy of the model during the search), under ``torch.random.fork_rng``
so the caller's RNG state is untouched too.

RaSA: during the search a group's shared pool has L = (number of candidates in the
group) * k rows; after discretisation only L_kept sites remain. Site i of a group
contributes rows [i*k, (i+1)*k) of the pool (and the matching entries of every
member's diagonal D), so warm start keeps exactly the kept members' rows of A_S, B_S
and of each kept site's D, in member order. A kept site's delta then equals its
searched delta minus the contribution of the dropped members' pool rows (identical
when the whole group is kept).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .api import adapt, adapters_of, set_active
from .errors import AdapterError
from .state import SHARED_ATTR, site_adapters
from .methods import method_for
from .modules import SharedTensors, SiteAdapter
from .passes.placement import BiLevelSearch, LossFn, StepLosses, cycle_batches
from .spec import AdapterSpec, Placement

__all__ = ["search", "DiffoRASearch", "parse_site", "gate_grid", "GateGrid", "plot_placement", "n_kept",
           "SEARCH_ADAPTER"]

#: Name of the temporary adapter the search attaches (on its private copy of the model).
SEARCH_ADAPTER = "diffora_search"


def _check_budget(budget: Any) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (0.0 < budget <= 1.0):
        raise ValueError(
            f"budget={budget!r} is out of range: it is the fraction of candidate sites to keep, "
            f"valid range (0, 1] (e.g. 0.5 keeps half)"
        )
    return float(budget)


def n_kept(budget: float, n_candidates: int) -> int:
    """How many sites a budget keeps: round(budget * n), half up, at least 1."""
    return max(1, min(n_candidates, math.floor(budget * n_candidates + 0.5)))


def _check_steps(steps: Any, warmup: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int (number of weight/gate alternations), got {steps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0 (weight-only steps before the gates move), got {warmup!r}")


def _check_not_empty(batches: Any, what: str) -> None:
    if batches is None:
        raise ValueError(f"{what} is None; pass a non-empty list, DataLoader or iterable of batches")
    try:
        n = len(batches)
    except TypeError:
        return  # not sized: cycle_batches raises on the first empty pass
    if n == 0:
        raise ValueError(f"{what} is empty; pass at least one batch")


Tensors = dict[str, torch.Tensor]


class DiffoRASearch:
    """The search state on a private copy of ``model`` (what :func:`search` drives).

    ``model`` is deep-copied; the copy gets the spec's adapter as ``SEARCH_ADAPTER`` at
    every candidate site (adapters already on the model stay as they were: active ones
    keep running, frozen). ``adapters`` maps candidate site -> its SiteAdapter and
    ``loop`` is the :class:`BiLevelSearch`. Seeding is the caller's job (``search``
    does it).
    """

    def __init__(self, model: nn.Module, spec: AdapterSpec, *, loss_fn: LossFn | None = None,
                 lr: float = 1e-3, gate_lr: float = 1e-2, weight_decay: float = 0.0) -> None:
        if not isinstance(spec, AdapterSpec):
            raise TypeError(f"spec must be a peftcompile.AdapterSpec, got {type(spec).__name__}")
        self.spec = AdapterSpec(spec.method, spec.targets, spec.exclude)  # candidates: targets, not a placement
        self.method = method_for(spec.method)
        self.model = copy.deepcopy(model)
        before = adapters_of(self.model)
        name = SEARCH_ADAPTER
        while name in before:
            name += "_"
        self.name = name
        prev_active = self._active(self.model)
        try:
            adapt(self.model, self.spec, name)
        except AdapterError as e:
            raise AdapterError(f"DiffoRA search: cannot attach the candidate adapters: {e}") from None
        if prev_active:  # keep the model computing what the user's model computes
            set_active(self.model, (*prev_active, name))
            for _, _, cont in site_adapters(self.model):
                for n, a in cont.items():
                    a.requires_grad_(n == name)
            for n, sh in (getattr(self.model, SHARED_ATTR, None) or {}).items():
                sh.requires_grad_(n == name)
        self.adapters: dict[str, SiteAdapter] = {
            cont.site: cont[name] for _, _, cont in site_adapters(self.model) if name in cont
        }
        self.shared: dict[str, SharedTensors] = {}
        root = getattr(self.model, SHARED_ATTR, None)
        if root is not None and name in root:
            self.shared = {sh.group: sh for sh in root[name].values()}
        self.loop = BiLevelSearch(self.model, self.adapters,
                                  [p for sh in self.shared.values() for p in sh.parameters()],
                                  loss_fn=loss_fn, lr=lr, gate_lr=gate_lr, weight_decay=weight_decay)

    @staticmethod
    def _active(model: nn.Module) -> tuple[str, ...]:
        from .state import state_of as _state

        st = _state(model)
        return tuple(st.active) if st else ()

    @property
    def sites(self) -> list[str]:
        """Candidate sites, in model order."""
        return list(self.adapters)

    def run(self, train_batches: Iterable, val_batches: Iterable, steps: int, *, warmup: int = 0,
            seed: int = 0, shuffle: bool = True, progress: bool = True) -> list[StepLosses]:
        """``warmup`` weight-only steps, then ``steps`` alternations (weight step, gate step);
        data order from Generators seeded by ``seed``."""
        _check_steps(steps, warmup)
        _check_not_empty(train_batches, "train_batches")
        _check_not_empty(val_batches, "val_batches")
        g_train = torch.Generator().manual_seed(seed)
        g_val = torch.Generator().manual_seed(seed + 1)
        train = cycle_batches(train_batches, "train_batches", g_train, shuffle)
        val = cycle_batches(val_batches, "val_batches", g_val, shuffle)
        return self.loop.run(train, val, steps, progress=progress, warmup=warmup)

    def gates(self) -> dict[str, float]:
        return self.loop.gates.values()

    def placement(self, budget: float) -> Placement:
        """Keep the top ``budget`` fraction of sites by gate value (ties: model order) with their weights."""
        budget = _check_budget(budget)
        gates = self.gates()
        order = sorted(range(len(self.sites)), key=lambda i: (-gates[self.sites[i]], i))
        keep_idx = sorted(order[: n_kept(budget, len(self.sites))])
        kept = [self.sites[i] for i in keep_idx]
        weights, shared = self._kept_tensors(kept)
        return Placement(kept, gates, weights, shared)

    def _kept_tensors(self, kept: list[str]) -> tuple[dict[str, Tensors], dict[str, Tensors]]:
        def own(s: str) -> Tensors:
            return {p: t.detach().clone() for p, t in self.adapters[s]._parameters.items()}

        weights = {s: own(s) for s in kept}
        shared: dict[str, Tensors] = {}
        if not self.method.shares:
            return weights, shared
        by_group: dict[str, list[str]] = defaultdict(list)
        for s in kept:
            by_group[self.adapters[s].group].append(s)
        rule = self.method.shrink_group
        for group, members_kept in by_group.items():
            sh = self.shared[group]
            pool = {p: t.detach().clone() for p, t in sh._parameters.items()}
            if rule is not None:
                new_sites, shared[group] = rule(sh.cfg, list(sh.members), members_kept,
                                                {s: weights[s] for s in members_kept}, pool)
                weights.update(new_sites)
            elif len(members_kept) == len(sh.members):
                shared[group] = pool
            else:
                warnings.warn(
                    f"{self.method.name}: no rule to shrink the shared tensors of group {group!r} from "
                    f"{len(sh.members)} to {len(members_kept)} sites; its shared tensors start fresh",
                    stacklevel=3,
                )
        self._check_shapes(weights, shared, by_group)
        return weights, shared

    def _check_shapes(self, weights, shared, by_group) -> None:
        """What adapt will build for the kept sites must match what we hand it."""
        cfg = self.spec.method
        n_of = {s: len(m) for m in by_group.values() for s in m}
        for s, t in list(weights.items()):
            a = self.adapters[s]
            want = self.method.shapes(cfg, a.in_features, a.out_features, n_of.get(s, 1))
            bad = {p for p, x in t.items() if tuple(x.shape) != tuple(want.get(p, ()))}
            if bad:  # only reachable for sharing methods without a shrink rule
                weights[s] = {p: x for p, x in t.items() if p not in bad}
        for g, t in shared.items():
            a = self.adapters[by_group[g][0]]
            want = self.method.shared_shapes(cfg, a.in_features, a.out_features, len(by_group[g]))
            for p, x in t.items():
                if tuple(x.shape) != tuple(want[p]):
                    raise AssertionError(f"internal: shared {g}.{p} is {tuple(x.shape)}, adapt needs {want[p]}")

    def close(self) -> None:
        """Remove the gate hooks from the working copy."""
        self.loop.gates.detach_()


def search(model: nn.Module, spec: AdapterSpec, train_batches: Iterable, val_batches: Iterable,
           budget: float = 0.5, steps: int = 100, loss_fn: LossFn | None = None, seed: int = 0, *,
           warmup: int = 0, lr: float = 1e-3, gate_lr: float = 1e-2, weight_decay: float = 0.0,
           shuffle: bool = True, progress: bool = True) -> Placement:
    """Differentiable placement search; returns the kept sites, every gate and the searched weights.

    Args:
        model: the base model (plain module or HF model, possibly already adapted). It is
            not modified: the search runs on a deep copy.
        spec: method (LoRA / GraLoRA / RaSA) and the candidate sites (targets/exclude).
        train_batches, val_batches: iterables of batches, re-iterated cyclically. A
            list/tuple is reshuffled each pass (``shuffle``) with a Generator seeded by ``seed``.
        budget: fraction of candidate sites to keep, in (0, 1]; round half up, at least one.
        steps: number of (weight step, gate step) alternations.
        warmup: weight-only steps before the alternation starts (the gates of still-zero
            deltas get no useful signal; a few dozen steps make the ranking much steadier).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default ``model(**batch).loss``.
        seed: seeds adapter init, dropout and data order (the caller's RNG is left as it was).
        lr / weight_decay: AdamW on the adapter weights; gate_lr: Adam on the gate logits.
        progress: show a tqdm bar.

    Returns:
        ``Placement(sites, gates, weights, shared)`` for ``adapt(model, spec, placement=p)``.

    Raises:
        ValueError: budget outside (0, 1], empty batches, bad steps/lr.
        AdapterError: the spec selects no site of ``model`` (or adapt refuses it otherwise).
        FloatingPointError: a NaN/inf loss (the message names the step).
    """
    _check_budget(budget)
    _check_steps(steps, warmup)
    _check_not_empty(train_batches, "train_batches")
    _check_not_empty(val_batches, "val_batches")
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        s = DiffoRASearch(model, spec, loss_fn=loss_fn, lr=lr, gate_lr=gate_lr, weight_decay=weight_decay)
        try:
            s.run(train_batches, val_batches, steps, warmup=warmup, seed=seed, shuffle=shuffle, progress=progress)
            return s.placement(budget)
        finally:
            s.close()


# --- plotting -------------------------------------------------------------------------

_NUM = re.compile(r"^\d+$")


def parse_site(name: str) -> tuple[str, int | None, str]:
    """(block prefix, layer index, module type) from a site name.

    The first all-digit component is the layer: ``model.layers.3.self_attn.q_proj`` ->
    ("model.layers", 3, "self_attn.q_proj"); ``blocks.2`` -> ("blocks", 2, "blocks");
    a name without one -> ("", None, name).
    """
    parts = name.split(".")
    for i, p in enumerate(parts):
        if _NUM.match(p):
            prefix = ".".join(parts[:i])
            return prefix, int(p), ".".join(parts[i + 1:]) or prefix or p
    return "", None, name


@dataclass
class GateGrid:
    """Gate values laid out as layers x module types (NaN where a layer lacks that type)."""

    rows: list[str]  # layer labels ("3", or "encoder.layer.3" when prefixes differ; "(no layer)")
    cols: list[str]  # module types, in first-seen order
    values: np.ndarray  # [rows, cols] gate values
    kept: np.ndarray  # [rows, cols] bool: cell holds a kept site
    cell: dict[str, tuple[int, int]]  # site -> (row, col)
    ylabel: str


def gate_grid(placement: Placement) -> GateGrid:
    """Arrange a placement's gates by (layer, module type) using :func:`parse_site`.

    Rows with the same block prefix are sorted by index; sites without an index share
    the last row, "(no layer)".
    """
    gates = dict(placement.gates)
    for s in placement.sites:
        gates.setdefault(s, float("nan"))
    if not gates:
        raise ValueError("placement has no sites and no gates to plot")
    parsed = {s: parse_site(s) for s in gates}
    prefixes = list(dict.fromkeys(p for p, i, _ in parsed.values() if i is not None))
    rows = sorted({(p, i) for p, i, _ in parsed.values() if i is not None},
                  key=lambda r: (prefixes.index(r[0]), r[1]))
    if any(i is None for _, i, _ in parsed.values()):
        rows.append(("", None))
    cols = list(dict.fromkeys(t for _, _, t in parsed.values()))
    values = np.full((len(rows), len(cols)), np.nan)
    kept = np.zeros((len(rows), len(cols)), dtype=bool)
    cell = {}
    keep = set(placement.sites)
    for s, (p, i, t) in parsed.items():
        r, c = rows.index((p, i)), cols.index(t)
        values[r, c] = gates[s]
        kept[r, c] |= s in keep
        cell[s] = (r, c)

    def label(p: str, i: int | None) -> str:
        if i is None:
            return "(no layer)"
        return str(i) if len(prefixes) == 1 else f"{p}.{i}"

    ylabel = prefixes[0] if len(prefixes) == 1 and prefixes[0] else "layer"
    return GateGrid([label(*r) for r in rows], cols, values, kept, cell, ylabel)


def plot_placement(placement: Placement, path: str | Path, *, title: str | None = None) -> Path:
    """Heatmap of gate values (rows: layers, columns: module types); kept sites framed in red.

    Written with the Agg canvas directly, so no pyplot state or global backend is touched.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    g = gate_grid(placement)
    nr, nc = g.values.shape
    fig = Figure(figsize=(max(4.0, 1.5 + 0.9 * nc), max(2.5, 1.4 + 0.35 * nr)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: no site there
    im = ax.imshow(np.ma.masked_invalid(g.values), cmap=cmap, aspect="auto")
    fig.colorbar(im, ax=ax, label="gate sigmoid(g)")
    ax.set_xticks(range(nc), labels=g.cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(nr), labels=g.rows, fontsize=8)
    ax.set_xlabel("module type")
    ax.set_ylabel(g.ylabel)
    for r, c in zip(*np.nonzero(g.kept)):
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    if g.values.size <= 400:  # numbers stay legible only on small grids
        for r, c in zip(*np.nonzero(~np.isnan(g.values))):
            bright = im.norm(g.values[r, c]) > 0.6  # viridis turns yellow: dark text there
            ax.text(c, r, f"{g.values[r, c]:.3f}", ha="center", va="center", fontsize=6,
                    color="black" if bright else "white")
    n_cand = len(placement.gates) or len(placement.sites)
    ax.set_title(title or f"DiffoRA gates: {len(placement.sites)}/{n_cand} sites kept (red)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
