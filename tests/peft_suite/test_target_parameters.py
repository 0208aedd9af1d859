"""Port of PEFT's ``tests/test_target_parameters.py`` (huggingface/peft): its ALL_CONFIGS rows and
the PeftCommonTester checks that apply, on tiny Mixtral built from a config (PEFT runs the same rows
on hub checkpoints of tiny Llama4 / GPT-OSS, which this suite cannot download; their MoE experts are
the same kind of stacked [experts, ...] parameters). PEFT is the yardstick: its model with
``init_lora_weights=False`` is saved and loaded into ours (<= 1e-5)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peftcompile as pc
from peftcompile.state import site_adapters

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import ParamWrapper  # noqa: E402

NUM_EXPERTS = 4

# PEFT's ALL_CONFIGS (the Llama4 rows; our tiny Mixtral has the same experts.gate_up_proj / down_proj names
# under mlp. instead of feed_forward.)
ALL_CONFIGS = [
    {"task_type": "CAUSAL_LM", "target_modules": [], "lora_dropout": 0.0,
     "target_parameters": ["mlp.experts.down_proj"]},
    {"task_type": "CAUSAL_LM", "target_modules": [], "lora_dropout": 0.0,
     "target_parameters": ["0.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"]},
    {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "target_modules": None, "lora_dropout": 0.0, "bias": "none",
     "target_parameters": ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]},
    {"task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0,
     "target_parameters": ["mlp.experts.down_proj"]},
]
IDS = ["down_proj", "split_layers", "same_module", "q_v_and_down_proj"]
cases = pytest.mark.parametrize("config_kwargs", ALL_CONFIGS, ids=IDS)


def from_pretrained():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=NUM_EXPERTS,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    return transformers.MixtralForCausalLM(cfg).eval()


def inputs():
    """PEFT's ``prepare_inputs_for_testing``."""
    return {"input_ids": torch.tensor([[1, 1, 1], [1, 2, 1]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 1]])}


def logits(model):
    with torch.no_grad():
        return model(**inputs()).logits


def twin(config_kwargs, tmp_path, init_false=True):
    """PEFT's model (init_lora_weights=False: non-zero deltas) and ours, loaded from PEFT's checkpoint."""
    base = from_pretrained()
    kw = {k: v for k, v in config_kwargs.items() if k != "bias"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(**kw, init_lora_weights=not init_false)).eval()
    pm.save_pretrained(tmp_path / "peft")
    ours = pc.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft", is_trainable=True).eval()
    return base, pm, ours


def close(a, b, tol=1e-5):
    return ((a - b).abs().max() / b.abs().max()).item() <= tol


@cases
def test_logits_and_sites_equal_peft(config_kwargs, tmp_path):
    base, pm, ours = twin(config_kwargs, tmp_path)
    assert close(logits(ours), logits(pm)) and not torch.allclose(logits(ours), logits(base))
    peft_sites = set(pm.base_model.targeted_module_names) | set(pm.base_model.targeted_parameter_names)
    assert {c.site for _, _, c in site_adapters(ours)} == peft_sites


