"""ONNX export of an adapted model: merged (deltas folded into W) or unmerged (adapter as inputs).

Both go through torch's onnxscript-based exporter (``torch.onnx.export(..., dynamo=True,
optimize=True)``, i.e. non-strict ``torch.export``, translation, then onnxscript's optimizer).

* merged: a deep copy gets :func:`peftcompile.merge_and_unload`, so the file holds the base
  graph with folded weights: no adapter nodes, the base model's initializers.
* unmerged: the model is wrapped so that its adapter tensors are extra ``forward`` inputs,
  installed with ``torch.func.functional_call`` for the duration of the call. The exporter
  sees them as graph inputs, never as constants, so the optimizer keeps them as they are
  (it does fold and rename constant weights: a transposed base W becomes ``val_N``). They
  are renamed to stable keys, the same as :func:`peftcompile.save_adapters` writes:
  ``<site>.<param>`` (``model.layers.0.self_attn.q_proj.lora_A``) and
  ``shared.<group>.<param>`` for tensors a group shares (RaSA's pool, stored once).
  Each adapter input also gets an initializer of the same name as its default, so the file
  runs as the base model when no adapter is bound: zero-rank tensors (LoRA A [0, in],
  B [out, 0]; the rank axes are exported symbolic) or zero-valued tensors of full shape
  (the method's ``rank_axes`` and ``zero_rank_default`` in its registry entry). Every default is checked
  against the method's reference ``delta`` (it must give exactly 0) before it is written.
  Next to ``model.onnx`` go the exported adapter's tensors, keyed by input name:
  ``model.adapter.safetensors`` (the sidecar; the export description is in its metadata)
  and ``model.onnx_adapter`` (onnxruntime's adapter format, stamped with the export's
  fingerprint, its spec in ``model.onnx_adapter.json``). All files are written under their
  final names into a temporary sibling directory and ``os.replace``d into place, the ``.onnx``
  last; the output paths are checked before any export work.

onnxruntime's ``LoraAdapter`` + ``RunOptions.add_active_adapter`` feeds the adapter's
tensors as graph inputs by name (checked with onnxruntime 1.32: a name that is only an
initializer is rejected, "Invalid input name"), so it overrides exactly these inputs'
defaults. It does not check shapes: a partial or wrong-rank adapter fails inside a MatMul
kernel or broadcasts silently. The bound adapter must have the exported spec's exact
shapes (the scaling is a constant of the graph); :class:`OrtAdapterSession` checks names,
shapes, dtype and spec before running.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim

from ..api import merge_and_unload
from ..errors import AdapterError
from ..methods import get_method, method_for
from ..state import adapter_params, merged_sites, owned_by, shared_key, site_adapters, site_key, state_of
from ..atomic import atomic_replace_files, check_writable, temp_sibling_dir
from .formats import (FORMAT, METADATA_KEY, ORT_ADAPTER_SPEC_SUFFIX, ORT_ADAPTER_SUFFIX, SIDECAR_SUFFIX, AdapterInput,
                      export_fingerprint, write_ort_adapter, write_sidecar)

__all__ = ["to_onnx", "OnnxExport", "OnnxExportError", "default_dynamic_axes"]

Defaults = Literal["auto", "zero-rank", "zeros"]


class OnnxExportError(AdapterError, RuntimeError):
    """The model could not be exported; the message names the op/module and the fix.

    An :class:`AdapterError` (what callers catch) and, as before, a ``RuntimeError``."""


@dataclass
class OnnxExport:
    """What :func:`to_onnx` wrote (also stored as JSON in the model's metadata)."""

    path: Path
    merged: bool
    adapter: str | None  # the bound-at-run-time adapter (unmerged) or the merged ones, comma-joined
    specs: dict[str, dict]  # adapter name -> AdapterSpec.to_dict() of what the file holds / accepts
    input_names: list[str]
    output_names: list[str]
    adapter_inputs: dict[str, AdapterInput] = field(default_factory=dict)
    sidecar: Path | None = None
    ort_adapter: Path | None = None

    def metadata(self) -> dict:
        """The JSON description stored in the file (and the sidecar), with its fingerprint."""
        meta = {
            "format": FORMAT,
            "merged": self.merged,
            "adapter": self.adapter,
            "specs": self.specs,
            "inputs": self.input_names,
            "outputs": self.output_names,
            "adapter_inputs": {k: v.to_dict() for k, v in self.adapter_inputs.items()},
            "sidecar": self.sidecar.name if self.sidecar else None,
            "ort_adapter": self.ort_adapter.name if self.ort_adapter else None,
        }
        meta["fingerprint"] = export_fingerprint(meta)
        return meta

    @property
    def fingerprint(self) -> int:
        """What an ``.onnx_adapter`` must be stamped with to bind to this export."""
        return self.metadata()["fingerprint"]


# ----------------------------------------------------------------------------- inputs

DynamicAxes = Mapping[str, Mapping[int, str]]


# Integer inputs whose axis 1 is the (encoder) token axis: they share one "sequence" dim.
_SEQUENCE_FAMILY = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def default_dynamic_axes(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> dict[str, dict[int, str]]:
    """The dynamic axes that are certain from an input's name and dtype alone.

    Axis 0 of every tensor of rank >= 2 is "batch". Axis 1 of an integer (token-like) input
    of rank >= 2 is a length: ``input_ids``, ``attention_mask``, ``token_type_ids`` and
    ``position_ids`` share "sequence"; ``decoder_*`` inputs share "decoder_sequence" (an
    encoder-decoder's two lengths differ); any other integer input gets an axis named after
    itself. Float inputs keep axis 1 static (channels of ``pixel_values``, mel bins of
    ``input_features``, features), except ``inputs_embeds`` ("sequence") and
    ``decoder_inputs_embeds`` ("decoder_sequence"). Pass a mapping for anything else.
    """
    out: dict[str, dict[int, str]] = {}
    for n, t in zip(names, tensors):
        if t.ndim < 2:
            continue
        axes: dict[int, str] = {0: "batch"}
        if t.is_floating_point() or t.is_complex():
            if n == "inputs_embeds":
                axes[1] = "sequence"
            elif n == "decoder_inputs_embeds":
                axes[1] = "decoder_sequence"
        elif n in _SEQUENCE_FAMILY:
            axes[1] = "sequence"
        elif n.startswith("decoder_"):
            axes[1] = "decoder_sequence"
        else:
            axes[1] = n
        out[n] = axes
    return out


@dataclass
class _Inputs:
    """Example inputs split into graph inputs (tensors) and constants (everything else)."""

    args: list[Any]
    kwargs: dict[str, Any]
    slots: list[tuple[str, int | str]]  # where each tensor input goes: ("arg", i) | ("kw", key)
    names: list[str]
    tensors: list[torch.Tensor]

    def fill(self, tensors: Sequence[torch.Tensor]) -> tuple[list, dict]:
        args, kwargs = list(self.args), dict(self.kwargs)
        for (kind, where), t in zip(self.slots, tensors):
            if kind == "arg":
                args[where] = t
            else:
                kwargs[where] = t
        return args, kwargs


def _split_inputs(model: nn.Module, example_inputs: Any) -> _Inputs:
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = [example_inputs], {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = [], dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = list(example_inputs), {}
    else:
        raise AdapterError(
            f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
            f"got {type(example_inputs).__name__}"
        )
    try:
        # The class forward: an adapted module's instance forward is a generated *args wrapper.
        params = list(inspect.signature(type(model).forward).parameters)[1:]
    except (TypeError, ValueError):
        params = []
    # The no-cache forward: a KV cache is not a tensor output ONNX can carry.
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    slots, names, tensors = [], [], []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            slots.append(("arg", i))
            names.append(params[i] if i < len(params) and params[i] not in ("args", "kwargs") else f"input_{i}")
            tensors.append(a)
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            slots.append(("kw", k))
            names.append(k)
            tensors.append(v)
    if not tensors:
        raise AdapterError("example_inputs hold no tensor; pass the tensors the model's forward takes")
    return _Inputs(args, kwargs, slots, names, tensors)


# ----------------------------------------------------------------------------- adapters

def _adapter_inputs(model: nn.Module, name: str) -> dict[str, tuple[str, nn.Parameter]]:
    """Graph input name (the checkpoint key) -> (parameter path in ``model``, parameter)."""
    path_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return {k: (path_of[id(t)], t) for k, t in adapter_params(model, name).items()}


def _pick_adapter(model: nn.Module, adapter: str | None) -> str:
    st = state_of(model)
    if adapter is not None:
        if adapter not in st.specs:
            raise AdapterError(f"no adapter named {adapter!r}; this model has {sorted(st.specs)}")
        if adapter not in st.active:
            raise AdapterError(
                f"adapter {adapter!r} is not active (active: {list(st.active)}); "
                f"call peftcompile.set_active(model, {adapter!r}) first"
            )
    elif len(st.active) != 1:
        raise AdapterError(
            f"an unmerged export carries exactly one adapter, but {len(st.active)} are active "
            f"({list(st.active)}); pass adapter=<name> or set_active one (or export merged=True)"
        )
    name = adapter if adapter is not None else st.active[0]
    owned = sorted(k.removeprefix("trainable.") for k in owned_by(model, name))
    if owned:  # their values are not graph inputs: the graph would hold this adapter's as constants
        raise AdapterError(
            f"adapter {name!r} trains base parameters {owned[:4]} (AdapterSpec.trainable / bias), whose values an "
            f"unmerged export would bake into the graph: unbound it would not run as the base model, and another "
            f"adapter's sidecar would run with these values. Fix: export merged=True"
        )
    return name


def _rank_axes(method: str, key: str) -> tuple[int, ...] | None:
    param = key.rsplit(".", 1)[-1]
    return (get_method(method).rank_axes or {}).get(param)


def _defaults_are_zero(model: nn.Module, name: str, defaults: Mapping[str, torch.Tensor]) -> bool:
    """True if the method's reference delta is exactly 0 at every site with these tensors."""
    for _, _, cont in site_adapters(model):
        if name not in cont:
            continue
        a = cont[name]
        t = {p: defaults[site_key(cont.site, p)] for p in a._parameters}
        if a.shared is not None:
            t.update({p: defaults[shared_key(a.shared.group, p)] for p in a.shared._parameters})
        x = torch.randn(2, a.in_features, dtype=next(iter(t.values())).dtype)
        try:
            with torch.no_grad():
                d = method_for(a.cfg).delta(x, t, a.cfg)
        except (RuntimeError, ValueError, IndexError):
            return False
        if tuple(d.shape) != (2, a.out_features) or bool(d.abs().max() != 0):
            return False
    return True


# ----------------------------------------------------------------------------- wrapper

def _leaf_name(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    if not parts:
        return "output"
    name = ".".join(parts)
    return f"output_{name}" if parts[0].isdigit() else name


class _Exportable(nn.Module):
    """``forward(inputs, adapters)``: the model with its adapter tensors passed in.

    ``functional_call`` installs the adapter tensors in place of the parameters for the
    call, so torch.export traces them as user inputs. Outputs are flattened to a tuple of
    tensors; their pytree paths (``logits``) are recorded as output names.
    """

    def __init__(self, model: nn.Module, inputs: _Inputs, params: Sequence[str], output_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self._inputs = inputs
        self._params = list(params)
        # Filled in place during tracing: torch.export restores the module's own attributes
        # after a non-strict trace, so the caller keeps a reference to this list.
        self._output_names = output_names

    def forward(self, inputs: tuple[torch.Tensor, ...], adapters: tuple[torch.Tensor, ...] = ()) -> tuple:
        args, kwargs = self._inputs.fill(inputs)
        out = torch.func.functional_call(self.model, dict(zip(self._params, adapters)), tuple(args), kwargs,
                                         tie_weights=False, strict=False)
        leaves, _ = pytree.tree_flatten_with_path(out)
        leaves = [(p, v) for p, v in leaves if isinstance(v, torch.Tensor)]
        self._output_names[:] = [_leaf_name(p) for p, _ in leaves]
        return tuple(v for _, v in leaves)


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode for the export (dropout off), training flags restored afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, f in flags.items():
            m.training = f


_NO_ONNX = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)")


def _unsupported_ops(err: BaseException) -> list[str]:
    ops, e, seen = [], err, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        ops += [f"{a}.{b}" for a, b in _NO_ONNX.findall(str(e))]
        e = e.__cause__ or e.__context__
    return list(dict.fromkeys(ops))


def _summary(err: BaseException) -> str:
    """The root cause line of a torch.onnx error (its "Exception summary"), without colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        i = lines.index("## Exception summary")
        if i + 1 < len(lines):
            return lines[i + 1]
    return lines[0] if lines else type(err).__name__


def _modules_using(ep: torch.export.ExportedProgram, op: str, root: str) -> list[str]:
    """Where ``op`` is called: the innermost module path (or the model's class for code that
    fx inlined into the model's own forward) and the source line."""
    where = []
    for n in ep.graph.nodes:
        if n.op == "call_function" and str(n.target) == op:
            stack = n.meta.get("nn_module_stack") or {}
            path = str(list(stack.values())[-1][0]) if stack else ""
            path = re.sub(r"^(L\['self'\]\.)?model\.?", "", path) or root
            # The model's own source lines: not torch's, not this wrapper's, not code that
            # peftcompile regenerated ("<peftcompile-forward-N>").
            skip = (str(Path(torch.__file__).parent), str(Path(__file__).parent))
            lines = [f for f in re.findall(r'File "([^"]+)", line (\d+)', n.meta.get("stack_trace") or "")
                     if not f[0].startswith("<") and not f[0].startswith(skip)]
            if lines:
                path += f" at {Path(lines[-1][0]).name}:{lines[-1][1]}"
            where.append(path)
    return list(dict.fromkeys(where))


@functools.cache
def _cache_torchlib_ops() -> None:
    """Build onnxscript's torchlib op list once per process instead of once per export.

    ``torch.onnx.export`` rebuilds its op registry on every call and onnxscript re-parses
    the source of ~500 torchlib functions for it: 1.0-1.2 s of every export here (of
    ~2.5 s for a tiny Llama on an idle core). The list is static, so it is cached.
    Skipped silently if the private hook moves in another torch/onnxscript version.
    """
    try:
        from torch.onnx._internal._lazy_import import onnxscript_apis

        mod = importlib.import_module(onnxscript_apis.__name__)
        fn = mod.get_torchlib_ops
    except (ImportError, AttributeError):
        return
    if not hasattr(fn, "cache_info"):
        mod.get_torchlib_ops = functools.cache(fn)


def _export(wrapper: _Exportable, tensors: list[torch.Tensor], adapters: list[torch.Tensor],
            dyn_in: list[dict | None], dyn_ad: list[dict | None], opset: int | None,
            custom_translation_table: Mapping[Callable, Callable] | None) -> torch.onnx.ONNXProgram:
    _cache_torchlib_ops()
    # Static tensors are given as {} and a merged export passes no adapter tuple at all:
    # torch.onnx's string-axis handling turns a tuple of Nones (or an empty tuple) into a
    # list, which torch.export then rejects as a structure mismatch.
    args: tuple = (tuple(tensors), tuple(adapters)) if adapters else (tuple(tensors),)
    dyn = tuple(tuple(d or {} for d in part) for part in ((dyn_in, dyn_ad) if adapters else (dyn_in,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytree / export deprecation chatter
        try:
            # String dim names in dynamic_shapes become Dim.DYNAMIC and name the ONNX axes.
            return torch.onnx.export(wrapper, args, dynamic_shapes=dyn, dynamo=True,
                                     optimize=True, verbose=False, opset_version=opset,
                                     custom_translation_table=dict(custom_translation_table or {}))
        except torch.onnx.OnnxExporterError as e:
            ops = _unsupported_ops(e)
            if not ops:
                raise OnnxExportError(
                    f"exporting {type(wrapper.model).__name__} to ONNX failed: {_summary(e)}. Fix: check example_inputs "
                    f"match the forward signature; if a dynamic axis cannot be dynamic, pass dynamic_axes=None or "
                    f"a smaller mapping"
                ) from e
            try:  # only to say where the op is used
                ep = torch.export.export(wrapper, args, strict=False)
                where = {op: _modules_using(ep, op, type(wrapper.model).__name__) for op in ops}
            except Exception:  # noqa: BLE001 - the message is still useful without it
                where = {op: [] for op in ops}
            desc = "; ".join(f"{op} (in {', '.join(w) or 'the model'})" for op, w in where.items())
            raise OnnxExportError(
                f"operator(s) with no ONNX translation: {desc}. Fix: pass custom_translation_table="
                f"{{torch.ops.<namespace>.<op>.default: <onnxscript function>}} to to_onnx, or give the op a "
                f"decomposition into standard aten ops"
            ) from e


def _dyn_spec(names: Sequence[str], tensors: Sequence[torch.Tensor], axes: DynamicAxes) -> list[dict | None]:
    unknown = sorted(set(axes) - set(names))
    if unknown:
        raise AdapterError(f"dynamic_axes names inputs {unknown} that the model does not take; inputs: {list(names)}")
    out: list[dict | None] = []
    for n, t in zip(names, tensors):
        spec = {}
        for ax, dim_name in (axes.get(n) or {}).items():
            ax = int(ax)
            if not -t.ndim <= ax < t.ndim:
                raise AdapterError(f"dynamic_axes[{n!r}] names axis {ax}, but the example input has {t.ndim} axes")
            if t.shape[ax] < 2:
                raise AdapterError(
                    f"input {n!r} axis {ax} ({dim_name!r}) is dynamic but has size {t.shape[ax]} in the example; "
                    f"torch.export specializes sizes 0 and 1, so use an example with size >= 2"
                )
            spec[ax % t.ndim] = str(dim_name)
        out.append(spec or None)
    return out


# ----------------------------------------------------------------------------- main

def to_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    merged: bool = True,
    dynamic_axes: DynamicAxes | str | None = "auto",
    *,
    adapter: str | None = None,
    defaults: Defaults = "auto",
    allow_plain: bool = False,
    opset: int | None = None,
    custom_translation_table: Mapping[Callable, Callable] | None = None,
) -> OnnxExport:
    """Export ``model`` to ONNX at ``path``, merged or with the adapter as named graph inputs.

    example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs
    (non-tensor values are baked in as constants; HF models get ``use_cache=False``).
    merged: fold the active adapters into the base weights of a deep copy (``model`` is
    never changed). Else keep the delta subgraph, with adapter ``adapter`` (default: the
    single active one) as inputs named ``<site>.<param>`` / ``shared.<group>.<param>``,
    zero defaults (the file runs as the base model), a safetensors sidecar
    ``<stem>.adapter.safetensors`` and onnxruntime's ``<stem>.onnx_adapter``.
    dynamic_axes: ``"auto"`` (batch and sequence axes, see :func:`default_dynamic_axes`),
    ``None`` (static shapes) or ``{input name: {axis: dim name}}``.
    defaults: the adapter inputs' defaults: ``"zero-rank"``, ``"zeros"`` (full shape) or
    ``"auto"`` (zero-rank where the method's registry entry says ``zero_rank_default``).
    allow_plain: a model without peftcompile adapters raises :class:`AdapterError` unless
    this is True, in which case the base model is exported plainly (merged and unmerged alike).
    custom_translation_table: passed to ``torch.onnx.export`` for ops it cannot translate.
    Returns an :class:`OnnxExport`; the same description is stored as JSON in the model's
    ``metadata_props`` under ``"peftcompile"``.
    """
    path = Path(path)
    plain = _check_request(model, path, merged, defaults, allow_plain)
    inputs = _split_inputs(model, example_inputs)
    dyn_in = _dyn_spec(inputs.names, inputs.tensors, _resolve_axes(dynamic_axes, inputs))

    st = state_of(model)
    name: str | None = None
    specs: dict[str, dict] = {}
    found: dict[str, tuple[str, nn.Parameter]] = {}
    zero_rank = False
    target = model
    if not plain and merged:
        name = ",".join(st.active)
        specs = {n: st.specs[n].to_dict() for n in st.active}
        target = merge_and_unload(copy.deepcopy(model))
    elif not plain:
        name = _pick_adapter(model, adapter)
        specs = {name: st.specs[name].to_dict()}
        found = _adapter_inputs(model, name)
        method = get_method(st.specs[name].method.name)
        zero_rank = method.rank_axes is not None and (
            defaults == "zero-rank" or (defaults == "auto" and method.zero_rank_default))
    keys = list(found)
    ad_tensors = [t.detach() for _, t in found.values()]
    method_name = st.specs[name].method.name if found else ""
    ranks = {k: (_rank_axes(method_name, k) or ()) if zero_rank else () for k in keys}
    # Dim.AUTO: torch.export may relate rank axes (RaSA's D has length private + shared).
    dyn_ad = [{ax: Dim.AUTO for ax in ranks[k]} or None for k in keys]

    out_names: list[str] = []
    wrapper = _Exportable(target, inputs, [p for p, _ in found.values()], out_names)
    with _eval(target), torch.no_grad():
        prog = _export(wrapper, inputs.tensors, ad_tensors, dyn_in, dyn_ad, opset, custom_translation_table)

    g = prog.model.graph
    _rename_graph_(g, inputs.names, keys, out_names)
    result = OnnxExport(path, merged, name, specs, [v.name for v in g.inputs if v.name not in found],
                        [v.name for v in g.outputs])
    if keys:
        _adapter_defaults_(g, model, name, keys, ad_tensors, ranks, zero_rank, result)
    prog.model.metadata_props[METADATA_KEY] = json.dumps(result.metadata())
    _write(prog, result, dict(zip(keys, ad_tensors)))
    return result


def _output_files(path: Path) -> list[Path]:
    """The files an export to ``path`` writes (the external data file only for > 2 GB models)."""
    return [path, path.with_name(path.name + ".data"), path.with_name(path.stem + SIDECAR_SUFFIX),
            path.with_name(path.stem + ORT_ADAPTER_SUFFIX),
            path.with_name(path.stem + ORT_ADAPTER_SUFFIX + ORT_ADAPTER_SPEC_SUFFIX)]


def _write(prog: torch.onnx.ONNXProgram, result: OnnxExport, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write every file under its final name into a temporary sibling directory, then
    ``os.replace`` each into place, the ``.onnx`` last: it is the commit point, and side files
    that a crash leaves next to an older ``.onnx`` carry another fingerprint, so bind refuses them."""
    path = result.path
    with temp_sibling_dir(path) as tmp:
        prog.save(str(tmp / path.name))
        if tensors:
            meta = result.metadata()
            write_sidecar(tmp / result.sidecar.name, tensors, meta)
            write_ort_adapter(tmp / result.ort_adapter.name, tensors, export=meta)
        atomic_replace_files(tmp, path.parent, order=[path.name + ".data", path.name])


def _check_request(model: nn.Module, path: Path, merged: bool, defaults: str, allow_plain: bool) -> bool:
    """Validate the arguments before any export work; True if the model has no adapters."""
    if path.suffix != ".onnx":
        raise AdapterError(f"path must end in .onnx, got {path}")
    # Every file the export may write, checked before any export work (seconds to minutes).
    for p in _output_files(path):
        check_writable(p, "ONNX export output")
    if defaults not in ("auto", "zero-rank", "zeros"):
        raise AdapterError(f"defaults must be 'auto', 'zero-rank' or 'zeros', got {defaults!r}")
    st = state_of(model)
    plain = st is None or not st.specs
    if plain and not allow_plain:
        raise AdapterError(
            f"{type(model).__name__} has no peftcompile adapters, so there is nothing to merge or bind. "
            f"Fix: call peftcompile.adapt (or load_adapters) first, or pass allow_plain=True to export the base "
            f"model as it is"
        )
    if not plain and not merged:
        bad = merged_sites(model)
        if bad:
            raise AdapterError(
                f"adapters are merged into the base weights at {bad[:4]}; an unmerged export would carry them twice. "
                f"Fix: peftcompile.unmerge(model) first, or export merged=True"
            )
    return plain


def _resolve_axes(dynamic_axes: DynamicAxes | str | None, inputs: _Inputs) -> DynamicAxes:
    if isinstance(dynamic_axes, str):
        if dynamic_axes != "auto":
            raise AdapterError(f"dynamic_axes must be 'auto', None or a mapping, got {dynamic_axes!r}")
        return default_dynamic_axes(inputs.names, inputs.tensors)
    return dynamic_axes or {}


def _adapter_defaults_(g: Any, model: nn.Module, name: str, keys: list[str], ad_tensors: list[torch.Tensor],
                       ranks: dict[str, tuple[int, ...]], zero_rank: bool, result: OnnxExport) -> None:
    """Give each adapter input a zero default (checked: the method's delta must be exactly 0
    with it) and record the adapter inputs and side files in ``result``."""
    import onnx_ir as ir

    by_name = {v.name: v for v in g.inputs}
    missing = [k for k in keys if k not in by_name]
    if missing:
        raise OnnxExportError(
            f"adapter tensors {missing[:4]} did not become graph inputs (their sites are not on the traced "
            f"path); check the example inputs reach every adapted site"
        )
    if any(isinstance(by_name[k].shape[ax], int) for k in keys for ax in ranks[k]):
        # torch.export specialized a rank axis (a size-1 pool, say): zero rank would
        # be rejected by the graph, so fall back to full-shape zeros.
        zero_rank = False
    # parameter sites (target_parameters) take full-shape zeros: their rank axis is rank x experts, and a
    # zero-size expert reshape crashed onnxruntime (SIGFPE) in our test
    full = {site_key(c.site, p) for _, _, c in site_adapters(model) if c.kind == "param" and name in c
            for p in c[name]._parameters}
    zeros = {}
    for k, t in zip(keys, ad_tensors):
        shape = list(t.shape)
        for ax in ranks[k] if zero_rank and k not in full else ():
            shape[ax] = 0
        zeros[k] = torch.zeros(shape, dtype=t.dtype)
    ok = _defaults_are_zero(model, name, zeros)
    if not ok and zero_rank:
        zeros = {k: torch.zeros_like(t) for k, t in zip(keys, ad_tensors)}
        ok = _defaults_are_zero(model, name, zeros)
    if not ok:
        warnings.warn(
            f"adapter {name!r}: the method's delta is not exactly 0 with zero-valued tensors, so the adapter "
            f"inputs get no defaults and every run must bind an adapter",
            stacklevel=3,
        )
    for k, t in zip(keys, ad_tensors):
        if ok:
            v = by_name[k]
            v.const_value = ir.tensor(zeros[k], name=k)
            g.register_initializer(v)
        result.adapter_inputs[k] = AdapterInput(
            k, tuple(t.shape), tuple(zeros[k].shape) if ok else None, str(t.dtype).removeprefix("torch.")
        )
    result.sidecar = result.path.with_name(result.path.stem + SIDECAR_SUFFIX)
    result.ort_adapter = result.path.with_name(result.path.stem + ORT_ADAPTER_SUFFIX)


def _rename_graph_(g: Any, input_names: Sequence[str], adapter_keys: Sequence[str], output_names: Sequence[str]) -> None:
    """Stable names: user inputs, adapter inputs, outputs, and base weights without the
    wrapper's ``model.`` prefix (so they read as the model's own state_dict keys)."""
    # The exporter names nested inputs "<arg>_<index>".
    rename = {f"inputs_{i}": n for i, n in enumerate(input_names)}
    rename.update({f"adapters_{j}": k for j, k in enumerate(adapter_keys)})
    for v in g.inputs:
        if v.name in rename:
            v.name = rename[v.name]
    taken = {v.name for v in g.inputs} | set(g.initializers)
    if len(output_names) == len(g.outputs) and len(set(output_names)) == len(output_names):
        for v, n in zip(g.outputs, output_names):
            if v not in g.inputs and v.name not in g.initializers and n not in taken:
                v.name = n
    inits = list(g.initializers.values())
    for v in inits:
        new = v.name.removeprefix("model.")
        if new != v.name and new not in taken:
            g.initializers.pop(v.name)
            v.name = new
            g.initializers[new] = v
