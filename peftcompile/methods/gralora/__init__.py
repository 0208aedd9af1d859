"""GraLoRA: the method's registration -- math (``math.py``), backend lowering, ONNX rank axes, PEFT format."""

from __future__ import annotations

import operator

import torch

from ..registry import ANY, Lowering, Method, PeftFormat, register_method, shapes_check
from .math import (GraLoRA, gralora_as_lora, gralora_check_site, gralora_conv, gralora_delta, gralora_delta_weight,
                   gralora_embed, gralora_embed_init, gralora_init, gralora_shapes)

__all__ = ["GraLoRA", "gralora_delta", "gralora_delta_weight"]


def _lower(emit, x, w, b, p, cfg: GraLoRA, xa=None):
    # block-wise A [k, in/k, r], B [k, r, out/k], optional hybrid pair
    return emit(torch.ops.peftcompile.block_lowrank_linear.default, x, w, b, p["gralora_A"], p["gralora_B"],
                p.get("gralora_A_hybrid"), p.get("gralora_B_hybrid"), int(cfg.k), float(cfg.scaling), xa)


def _stack(emit, x, w, b, pcs):
    """Several GraLoRA adapters with the same k as one of rank sum(r): chunk j of every z_i is
    the adapters' chunks side by side, so A[i]'s columns and B[j]'s rows interleave per chunk
    (A_a [k, in_b, k, c_a] -> concatenated on c; B_a [k(j), k(i), c_a, out_b] likewise, scaled)."""
    ks = {c.k for _, c in pcs}
    if len(ks) > 1:
        return f"several GraLoRA adapters with different k {sorted(ks)} on one site"
    k = ks.pop()
    As, Bs, Ahs, Bhs = [], [], [], []
    for p, c in pcs:
        A, B = p["gralora_A"], p["gralora_B"]
        in_b, out_b, ch = A.meta["example_value"].shape[1], B.meta["example_value"].shape[2], c.r // k
        As.append(emit(torch.reshape, A, (k, in_b, k, ch)))
        Bs.append(emit(torch.reshape, emit(operator.mul, B, float(c.scaling)), (k, k, ch, out_b)))
        if "gralora_A_hybrid" in p:
            Ahs.append(p["gralora_A_hybrid"])
            Bhs.append(emit(operator.mul, p["gralora_B_hybrid"], float(c.scaling)))
    R = sum(c.r for _, c in pcs)
    A = emit(torch.reshape, emit(torch.cat, As, 3), (k, in_b, R))
    B = emit(torch.reshape, emit(torch.cat, Bs, 2), (k, R, out_b))
    A_h = emit(torch.cat, Ahs, 0) if Ahs else None
    B_h = emit(torch.cat, Bhs, 1) if Bhs else None
    return emit(torch.ops.peftcompile.block_lowrank_linear.default, x, w, b, A, B, A_h, B_h, k, 1.0, None)


def _from_peft(c: dict) -> GraLoRA:
    return GraLoRA(r=int(c["r"]), k=int(c["gralora_k"]), alpha=float(c["alpha"]),
                   hybrid_r=int(c.get("hybrid_r", 0)), dropout=float(c.get("gralora_dropout", 0.0)))


def _to_peft(cfg: GraLoRA) -> dict:
    return {"r": cfg.r, "gralora_k": cfg.k, "alpha": cfg.alpha, "hybrid_r": cfg.hybrid_r,
            "gralora_dropout": cfg.dropout}


# PEFT 0.21 GraloraConfig fields (see lora/__init__.py for the convention).
_PEFT_OPTIONS = {
    **{k: ANY for k in ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                        "revision", "inference_mode", "r", "hybrid_r", "target_modules", "alpha", "gralora_dropout",
                        "gralora_k", "fan_in_fan_out", "init_weights", "layers_pattern", "layers_to_transform", "modules_to_save")},
    "bias": ("none",),
}


def _default_targets(model_type: str) -> list[str] | None:
    from peft.utils import constants

    return getattr(constants, "TRANSFORMERS_MODELS_TO_GRALORA_TARGET_MODULES_MAPPING", {}).get(model_type)


register_method(
    Method(
        name="gralora",
        config_cls=GraLoRA,
        shapes=gralora_shapes,
        init=gralora_init,
        delta=gralora_delta,
        delta_weight=gralora_delta_weight,
        check_site=gralora_check_site,
        lowering=Lowering(shapes_check(gralora_shapes), _lower, _stack),
        rank_axes={"gralora_A": (2,), "gralora_B": (1,), "gralora_A_hybrid": (0,), "gralora_B_hybrid": (1,)},
        # The block product reshapes z to [..., k, k, r/k]; with a symbolic r torch.export took
        # 4-5x longer on a tiny Llama (35 s vs 7 s), so ONNX defaults are full-shape zeros
        # (B = 0 makes the delta 0) unless zero rank is asked for.
        zero_rank_default=False,
        peft=PeftFormat(
            "GRALORA",
            {"gralora_A": "gralora_A", "gralora_B": "gralora_B",
             "gralora_A_general.weight": "gralora_A_hybrid", "gralora_B_general.weight": "gralora_B_hybrid"},
            _from_peft,
            _to_peft,
            _PEFT_OPTIONS,
            _default_targets,
        ),
        as_lora=gralora_as_lora,
        scale_params=("gralora_B", "gralora_B_hybrid"),
        embed=gralora_embed,
        embed_init=gralora_embed_init,
        conv=gralora_conv,
    )
)
