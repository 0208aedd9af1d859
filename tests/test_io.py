"""save/load round trips, PEFT checkpoints, and loading errors that leave the model unchanged."""

from __future__ import annotations

import json

import pytest
import torch

import peftcompile as pc
from conftest import VOCAB, hf_output, randomize_adapters_, tiny_gpt2, tiny_llama


def ids(seed=0):
    return torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))


def logits(m, x):
    with torch.no_grad():
        return hf_output(m(input_ids=x))


def snapshot(model):
    """Everything load errors must leave alone."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [m.__dict__.get("forward") for m in model.modules()])


def assert_unchanged(model, snap):
    sd, flags, fwds = snap
    now = model.state_dict()
    assert list(now) == list(sd)
    assert all(torch.equal(now[k], v) for k, v in sd.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert [m.__dict__.get("forward") for m in model.modules()] == fwds


@pytest.mark.parametrize("method", [pc.LoRA(r=4, alpha=8), pc.GraLoRA(r=4, k=2, alpha=8, hybrid_r=2),
                                    pc.RaSA(r=4, k=1, alpha=8)], ids=["lora", "gralora", "rasa"])
def test_round_trip_exact(tmp_path, method):
    torch.manual_seed(0)
    m = tiny_llama().eval()
    pc.adapt(m, pc.AdapterSpec(method, targets=["q_proj", "v_proj", "down_proj"]))
    randomize_adapters_(m)
    y = logits(m, ids())
    pc.save_adapters(m, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["spec"]["method"]["method"] == method.name and len(cfg["sites"]) == 6

    torch.manual_seed(0)
    fresh = tiny_llama().eval()
    pc.load_adapters(fresh, tmp_path, is_trainable=True)
    assert torch.equal(logits(fresh, ids()), y)
    a = {k: v for k, v in m.state_dict().items() if "peftcompile" in k}
    b = {k: v for k, v in fresh.state_dict().items() if "peftcompile" in k}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # loading again into the same adapter replaces weights in place (no retrace)
    q = fresh.model.layers[0].self_attn.q_proj
    fwd = q.forward
    randomize_adapters_(fresh, seed=5)
    pc.load_adapters(fresh, tmp_path)
    assert q.forward is fwd and torch.equal(logits(fresh, ids()), y)


def test_rasa_shared_tensors_stored_once(tmp_path):
    from safetensors import safe_open

    m = tiny_llama()
    pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1, alpha=8), targets=["q_proj"]))
    pc.save_adapters(m, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    shared = [k for k in keys if k.startswith("shared.")]
    assert sorted(shared) == ["shared.model.layers.*.self_attn.q_proj.rasa_A_shared",
                              "shared.model.layers.*.self_attn.q_proj.rasa_B_shared"]
    assert len(keys) == 2 + 3 * 2


def test_load_errors_leave_model_unchanged(tmp_path):
    torch.manual_seed(0)
    src = tiny_llama()
    pc.adapt(src, pc.AdapterSpec(pc.LoRA(r=4, alpha=8), targets=["q_proj"]))
    pc.save_adapters(src, tmp_path / "ok")

    other = tiny_llama(hidden_size=64, intermediate_size=64)  # other shapes
    snap = snapshot(other)
    with pytest.raises(pc.AdapterError, match="shape mismatch"):
        pc.load_adapters(other, tmp_path / "ok")
    assert_unchanged(other, snap)

    gpt = tiny_gpt2()  # other model: sites do not exist
    snap = snapshot(gpt)
    with pytest.raises(pc.AdapterError, match="does not have"):
        pc.load_adapters(gpt, tmp_path / "ok")
    assert_unchanged(gpt, snap)

    target = tiny_llama()
    snap = snapshot(target)
    # missing tensor
    from safetensors.torch import load_file, save_file

    (tmp_path / "missing").mkdir()
    t = load_file(str(tmp_path / "ok" / "adapter_model.safetensors"))
    t.pop(next(iter(t)))
    save_file(t, str(tmp_path / "missing" / "adapter_model.safetensors"))
    (tmp_path / "missing" / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    # the config's weights hash catches the hand-made mix first ...
    with pytest.raises(pc.AdapterError, match="sha256 differs"):
        pc.load_adapters(target, tmp_path / "missing")
    assert_unchanged(target, snap)
    # ... and without a hash (older or hand-written configs) the tensors themselves are checked
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    del cfg["weights_sha256"]
    (tmp_path / "missing" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(pc.AdapterError, match="missing tensors"):
        pc.load_adapters(target, tmp_path / "missing")
    assert_unchanged(target, snap)
    # not a safetensors file
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(pc.AdapterError, match="not a readable safetensors"):
        pc.load_adapters(target, tmp_path / "bad")
    assert_unchanged(target, snap)
    # into an existing adapter of another spec
    pc.adapt(target, pc.AdapterSpec(pc.GraLoRA(r=4, k=2, alpha=8), targets=["q_proj"]))
    snap = snapshot(target)
    with pytest.raises(pc.AdapterError, match="load it under another name"):
        pc.load_adapters(target, tmp_path / "ok")
    assert_unchanged(target, snap)
    pc.load_adapters(target, tmp_path / "ok", name="other")  # fine under another name
    assert set(pc.adapters_of(target)) == {"default", "other"}


def test_rasa_other_grouping_rejected(tmp_path):
    m = tiny_llama(num_hidden_layers=3)
    pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1, alpha=8), targets=["q_proj"]))
    pc.save_adapters(m, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["groups"] = {"model.layers.*.self_attn.q_proj": cfg["groups"]["model.layers.*.self_attn.q_proj"][:2]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = tiny_llama(num_hidden_layers=3)
    snap = snapshot(fresh)
    with pytest.raises(pc.AdapterError, match="group"):
        pc.load_adapters(fresh, tmp_path)
    assert_unchanged(fresh, snap)


PEFT_CASES = {
    "lora": lambda: __import__("peft").LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                                                  init_lora_weights=False),
    "gralora": lambda: __import__("peft").GraloraConfig(r=4, gralora_k=2, alpha=8, target_modules=["q_proj", "o_proj",
                                                        "up_proj"], init_weights=False),
    "gralora_hybrid": lambda: __import__("peft").GraloraConfig(r=4, gralora_k=2, alpha=8, hybrid_r=2,
                                                               target_modules=["k_proj", "down_proj"],
                                                               init_weights=False),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_load_peft_adapter_matches_peftmodel(tmp_path, case):
    from peft import PeftModel, get_peft_model

    torch.manual_seed(0)
    base = tiny_llama().eval()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, PEFT_CASES[case]()).eval()
    x = ids(3)
    want = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    assert isinstance(peft_model, PeftModel)

    ours = tiny_llama().eval()
    ours.load_state_dict(base_sd)
    assert not torch.allclose(logits(ours, x), want)  # the adapter matters
    pc.load_peft_adapter(ours, tmp_path)
    got = logits(ours, x)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_peft_unsupported_option(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path)
    m = tiny_llama()
    snap = snapshot(m)
    with pytest.raises(pc.AdapterError, match="use_dora"):
        pc.load_peft_adapter(m, tmp_path)
    assert_unchanged(m, snap)


def test_trainable_modules_train_and_round_trip(tmp_path):
    """spec.trainable keeps a module (here the LM head) trainable; it is saved with the adapter."""
    torch.manual_seed(0)
    m = tiny_llama().eval()
    spec = pc.AdapterSpec(pc.LoRA(r=4, alpha=8), targets=["q_proj"], trainable=["lm_head"])
    pc.adapt(m, spec)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in trainable and all("peftcompile" in n or n == "lm_head.weight" for n in trainable)
    m(input_ids=ids(), labels=ids()).loss.backward()
    assert m.lm_head.weight.grad is not None
    randomize_adapters_(m)  # adapters and the head
    y = logits(m, ids())
    pc.save_adapters(m, tmp_path)
    torch.manual_seed(0)
    fresh = tiny_llama().eval()
    pc.load_adapters(fresh, tmp_path, is_trainable=True)
    assert torch.equal(logits(fresh, ids()), y)
    assert fresh.lm_head.weight.requires_grad and pc.adapters_of(fresh)["default"].trainable == ("lm_head",)
    # the head trains with its adapter: a second adapter (now the only active one) freezes it,
    # activating both makes it trainable again (issue #11: it used to stay trainable)
    pc.adapt(fresh, pc.AdapterSpec(pc.LoRA(r=2), targets=["v_proj"]), name="b")
    assert not fresh.lm_head.weight.requires_grad
    pc.set_active(fresh, ["default", "b"])
    assert fresh.lm_head.weight.requires_grad


def test_trainable_matching_nothing_is_an_error():
    m = tiny_llama()
    snap = snapshot(m)
    with pytest.raises(pc.AdapterError, match="trainable=\\('classifier',\\) matched no module"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"], trainable=["classifier"]))
    assert_unchanged(m, snap)
