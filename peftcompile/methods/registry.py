"""The method registry: one entry per adapter method, looked up by name.

A method is one package (``methods/<name>/``): a frozen config dataclass and a
:class:`Method` holding its whole story -- reference math (pure torch on ``[..., in]``),
init and merge weight, how the compile backend lowers it (:class:`Lowering`), which
parameter axes carry its rank (ONNX zero-rank defaults), its PEFT checkpoint format
(:class:`PeftFormat`) and its exact LoRA-equivalent form (runtimes that only know LoRA).
The package registers it with one :func:`register_method` call. Rewrite, merge, kernels,
export and checkpoints read this registry, so no other module branches on a method name:
a new method is a new folder.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch
from torch import nn

__all__ = [
    "MethodConfig",
    "Method",
    "Lowering",
    "PeftFormat",
    "ParamForm",
    "register_method",
    "unregister_method",
    "get_method",
    "method_for",
    "registered_methods",
    "kaiming_",
    "same_shape",
    "shape_mismatch",
    "shapes_check",
    "check_scale",
    "check_positive_int",
    "check_dropout",
    "ANY",
]

Params = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's hyper-parameters (frozen once built)."""

    name: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}

    def __post_init__(self) -> None:
        # the shared checks of every method's usual fields; methods add their own
        if hasattr(self, "r"):
            check_positive_int(self.name, "r", self.r)
        if hasattr(self, "alpha"):
            check_scale(self.name, "alpha", self.alpha)
        if hasattr(self, "dropout"):
            check_dropout(self.name, self.dropout)

    @property
    def dropout_p(self) -> float:
        return float(getattr(self, "dropout", 0.0))


@dataclass(frozen=True)
class Method:
    """Reference math of one method.

    shapes(cfg, in_f, out_f, n) -> {param name: shape}  (per-site parameters;
                                                       n = sites sharing with it, 1 if none)
    init(cfg, params, n) -> None                       (in place, PEFT conventions)
    delta(x, params, cfg) -> [..., out]                (x already dropped out)
    delta_weight(params, cfg) -> [out, in]             (so that delta(x) == x @ dW.T)
    check_site(cfg, in_f, out_f) -> str | None        (why the site cannot take it)
    Optional, for methods that share tensors across a group of sites (RaSA):
    group_key(site_name, in_f, out_f) -> hashable | None
    shared_shapes(cfg, in_f, out_f, n) -> {name: shape}  (stored once per group)
    shared_init(cfg, shared, n) -> None
    ``delta``/``delta_weight`` then receive the site's and the group's tensors in one mapping.
    shrink_group(cfg, members, kept, {site: tensors}, shared) -> ({site: tensors}, shared)
        the tensors of a group cut down to its ``kept`` members (DiffoRA's warm start).
    Integration (all optional):
    lowering: how the compile backend fuses ``base + delta`` (None: stays reference math).
    rank_axes: {param: axes carrying the rank}; setting them to 0 must give a delta of
        exactly 0 (ONNX zero-rank defaults). ``zero_rank_default``: use them by default.
    peft: the PEFT checkpoint format this method reads (and, with ``write_config``, writes).
    as_lora(params, cfg) -> (A [R, in], B [out, R]): the same delta as a plain LoRA pair,
        exactly, scaling folded into B (``delta(x) == (x @ A.T) @ B.T``).
    factors(params, cfg) -> (A [r, in], B [out, r], scaling): when the delta is literally
        ``scaling * (x @ A.T) @ B.T`` of the method's own parameters (PEFT's ``linear``
        weighted combination mixes these factors, not the deltas).
    from_factors(A [R, in], B [out, R]) -> (cfg, params): an adapter of this method whose
        delta is exactly ``(x @ A.T) @ B.T`` (weighted combinations are built in this form).
    scale_params: parameters that, each multiplied by one scalar g, multiply the delta by g
        (one factor of every additive term: LoRA's B; GraLoRA's B and hybrid B; RaSA's D).
        Under torch.compile the site's on/off gate (a tensor, so that disabling adapters
        does not recompile) multiplies these: an [out, r]-sized product. Empty: the gate
        multiplies the adapter's input instead ([tokens, in]-sized; deltas are linear in x).
    embed(ids, p, cfg, kwargs) -> the delta of an ``nn.Embedding`` site (in = num_embeddings,
        out = embedding_dim) for integer ``ids``; ``kwargs`` are the embedding's own
        ``F.embedding`` options (padding_idx, scale_grad_by_freq, sparse). Optional: a method
        without it refuses Embedding targets. ``delta_weight`` gives dW [dim, num] (W += dW.T).
    embed_init(cfg, p) -> initialise an embedding site's own parameters (with ``embed``);
        AdapterError if this config has no embedding form. None: ``init`` (it must then start
        the delta at exactly 0 there too).
    delta_bias(params, cfg) -> [out] or None: a delta's constant term (LoRA's ``lora_bias``),
        which merging adds to the base bias; None when the delta is linear in x.
    conv(x, p, cfg, opts) -> the delta of an ``nn.Conv1d/2d/3d`` site for its input ``x``
        ([N, C_in, *spatial], already dropped out), with the parameters of a linear site of
        in = C_in * prod(kernel_size), out = C_out (the conv weight viewed as [out, in]: a linear
        on the unfolded input patches; ``init`` initialises them). ``opts`` are the base conv's
        ``kernel_size``, ``stride`` and ``padding`` (dilation 1, groups 1 and zero padding are
        checked before). Optional: a method without it refuses conv targets. ``delta_weight``
        gives dW [out, C_in * prod(k)] (W += dW.view(W.shape)).
    param_form: the method on a parameter the host module uses itself (``AdapterSpec.target_parameters``,
        e.g. MoE experts stored as one [experts, out, in] tensor): see :class:`ParamForm`.
        Optional: a method without it refuses parameter targets.
    """

    name: str
    config_cls: type
    shapes: Callable[..., dict[str, tuple[int, ...]]]
    init: Callable[..., None]
    delta: Callable[..., torch.Tensor]
    delta_weight: Callable[..., torch.Tensor]
    check_site: Callable[..., str | None]
    group_key: Callable[..., object] | None = None
    shared_shapes: Callable[..., dict[str, tuple[int, ...]]] | None = None
    shared_init: Callable[..., None] | None = None
    shrink_group: Callable[..., tuple[dict, dict]] | None = None
    lowering: "Lowering | None" = None
    rank_axes: Mapping[str, tuple[int, ...]] | None = None
    zero_rank_default: bool = True
    peft: "PeftFormat | None" = None
    as_lora: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    factors: Callable[..., tuple[torch.Tensor, torch.Tensor, float]] | None = None
    from_factors: Callable[..., tuple[MethodConfig, dict[str, torch.Tensor]]] | None = None
    scale_params: tuple[str, ...] = ()
    embed: Callable[..., torch.Tensor] | None = None
    embed_init: Callable[..., None] | None = None
    delta_bias: Callable[..., "torch.Tensor | None"] | None = None
    conv: Callable[..., torch.Tensor] | None = None
    param_form: "ParamForm | None" = None

    @property
    def shares(self) -> bool:
        return self.group_key is not None

    def param_names(self, cfg: MethodConfig) -> frozenset[str]:
        """Names of every tensor the delta reads: the site's own and, if shared, the group's."""
        # the names do not depend on the sizes, so any sizes do
        names = set(self.shapes(cfg, 0, 0, 1))
        if self.shared_shapes is not None:
            names |= set(self.shared_shapes(cfg, 0, 0, 1))
        return frozenset(names)


