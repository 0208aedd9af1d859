"""Run-time adapter modules: what the rewritten graphs call.

A site's host module (the nn.Linear / Conv1D / nn.Embedding / nn.ConvNd itself, or the
module owning an ``F.linear`` weight) gets one :class:`SiteAdapterSet` child. It holds one
:class:`SiteAdapter` per named adapter and the switches read at run time (active,
merged, disabled), so switching adapters never retraces the fx graph, and under
torch.compile does not recompile either (see :class:`SiteAdapterSet`).
"""

from __future__ import annotations

import json
import warnings

import torch
import torch.fx.traceback as fx_traceback
from torch import nn

from .errors import AdapterError, AdapterWarning
from .methods import MethodConfig, method_for

__all__ = ["SiteAdapter", "SiteAdapterSet", "ParamAdapterSet", "SharedTensors", "RowRouting", "ANNOTATION_KEY", "ROLE_KEY", "GATE",
           "BASE_ROW"]

#: Keys of the ``torch.fx.traceback.annotate`` dicts that mark adapter nodes. They
#: survive dynamo and aot_autograd (``node.meta["custom"]``), so the backend finds each
#: delta again: ANNOTATION_KEY -> {"site", "slot" (position among the site's running
#: adapters), "method", "config" (JSON of the method config)}; ROLE_KEY -> "delta" (dropout, cast and the method's math) or "add"
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


#: Every method config in use, by its JSON: the forward reads its config from here, so that
#: under torch.compile equal configs are one object at one guard source (adapters with equal
#: configs look the same: switching between them does not recompile), and each other config
#: has a source of its own (dynamo's "automatic dynamic" would otherwise turn an alpha that
#: changed at the same source into a symbolic float after a switch, which the backend
#: cannot fuse).
_CONFIGS: dict[str, MethodConfig] = {}


def _interned(cfg: MethodConfig) -> tuple[str, MethodConfig]:
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    return key, _CONFIGS.setdefault(key, cfg)


