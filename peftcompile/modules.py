"""Run-time adapter modules: what the rewritten graphs call.

A site's host module (the nn.Linear / Conv1D itself, or the module owning an
``F.linear`` weight) gets one :class:`SiteAdapterSet` child. It holds one
:class:`SiteAdapter` per named adapter and the switches read at run time (active,
merged, disabled), so switching adapters never retraces the fx graph.
"""

from __future__ import annotations

import json
import warnings

import torch
import torch.fx.traceback as fx_traceback
from torch import nn

from .errors import AdapterError, AdapterWarning
from .methods import MethodConfig, method_for

__all__ = ["SiteAdapter", "SiteAdapterSet", "SharedTensors", "ANNOTATION_KEY", "ROLE_KEY"]

#: Keys of the ``torch.fx.traceback.annotate`` dicts that mark adapter nodes. They
#: survive dynamo and aot_autograd (``node.meta["custom"]``), so the backend finds each
#: delta again: ANNOTATION_KEY -> {"site", "adapter", "method", "config" (JSON of the
#: method config)}; ROLE_KEY -> "delta" (dropout, cast and the method's math) or "add"
#: (``y + delta.to(y.dtype)``, whose other input is the base output).
ANNOTATION_KEY = "peftcompile"
ROLE_KEY = "peftcompile_role"


class SharedTensors(nn.Module):
    """Tensors one group of sites shares (RaSA's A_S, B_S); stored once at the model root."""

    def __init__(self, cfg: MethodConfig, group: str, in_f: int, out_f: int, members: list[str],
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        m = method_for(cfg)
        self.cfg, self.group, self.members = cfg, group, list(members)
        n = len(members)
        for name, shape in m.shared_shapes(cfg, in_f, out_f, n).items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device)))
        with torch.no_grad():
            m.shared_init(cfg, dict(self.named_parameters()), n)


class SiteAdapter(nn.Module):
    """One adapter's parameters at one site and its reference forward."""

    def __init__(self, cfg: MethodConfig, site: str, adapter: str, in_f: int, out_f: int,
                 dtype: torch.dtype, device: torch.device, shared: SharedTensors | None = None,
                 n_members: int = 1) -> None:
        super().__init__()
        m = method_for(cfg)
        self.cfg, self.site, self.adapter = cfg, site, adapter
        self.in_features, self.out_features, self.n_members = in_f, out_f, n_members
        for name, shape in m.shapes(cfg, in_f, out_f, n_members).items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device)))
        with torch.no_grad():
            m.init(cfg, dict(self.named_parameters()), n_members)
        self.dropout = nn.Dropout(cfg.dropout_p) if cfg.dropout_p > 0 else nn.Identity()
        # Not a registered child: the group's tensors are saved once, at the root.
        self.__dict__["shared"] = shared
        self._tag = {"site": site, "adapter": adapter, "method": cfg.name,
                     "config": json.dumps(cfg.to_dict(), sort_keys=True)}

    @property
    def group(self) -> str | None:
        return None if self.shared is None else self.shared.group

    def tensors(self) -> dict[str, torch.Tensor]:
        """Own and shared tensors, as the method's reference math takes them."""
        t = dict(self._parameters)
        if self.shared is not None:
            t.update(self.shared._parameters)
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fx_traceback.annotate({ANNOTATION_KEY: self._tag, ROLE_KEY: "delta"}):
            w = self.tensors()
            dtype = next(iter(w.values())).dtype
            return method_for(self.cfg).delta(self.dropout(x.to(dtype)), w, self.cfg)

    def delta_weight(self) -> torch.Tensor:
        """dW [out, in] such that forward(x) == x @ dW.T (without dropout)."""
        return method_for(self.cfg).delta_weight(self.tensors(), self.cfg)

    def extra_repr(self) -> str:
        return f"{self.cfg!r}, site={self.site!r}"


class _MergedGuard(torch.autograd.Function):
    """Identity forward; a backward through a merged site raises the reason instead of
    autograd's generic "does not require grad" (or a silently missing gradient)."""

    @staticmethod
    def forward(ctx, y, anchor, msg):
        ctx.msg = msg
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        raise AdapterError(ctx.msg)


class SiteAdapterSet(nn.ModuleDict):
    """All adapters of one site: y = base(x) + sum of the active, unmerged deltas."""

    def __init__(self, site: str, kind: str, weight_attr: str, in_f: int, out_f: int) -> None:
        super().__init__()
        self.site, self.kind, self.weight_attr = site, kind, weight_attr
        self.in_features, self.out_features = in_f, out_f
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self.disabled = False

    @property
    def transposed(self) -> bool:
        """HF Conv1D stores W as [in, out]."""
        return self.kind == "conv1d"

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return y
        if self.merged and self.training and torch.is_grad_enabled():
            # a merged adapter runs inside W: training would leave it untouched (no grad, or
            # autograd's "does not require grad"); warn now, and fail clearly on backward
            msg = (f"{self.site}: adapter(s) {list(self.merged)} are merged into the base weight, so training does "
                   f"not update them; call peftcompile.unmerge(model) before training (or model.eval() for inference)")
            warnings.warn(msg, AdapterWarning, stacklevel=2)
            anchor = next((p for n in self.merged if n in self for p in self[n].parameters() if p.requires_grad), None)
            if anchor is not None:
                y = _MergedGuard.apply(y, anchor, msg)
        for name in self.active:
            if name in self.merged or name not in self:
                continue
            a = self[name]
            d = a(x)
            with fx_traceback.annotate({ANNOTATION_KEY: a._tag, ROLE_KEY: "add"}):
                y = y + d.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"site={self.site!r}, active={self.active}, merged={self.merged}"
