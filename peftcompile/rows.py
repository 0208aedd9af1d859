"""Mixed-adapter batches: PEFT's ``model(..., adapter_names=[...])``, one adapter per row.

``adapt`` installs, on the adapted model, a forward pre-hook that takes ``adapter_names``
out of the call (HF forwards would swallow it and ignore it), checks it, and routes the
batch for that one call: every :class:`~peftcompile.modules.SiteAdapterSet` then adds to
each row the delta of that row's adapter (``"__base__"``: none), computed on the rows of
that adapter only. A forward hook (``always_call``: also when the forward raises) clears
the routing. HF models also get ``generate(..., adapter_names=[...])``: an instance
attribute wrapping the class's ``generate`` that routes every step, with the names
repeated per beam / returned sequence as HF repeats the rows (PEFT's behaviour).

As in PEFT: eager and inference only (refused in training mode and while any adapter is
merged); a disabled model runs every row on the base. Under torch.compile the call is
refused with the fix (one compiled batch per adapter: switching does not recompile).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .errors import AdapterError, AdapterTypeError
from .modules import BASE_ROW, refuse_compiled_rows
from .state import merged_sites, owned_by, require_state, site_adapters, state_of

__all__ = ["check_adapter_names", "install_", "remove_", "MixedBatchGenerate", "BASE_ROW"]


def _batch_of(args: Sequence[Any], kwargs: dict) -> int | None:
    """The batch size of a forward call: dim 0 of input_ids / inputs_embeds, else of its first
    tensor of rank >= 2 (None if there is none: the sites check their own inputs)."""
    cands = [kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args, *kwargs.values()]
    for v in cands:
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            return int(v.shape[0])
    return None


def check_adapter_names(model: nn.Module, names: object, batch: int | None) -> tuple[str, ...]:
    """``names`` as a tuple, or AdapterError (AdapterTypeError) saying what is wrong and the fix.
    Reads the model only."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise AdapterTypeError(f"adapter_names must be a list of adapter names, one per row of the batch "
                               f"('{BASE_ROW}' for a row without adapter), got {names!r}")
    st = require_state(model)
    names = tuple(names)
    if model.training:
        raise AdapterError("adapter_names=[...] (mixed-adapter batches) is for inference; the model is in training "
                           "mode. Fix: model.eval() first (PEFT refuses it in training mode too)")
    unknown = sorted({n for n in names if n != BASE_ROW and n not in st.specs})
    if unknown:
        raise AdapterError(f"adapter_names: unknown adapter(s) {unknown}; this model has {sorted(st.specs)}. Pass "
                           f"those names, or '{BASE_ROW}' for rows without an adapter")
    params = sorted(c.site for _, _, c in site_adapters(model) if c.kind == "param" and len(c))
    if params:
        raise AdapterError(f"adapter_names: this model has parameter targets (target_parameters) at {params[:3]}, "
                           f"whose module reads one weight for the whole batch, so rows cannot use different adapters "
                           f"(PEFT's ParamWrapper refuses mixed batches too). Fix: one batch per adapter with "
                           f"peftcompile.set_active(model, name)")
    merged = merged_sites(model)
    if merged:
        raise AdapterError(f"adapter_names: adapters are merged into the base weights at {merged[:3]}, so every row "
                           f"would get them. Fix: peftcompile.unmerge(model) first")
    whole = sorted({n for n in names if n != BASE_ROW and owned_by(model, n)})
    if st.live and len(set(names)) > 1:
        # a trainable module holds one adapter's values (copies.py): the other rows would get them
        raise AdapterError(f"adapter_names: adapter(s) {whole or sorted(n for n in st.specs if owned_by(model, n))} "
                           f"train whole modules or biases (trainable=..., bias=...), which hold one adapter's values "
                           f"at a time, so rows "
                           f"of different adapters cannot share a forward. Fix: one batch per adapter with "
                           f"peftcompile.set_active(model, name)")
    if batch is not None and batch != len(names):
        raise AdapterError(f"adapter_names has {len(names)} names but the batch has {batch} rows; pass one name per "
                           f"row ('{BASE_ROW}' for a row without adapter)")
    return names


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Take ``adapter_names`` out of the call; check it and route this forward by it."""
    if "adapter_names" not in kwargs:
        return None
    kwargs = dict(kwargs)
    names = kwargs.pop("adapter_names")
    if names is not None:
        if torch.compiler.is_compiling():
            refuse_compiled_rows()
        routing = state_of(model).routing
        if routing.pinned:
            raise AdapterError("adapter_names given to a forward inside generate(..., adapter_names=...); pass it "
                               "to one of them")
        names = check_adapter_names(model, names, _batch_of(args, kwargs))
        routing.set({len(names): names})
    return args, kwargs


def _post_hook(model: nn.Module, args: tuple, output: Any) -> None:
    """Clear a forward's routing, also when the forward raised (``always_call``)."""
    st = state_of(model)
    if st is not None and st.routing.names is not None and not st.routing.pinned:
        st.routing.set(None)


class MixedBatchGenerate:
    """``model.generate`` taking PEFT's ``adapter_names=[...]`` (an instance attribute over the
    class's ``generate``; picklable, deep-copies with the model, removed by ``unload``)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        model = self.module
        generate = type(model).generate
        if adapter_names is None:
            return generate(model, *args, **kwargs)
        batch = _batch_of(args, kwargs)
        names = check_adapter_names(model, adapter_names, batch)
        gen_cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)

        def setting(key: str) -> int:
            v = kwargs.get(key, getattr(gen_cfg, key, None))
            return v if isinstance(v, int) and v > 1 else 1

        # HF repeats each row (repeat_interleave) for beams / returned sequences; the encoder of
        # an encoder-decoder model still sees the rows as given (PEFT: the same two lists)
        n = max(setting("num_beams"), setting("num_return_sequences"))
        routing = state_of(model).routing
        routing.set({len(names): names, len(names) * n: tuple(a for a in names for _ in range(n))}, pinned=True)
        try:
            return generate(model, *args, **kwargs)
        finally:
            routing.set(None)

    def __repr__(self) -> str:
        return f"MixedBatchGenerate({type(self.module).__name__}.generate)"


def install_(model: nn.Module) -> None:
    """Hooks (and, for models with ``generate``, the generate wrapper) on a newly adapted model."""
    model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    model.register_forward_hook(_post_hook, always_call=True)
    if callable(getattr(type(model), "generate", None)) and "generate" not in model.__dict__:
        model.__dict__["generate"] = MixedBatchGenerate(model)


def remove_(model: nn.Module) -> None:
    """Undo :func:`install_`."""
    for hid, hook in list(model._forward_pre_hooks.items()):
        if hook is _pre_hook:
            del model._forward_pre_hooks[hid]
            model._forward_pre_hooks_with_kwargs.pop(hid, None)
    for hid, hook in list(model._forward_hooks.items()):
        if hook is _post_hook:
            del model._forward_hooks[hid]
            model._forward_hooks_with_kwargs.pop(hid, None)
            model._forward_hooks_always_called.pop(hid, None)
    if isinstance(model.__dict__.get("generate"), MixedBatchGenerate):
        del model.__dict__["generate"]
