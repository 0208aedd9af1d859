"""LoRA: the method's registration -- math (``math.py``), backend lowering, ONNX rank axes, PEFT format."""

from __future__ import annotations

import operator

import torch

from ...errors import AdapterError
from ..registry import ANY, Lowering, Method, ParamForm, PeftFormat, register_method, shapes_check
from .math import (INITS, LoRA, lora_as_lora, lora_conv, lora_conv_shape, lora_delta, lora_delta_bias, lora_delta_weight,
                   lora_embed, lora_embed_init, lora_init, lora_param_check, lora_param_delta_weight, lora_param_init,
                   lora_param_shapes, lora_shapes)

__all__ = ["LoRA", "lora_delta", "lora_delta_weight"]


def _lower(emit, x, w, b, p, cfg: LoRA, xa=None):
    # y = x W^T + b + s (xa A^T) B^T  (+ s b_B with lora_bias: one broadcast add after the fused op)
    y = emit(torch.ops.peftcompile.lowrank_linear.default, x, w, b, p["lora_A"], p["lora_B"], None,
             float(cfg.scaling), xa)
    return _plus_bias(emit, y, [(p, cfg)])


def _stack(emit, x, w, b, pcs):
    # sum_a s_a (x A_a^T) B_a^T = (x [A_1; A_2; ...]^T) [s_1 B_1, s_2 B_2, ...]^T
    A = emit(torch.cat, [p["lora_A"] for p, _ in pcs], 0)
    B = emit(torch.cat, [emit(operator.mul, p["lora_B"], float(c.scaling)) for p, c in pcs], 1)
    y = emit(torch.ops.peftcompile.lowrank_linear.default, x, w, b, A, B, None, 1.0, None)
    return _plus_bias(emit, y, pcs)


def _plus_bias(emit, y, pcs):
    for p, c in pcs:
        if "lora_B_bias" in p:
            y = emit(operator.add, y, emit(operator.mul, p["lora_B_bias"], float(c.scaling)))
    return y


def _from_peft(c: dict) -> LoRA:
    return LoRA(r=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)),
                use_rslora=bool(c.get("use_rslora", False)), lora_bias=bool(c.get("lora_bias", False)),
                # the init only chose the starting point; one we do not offer (eva) reads as the default
                init_lora_weights=next((v for v in INITS if c.get("init_lora_weights", True) is v
                                        or c.get("init_lora_weights") == v and isinstance(v, str)), True))


def _to_peft(cfg: LoRA) -> dict:
    return {"r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
            "lora_bias": cfg.lora_bias, "init_lora_weights": cfg.init_lora_weights}


# PEFT 0.21 LoraConfig fields: ANY = does not change the loaded math; a tuple = the values we
# implement exactly. Everything else (DoRA, aLoRA, weight-modifying inits such as
# PiSSA/OLoRA/LoftQ/CorDA, ...) is refused by name; target_parameters name parameter sites (io.py). rank_pattern /
# alpha_pattern become the spec's own (same matching rule); layers_to_transform/layers_pattern
# only chose the sites, which the checkpoint's tensors name; modules_to_save become the spec's
# trainable modules (a copy per adapter, as PEFT's).
_PEFT_OPTIONS = {
    **{k: ANY for k in ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                        "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
                        "lora_dropout", "fan_in_fan_out", "megatron_core", "qalora_group_size", "runtime_config",
                        "layers_pattern", "ensure_weight_tying", "eva_config", "rank_pattern", "alpha_pattern",
                        "layers_to_transform", "modules_to_save", "target_parameters")},
    "init_lora_weights": (True, False, "gaussian", "eva", "orthogonal"),
    "bias": ("none", "all", "lora_only"), "use_rslora": (False, True), "use_dora": (False,), "use_qalora": (False,), "lora_bias": (False, True),
    "megatron_config": (None,), "trainable_token_indices": (None,), "loftq_config": ({},), "corda_config": (None,),
    "lora_ga_config": (None,), "velora_config": (None,), "alora_invocation_tokens": (None,),
    "monteclora_config": (None,), "layer_replication": (None,),
    "use_bdlora": (None,), "arrow_config": (None,), "kasa_config": (None,),
}


