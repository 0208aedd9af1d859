"""``add_weighted_adapter``: a new adapter combined from existing ones (PEFT's call).

``cat`` and ``svd`` work on any method's exact low-rank form (``Method.as_lora`` and
``Method.delta_weight``), so they are exact for LoRA, GraLoRA and RaSA alike (``svd`` up to
its truncation); ``linear`` is PEFT's mix of the factors themselves (methods declaring
``Method.factors``, equal ranks) -- an approximation, as in PEFT. The result is built in the
default method's form (``Method.from_factors``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .api import apply_plan_, check_adapter_name, plan_adapt, set_active
from .errors import AdapterError, AdapterTypeError
from .methods import DEFAULT_METHOD, get_method, method_for
from .modules import SiteAdapter
from .spec import AdapterSpec, exact_targets
from .copies import checkpoint_params, set_copy_
from .state import bias_params, owned_by, require_state, site_adapters

__all__ = ["add_weighted_adapter", "COMBINATIONS"]

COMBINATIONS = ("svd", "linear", "cat")
# PEFT's other combinations, refused by name (not implemented)
_PEFT_ONLY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
              "magnitude_prune_svd")


def _rank(a: SiteAdapter) -> int:
    return method_for(a.cfg).as_lora(a.tensors(), a.cfg)[0].shape[0]


def _check_args(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], name: str,
                combination_type: str, svd_rank: int | None, svd_clamp: float | None) -> list[str]:
    st = require_state(model)
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise AdapterTypeError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    adapters = list(adapters)
    unknown = [a for a in adapters if a not in st.specs]
    if unknown:
        raise AdapterError(f"add_weighted_adapter: unknown adapter(s) {unknown}; this model has {sorted(st.specs)}")
    if len(set(adapters)) != len(adapters):
        raise AdapterError(f"add_weighted_adapter: adapters {adapters} name one adapter twice; give it one weight")
    if isinstance(weights, str) or not isinstance(weights, Sequence) or len(weights) != len(adapters):
        raise AdapterError(f"add_weighted_adapter: weights must be a list with one number per adapter "
                           f"({len(adapters)}), got {weights!r}")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise AdapterError(f"add_weighted_adapter: weights must be finite numbers, got {bad}")
    check_adapter_name(name)
    if name in st.specs:
        # PEFT returns silently here, leaving the old adapter: a surprise, so we refuse
        raise AdapterError(f"add_weighted_adapter: an adapter named {name!r} exists; pick a new name or "
                           f"delete_adapter(model, {name!r}) first")
    params = sorted(c.site for _, _, c in site_adapters(model) if c.kind == "param" and any(a in c for a in adapters))
    if params:
        raise AdapterError(f"add_weighted_adapter: adapters {[a for a in adapters if st.specs[a].target_parameters]} "
                           f"adapt parameters (target_parameters) at {params[:3]}, which cannot be combined (PEFT: "
                           f"'add_weighted_adapter does not support targeting nn.Parameter'). Fix: combine adapters "
                           f"without target_parameters")
    if combination_type in _PEFT_ONLY:
        raise AdapterError(f"add_weighted_adapter: combination_type={combination_type!r} (PEFT's TIES/DARE/magnitude "
                           f"pruning) is not implemented; use one of {list(COMBINATIONS)}")
    if combination_type not in COMBINATIONS:
        raise AdapterError(f"add_weighted_adapter: combination_type must be one of {list(COMBINATIONS)}, "
                           f"got {combination_type!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise AdapterError(f"add_weighted_adapter: svd_rank must be an int >= 1 or None, got {svd_rank!r}")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 < svd_clamp <= 1):
        raise AdapterError(f"add_weighted_adapter: svd_clamp is a quantile in (0, 1] or None, got {svd_clamp!r}")
    # PEFT refuses adapters whose modules_to_save name the same module (one copy each, not additive);
    # adapters training different modules combine, and the result trains adapters[0]'s (as PEFT)
    owners: dict[str, list[str]] = {}
    for a in adapters:
        for key in owned_by(model, a):
            owners.setdefault(key.removeprefix("trainable."), []).append(a)
    shared = {k: v for k, v in owners.items() if len(v) > 1}
    if shared:
        raise AdapterError(f"add_weighted_adapter: adapters train the same module or bias (trainable=..., bias=...), "
                           f"whose copies "
                           f"cannot be combined: {shared} (PEFT: 'Cannot add weighted adapters if they target the "
                           f"same module with modules_to_save')")
    return adapters


def _combine(present: list[tuple[SiteAdapter, float]], kind: str, rank: int,
             svd: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], B [out, rank]) of one site, scaling 1."""
    if kind == "cat":
        As, Bs = [], []
        for a, w in present:
            A, B = method_for(a.cfg).as_lora(a.tensors(), a.cfg)
            As.append(A * w)
            Bs.append(B)
        A, B = torch.cat(As, 0), torch.cat(Bs, 1)
    elif kind == "linear":
        # PEFT: sqrt(|w s|) on both factors, the sign on A only (mixing factors is not exact)
        A = B = 0
        for a, w in present:
            fa, fb, s = method_for(a.cfg).factors(a.tensors(), a.cfg)
            c = math.sqrt(abs(w * s))
            A = A + (c if w * s >= 0 else -c) * fa
            B = B + c * fb
    else:
        dW = sum(w * a.delta_weight().float() for a, w in present)
        U, S, Vh = torch.linalg.svd(dW, full_matrices=svd["full_matrices"])
        k = min(rank, S.numel())  # a rank above min(out, in) is zero-padded below
        B, A = U[:, :k] @ torch.diag(S[:k]), Vh[:k, :]
        if svd["clamp"] is not None:
            hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), svd["clamp"])
            B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    pad = rank - A.shape[0]  # sites where fewer adapters (or a smaller SVD) fill the rank
    if pad > 0:
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])], 0)
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], 1)
    return A, B


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True) -> nn.Module:
    """Add ``adapter_name``, a weighted combination of ``adapters`` (PEFT's
    ``add_weighted_adapter``), at every site any of them adapts.

    ``cat``: exact, rank = sum of the ranks; ``svd`` (default): the weighted sum of the deltas
    truncated to ``svd_rank`` (default: the largest rank), optional ``svd_clamp`` quantile;
    ``linear``: PEFT's weighted mix of the low-rank factors (equal ranks; not exact). One
    adapter alone is always combined ``linear`` when it can be (as PEFT does). As in PEFT the
    new adapter is frozen and not activated: ``set_active(model, adapter_name)`` (and
    ``inference_mode=False`` to train it). Weights may be negative. ``trainable`` modules: the
    new adapter trains ``adapters[0]``'s, from their original values (PEFT: its config is
    ``adapters[0]``'s); adapters training the same module are refused (as PEFT).
    """
    from .distributed import unwrap

    model = unwrap(model)
    adapters = _check_args(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp)
    st = require_state(model)
    conts = [c for _, _, c in site_adapters(model) if any(a in c for a in adapters)]
    ranks = {a: max(_rank(c[a]) for c in conts if a in c) for a in adapters}
    if len(adapters) == 1 and all(method_for(c[adapters[0]].cfg).factors for c in conts if adapters[0] in c):
        combination_type = "linear"
    if combination_type == "linear":
        no_factors = sorted({st.specs[a].method.name for a in adapters
                             if method_for(st.specs[a].method).factors is None})
        if no_factors:
            raise AdapterError(f"add_weighted_adapter: combination_type='linear' mixes plain low-rank factors; "
                               f"{no_factors} adapters have none. Use 'cat' (exact) or 'svd'")
        shapes = {(a, tuple(method_for(c[a].cfg).factors(c[a].tensors(), c[a].cfg)[0].shape))
                  for c in conts for a in adapters if a in c}
        if len({r for _, (r, _) in shapes}) > 1:
            raise AdapterError(f"add_weighted_adapter: combination_type='linear' needs equal ranks, got "
                               f"{ranks}; use 'cat' or 'svd'")
        rank = next(iter(shapes))[1][0]
    elif combination_type == "cat":
        rank = sum(ranks.values())
    else:
        rank = svd_rank or max(ranks.values())
    svd = {"full_matrices": bool(svd_full_matrices), "clamp": svd_clamp}
    new = {}
    with torch.no_grad():
        for c in conts:
            present = [(c[a], float(w)) for a, w in zip(adapters, weights) if a in c]
            new[c.site] = _combine(present, combination_type, rank, svd)
    target = get_method(DEFAULT_METHOD)
    cfg, _ = target.from_factors(*next(iter(new.values())))
    first = st.specs[adapters[0]]  # PEFT: the new config is adapters[0]'s
    plan = plan_adapt(model, AdapterSpec(cfg, exact_targets(new), trainable=first.trainable, bias=first.bias),
                      adapter_name)
    dtype = next(iter(conts[0][adapters[0]].parameters())).dtype
    previous = st.active
    apply_plan_(model, plan)
    with torch.no_grad():
        for site, (A, B) in new.items():
            for p, t in target.from_factors(A, B)[1].items():
                getattr(plan.adapters[site], p).data = t.to(dtype).contiguous()
        # bias=: PEFT's biases are shared, so its combination runs on adapters[0]'s trained values; ours
        # are per adapter: start the new adapter's from adapters[0]'s (trainable modules start from the
        # original, as PEFT's new ModulesToSaveWrapper copy does)
        biases = bias_params(model, first.bias, list(new), first.target_parameters)
        donor = checkpoint_params(model, adapters[0])
        for key in biases:
            if key in donor:
                set_copy_(model, adapter_name, key, donor[key])
    st.frozen = st.frozen | {adapter_name}
    set_active(model, previous)
    return model