@dataclass(frozen=True)
class Lowering:
    """How the compile backend turns one method's ``base + delta`` into a fused op.

    check(cfg, shapes, in_f, out_f) -> why the parameter shapes do not fit, or None
    replace(emit, x, w, b, p, cfg, xa) -> the node computing ``base + delta``; ``emit(target,
        *args)`` inserts a call_function node; w is W as [out, in]; p maps param -> node;
        xa is the adapter's input node when it is not x itself (the output of an active
        dropout), else None. The ops take it as their ``xa`` argument.
    stack(emit, x, w, b, [(p, cfg), ...]) -> one node computing ``base + sum of the deltas``
        of several active adapters of this method on one site (factors concatenated along
        the rank, scalings folded in), or a string saying why not. Optional.
    The parameters the region must read are :meth:`Method.param_names`.
    """

    check: Callable[[MethodConfig, Mapping[str, torch.Size], int, int], "str | None"]
    replace: Callable[..., object]
    stack: Callable[..., object] | None = None


@dataclass(frozen=True)
class PeftFormat:
    """A method's checkpoint format in Hugging Face PEFT.

    peft_type: PEFT's ``peft_type`` (e.g. "LORA"); keys: PEFT key suffix -> our param;
    read_config(peft config dict) -> our config, raising ValueError for anything it cannot
    honour exactly (name the field).
    """

    peft_type: str
    keys: Mapping[str, str]
    read_config: Callable[[dict], MethodConfig]
    #: our config -> PEFT's method-specific config fields (for ``save_adapters(format="peft")``)
    write_config: Callable[[MethodConfig], dict] | None = None
    #: every PEFT config field we know -> the values we honour exactly (a tuple) or ANY.
    #: A field not listed, or a value not allowed, is refused by name: loading it as the
    #: plain method would give wrong outputs silently (DoRA, rsLoRA, aLoRA, rank patterns...).
    options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    #: model_type -> PEFT's default target modules for this method (``target_modules`` omitted),
    #: or None where PEFT has no default. A callable so that importing peft stays lazy.
    default_targets: Callable[[str], "list[str] | None"] | None = None
    #: PEFT key suffix -> our param at ``nn.Embedding`` sites (LoRA: ``lora_embedding_A``/``_B``)
    embedding_keys: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: (our param, its shape, the conv's kernel_size) -> the shape PEFT stores it in at an
    #: ``nn.Conv1d/2d/3d`` site (ours is the linear-site shape; the values are the same, reshaped).
    #: None: the shapes are the same.
    conv_shape: Callable[[str, tuple, tuple], tuple] | None = None
    #: PEFT's own target resolution on transformers models, where it differs from the names as
    #: given (PEFT 0.21 maps "all-linear" and v4 expert names on Mixtral / Qwen-MoE to
    #: ``target_parameters``): (model, cfg, targets, target_parameters) -> (targets,
    #: target_parameters, rank_pattern additions, alpha_pattern additions), or None if unchanged.
    resolve_targets: Callable[..., "tuple | None"] | None = None


@dataclass(frozen=True)
class ParamForm:
    """A method on a targeted parameter W ([out, in], or [experts, out, in] for stacked MoE
    experts; PEFT's ``ParamWrapper``): the host module's own forward runs on ``W + dW``.

    shapes(cfg, in_f, out_f, experts) -> {param: shape}     (experts = 1 for a 2-D W)
    init(cfg, params, experts) -> None                        (in place)
    delta_weight(params, cfg, experts) -> dW [experts, out, in]
    check(cfg) -> why this config cannot adapt a parameter, or None (e.g. dropout: W has no
        input to drop out)
    """

    shapes: Callable[..., dict[str, tuple[int, ...]]]
    init: Callable[..., None]
    delta_weight: Callable[..., torch.Tensor]
    check: Callable[..., "str | None"] = lambda cfg: None


#: PeftFormat.options value: any value of that field is honoured (it does not change the math).
ANY = object()


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method; names are lower-case and unique."""
    if method.name != method.name.lower() or not method.name:
        raise ValueError(f"method names are lower-case and non-empty, got {method.name!r}")
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    method.config_cls.name = method.name
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method (tests register throw-away methods)."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(_REGISTRY)}") from None


def method_for(cfg: MethodConfig) -> Method:
    return get_method(cfg.name)


def registered_methods() -> dict[str, Method]:
    return dict(_REGISTRY)


def kaiming_(t: torch.Tensor) -> None:
    """nn.Linear's default init (what PEFT uses for A)."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def config_from_dict(d: Mapping) -> MethodConfig:
    """A method config from ``MethodConfig.to_dict()`` (e.g. read from a checkpoint).

    Raises AdapterError naming an unknown method, unknown or missing fields and bad values."""
    from ..errors import AdapterError

    d = dict(d)
    name = d.pop("method", None)
    if name not in _REGISTRY:
        raise AdapterError(f"unknown method {name!r}; registered: {sorted(_REGISTRY)}")
    cls = _REGISTRY[name].config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise AdapterError(f"{name}: unknown config field(s) {unknown}; known: {sorted(fields)}")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{name}: invalid config {d}: {e}") from None


def check_scale(method: str, name: str, value: object) -> None:
    """A scaling hyper-parameter (alpha) must be a finite, non-zero real number: NaN/inf would
    poison every output, and 0 silently turns the adapter off."""
    from ..errors import AdapterError

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
        raise AdapterError(f"{method}: {name} must be a finite non-zero number, got {value!r}")


def check_positive_int(method: str, name: str, value: object, minimum: int = 1) -> None:
    from ..errors import AdapterError

    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise AdapterError(f"{method}: {name} must be {what}, got {value!r}")


def check_dropout(method: str, value: object) -> None:
    from ..errors import AdapterError

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise AdapterError(f"{method}: dropout must be in [0, 1), got {value!r}")


def same_shape(a, b) -> bool:
    """Equal without adding guards: under dynamic shapes sizes are SymInts, and a check that
    is not statically known counts as a mismatch (the region then stays reference math)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(statically_known_true(i == j) for i, j in zip(a, b))


def shape_mismatch(expected: Mapping[str, tuple], got: Mapping[str, torch.Size]) -> str | None:
    """Why ``got`` (param -> shape) does not have the ``expected`` shapes, or None."""
    bad = [f"{k}: {tuple(got[k])} != {tuple(v)}" for k, v in expected.items() if not same_shape(got[k], v)]
    return "parameter shapes do not fit the site: " + "; ".join(bad) if bad else None


def shapes_check(shapes: Callable[..., dict]) -> Callable[..., str | None]:
    """A :class:`Lowering` check for a method without shared tensors: own shapes must fit."""
    def check(cfg, got, in_f, out_f):
        return shape_mismatch(shapes(cfg, in_f, out_f, 1), got)
    return check
