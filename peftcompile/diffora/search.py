"""DiffoRA: choose adapter sites by differentiable search (arXiv 2502.08905, reconstructed).

Every candidate site (the sites ``spec`` selects) gets the spec's adapter, scaled by a
gate gamma_c in [0, 1]; the gates are a soft top-K of per-site logits (they sum to K,
the number of sites the budget keeps, and compete for it; see
:mod:`peftcompile.diffora.loop`). Adapter weights and gate logits are trained
alternately (first-order DARTS: weights on training batches, gates on validation
batches) while the temperature anneals, so the gates end near 0/1; then the top-K sites
by gate are kept. The result is a :class:`~peftcompile.spec.Placement` that
``adapt(model, spec, placement=p)`` accepts; with ``warm_start=True`` the kept sites
then start from their searched weights (DiffoRA's weight sharing).

The user's model is never modified: every argument is checked first, then the search
runs on ``copy.deepcopy(model)`` (memory: one extra copy of the model during the
search), under ``torch.random.fork_rng`` so the caller's RNG state is untouched too.

RaSA: during the search a group's shared pool has L = (number of candidates in the
group) * k rows; after discretisation only L_kept sites remain. Site i of a group
contributes rows [i*k, (i+1)*k) of the pool (and the matching entries of every
member's diagonal D), so warm start keeps exactly the kept members' rows of A_S, B_S
and of each kept site's D, in member order. A kept site's delta then equals its
searched delta minus the contribution of the dropped members' pool rows (identical
when the whole group is kept).
"""

from __future__ import annotations

import collections.abc as cabc
import copy
import dataclasses
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..api import adapt, adapters_of, set_active
from ..errors import AdapterError
from ..state import SHARED_ATTR, site_adapters
from ..state import state_of
from ..methods import method_for
from ..modules import SharedTensors, SiteAdapter
from ..spec import ALL_LINEAR, AdapterSpec, Placement
from .loop import (
    BiLevelSearch,
    LossFn,
    SearchInputError,
    StepLosses,
    cycle_batches,
    hf_loss,
)

__all__ = ["SEARCH_ADAPTER", "DiffoRASearch", "n_kept", "search"]

#: Name of the temporary adapter the search attaches (on its private copy of the model).
SEARCH_ADAPTER = "diffora_search"


def _check_budget(budget: Any) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (0.0 < budget <= 1.0):
        raise AdapterError(
            f"budget={budget!r} is out of range: it is the fraction of candidate sites to keep, "
            f"valid range (0, 1] (e.g. 0.5 keeps half)"
        )
    return float(budget)


def n_kept(budget: float, n_candidates: int) -> int:
    """How many sites a budget keeps: round(budget * n), half up.

    Raises AdapterError when that is 0 (a budget must keep at least one site).
    """
    k = min(n_candidates, math.floor(budget * n_candidates + 0.5))
    if k < 1:
        raise AdapterError(
            f"budget={budget!r} keeps 0 of the {n_candidates} candidate sites (round(budget * n) = 0); "
            f"pass budget >= {0.5 / n_candidates:.4g} to keep at least one site"
        )
    return k