class SiteAdapter(nn.Module):
    """One adapter's parameters at one site and its reference forward."""

    def __init__(self, cfg: MethodConfig, site: str, adapter: str, in_f: int, out_f: int,
                 dtype: torch.dtype, device: torch.device, shared: SharedTensors | None = None,
                 n_members: int = 1, embedding: dict | None = None, conv: dict | None = None,
                 param: dict | None = None) -> None:
        super().__init__()
        m = method_for(cfg)
        if embedding is not None and m.embed is None:
            raise AdapterError(f"{site}: method {cfg.name!r} cannot adapt an nn.Embedding")
        if conv is not None and m.conv is None:
            raise AdapterError(f"{site}: method {cfg.name!r} cannot adapt an nn.Conv1d/2d/3d")
        if param is not None and m.param_form is None:
            raise AdapterError(f"{site}: method {cfg.name!r} cannot adapt a parameter target")
        #: the site's F.embedding options when it is an nn.Embedding (the delta then takes ids), and
        #: the scale its (subclass's) forward multiplies the lookup by (PEFT scales the delta by it too)
        self.embedding = None if embedding is None else {k: v for k, v in embedding.items() if k != "scale"}
        self.embed_scale = None if embedding is None else embedding.get("scale")
        #: the site's kernel_size / stride / padding when it is an nn.Conv1d/2d/3d (x: [N, C, *spatial])
        self.conv = None if conv is None else dict(conv)
        #: a parameter site's layout ({"experts", "ndim", "transposed"}; passes/params.py): the delta is a weight
        self.param = None if param is None else {k: param[k] for k in ("experts", "ndim", "transposed")}
        self._cfg_key, cfg = _interned(cfg)
        self.cfg, self.site, self.adapter = cfg, site, adapter
        self.in_features, self.out_features, self.n_members = in_f, out_f, n_members
        shapes = (m.shapes(cfg, in_f, out_f, n_members) if param is None
                  else m.param_form.shapes(cfg, in_f, out_f, param["experts"]))
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device)))
        with torch.no_grad():
            if param is not None:
                m.param_form.init(cfg, dict(self.named_parameters()), param["experts"])
            elif embedding is not None and m.embed_init is not None:
                try:
                    m.embed_init(cfg, dict(self.named_parameters()))
                except AdapterError as e:
                    raise AdapterError(f"{site}: {e}") from None
            else:
                m.init(cfg, dict(self.named_parameters()), n_members)
        self.dropout = nn.Dropout(cfg.dropout_p) if cfg.dropout_p > 0 else nn.Identity()
        # Not a registered child: the group's tensors are saved once, at the root.
        self.__dict__["shared"] = shared
        # No adapter name in the tag: a compiled graph guards on what it reads, and the tag
        # of adapter "b" must read the same as the tag of an equal adapter "a".
        self._tag = {"site": site, "method": cfg.name, "config": self._cfg_key}
        # the backend leaves embedding and conv regions as reference math (skipped_<method>)
        if embedding is not None:
            self._tag["embedding"] = True
        if conv is not None:
            self._tag["conv"] = True
        if param is not None:  # likewise W + dW of a parameter site
            self._tag["param"] = True

    def __setstate__(self, state: dict) -> None:
        state.setdefault("conv", None)  # pickled before conv sites existed
        super().__setstate__(state)
        self.__dict__.setdefault("embed_scale", None)  # pickled before scaled embeddings were sites
        self._cfg_key, self.cfg = _interned(self.cfg)  # unpickled in another process, or deep-copied

    @property
    def group(self) -> str | None:
        return None if self.shared is None else self.shared.group

    def tensors(self) -> dict[str, torch.Tensor]:
        """Own and shared tensors, as the method's reference math takes them."""
        t = dict(self._parameters)
        if self.shared is not None:
            t.update(self.shared._parameters)
        return t

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None, slot: int = 0) -> torch.Tensor:
        """The delta of ``x``. ``gate`` (a 0-dim 0/1 tensor, compiled path only) multiplies it;
        ``slot`` is its position among the site's running adapters (the backend's region key)."""
        with fx_traceback.annotate({ANNOTATION_KEY: {**self._tag, "slot": slot}, ROLE_KEY: "delta"}):
            cfg = _CONFIGS[self._cfg_key]
            w = self.tensors()
            dtype = next(iter(w.values())).dtype
            method = method_for(cfg)
            scaled = [k for k in method.scale_params if k in w] if gate is not None else []
            for k in scaled:
                w[k] = w[k] * gate
            if self.embedding is not None:  # x: integer ids; no dropout (PEFT's lora.Embedding has none)
                d = method.embed(x, w, cfg, self.embedding)
                if self.embed_scale is not None:
                    d = d * self.embed_scale
                return d * gate if gate is not None and not scaled else d
            xa = self.dropout(x.to(dtype))
            if gate is not None and not scaled:
                xa = xa * gate
            if self.conv is not None:  # x: [N, C_in, *spatial]
                return method.conv(xa, w, cfg, self.conv)
            return method.delta(xa, w, cfg)

    def delta_weight(self) -> torch.Tensor:
        """dW [out, in] such that forward(x) == x @ dW.T + delta_bias() (without dropout); at a conv
        site the conv weight's delta flattened to [out, C_in * prod(kernel_size)]; at a parameter
        site, dW in the parameter's own layout (W + dW is what the host reads)."""
        if self.param is not None:
            return self.weight_delta()
        return method_for(self.cfg).delta_weight(self.tensors(), self.cfg)

    def delta_bias(self) -> torch.Tensor | None:
        """The delta's constant term [out] (what merging adds to the base bias), or None."""
        f = method_for(self.cfg).delta_bias
        return None if f is None or self.param is not None else f(self.tensors(), self.cfg)

    def weight_delta(self, gate: torch.Tensor | None = None, slot: int = 0) -> torch.Tensor:
        """A parameter site's dW in the parameter's layout ([out, in], [experts, out, in] or, for an
        ``is_transposed`` host, [experts, in, out]); ``gate`` as in :meth:`forward`."""
        with fx_traceback.annotate({ANNOTATION_KEY: {**self._tag, "slot": slot}, ROLE_KEY: "delta"}):
            cfg = _CONFIGS[self._cfg_key]
            w = self.tensors()
            method = method_for(cfg)
            if gate is not None:
                for k in method.scale_params:
                    if k in w:
                        w[k] = w[k] * gate
            d = method.param_form.delta_weight(w, cfg, self.param["experts"])  # [experts, out, in]
            if gate is not None and not any(k in w for k in method.scale_params):
                d = d * gate
            if self.param["ndim"] == 2:
                return d[0]
            return d.transpose(-1, -2) if self.param["transposed"] else d

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


