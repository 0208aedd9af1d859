"""DiffoRA gate machinery: budget-coupled gates on the candidate adapters and the bi-level loop.

Relaxation. DiffoRA's Differential Adaptation Matrix holds one binary entry per candidate
site (adapter on / off) under a budget of K kept sites. We relax it to gates
``gamma_c = sigmoid((g_c - theta) / tau)`` where the threshold ``theta`` is solved for so
that ``sum_c gamma_c = K`` (a soft top-K). Three things follow that independent sigmoid
gates do not have:

* competition: the gradient reaching g_c is ``gamma_c (1 - gamma_c) / tau * (s_c - s_bar)``
  with ``s_c = dL/dgamma_c`` and ``s_bar`` the (gamma(1-gamma)-weighted) mean over sites,
  so a gate rises only if its site lowers the validation loss *more than the others*.
  Independent gates all rise together, because every extra adapter lowers the loss;
* the budget holds throughout: at initialisation (all logits 0) every gate is K/N, and the
  total adapter "mass" never changes;
* annealing ``tau`` (``tau_start`` -> ``tau_end``, geometric) drives the gates to 0/1, so
  the discretised placement (top K) is what the search was already running: the kept sites
  end near gamma = 1 and their searched weights are a faithful warm start.

``theta`` is found by bisection (no gradient) and re-attached with its implicit gradient
``d theta / d g_c = w_c / sum w`` (w = gamma (1 - gamma)), which is exactly the gradient
of the constrained map; ``test_diffora`` checks it against central differences.

Why hooks: the rewritten graphs call the live :class:`~peftcompile.modules.SiteAdapter`
module, so a forward hook scales each delta by its gate without touching the graph, the
method's math or any core module; removing the hooks gives the plain adapters back.

The loop is DARTS first-order (arXiv 1806.09055, eq. 7 with xi = 0): alternately one
AdamW step on the adapter weights with the training loss and one Adam step on the gate
logits with the validation loss, each loss reaching only its own parameters (switched
with ``requires_grad``). The gate step size anneals with the temperature (``set_tau``).
"""

from __future__ import annotations

import collections.abc as cabc
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError
from ..modules import SiteAdapter