def _check_int(name: str, v: Any, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        what = {"steps": ("a positive int", "the number of weight/gate alternations"),
                "warmup": ("an int >= 0", "weight-only steps before the gates move")}
        kind, why = what[name]
        raise AdapterError(f"{name} must be {kind} ({why}), got {v!r}")


def _check_steps(steps: Any, warmup: Any) -> None:
    _check_int("steps", steps, 1)
    _check_int("warmup", warmup, 0)


def _check_batches(batches: Any, what: str, default_loss: bool) -> None:
    """Empty or obviously malformed batches are refused before anything is built."""
    if batches is None:
        raise AdapterError(f"{what} is None; pass a non-empty list, DataLoader or iterable of batches")
    if isinstance(batches, (str, bytes, Mapping, torch.Tensor)):
        raise SearchInputError(
            f"{what} must be an iterable of batches (e.g. a list of dicts), got a {type(batches).__name__}; "
            f"wrap a single batch in a list: [{'batch'}]"
        )
    if not isinstance(batches, cabc.Iterable):
        raise SearchInputError(f"{what} must be an iterable of batches, got {type(batches).__name__}")
    try:
        n = len(batches)
    except TypeError:
        return  # not sized: cycle_batches raises on the first empty pass
    if n == 0:
        raise AdapterError(f"{what} is empty; pass at least one batch")
    if default_loss and isinstance(batches, cabc.Sequence) and not isinstance(batches[0], Mapping):
        raise SearchInputError(
            f"{what}[0] is a {type(batches[0]).__name__}: the default loss calls model(**batch) and needs "
            f"dict batches; pass loss_fn=lambda model, batch: ... for other batch types"
        )


Tensors = dict[str, torch.Tensor]


class DiffoRASearch:
    """The search state on a private copy of ``model`` (what :func:`search` drives).

    ``model`` is deep-copied; the copy gets the spec's adapter as ``SEARCH_ADAPTER`` at
    every candidate site (adapters already on the model stay as they were: active ones
    keep running, frozen). ``adapters`` maps candidate site -> its SiteAdapter and
    ``loop`` is the :class:`BiLevelSearch`. Seeding is the caller's job (``search``
    does it).
    """

    def __init__(self, model: nn.Module, spec: AdapterSpec, budget: float = 0.5, *,
                 loss_fn: LossFn | None = None, lr: float = 1e-3, gate_lr: float = 5e-2,
                 weight_decay: float = 1.0, tau_start: float = 1.0, tau_end: float = 0.01) -> None:
        if not isinstance(spec, AdapterSpec):
            raise SearchInputError(f"spec must be a peftcompile.AdapterSpec, got {type(spec).__name__}")
        self.budget = _check_budget(budget)
        # candidates: the targets (every linear site when omitted: the search decides where),
        # with the spec's per-site ranks; not a placement
        self.spec = dataclasses.replace(spec, targets=ALL_LINEAR if spec.targets is None else spec.targets,
                                        placement=None)
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
        params = [c.site for _, _, c in site_adapters(self.model) if c.kind == "param" and name in c]
        if params:  # their SiteAdapters are never called: the gates' forward hooks would never scale them
            raise AdapterError(
                f"DiffoRA search: cannot gate parameter sites {params[:4]} (target_parameters, or PEFT's all-linear "
                f"on a transformers-5 MoE model): their delta is added to a weight, not to a call's output. Fix: "
                f"search the linear sites (targets= a list or regex of linear site names), then adapt the parameters "
                f"with their own spec")
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
        self.k = n_kept(self.budget, len(self.adapters))
        self.loop = BiLevelSearch(self.model, self.adapters, self.k,
                                  [p for sh in self.shared.values() for p in sh.parameters()],
                                  loss_fn=loss_fn, lr=lr, gate_lr=gate_lr, weight_decay=weight_decay,
                                  tau_start=tau_start, tau_end=tau_end)

    @staticmethod
    def _active(model: nn.Module) -> tuple[str, ...]:
        st = state_of(model)
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
        _check_batches(train_batches, "train_batches", self.loop.loss_fn is hf_loss)
        _check_batches(val_batches, "val_batches", self.loop.loss_fn is hf_loss)
        g_train = torch.Generator().manual_seed(seed)
        g_val = torch.Generator().manual_seed(seed + 1)
        train = cycle_batches(train_batches, "train_batches", g_train, shuffle)
        val = cycle_batches(val_batches, "val_batches", g_val, shuffle)
        return self.loop.run(train, val, steps, progress=progress, warmup=warmup)

    def gates(self) -> dict[str, float]:
        """Site -> gate gamma in [0, 1] (they sum to the number of kept sites)."""
        return self.loop.gates.values()

    def placement(self, budget: float | None = None, *, warm_start: bool = True) -> Placement:
        """Keep the top ``budget`` fraction of sites (default: the search's) by gate logit
        (ties: model order), with their searched weights when ``warm_start``."""
        budget = self.budget if budget is None else _check_budget(budget)
        gates = self.gates()
        logits = self.loop.gates.logits.detach().cpu().tolist()  # same order as gamma, no saturation ties
        order = sorted(range(len(self.sites)), key=lambda i: (-logits[i], i))
        keep_idx = sorted(order[: n_kept(budget, len(self.sites))])
        kept = [self.sites[i] for i in keep_idx]
        if not warm_start:
            return Placement(kept, gates)
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
        n_of = {s: len(m) for m in by_group.values() for s in m}
        for s, t in list(weights.items()):
            a = self.adapters[s]
            want = self.method.shapes(self.spec.config_for(s), a.in_features, a.out_features, n_of.get(s, 1))
            bad = {p for p, x in t.items() if tuple(x.shape) != tuple(want.get(p, ()))}
            if bad:  # only reachable for sharing methods without a shrink rule
                weights[s] = {p: x for p, x in t.items() if p not in bad}
        for g, t in shared.items():
            a = self.adapters[by_group[g][0]]
            want = self.method.shared_shapes(self.spec.config_for(by_group[g][0]), a.in_features, a.out_features, len(by_group[g]))
            for p, x in t.items():
                if tuple(x.shape) != tuple(want[p]):
                    raise AssertionError(f"internal: shared {g}.{p} is {tuple(x.shape)}, adapt needs {want[p]}")

    def close(self) -> None:
        """Remove the gate hooks from the working copy."""
        self.loop.gates.detach_()


def search(model: nn.Module, spec: AdapterSpec, train_batches: Iterable, val_batches: Iterable,
           budget: float = 0.5, steps: int = 100, loss_fn: LossFn | None = None, seed: int = 0, *,
           warmup: int | None = None, lr: float = 1e-3, gate_lr: float = 5e-2, weight_decay: float = 1.0,
           tau_start: float = 1.0, tau_end: float = 0.01, warm_start: bool = True,
           shuffle: bool = True, progress: bool = True) -> Placement:
    """Differentiable placement search; returns the kept sites, every gate and the searched weights.

    Args:
        model: the base model (plain module or HF model, possibly already adapted). It is
            not modified: the search runs on a deep copy.
        spec: method (LoRA / GraLoRA / RaSA) and the candidate sites (targets/exclude).
        train_batches, val_batches: iterables of batches, re-iterated cyclically. A
            list/tuple is reshuffled each pass (``shuffle``) with a Generator seeded by ``seed``.
        budget: fraction of candidate sites to keep, in (0, 1]; K = round(budget * n), half
            up, must be >= 1. The gates share a total of K throughout the search.
        steps: number of (weight step, gate step) alternations.
        warmup: weight-only steps before the gates move (default ``steps // 2``): every
            delta starts at zero, so gates judged before the adapters learn only see noise.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default ``model(**batch).loss``.
        seed: seeds adapter init, dropout and data order (the caller's RNG is left as it was).
        lr / weight_decay: AdamW on the adapter weights. The decay matters: it breaks the
            symmetry gamma * B == (gamma / c) * (c * B) that lets a low gate hide behind
            large weights, so sites that carry the fit pull their gates up (measured on
            planted-site problems: 0.1-1.0 recovers them, 0 does not). gate_lr: the logits' step
            at ``tau_start``; it anneals with the temperature (``gate_lr * tau / tau_start``).
        tau_start, tau_end: the gate temperature, annealed geometrically over ``steps``.
        warm_start: return the kept sites' searched weights so ``adapt`` starts from them
            (DiffoRA's weight sharing); ``False``: sites only, ``adapt`` starts fresh.
        progress: show a tqdm bar.

    Returns:
        ``Placement(sites, gates, weights, shared)`` for ``adapt(model, spec, placement=p)``.

    Raises:
        AdapterError (a ValueError) naming the argument: budget outside (0, 1] or keeping
        no site, bad steps/warmup/lr, empty batches, a spec selecting no site of ``model``;
        its subclasses ``SearchInputError`` (also a TypeError: batches or loss of the wrong
        form) and ``SearchLossError`` (also a FloatingPointError: a NaN/inf loss, naming
        the step). In every case ``model`` is left unchanged.
    """
    _check_budget(budget)
    if warmup is None:
        _check_int("steps", steps, 1)
        warmup = steps // 2
    _check_steps(steps, warmup)
    _check_batches(train_batches, "train_batches", loss_fn is None)
    _check_batches(val_batches, "val_batches", loss_fn is None)
    if loss_fn is not None and not callable(loss_fn):
        raise SearchInputError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        s = DiffoRASearch(model, spec, budget, loss_fn=loss_fn, lr=lr, gate_lr=gate_lr, weight_decay=weight_decay,
                          tau_start=tau_start, tau_end=tau_end)
        try:
            s.run(train_batches, val_batches, steps, warmup=warmup, seed=seed, shuffle=shuffle, progress=progress)
            return s.placement(warm_start=warm_start)
        finally:
            s.close()