#: Row name of PEFT's mixed-adapter batches for "no adapter on this row".
BASE_ROW = "__base__"

#: Name of each site set's on/off gate buffer (not saved: it is run-time state).
GATE = "peftcompile_gate"


class RowRouting:
    """A model's mixed-adapter batch (PEFT's ``adapter_names``): one adapter name per row,
    set around one forward (or one ``generate``) and read by every site. ``names`` maps a
    batch size to the names of its rows: generate's encoder sees the batch as given, its
    decoder the batch expanded by beams / return sequences."""

    def __init__(self) -> None:
        self.names: dict[int, tuple[str, ...]] | None = None
        self.pinned = False  # held for a whole generate() call
        self._index: dict[tuple, tuple[tuple[str, torch.Tensor], ...]] = {}

    def set(self, names: dict[int, tuple[str, ...]] | None, pinned: bool = False) -> None:
        self.names, self.pinned, self._index = names, pinned, {}

    def rows(self, site: str, x: torch.Tensor) -> tuple[tuple[str, torch.Tensor], ...]:
        """(adapter name, row indices) of the batch ``x`` at ``site``; AdapterError if its dim 0
        is not a batch the names were given for."""
        n = x.shape[0] if x.dim() >= 2 else None
        names = self.names.get(n) if n is not None else None
        if names is None:
            sizes = sorted(self.names)
            raise AdapterError(
                f"{site}: adapter_names has {sizes[0] if len(sizes) == 1 else sizes} names, but this layer's input has "
                f"shape {tuple(x.shape)}; mixed-adapter batches need one name per row of the batch (dim 0) at every "
                f"adapted layer. Pass one name per row ('{BASE_ROW}' for no adapter)")
        key = (n, x.device)
        if key not in self._index:
            order = list(dict.fromkeys(names))
            self._index[key] = tuple((a, torch.tensor([i for i, b in enumerate(names) if b == a], device=x.device))
                                     for a in order)
        return self._index[key]

    def __getstate__(self) -> dict:
        return {"names": None, "pinned": False, "_index": {}}  # a forward's routing never travels


@torch._dynamo.disable
def refuse_compiled_rows() -> None:
    """Raised outside the compiled graph (a call dynamo does not trace), so it reaches the caller."""
    raise AdapterError(
        "adapter_names=[...] (mixed-adapter batches) runs in eager mode only; under torch.compile each row's adapter "
        "would be a Python decision per batch. Fix: call the uncompiled model (compiled._orig_mod(..., "
        "adapter_names=...)), or run one batch per adapter through the compiled model with "
        "peftcompile.set_active(model, name), which does not recompile")