def _factors(p, cfg: LoRA):
    if cfg.lora_bias:  # PEFT's linear combination has no rule for lora_B's bias either
        raise AdapterError("LoRA(lora_bias=True): a weighted combination of factors has no rule for the bias b_B; "
                           "combine adapters trained with lora_bias=False")
    return p["lora_A"], p["lora_B"], cfg.scaling


def _resolve_targets(model, cfg: LoRA, targets, target_parameters) -> tuple | None:
    """PEFT's own rewrite of the targets on transformers-5 MoE models (Mixtral, Qwen2/3-MoE, ...):
    ``peft.utils.transformers_weight_conversion.convert_peft_config_for_transformers`` maps
    "all-linear" and the v4 module names (``w1``/``w3`` -> ``gate_up_proj`` at rank 2r and
    alpha 2 alpha, ``w2`` -> ``down_proj``, ``gate`` -> ``gate.weight``) to target_parameters.
    Run on a throw-away LoraConfig, so our sites are PEFT's sites. None where PEFT changes nothing
    (or this PEFT has no such rewrite)."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # an older PEFT: no rewrite
        return None
    if isinstance(targets, str) and targets != "all-linear":
        return None  # a regex (also our exact-site regexes): taken as written
    tm = None if targets is None else targets if isinstance(targets, str) else list(targets)
    pc = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=tm,
                    target_parameters=list(target_parameters) if target_parameters else None)
    before = (pc.target_modules, pc.target_parameters, dict(pc.rank_pattern or {}), dict(pc.alpha_pattern or {}))
    try:
        convert_peft_config_for_transformers(pc, model=model, conversions=None)
    except ValueError as e:  # e.g. w1 targeted without w3 (fused into one parameter)
        from ...errors import AdapterError

        raise AdapterError(f"targets {targets!r}: {e}") from None
    after = (pc.target_modules, pc.target_parameters, dict(pc.rank_pattern or {}), dict(pc.alpha_pattern or {}))
    same_modules = (after[0] is None) == (before[0] is None) and set(after[0] or ()) == set(before[0] or ())
    if same_modules and set(after[1] or ()) == set(before[1] or ()) and after[2:] == before[2:]:
        return None
    return (None if pc.target_modules is None else tuple(sorted(pc.target_modules)),
            tuple(sorted(pc.target_parameters or ())), after[2], after[3])


def _default_targets(model_type: str) -> list[str] | None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    return table.get(model_type)


register_method(
    Method(
        name="lora",
        config_cls=LoRA,
        shapes=lora_shapes,
        init=lora_init,
        delta=lora_delta,
        delta_weight=lora_delta_weight,
        check_site=lambda cfg, in_f, out_f: None,
        lowering=Lowering(shapes_check(lora_shapes), _lower, _stack),
        rank_axes={"lora_A": (0,), "lora_B": (1,)},
        peft=PeftFormat("LORA", {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_B.bias": "lora_B_bias"}, _from_peft, _to_peft,
                        _PEFT_OPTIONS, _default_targets,
                        embedding_keys={"lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"},
                        conv_shape=lora_conv_shape, resolve_targets=_resolve_targets),
        as_lora=lora_as_lora,
        factors=_factors,
        # alpha = r: scaling 1, so the factors are stored as given
        from_factors=lambda A, B: (LoRA(r=A.shape[0], alpha=float(A.shape[0])), {"lora_A": A, "lora_B": B}),
        scale_params=("lora_B", "lora_B_bias"),
        delta_bias=lora_delta_bias,
        embed=lora_embed,
        embed_init=lora_embed_init,
        conv=lora_conv,
        param_form=ParamForm(lora_param_shapes, lora_param_init, lora_param_delta_weight, lora_param_check),
    )
)
