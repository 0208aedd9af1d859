"""Port of PEFT's ``tests/test_config.py`` (``TestPeftConfig``) for LoRA and GraLoRA: our configs
are ``pc.LoRA`` / ``pc.GraLoRA`` inside a ``pc.AdapterSpec``, serialised by ``to_dict`` /
``from_dict`` (what ``save_adapters`` writes to ``adapter_config.json``). Plus the config
validation PEFT leaves to later (bad r / alpha / dropout / targets: PEFT 0.21 accepts r=0,
alpha=0 and NaN; ours refuses each, README "Guarantees").
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest
import torch
from peft import GraloraConfig, LoraConfig, get_peft_model

import peftcompile as pc
from peftcompile.errors import AdapterTypeError
from peftcompile.state import site_adapters, state_of

from .common import make

ALL_CONFIG_CLASSES = [
    pc.AdapterSpec(pc.LoRA()),
    pc.AdapterSpec(pc.LoRA(r=4, alpha=8, dropout=0.1), targets=["lin0", "lin1"], exclude=["lin1"]),
    pc.AdapterSpec(pc.GraLoRA()),
    pc.AdapterSpec(pc.GraLoRA(r=8, k=4, alpha=16, hybrid_r=2, dropout=0.05), targets=r".*lin\d",
                   trainable=["sm"]),
]
IDS = ["lora_default", "lora", "gralora_default", "gralora_hybrid"]
CONFIGS = pytest.mark.parametrize("config", ALL_CONFIG_CLASSES, ids=IDS)


@CONFIGS
def test_methods(config):
    # test_methods: every config has to_dict / from_dict (PEFT: save_pretrained / from_pretrained)
    assert hasattr(config, "to_dict") and hasattr(pc.AdapterSpec, "from_dict")
    assert isinstance(config.to_dict(), dict)  # test_to_dict


@CONFIGS
def test_save_pretrained(config, tmp_path):
    # test_save_pretrained / test_from_json_file: JSON round trip equals the config
    (tmp_path / "adapter_config.json").write_text(json.dumps(config.to_dict()))
    config_from_pretrained = pc.AdapterSpec.from_dict(json.loads((tmp_path / "adapter_config.json").read_text()))
    assert config.to_dict() == config_from_pretrained.to_dict()
    assert config_from_pretrained == config


@CONFIGS
def test_save_adapters_records_the_config(config, tmp_path):
    # the config save_adapters writes is the spec's to_dict (with targets as given)
    spec = dataclasses.replace(config, targets=["lin0"], exclude=None)
    if isinstance(spec.method, pc.GraLoRA):
        spec = dataclasses.replace(spec, method=dataclasses.replace(spec.method, k=2))
    pc.save_adapters(pc.adapt(make("MLP"), spec), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert pc.AdapterSpec.from_dict(cfg["spec"]) == spec


@CONFIGS
def test_config_copy(config):
    copied = copy.copy(config)
    assert config.to_dict() == copied.to_dict()


@CONFIGS
def test_config_deepcopy(config):
    copied = copy.deepcopy(config)
    assert config.to_dict() == copied.to_dict()


@CONFIGS
def test_config_pickle_roundtrip(config):
    copied = pickle.loads(pickle.dumps(config))
    assert config.to_dict() == copied.to_dict()


@CONFIGS
def test_set_attributes(config):
    # PEFT configs are mutable; ours are frozen dataclasses (a spec attached to a model cannot change
    # under it: peftcompile/methods/registry.py "frozen once built"). dataclasses.replace makes a new one.
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.method.r = 3
    new = dataclasses.replace(config, method=dataclasses.replace(config.method, r=config.method.r * 2))
    assert pc.AdapterSpec.from_dict(json.loads(json.dumps(new.to_dict()))) == new != config


def test_from_pretrained_sanity_check(tmp_path):
    # a JSON that is not an adapter config is refused, naming what is missing
    non_peft_json = {"foo": "bar", "baz": 123}
    with pytest.raises(pc.AdapterError, match="needs a 'method' mapping"):
        pc.AdapterSpec.from_dict(non_peft_json)
    (tmp_path / "adapter_config.json").write_text(json.dumps(non_peft_json))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(pc.AdapterError, match="not a peftcompile adapter config"):
        pc.load_adapters(make("MLP"), tmp_path)
    with pytest.raises(pc.AdapterError, match="PEFT type '' is not supported"):
        pc.load_peft_adapter(make("MLP"), tmp_path)


@pytest.mark.parametrize("config_cls, kwargs", [(LoraConfig, {}), (GraloraConfig, {})], ids=["lora", "gralora"])
def test_from_pretrained_forward_compatible(config_cls, kwargs, tmp_path):
    # PEFT loads a config with unknown keys from a newer version, warning and ignoring them. Ours refuses
    # unknown fields by name (README "Guarantees": "unknown fields" -- an ignored field could change
    # the math), in PEFT checkpoints and in our own spec.
    get_peft_model(make("MLP"), config_cls(target_modules=["lin0"], **kwargs)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["foobar"] = "baz"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    model = make("MLP")
    with pytest.raises(pc.AdapterError, match="foobar"):
        pc.load_peft_adapter(model, tmp_path)
    assert state_of(model) is None
    with pytest.raises(pc.AdapterError, match=r"unknown adapter spec field\(s\) \['foobar'\]"):
        pc.AdapterSpec.from_dict({**pc.AdapterSpec(pc.LoRA()).to_dict(), "foobar": "baz"})
    with pytest.raises(pc.AdapterError, match=r"unknown config field\(s\) \['foobar'\]"):
        pc.AdapterSpec.from_dict({"method": {**pc.LoRA().to_dict(), "foobar": 1}})


def test_target_modules_str_and_list_keep_peft_meaning():
    # test_save_pretrained_with_target_modules / PEFT's matching: a list holds name suffixes, a str is a
    # regex matched against the whole name
    from .common import DeepMLP

    def sites(targets):
        torch.manual_seed(0)
        m = pc.adapt(DeepMLP(size=8, num_hidden_layers=2), pc.AdapterSpec(pc.LoRA(r=2), targets=targets))
        return sorted(c.site for _, _, c in site_adapters(m))

    def peft_sites(targets):
        torch.manual_seed(0)
        m = get_peft_model(DeepMLP(size=8, num_hidden_layers=2), LoraConfig(r=2, target_modules=targets))
        return sorted(n.removeprefix("base_model.model.") for n, mod in m.named_modules() if hasattr(mod, "lora_A"))

    for targets in (["lin0"], ["layers.1.lin1", "out"], r"layers\.\d\.lin0", r".*\.lin1"):
        assert sites(targets) == peft_sites(targets), targets
    assert pc.AdapterSpec(pc.LoRA(), targets=("a", "list")).to_dict()["targets"] == ["a", "list"]


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must be a positive int"), ({"r": -1}, "r must be a positive int"),
    ({"r": 1.5}, "r must be a positive int"), ({"alpha": 0}, "alpha must be a finite non-zero number"),
    ({"alpha": float("nan")}, "alpha must be a finite non-zero number"),
    ({"alpha": float("inf")}, "alpha must be a finite non-zero number"),
    ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"), ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
], ids=["r0", "r-1", "r1.5", "alpha0", "alpha_nan", "alpha_inf", "dropout1.5", "dropout-0.1"])
@pytest.mark.parametrize("method", [pc.LoRA, pc.GraLoRA], ids=["lora", "gralora"])
def test_bad_hyperparameters_raise(method, kwargs, match):
    if method is pc.GraLoRA and "r" in kwargs and kwargs["r"] == 1.5:
        kwargs = {**kwargs, "k": 1}
    with pytest.raises(pc.AdapterError, match=match):
        method(**kwargs)


@pytest.mark.parametrize("targets, error, match", [
    ([1], AdapterTypeError, "must hold non-empty module names"),
    ([""], AdapterTypeError, "must hold non-empty module names"),
    (5, AdapterTypeError, "must be a str or a list of str"),
    ("(", pc.AdapterError, "is not a valid regex"),
], ids=["int", "empty", "5", "bad_regex"])
def test_bad_targets_raise(targets, error, match):
    with pytest.raises(error, match=match):
        pc.AdapterSpec(pc.LoRA(), targets=targets)


def test_targets_none_is_the_default():
    # PEFT's target_modules=None (its default) means its per-architecture table, resolved when the
    # model is known (tests/peft_suite/test_decoder_models.py: test_default_targets_equal_peft)
    assert LoraConfig().target_modules is None
    assert pc.AdapterSpec(pc.LoRA(), targets=None) == pc.AdapterSpec(pc.LoRA())
    assert pc.AdapterSpec(pc.LoRA()).targets is None
    # where PEFT has no default (a plain module) it raises; ours is "all-linear" (README "Coming from
    # PEFT": LoraConfig() without target_modules)
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        get_peft_model(make("MLP"), LoraConfig())
    model = pc.adapt(make("MLP"), pc.AdapterSpec(pc.LoRA()))
    assert [c.site for _, _, c in site_adapters(model)] == ["lin0", "lin1"]


def test_bad_method_raises():
    with pytest.raises(AdapterTypeError, match="method config such as peftcompile.LoRA"):
        pc.AdapterSpec(LoraConfig(r=8))


@pytest.mark.parametrize("method", [pc.LoRA(r=8, alpha=16), pc.GraLoRA()], ids=["lora", "gralora"])
def test_lora_config_layers_to_transform_validation(method):
    """Test that specifying layers_pattern without layers_to_transform raises an error"""
    with pytest.raises(ValueError, match="When `layers_pattern` is specified, `layers_to_transform` must also be"):
        LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], layers_pattern="model.layers")
    with pytest.raises(pc.AdapterError, match="layers_pattern='model.layers' needs layers_to_transform"):
        pc.AdapterSpec(method, targets=["query", "value"], layers_pattern="model.layers")
    # Test that specifying both layers_to_transform and layers_pattern works fine (ours: a tuple)
    spec = pc.AdapterSpec(method, targets=["query", "value"], layers_to_transform=[0, 1, 2],
                          layers_pattern="model.layers")
    assert spec.layers_to_transform == (0, 1, 2)
    assert spec.layers_pattern == "model.layers"
    # Test that not specifying either works fine
    spec = pc.AdapterSpec(method, targets=["query", "value"])
    assert spec.layers_to_transform is None
    assert spec.layers_pattern is None


@pytest.mark.parametrize("method", [pc.LoRA(), pc.GraLoRA()], ids=["lora", "gralora"])
def test_config_layers_to_transform_index_zero(method):
    # `layers_to_transform=0` selects the first layer and is a valid index (0 is falsy: a truthiness
    # check would wrongly reject it with `layers_pattern`); ours normalises an int to a 1-tuple
    assert LoraConfig(layers_to_transform=0, layers_pattern="model.layers").layers_to_transform == 0
    spec = pc.AdapterSpec(method, targets=["q_proj"], layers_to_transform=0, layers_pattern="model.layers")
    assert spec.layers_to_transform == (0,)
    assert spec.layers_pattern == "model.layers"
