"""PEFT's tiny models, test-case tables and the helpers the ported tests share.

The model classes are copied from PEFT's ``tests/test_custom_models.py`` (only those whose
layers peftcompile adapts, plus the grouped-Conv/MHA ones the refusal tests need). ``to_spec`` is the
translation a PEFT user does by hand: ``LoraConfig`` / ``GraloraConfig`` kwargs -> our
``AdapterSpec`` (``target_modules`` keeps PEFT's meaning: a str is a regex matched against
the whole name, a list holds name suffixes). ``twin`` builds the same base model twice, once
through ``peft.get_peft_model`` and once through ``peftcompile.adapt``, with the same adapter
weights, so each ported test can use PEFT as the yardstick.
"""

from __future__ import annotations

import copy

import torch
from peft import GraloraConfig, LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftcompile as pc
from peftcompile.methods import method_for
from peftcompile.state import site_adapters, state_of


# ------------------------------------------------------------------ PEFT's tiny models (verbatim)
class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


class MLP_LayerNorm(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.layernorm0 = nn.LayerNorm(10, 10)
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.layernorm1 = nn.LayerNorm(20, 20)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = self.layernorm0(X)
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.layernorm1(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


class Block(nn.Module):
    def __init__(self, bias=True, size=10):
        super().__init__()
        self.lin0 = nn.Linear(size, size, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(size, size, bias=bias)

    def forward(self, X):
        X = X.float()
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.lin1(X)
        return X


class DeepMLP(nn.Module):
    # PEFT's tests use size=256 ("a size that works with all adapters"); LoRA and GraLoRA work at 16.
    def __init__(self, bias=True, num_hidden_layers=12, size=10):
        super().__init__()
        self.layers = nn.ModuleList([Block(bias=bias, size=size) for _ in range(num_hidden_layers)])
        self.out = nn.Linear(size, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.float()
        for layer in self.layers:
            X = layer(X)
        X = self.out(X)
        X = self.sm(X)
        return X


class ModelEmbConv1D(nn.Module):
    def __init__(self, emb_size=100):
        super().__init__()
        self.emb = nn.Embedding(emb_size, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = self.emb(X)
        X = self.conv1d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(9, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = X.reshape(-1, 1, 10)
        X = self.conv1d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv2D(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3, bias=bias)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = X.reshape(-1, 5, 3, 3)
        X = self.conv2d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv2DGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        # groups is set as 8 since default r=8
        # hence to make r divisible by groups
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = X.flatten()
        X = self.lin0(X)
        X = X.reshape(2, 16, 3, 3)
        X = self.conv2d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


class ModelConv2DGroups2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(12800, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        # Note: needs a different input shape, thus ignore original input
        X = torch.arange(9 * 16 * 20 * 20).view([9, 16, 20, 20]).to(self.conv2d.weight.device)
        X = X.to(self.dtype)
        X = self.conv2d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        # If necessary, convert from 2D image to 3D volume
        if X.dim() == 2:
            X = torch.stack([X] * 3, dim=-1)
        X = X.reshape(-1, 5, 3, 3, 3)
        X = self.conv3d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelMha(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X, _ = self.mha(X, X, X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


MODELS = {"MLP": MLP, "MLP_LayerNorm": MLP_LayerNorm, "EmbConv1D": ModelEmbConv1D, "Conv1d": ModelConv1D,
          "Conv2d": ModelConv2D, "Conv2dGroups": ModelConv2DGroups, "Conv2dGroups2": ModelConv2DGroups2,
          "Conv3d": ModelConv3D, "MHA": ModelMha}


def make(model_id: str, dtype=torch.float32) -> nn.Module:
    """PEFT's ``MockTransformerWrapper.from_pretrained(model_id, dtype)`` (seeds 0: the same
    "pretrained" weights every time)."""
    torch.manual_seed(0)
    return MODELS[model_id]().to(dtype)


def inputs() -> dict:
    """PEFT's ``TestPeftCustomModel.prepare_inputs_for_testing``."""
    return {"X": torch.arange(90).view(9, 10)}


# ------------------------------------------------------------------ PEFT's TEST_CASES rows
#: The LoRA and GraLoRA rows of PEFT's TEST_CASES that peftcompile implements, verbatim.
SUPPORTED = [
    ("Vanilla MLP 1 LoRA", "MLP", LoraConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", LoraConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", LoraConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", LoraConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", LoraConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", LoraConfig, {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP", LoraConfig,
     {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", LoraConfig, {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", LoraConfig, {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", LoraConfig, {"target_modules": ["emb", "conv1d"]}),
    ("Conv1d LoRA", "Conv1d", LoraConfig, {"target_modules": ["conv1d"]}),
    ("Conv2d 1 LoRA", "Conv2d", LoraConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", LoraConfig, {"target_modules": ["conv2d", "lin0"]}),
    ("Conv3d 1 LoRA", "Conv3d", LoraConfig, {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", LoraConfig, {"target_modules": ["conv3d", "lin0"]}),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", LoraConfig,
     {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", LoraConfig,
     {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    ("Vanilla MLP 1 GraLoRA", "MLP", GraloraConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 GraLoRA", "MLP", GraloraConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 GraLoRA", "MLP", GraloraConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 GraLoRA", "MLP", GraloraConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 GraLoRA", "MLP", GraloraConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    # PEFT's "Vanilla MLP 7 Hybrid GraLoRA" also lists lin1 in modules_to_save, which we refuse (see
    # REFUSED); the hybrid pair itself is covered by this row without the overlap.
    ("Vanilla MLP 7 Hybrid GraLoRA (no modules_to_save)", "MLP", GraloraConfig,
     {"target_modules": ["lin0", "lin1"], "hybrid_r": 4}),
    ("Embedding + transformers Conv1D 1 GraLoRA", "EmbConv1D", GraloraConfig,
     {"target_modules": ["conv1d"], "gralora_k": 1}),
]
IDS = [row[0] for row in SUPPORTED]

#: Rows with PEFT's ``modules_to_save`` (our ``trainable``: one copy per adapter, as PEFT).
def has_trainable(kwargs: dict) -> bool:
    return bool(kwargs.get("modules_to_save"))


def to_spec(config_cls, kwargs: dict) -> pc.AdapterSpec:
    """The peftcompile spec of a PEFT config (only what peftcompile implements)."""
    kw = dict(kwargs)
    targets = kw.pop("target_modules")  # None: PEFT's per-architecture default (ours too)
    trainable = kw.pop("modules_to_save", None)
    extra = {k: kw.pop(k) for k in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern")
             if kw.get(k) is not None}
    for ignored in ("init_lora_weights", "init_weights", "task_type", "base_model_name_or_path"):
        kw.pop(ignored, None)
    bias = kw.pop("bias", "none")
    if config_cls is LoraConfig:
        method = pc.LoRA(r=kw.pop("r", 8), alpha=kw.pop("lora_alpha", 8), dropout=kw.pop("lora_dropout", 0.0),
                         use_rslora=kw.pop("use_rslora", False), lora_bias=kw.pop("lora_bias", False))
    elif config_cls is GraloraConfig:
        method = pc.GraLoRA(r=kw.pop("r", 32), k=kw.pop("gralora_k", 2), alpha=kw.pop("alpha", 64),
                            hybrid_r=kw.pop("hybrid_r", 0), dropout=kw.pop("gralora_dropout", 0.0))
    else:  # pragma: no cover - the tables only hold LoRA and GraLoRA
        raise AssertionError(config_cls)
    assert not kw, f"no peftcompile translation for {kw}"
    return pc.AdapterSpec(method, targets=targets if targets is None or isinstance(targets, str) else list(targets),
                          trainable=trainable, bias=bias, **extra)


def init_false(config_cls, kwargs: dict) -> dict:
    """PEFT's ``testing_utils.set_init_weights_false``."""
    key = "init_lora_weights" if config_cls is LoraConfig else "init_weights"
    return {**kwargs, key: False}


def transplant(peft_model, ours: nn.Module, name: str = "default") -> None:
    """Copy adapter ``name`` of a PEFT model (and its modules_to_save copies) into ours."""
    cfg = state_of(ours).specs[name].method
    fmt = method_for(cfg).peft
    keys = {**fmt.keys, **fmt.embedding_keys}  # PEFT key suffix -> our param (linear and embedding sites)
    live = ours.state_dict(keep_vars=True)
    done = set()
    with torch.no_grad():
        for k, t in get_peft_model_state_dict(peft_model, adapter_name=name).items():
            k = k.removeprefix("base_model.model.")
            for suffix, param in keys.items():
                if k.endswith("." + suffix):
                    k = f"{k[: -len(suffix) - 1]}.peftcompile.{name}.{param}"
                    break
            else:  # bias="all"/"lora_only": a trained base bias (PEFT's base_layer.bias at a wrapped site)
                k = k.replace(".base_layer.", ".")
            # a site's adapter tensor (PEFT's conv layout [r, C_in, *k] / [out, r, 1, ...] at nn.ConvNd
            # sites, ours flattened: the same values), a modules_to_save weight or a trained bias
            live[k].copy_(t.reshape(live[k].shape) if t.numel() == live[k].numel() else t)
            done.add(k)
    ours_adapter = {k for k in live if f".peftcompile.{name}." in k}
    assert ours_adapter <= done, f"not transplanted: {sorted(ours_adapter - done)}"


def twin(model_id: str, config_cls, kwargs: dict, *, name: str = "default", init_weights_false: bool = True,
         dtype=torch.float32):
    """(base, PEFT model, our model): one base model, the same adapter weights in both."""
    return twin_of(make(model_id, dtype), config_cls, kwargs, name=name, init_weights_false=init_weights_false)


def twin_of(base: nn.Module, config_cls, kwargs: dict, *, name: str = "default", init_weights_false: bool = True,
            spec: pc.AdapterSpec | None = None):
    cfg_kwargs = init_false(config_cls, kwargs) if init_weights_false else kwargs
    peft_model = get_peft_model(copy.deepcopy(base), config_cls(**cfg_kwargs), adapter_name=name)
    ours = pc.adapt(copy.deepcopy(base), spec or to_spec(config_cls, kwargs), name=name)
    transplant(peft_model, ours, name)
    return base, peft_model, ours


def active(model: nn.Module) -> list[str]:
    st = state_of(model)
    return list(st.active) if st else []


def adapter_sets(model: nn.Module):
    return [c for _, _, c in site_adapters(model)]


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def is_adapter_param(name: str) -> bool:
    return ".peftcompile." in name or name.startswith("peftcompile_shared.")


def check_base_model_state_dict_round_trip(model: nn.Module, spec: pc.AdapterSpec) -> None:
    """PEFT's test_get_base_model_state_dict: the base keys and values come back from an adapted
    model, and set_base_model_state_dict restores perturbed base weights."""
    base_model_keys = set(model.state_dict().keys())
    original_state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = pc.adapt(model, spec)
    extracted_state_dict = pc.get_base_model_state_dict(peft_model)
    assert set(extracted_state_dict.keys()) == base_model_keys
    for key in original_state_dict:
        assert torch.allclose(original_state_dict[key], extracted_state_dict[key]), f"Value mismatch for key {key}"
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if not is_adapter_param(name) and param.is_floating_point():
                param.add_(torch.randn_like(param) * 0.1)
    pc.set_base_model_state_dict(peft_model, original_state_dict)
    restored_state_dict = pc.get_base_model_state_dict(peft_model)
    for key in original_state_dict:
        assert torch.allclose(original_state_dict[key], restored_state_dict[key]), f"Roundtrip failed for {key}"