@cases
def test_save_pretrained(config_kwargs, tmp_path):
    base, pm, ours = twin(config_kwargs, tmp_path)
    pc.save_adapters(ours, tmp_path / "ours", format="peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert close(logits(loaded), logits(pm))
    pc.save_adapters(ours, tmp_path / "native")
    again = pc.load_adapters(copy.deepcopy(base), tmp_path / "native")
    assert torch.equal(logits(again), logits(ours))


@cases
def test_merge_layers(config_kwargs, tmp_path):
    base, pm, ours = twin(config_kwargs, tmp_path)
    unmerged = logits(ours)
    pc.merge(ours)
    assert close(logits(ours), unmerged)
    pm.merge_adapter()
    assert close(logits(ours), logits(pm))
    plain = pc.merge_and_unload(copy.deepcopy(ours))
    assert close(logits(plain), unmerged) and set(plain.state_dict()) == set(base.state_dict())


@cases
def test_merge_layers_nan(config_kwargs, tmp_path):
    _, _, ours = twin(config_kwargs, tmp_path)
    sets = [c for _, _, c in site_adapters(ours)]
    with torch.no_grad():
        sets[0]["default"].lora_A.fill_(float("nan"))
    with pytest.raises(pc.AdapterError, match="NaN/inf"):
        pc.merge(ours, safe_merge=True)
    assert not any(c.merged for c in sets)


@cases
def test_disable_adapter(config_kwargs, tmp_path):
    base, pm, ours = twin(config_kwargs, tmp_path)
    assert not torch.allclose(logits(ours), logits(base))
    with pc.disabled(ours), pm.disable_adapter():
        assert torch.allclose(logits(ours), logits(base)) and torch.allclose(logits(pm), logits(base))


@cases
def test_training_decoders(config_kwargs, tmp_path):
    _, _, ours = twin(config_kwargs, tmp_path)
    ours.train()
    loss = ours(**inputs(), labels=inputs()["input_ids"]).loss
    loss.backward()
    for n, p in ours.named_parameters():
        if ".peftcompile" in n:
            assert p.requires_grad and p.grad is not None
        else:
            assert not p.requires_grad and p.grad is None


@cases
def test_delete_and_unload_adapter(config_kwargs, tmp_path):
    base, _, ours = twin(config_kwargs, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pc.adapt(ours, pc.AdapterSpec(pc.LoRA(r=8, alpha=8), targets=[],
                                      target_parameters=config_kwargs["target_parameters"]), "other")
    pc.delete_adapter(ours, "default")
    assert all("default" not in c for _, _, c in site_adapters(ours))
    assert torch.allclose(logits(ours), logits(base))  # "other" starts at B = 0
    pc.unload(ours)
    assert torch.equal(logits(ours), logits(base))


@cases
def test_mixed_adapter_batches_raise(config_kwargs, tmp_path):
    """PEFT: 'lora.ParamWrapper does not support mixed adapter batches yet.'"""
    _, _, ours = twin(config_kwargs, tmp_path)
    with pytest.raises(pc.AdapterError, match="mixed|one weight for the whole batch"):
        ours(**inputs(), adapter_names=["default", "__base__"])


@cases
def test_weighted_combination_of_adapters_raises(config_kwargs, tmp_path):
    """PEFT: 'add_weighted_adapter does not support targeting nn.Parameter'."""
    _, _, ours = twin(config_kwargs, tmp_path)
    with pytest.raises(pc.AdapterError, match="does not support targeting nn.Parameter"):
        pc.add_weighted_adapter(ours, ["default"], [1.0], "mix", combination_type="cat")


def test_rank_pattern_for_moe_target_parameters():
    """PEFT's test: a rank_pattern key for the experts sets their per-expert rank."""
    r = 8
    effective_r = max(1, r // NUM_EXPERTS)
    model = from_pretrained()
    spec = pc.AdapterSpec(pc.LoRA(r=r, alpha=32), targets=["q_proj", "v_proj"],
                          target_parameters=["mlp.experts.gate_up_proj"],
                          rank_pattern={"experts.gate_up_proj": effective_r})
    pc.adapt(model, spec)
    (cont, *_) = [c for _, _, c in site_adapters(model) if c.site.endswith("gate_up_proj")]
    a = cont["default"]
    assert a.cfg.r == effective_r
    assert a.lora_A.shape[0] == effective_r * NUM_EXPERTS
    assert a.cfg.scaling == 32 / effective_r
    assert spec.method.r == r
    # and PEFT agrees on the same config
    pm = get_peft_model(from_pretrained(), LoraConfig(r=r, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                      target_parameters=["mlp.experts.gate_up_proj"],
                                                      rank_pattern={"experts.gate_up_proj": effective_r}))
    (w, *_) = [m for m in pm.modules() if isinstance(m, ParamWrapper) and m.parameter_name == "gate_up_proj"]
    assert w.r["default"] == effective_r and w.lora_A["default"].weight.shape == a.lora_A.shape
