"""DiffoRA gate machinery: gated candidate adapters and the first-order bi-level loop.

Why hooks: the search needs ``delta_c(x) * sigmoid(g_c)`` at every candidate site c,
but the rewritten graphs call the live :class:`~peftcompile.modules.SiteAdapter`
module, so a forward hook on it scales the delta without touching the graph, the
method's math or any core module; removing the hooks gives the plain adapter back.

The loop is DARTS first-order (arXiv 1806.09055, eq. 7 with xi = 0): alternately one
AdamW step on the adapter weights with the training loss and one Adam step on the gate
logits with the validation loss. The two parameter sets are kept apart by switching
``requires_grad``: during the weight step the gates are frozen (their ``.grad`` stays
None) and during the gate step the adapters are frozen, so each loss only ever reaches
its own parameters.
"""

from __future__ import annotations

import collections.abc as cabc
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..modules import SiteAdapter

__all__ = ["Gates", "BiLevelSearch", "StepLosses", "LossFn", "hf_loss", "cycle_batches"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class Gates(nn.Module):
    """One gate logit per candidate site; ``attach_`` makes each site's delta ``delta * sigmoid(g)``."""

    def __init__(self, adapters: Mapping[str, SiteAdapter], init: float = 0.0) -> None:
        super().__init__()
        if not adapters:
            raise ValueError("Gates needs at least one candidate site")
        self.sites: list[str] = list(adapters)
        self._adapters = dict(adapters)  # plain dict: the adapters belong to the model, not to us
        dev = next(iter(adapters.values())).tensors()
        device = next(iter(dev.values())).device
        # fp32 logits whatever the model dtype: Adam on bf16 logits would round small steps away.
        self.logits = nn.Parameter(torch.full((len(self.sites),), float(init), device=device))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def values(self) -> dict[str, float]:
        """Site -> sigmoid(g), as plain floats."""
        g = torch.sigmoid(self.logits.detach()).cpu().tolist()
        return dict(zip(self.sites, g))

    def attach_(self) -> "Gates":
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

    def _hook(self, i: int):
        def scale(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return out * torch.sigmoid(self.logits[i]).to(out.dtype)

        return scale


def hf_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Default loss: ``model(**batch).loss`` (the HF convention: put ``labels`` in the batch)."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"the default loss calls model(**batch) and needs dict batches, got {type(batch).__name__}; "
            f"pass loss_fn=lambda model, batch: ... for other batch types"
        )
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            f"{type(model).__name__}(**batch) returned no .loss; put 'labels' in each batch or pass loss_fn"
        )
    return loss


def cycle_batches(batches: Iterable, what: str, generator: torch.Generator, shuffle: bool) -> Iterator:
    """Yield batches forever, re-iterating ``batches`` after each pass.

    A list/tuple is visited in a fresh ``generator`` permutation each pass when
    ``shuffle``; other re-iterables (DataLoader, ...) are re-iterated as they are; a
    one-shot iterator (generator) is cached during its first pass and replayed.
    Raises ValueError if a pass yields nothing.
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
            raise ValueError(f"{what} yielded no batches; pass a non-empty list, DataLoader or iterable")
        first = False


@dataclass
class StepLosses:
    step: int
    train: float
    val: float


class BiLevelSearch:
    """First-order DARTS over gate logits on an already adapted model.

    ``adapters`` are the candidate SiteAdapterSet (site -> module) of the search adapter;
    their parameters (and ``shared``, e.g. RaSA pools) are the weights. The model is
    changed in place (hooks, optimizer updates): run it on a copy you own.
    """

    def __init__(self, model: nn.Module, adapters: Mapping[str, SiteAdapter],
                 shared: Iterable[nn.Parameter] = (), *, loss_fn: LossFn | None = None,
                 lr: float = 1e-3, gate_lr: float = 1e-2, weight_decay: float = 0.0,
                 gate_weight_decay: float = 0.0) -> None:
        for name, v in (("lr", lr), ("gate_lr", gate_lr)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        self.model = model
        self.loss_fn = loss_fn or hf_loss
        self.gates = Gates(adapters).attach_()
        seen: set[int] = set()
        self.weights: list[nn.Parameter] = []
        for p in [p for a in adapters.values() for p in a.parameters()] + list(shared):
            if id(p) not in seen:  # shared pools are reachable from several sites
                seen.add(id(p))
                self.weights.append(p)
        self.opt_w = torch.optim.AdamW(self.weights, lr=lr, weight_decay=weight_decay)
        # DARTS' architecture optimizer: Adam with beta1 = 0.5.
        self.opt_g = torch.optim.Adam([self.gates.logits], lr=gate_lr, betas=(0.5, 0.999),
                                      weight_decay=gate_weight_decay)
        self.history: list[StepLosses] = []

    def _only(self, weights: bool) -> None:
        for p in self.weights:
            p.requires_grad_(weights)
        self.gates.logits.requires_grad_(not weights)
        self.opt_w.zero_grad(set_to_none=True)
        self.opt_g.zero_grad(set_to_none=True)

    def _loss(self, batch: Any, step: int, phase: str) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(
                f"loss_fn must return a scalar tensor, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
            )
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"DiffoRA search: the {phase} loss is {loss.item()} at step {step}; the search stopped. "
                f"Check the data/labels or lower lr / gate_lr"
            )
        if not loss.requires_grad:
            raise ValueError(
                f"DiffoRA search: the {phase} loss at step {step} does not depend on the "
                f"{'adapter weights' if phase == 'train' else 'gates'}; does loss_fn run the model it is given?"
            )
        return loss.reshape(())

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
        """``warmup`` weight-only steps, then ``steps`` alternations of weight_step / gate_step.

        Warm-up lets the adapters learn something before their gates are judged (every
        delta starts at zero, so early gate gradients are pure noise). Steps are numbered
        1..warmup+steps; warm-up entries of the history have ``val = nan``.
        """
        from tqdm.auto import tqdm

        self.model.train()
        total = warmup + steps
        bar = tqdm(range(1, total + 1), desc="DiffoRA search", disable=not progress, leave=False)
        try:
            for t in bar:
                lt = self.weight_step(next(train), t)
                lv = self.gate_step(next(val), t) if t > warmup else float("nan")
                self.history.append(StepLosses(t, lt, lv))
                if progress:
                    bar.set_postfix(train=f"{lt:.4g}", val=f"{lv:.4g}", refresh=False)
        finally:
            bar.close()
            self._only(weights=True)  # leave adapters trainable, gates frozen
        return self.history