__all__ = [
    "BiLevelSearch",
    "Gates",
    "LossFn",
    "SearchInputError",
    "SearchLossError",
    "StepLosses",
    "cycle_batches",
    "hf_loss",
    "soft_top_k",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class SearchInputError(AdapterError, TypeError):
    """A batch or loss of the wrong form (an AdapterError that is also a TypeError)."""


class SearchLossError(AdapterError, FloatingPointError):
    """A NaN/inf loss during the search (an AdapterError that is also a FloatingPointError)."""


def soft_top_k(logits: torch.Tensor, k: float, tau: float, iters: int = 64) -> torch.Tensor:
    """``sigmoid((logits - theta) / tau)`` with ``theta`` such that the result sums to ``k``.

    Differentiable in ``logits`` (implicit gradient of theta). ``0 < k < len(logits)``.
    """
    n = logits.numel()
    if not 0 < k < n:
        raise ValueError(f"soft_top_k needs 0 < k < {n}, got k={k}")
    z = logits.detach().double()
    lo, hi = z.min().item() - 50.0 * tau, z.max().item() + 50.0 * tau  # sum(lo) ~ n, sum(hi) ~ 0
    for _ in range(iters):  # sum of sigmoids is decreasing in theta: bisection
        mid = 0.5 * (lo + hi)
        if torch.sigmoid((z - mid) / tau).sum().item() > k:
            lo = mid
        else:
            hi = mid
    theta0 = 0.5 * (lo + hi)
    gam = torch.sigmoid((z - theta0) / tau)
    w = (gam * (1 - gam)).to(logits.dtype)
    ws = w.sum()
    # value theta0; gradient d theta / d g = w / sum(w) (implicit function theorem on sum = k)
    theta = theta0 + ((w * (logits - logits.detach())).sum() / ws if ws > 0 else 0.0)
    return torch.sigmoid((logits - theta) / tau)


class Gates(nn.Module):
    """One gate logit per candidate site; ``attach_`` makes each site's delta ``delta * gamma_c``.

    ``k`` is the number of sites the budget keeps; gamma = ``soft_top_k(logits, k, tau)``
    (all ones when ``k`` equals the number of sites: nothing to choose).
    """

    def __init__(self, adapters: Mapping[str, SiteAdapter], k: int, tau: float = 1.0) -> None:
        super().__init__()
        if not adapters:
            raise ValueError("Gates needs at least one candidate site")
        self.sites: list[str] = list(adapters)
        if not 1 <= k <= len(self.sites):
            raise ValueError(f"k must be in [1, {len(self.sites)}], got {k}")
        self.k = int(k)
        self.tau = float(tau)
        self.budget = float(k)  # the gates' total
        self._adapters = dict(adapters)  # plain dict: the adapters belong to the model, not to us
        dev = next(iter(adapters.values())).tensors()
        device = next(iter(dev.values())).device
        # fp32 logits whatever the model dtype: Adam on bf16 logits would round small steps away.
        self.logits = nn.Parameter(torch.zeros(len(self.sites), device=device))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # During one loss evaluation gamma is computed once and shared by every site (and by
        # several forward passes, e.g. a contrastive loss encoding queries and documents).
        self._caching = False
        self._gamma: torch.Tensor | None = None

    def gamma(self) -> torch.Tensor:
        """The relaxed DAM entries, one per site, in [0, 1], summing to the current budget."""
        # float64: cheap for a few hundred sites, and the hooks cast to the model's dtype
        logits = self.logits.double()
        if self.budget >= len(self.sites) - 1e-6:
            return torch.ones_like(logits) + 0.0 * logits
        return soft_top_k(logits, self.budget, self.tau)

    def values(self) -> dict[str, float]:
        """Site -> gamma, as plain floats."""
        with torch.no_grad():
            g = self.gamma().cpu().tolist()
        return dict(zip(self.sites, g))

    def attach_(self) -> Gates:
        """Register the scaling hooks (in place on the adapters)."""
        if self._handles:
            raise RuntimeError("gates are already attached")
        for i, site in enumerate(self.sites):
            self._handles.append(self._adapters[site].register_forward_hook(self._hook(i)))
        return self

    def detach_(self) -> None:
        """Remove every hook: the adapters compute their plain deltas again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def caching(self, on: bool) -> None:
        """Compute gamma once and reuse it until ``caching(False)`` (one loss evaluation)."""
        self._caching = bool(on)
        self._gamma = None

    def _hook(self, i: int):
        def scale(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if not self._caching:
                return out * self.gamma()[i].to(out.dtype)
            if self._gamma is None:
                self._gamma = self.gamma()
            return out * self._gamma[i].to(out.dtype)

        return scale


def hf_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Default loss: ``model(**batch).loss`` (the HF convention: put ``labels`` in the batch)."""
    if not isinstance(batch, Mapping):
        raise SearchInputError(
            f"the default loss calls model(**batch) and needs dict batches, got {type(batch).__name__}; "
            f"pass loss_fn=lambda model, batch: ... for other batch types"
        )
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise AdapterError(
            f"{type(model).__name__}(**batch) returned no .loss; put 'labels' in each batch or pass loss_fn"
        )
    return loss


def cycle_batches(batches: Iterable, what: str, generator: torch.Generator, shuffle: bool) -> Iterator:
    """Yield batches forever, re-iterating ``batches`` after each pass.

    A list/tuple is visited in a fresh ``generator`` permutation each pass when
    ``shuffle``; other re-iterables (DataLoader, ...) are re-iterated as they are; a
    one-shot iterator (generator) is cached during its first pass and replayed.
    Raises AdapterError if a pass yields nothing.
    """
    one_shot = isinstance(batches, cabc.Iterator)
    seq = isinstance(batches, cabc.Sequence) and not isinstance(batches, (str, bytes))
    cache: list | None = [] if one_shot else None
    first = True
    while True:
        if seq:
            order = torch.randperm(len(batches), generator=generator).tolist() if shuffle else range(len(batches))
            it: Iterable = (batches[i] for i in order)
        elif one_shot and not first:
            it = cache
        else:
            it = batches
        n = 0
        for b in it:
            n += 1
            if cache is not None and first:
                cache.append(b)
            yield b
        if n == 0:
            raise AdapterError(f"{what} yielded no batches; pass a non-empty list, DataLoader or iterable")
        first = False


class SharedScaleAdam:
    """Adam on the gate logits with ONE second-moment scale for the whole vector.

    Per-element Adam divides each logit's gradient by its own RMS, so a site with a
    small but steady gradient moves as fast as one with a large gradient: the ranking
    would follow the sign of each gradient, not its size. A shared scale keeps the sites'
    relative gradient magnitudes (which is what tells them apart) while the step size
    stays ~lr whatever the loss scale. beta1 = 0.5 as DARTS' architecture optimizer.
    """

    def __init__(self, param: nn.Parameter, lr: float, betas: tuple[float, float] = (0.5, 0.999),
                 eps: float = 1e-12) -> None:
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros((), dtype=param.dtype, device=param.device)
        self.t = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        g = self.param.grad
        if g is None:
            return
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).add_((g * g).mean(), alpha=1 - b2)
        m_hat = self.m / (1 - b1 ** self.t)
        v_hat = self.v / (1 - b2 ** self.t)
        self.param.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