class SiteAdapterSet(nn.ModuleDict):
    """All adapters of one site: y = base(x) + sum of the active, unmerged deltas.

    The switches (``active``, ``merged``, ``disabled``) are plain attributes for the API;
    what the forward reads is derived from them so that torch.compile does not recompile
    per adapter state: ``_running`` (the adapters to run, whatever their names, so dynamo
    guards on their configs and tensor shapes, not on names) and the ``peftcompile_gate``
    buffer (1.0, or 0.0 while disabled; a tensor, so its value is not guarded).
    """

    def __init__(self, site: str, kind: str, weight_attr: str, in_f: int, out_f: int) -> None:
        super().__init__()
        self.site, self.kind, self.weight_attr = site, kind, weight_attr
        self.in_features, self.out_features = in_f, out_f
        self.__dict__.update(_active=(), _merged=(), _disabled=False, _running=(), _routing=None)
        self.register_buffer(GATE, torch.ones(()), persistent=False)

    @property
    def transposed(self) -> bool:
        """HF Conv1D stores W as [in, out]; so does nn.Embedding ([num, dim] = [in, out])."""
        return self.kind in ("conv1d", "embedding")

    @property
    def active(self) -> tuple[str, ...]:
        return self._active

    @active.setter
    def active(self, names: tuple[str, ...]) -> None:
        self.__dict__["_active"] = tuple(names)
        self._refresh()

    @property
    def merged(self) -> tuple[str, ...]:
        return self._merged

    @merged.setter
    def merged(self, names: tuple[str, ...]) -> None:
        self.__dict__["_merged"] = tuple(names)
        self._refresh()

    @property
    def disabled(self) -> bool:
        return self._disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self.__dict__["_disabled"] = bool(value)
        g = self._buffers[GATE]
        # a new tensor, not fill_: a graph recorded before the switch may have saved the old
        # gate for its backward (autograd would refuse an in-place change of it)
        self._buffers[GATE] = torch.full((), 0.0 if value else 1.0, dtype=g.dtype, device=g.device)

    def _refresh(self) -> None:
        self.__dict__["_running"] = tuple(self._modules[n] for n in self._active
                                          if n in self._modules and n not in self._merged)

    def __setitem__(self, key: str, module: nn.Module) -> None:
        super().__setitem__(key, module)
        p = next(module.parameters(), None)
        g = self._buffers[GATE]
        if p is not None and p.device != g.device:  # the gate lives with the adapters
            self._buffers[GATE] = g.to(p.device)
        self._refresh()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._refresh()

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        routing = self._routing
        mixed = routing is not None and routing.names is not None
        if torch.compiler.is_dynamo_compiling():
            if mixed:
                refuse_compiled_rows()
            gate = self._buffers[GATE]
        else:
            # eager reads the Python switches: nothing runs for a disabled site
            if self._disabled:
                return y
            if mixed:
                return self._mixed(y, x, routing)
            gate = None
        if self._merged and self.training and torch.is_grad_enabled():
            # a merged adapter runs inside W: training would leave it untouched (no grad, or
            # autograd's "does not require grad"); warn now, and fail clearly on backward
            msg = (f"{self.site}: adapter(s) {list(self._merged)} are merged into the base weight, so training does "
                   f"not update them; call peftcompile.unmerge(model) before training (or model.eval() for inference)")
            warnings.warn(msg, AdapterWarning, stacklevel=2)
            anchor = next((p for n in self._merged if n in self for p in self[n].parameters() if p.requires_grad),
                          None)
            if anchor is not None:
                y = _MergedGuard.apply(y, anchor, msg)
        for slot, a in enumerate(self._running):
            d = a(x, gate, slot)
            with fx_traceback.annotate({ANNOTATION_KEY: {**a._tag, "slot": slot}, ROLE_KEY: "add"}):
                y = y + d.to(y.dtype)
        return y

    def _mixed(self, y: torch.Tensor, x: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        """PEFT's mixed-adapter batch: each row's delta from its own adapter (none for
        ``__base__`` rows and for adapters that do not cover this site)."""
        for name, idx in routing.rows(self.site, x):
            if name not in self._modules:
                continue
            if name in self._merged:  # checked before the forward; a merged delta would count twice
                raise AdapterError(f"{self.site}: adapter {name!r} is merged; peftcompile.unmerge(model) before "
                                   f"passing adapter_names")
            d = self._modules[name](x.index_select(0, idx))
            y = y.index_add(0, idx, d.to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return f"site={self.site!r}, active={self.active}, merged={self.merged}"


class ParamAdapterSet(SiteAdapterSet):
    """All adapters of one targeted parameter W of a host module (PEFT's ``target_parameters``).

    No graph calls it: a forward pre-hook on the host puts ``W + sum of the running deltas`` in
    place of W for the host's own forward (the host's class, code and ``state_dict`` keys stay),
    and a forward hook that always runs (also when the forward raises) puts W back. Gradients
    reach the adapters through the substituted tensor; W itself stays the frozen parameter.
    Switches, gate and merge state are :class:`SiteAdapterSet`'s: disabled in eager runs W
    untouched; under torch.compile the gate multiplies the delta (no recompile), and the sum
    is tagged so that the backend counts it (``skipped_<method>``: it stays reference math).
    """

    def __init__(self, site: str, weight_attr: str, in_f: int, out_f: int) -> None:
        super().__init__(site, "param", weight_attr, in_f, out_f)

    def attach_(self, host: nn.Module) -> None:
        host.register_forward_pre_hook(self._swap_in)
        host.register_forward_hook(self._swap_out, always_call=True)

    def detach_(self, host: nn.Module) -> None:
        for hooks in (host._forward_pre_hooks, host._forward_hooks):
            for k in [k for k, h in hooks.items() if getattr(h, "__self__", None) is self]:
                del hooks[k]
                host._forward_hooks_always_called.pop(k, None)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """W plus the running adapters' deltas (W itself when none runs)."""
        if torch.compiler.is_dynamo_compiling():
            gate = self._buffers[GATE]
        else:
            if self._disabled:
                return w
            gate = None
        if self._merged and self.training and torch.is_grad_enabled():
            warnings.warn(f"{self.site}: adapter(s) {list(self._merged)} are merged into the base weight, so training "
                          f"does not update them; call peftcompile.unmerge(model) before training",
                          AdapterWarning, stacklevel=3)
        for slot, a in enumerate(self._running):
            d = a.weight_delta(gate, slot)
            with fx_traceback.annotate({ANNOTATION_KEY: {**a._tag, "slot": slot}, ROLE_KEY: "add"}):
                w = w + d.to(w.dtype)
        return w

    def _swap_in(self, host: nn.Module, args) -> None:
        routing = self._routing  # checked up front by rows.check_adapter_names; this is the backstop
        if routing is not None and routing.names is not None and len(self):
            raise AdapterError(f"{self.site}: a parameter target cannot run a mixed-adapter batch (adapter_names=...): "
                               f"the whole batch reads one weight (PEFT's ParamWrapper refuses it too). Fix: one batch "
                               f"per adapter with peftcompile.set_active")
        if not self._running:
            return
        hook = getattr(host, "_hf_hook", None)  # accelerate's AlignDevicesHook, set by cpu_offload / device_map
        if any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,))):
            # its pre-forward (after ours) reloads W from the offload store over W + dW: the adapter
            # would be dropped, or accelerate fails on the non-Parameter tensor
            raise AdapterError(f"{self.site}: the module is offloaded by accelerate (cpu_offload / device_map with "
                               f"offload), whose pre-forward reloads the weight over W + delta. Fix: keep this module "
                               f"on its device (no offload), or merge the adapter (peftcompile.merge_and_unload) "
                               f"before offloading")
        w = host._parameters[self.weight_attr]
        new = self.weight(w)
        if new is not w:
            self.__dict__["_held"] = w
            host._parameters[self.weight_attr] = new

    def _swap_out(self, host: nn.Module, args, out) -> None:
        held = self.__dict__.pop("_held", None)
        if held is not None:
            host._parameters[self.weight_attr] = held

    def forward(self, *args, **kwargs):
        raise AdapterError(f"{self.site}: a parameter site's adapters run through its host's forward, not on their own")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_held", None)  # only held during one forward
        return state