@dataclass
class StepLosses:
    step: int
    train: float
    val: float
    tau: float = float("nan")


class BiLevelSearch:
    """First-order DARTS over budget-coupled gate logits on an already adapted model.

    ``adapters`` are the candidate SiteAdapter modules (site -> module) of the search adapter;
    their parameters (and ``shared``, e.g. RaSA pools) are the weights; ``k`` sites are
    kept. The model is changed in place (hooks, optimizer updates): run it on a copy you own.
    """

    def __init__(self, model: nn.Module, adapters: Mapping[str, SiteAdapter], k: int,
                 shared: Iterable[nn.Parameter] = (), *, loss_fn: LossFn | None = None,
                 lr: float = 1e-3, gate_lr: float = 5e-2, weight_decay: float = 0.0,
                 tau_start: float = 1.0, tau_end: float = 0.01) -> None:
        for name, v in (("lr", lr), ("gate_lr", gate_lr), ("tau_start", tau_start), ("tau_end", tau_end)):
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise AdapterError(f"{name} must be a positive number, got {v!r}")
        if tau_end > tau_start:
            raise AdapterError(f"tau_end={tau_end} must be <= tau_start={tau_start} (the temperature anneals down)")
        self.model = model
        self.loss_fn = loss_fn or hf_loss
        self.tau_start, self.tau_end = float(tau_start), float(tau_end)
        self.gates = Gates(adapters, k, tau_start).attach_()
        seen: set[int] = set()
        self.weights: list[nn.Parameter] = []
        for p in [p for a in adapters.values() for p in a.parameters()] + list(shared):
            if id(p) not in seen:  # shared pools are reachable from several sites
                seen.add(id(p))
                self.weights.append(p)
        self.opt_w = torch.optim.AdamW(self.weights, lr=lr, weight_decay=weight_decay)
        self.gate_lr = float(gate_lr)  # at tau_start; set_tau scales the step with the temperature
        self.opt_g = SharedScaleAdam(self.gates.logits, lr=gate_lr, betas=(0.5, 0.999))
        self.history: list[StepLosses] = []
        self.gate_history: list[list[float]] = []  # gamma per site after each step

    def _only(self, weights: bool) -> None:
        for p in self.weights:
            p.requires_grad_(weights)
        self.gates.logits.requires_grad_(not weights)
        self.opt_w.zero_grad(set_to_none=True)
        self.opt_g.zero_grad(set_to_none=True)

    def _loss(self, batch: Any, step: int, phase: str) -> torch.Tensor:
        what = "train_batches" if phase == "train" else "val_batches"
        self.gates.caching(True)
        try:
            loss = self.loss_fn(self.model, batch)
        except SearchInputError as e:
            raise SearchInputError(f"DiffoRA search, {phase} step {step} ({what}): {e}") from None
        finally:
            self.gates.caching(False)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise SearchInputError(
                f"DiffoRA search, {phase} step {step}: loss_fn must return a scalar tensor, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
            )
        if not torch.isfinite(loss.detach()).all():
            raise SearchLossError(
                f"DiffoRA search: the {phase} loss is {loss.item()} at step {step} (a batch of {what}); "
                f"the search stopped and your model is unchanged. Check the data/labels or lower lr / gate_lr"
            )
        if not loss.requires_grad:
            raise AdapterError(
                f"DiffoRA search: the {phase} loss at step {step} does not depend on the "
                f"{'adapter weights' if phase == 'train' else 'gates'}; does loss_fn run the model it is given?"
            )
        return loss.reshape(())

    def set_tau(self, tau: float) -> None:
        """Set the temperature; the gate step size follows it (``gate_lr * tau / tau_start``).

        The logits enter the gates as ``(g - theta) / tau``: with a fixed step, a logit step is
        20x larger in the gates' argument at the end of a 1 -> 0.05 anneal than at the start,
        and the gates of the sites that matter oscillate (measured on weak planted changes,
        benchmarks/FIDELITY.md C.1: a planted gate swinging 0.1 -> 0.7 -> 0.1 while tau fell, then
        locked at 0). Scaling the step with tau keeps it constant in the gates' own argument."""
        self.gates.tau = float(tau)
        self.opt_g.lr = self.gate_lr * self.gates.tau / self.tau_start

    def weight_step(self, batch: Any, step: int = 0) -> float:
        """One AdamW step on the adapter weights with the training loss (gates frozen)."""
        self._only(weights=True)
        loss = self._loss(batch, step, "train")
        loss.backward()
        self.opt_w.step()
        return loss.item()

    def gate_step(self, batch: Any, step: int = 0) -> float:
        """One Adam step on the gate logits with the validation loss (adapters frozen)."""
        self._only(weights=False)
        loss = self._loss(batch, step, "validation")
        loss.backward()
        self.opt_g.step()
        return loss.item()

    def run(self, train: Iterator, val: Iterator, steps: int, progress: bool = True,
            warmup: int = 0) -> list[StepLosses]:
        """``warmup`` weight-only steps, then ``steps`` alternations of weight_step / gate_step
        while the temperature anneals geometrically from ``tau_start`` to ``tau_end``.

        Warm-up lets the adapters learn something before their gates are judged (every
        delta starts at zero, so early gate gradients are pure noise). Steps are numbered
        1..warmup+steps; warm-up entries of the history have ``val = nan``.
        """
        from tqdm.auto import tqdm

        self.model.train()
        total = warmup + steps
        bar = tqdm(range(1, total + 1), desc="DiffoRA search", disable=not progress, leave=False)
        ratio = self.tau_end / self.tau_start
        try:
            for t in bar:
                frac = 0.0 if t <= warmup else (t - warmup) / steps
                self.set_tau(self.tau_start * ratio ** frac)
                lt = self.weight_step(next(train), t)
                lv = self.gate_step(next(val), t) if t > warmup else float("nan")
                self.history.append(StepLosses(t, lt, lv, self.gates.tau))
                self.gate_history.append(list(self.gates.values().values()))
                if progress:
                    bar.set_postfix(train=f"{lt:.4g}", val=f"{lv:.4g}", tau=f"{self.gates.tau:.3g}", refresh=False)
        finally:
            bar.close()
            self._only(weights=True)  # leave adapters trainable, gates frozen
        return self.history
