"""adapt() on every supported model kind x method: identity at init, training, dtypes, dropout,
generate, named adapters, merge/unmerge, merge_and_unload, copy/pickle."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftcompile as pc
from conftest import VOCAB, FunctionalMLP, MLP, hf_output, randomize_adapters_, tiny_bert, tiny_gpt2, tiny_llama

METHODS = {
    "lora": lambda: pc.LoRA(r=4, alpha=8),
    "gralora": lambda: pc.GraLoRA(r=4, k=2, alpha=8),
    "gralora_hybrid": lambda: pc.GraLoRA(r=4, k=2, alpha=8, hybrid_r=2),
    "rasa": lambda: pc.RaSA(r=4, k=1, alpha=8),
}
MODELS = {
    "mlp": (MLP, "dense"),
    "functional": (FunctionalMLP, "dense"),
    "llama": (tiny_llama, "causal"),
    "gpt2": (tiny_gpt2, "causal"),
    "bert": (tiny_bert, "encoder"),
}
# Number of linear sites "all-linear" picks (output head excluded).
N_SITES = {"mlp": 2, "functional": 2, "llama": 14, "gpt2": 8, "bert": 13}


def make(model_name: str, dtype=torch.float32):
    torch.manual_seed(0)
    return MODELS[model_name][0]().to(dtype)


def batch(model_name: str, n: int = 2, t: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if MODELS[model_name][1] == "dense":
        return {"x": torch.randn(n, t, 16, generator=g)}
    return {"input_ids": torch.randint(3, VOCAB, (n, t), generator=g)}


def out(model, b):
    y = model(**b)
    return y if isinstance(y, torch.Tensor) else hf_output(y)


def loss_of(model_name, model, b, target=None):
    if MODELS[model_name][1] == "causal":
        return model(**b, labels=b["input_ids"]).loss
    y = model(**b)
    if isinstance(y, torch.Tensor):
        return F.mse_loss(y.float(), target)
    # encoder: use the pooler too, so every adapted site is in the graph of the loss
    return F.mse_loss(y.last_hidden_state.float(), target) + y.pooler_output.float().pow(2).mean()


def spec(method: str, **kw):
    kw.setdefault("targets", "all-linear")  # the default would be PEFT's per-architecture targets
    return pc.AdapterSpec(METHODS[method](), **kw)


CASES = [(m, meth) for m in MODELS for meth in METHODS if not (m in ("mlp", "functional") and meth == "rasa")]


@pytest.mark.parametrize("model_name, method", CASES)
def test_identity_grads_and_training(model_name, method):
    """Right after adapt the output is bit-identical; grads reach only adapters; loss decreases."""
    model = make(model_name).eval()
    b = batch(model_name)
    with torch.no_grad():
        ref = out(model, b)
    base_keys = set(model.state_dict())
    assert pc.adapt(model, spec(method)) is model
    with torch.no_grad():
        assert torch.equal(out(model, b), ref)
    s = pc.summary(model)
    assert len(s.sites["default"]) == N_SITES[model_name]
    assert base_keys <= set(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("peftcompile" in n for n in trainable)

    model.train()
    target = torch.randn_like(ref.float())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(6):
        opt.zero_grad()
        loss = loss_of(model_name, model, b, target)
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                assert (p.grad is not None) == p.requires_grad, n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("model_name", ["mlp", "llama", "gpt2", "bert"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_keeps_dtype(model_name, dtype, autocast):
    """The base keeps its dtype; adapters are float32 (PEFT's autocast_adapter_dtype) unless
    asked to follow the base; outputs keep the base dtype."""
    model = make(model_name, dtype).eval()
    pc.adapt(model, spec("gralora"), autocast_adapter_dtype=autocast)
    randomize_adapters_(model, std=0.05)
    adapter_ids = {id(p) for p in pc.state.adapter_params(model, "default").values()}
    assert adapter_ids
    assert all(p.dtype == dtype for p in model.parameters() if id(p) not in adapter_ids)
    assert {p.dtype for p in model.parameters() if id(p) in adapter_ids} == {torch.float32 if autocast else dtype}
    b = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch(model_name).items()}
    y = out(model, b)
    assert y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("model_name", ["mlp", "llama"])
def test_dropout_only_in_train_mode(model_name):
    model = make(model_name)
    pc.adapt(model, pc.AdapterSpec(pc.LoRA(r=4, alpha=8, dropout=0.5)))
    randomize_adapters_(model)
    b = batch(model_name)
    model.eval()
    with torch.no_grad():
        assert torch.equal(out(model, b), out(model, b))
        model.train()
        assert not torch.equal(out(model, b), out(model, b))


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "gralora", "rasa"])
def test_generate_with_kv_cache(model_name, method):
    """generate runs and equals a manual greedy loop without cache (adapter non-zero)."""
    model = make(model_name).eval()
    pc.adapt(model, spec(method))
    randomize_adapters_(model, std=0.2)
    ids = batch(model_name, n=1, t=5)["input_ids"]
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)


def test_named_adapters_switch_and_disable():
    model = make("llama").eval()
    b = batch("llama")
    base = out(model, b).detach()
    pc.adapt(model, spec("lora"), name="a")
    randomize_adapters_(model, seed=1)
    ya = out(model, b).detach()
    pc.adapt(model, spec("gralora", targets=["q_proj", "v_proj"]), name="b")
    randomize_adapters_(model, seed=2)  # only b is trainable now
    yb = out(model, b).detach()
    assert not torch.allclose(ya, base) and not torch.allclose(yb, ya) and not torch.allclose(yb, base)
    pc.set_active(model, "a")
    torch.testing.assert_close(out(model, b), ya, atol=0, rtol=0)
    assert all(("default" not in n) and (".a." in n) for n, p in model.named_parameters() if p.requires_grad)
    with pc.disabled(model):
        torch.testing.assert_close(out(model, b), base, atol=0, rtol=0)
    torch.testing.assert_close(out(model, b), ya, atol=0, rtol=0)
    # several active adapters add up at a site: q(x) = base + delta_a + delta_b
    q, x = model.model.layers[0].self_attn.q_proj, torch.randn(2, 3, 32)
    with torch.no_grad():
        qa = q(x)
        pc.set_active(model, "b")
        qb = q(x)
        with pc.disabled(model):
            q0 = q(x)
        pc.set_active(model, ["a", "b"])
        torch.testing.assert_close(q(x), qa + qb - q0, atol=1e-5, rtol=1e-5)
    s = pc.summary(model)
    assert set(s.sites) == {"a", "b"} and len(s.sites["b"]) == 4
    with pytest.raises(pc.AdapterError, match="unknown adapter"):
        pc.set_active(model, "c")


def test_switching_does_not_retrace():
    model = make("llama").eval()
    pc.adapt(model, spec("lora"), name="a")
    pc.adapt(model, spec("lora"), name="b")
    q = model.model.layers[0].self_attn.q_proj
    fwd = q.forward
    pc.set_active(model, "a")
    pc.set_active(model, "b")
    with pc.disabled(model):
        pass
    assert q.forward is fwd


@pytest.mark.parametrize("model_name, method", [("llama", "gralora_hybrid"), ("gpt2", "lora"),
                                                ("bert", "rasa"), ("functional", "gralora")])
def test_merge_unmerge(model_name, method):
    model = make(model_name).eval()
    weights0 = {k: v.clone() for k, v in model.state_dict().items()}
    pc.adapt(model, spec(method))
    randomize_adapters_(model, std=0.1)
    b = batch(model_name)
    with torch.no_grad():
        y = out(model, b)
        pc.merge(model)
        ym = out(model, b)
        assert (ym - y).abs().max() <= 1e-5 * y.abs().max()
        pc.unmerge(model)
        for k, v in weights0.items():
            assert (model.state_dict()[k] - v).abs().max() <= 1e-6, k
        torch.testing.assert_close(out(model, b), y, atol=1e-6, rtol=1e-5)


def test_merge_and_unload_gives_plain_checkpoint(tmp_path):
    from transformers import LlamaForCausalLM

    model = make("llama").eval()
    keys = list(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    pc.adapt(model, spec("gralora"))
    randomize_adapters_(model, std=0.1)
    b = batch("llama")
    with torch.no_grad():
        y = out(model, b)
    plain = pc.merge_and_unload(model)
    assert plain is model and list(plain.state_dict()) == keys
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags
    assert not any("forward" in m.__dict__ for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(out(plain, b), y, atol=1e-5, rtol=1e-4)
    plain.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(out(loaded, b), y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_name", ["mlp", "gpt2"])
def test_deepcopy_pickle_and_isinstance(model_name):
    from transformers.pytorch_utils import Conv1D

    model = make(model_name).eval()
    pc.adapt(model, spec("gralora"))
    randomize_adapters_(model)
    b = batch(model_name)
    with torch.no_grad():
        y = out(model, b)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(clone) is type(model)
            torch.testing.assert_close(out(clone, b), y, atol=0, rtol=0)
            # the clone's adapters are its own
            p = next(p for p in clone.parameters() if p.requires_grad)
            p.add_(1.0)
            assert not torch.equal(out(clone, b), y)
    site_cls = Conv1D if model_name == "gpt2" else nn.Linear
    assert sum(isinstance(m, site_cls) for m in model.modules()) >= 2
    assert type(model.transformer.h[0].attn.c_attn if model_name == "gpt2" else model.fc1) in (Conv1D, nn.Linear)


def test_targets_forms():
    model = make("llama")
    names = lambda m: pc.summary(m).sites["default"]
    pc.adapt(model, spec("lora", targets=["q_proj", "v_proj"]))
    assert names(model) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    model = make("llama")
    pc.adapt(model, spec("lora", targets=r"model\.layers\.1\..*_proj", exclude=["o_proj"]))
    assert len(names(model)) == 6 and all(".1." in n for n in names(model))
    model = make("llama")
    pc.adapt(model, spec("lora"))
    assert "lm_head" not in names(model)
    model = make("llama")
    pc.adapt(model, spec("lora", targets=["lm_head"]))
    assert names(model) == ["lm_head"]


def test_second_adapter_on_new_sites_of_a_rewritten_graph():
    """A plain module's whole graph is regenerated with both sites; the first adapter keeps working."""
    model = make("mlp").eval()
    b = batch("mlp")
    pc.adapt(model, pc.AdapterSpec(pc.LoRA(r=2), targets=["fc1"]), name="a")
    randomize_adapters_(model, seed=1)
    ya = out(model, b).detach()
    pc.adapt(model, pc.AdapterSpec(pc.LoRA(r=2), targets=["fc2"]), name="b")
    assert "self.fc2.peftcompile(" in model.forward.src and "self.fc1.peftcompile(" in model.forward.src
    pc.set_active(model, "a")
    torch.testing.assert_close(out(model, b), ya, atol=0, rtol=0)
    assert pc.summary(model).sites == {"a": ["fc1"], "b": ["fc2"]}
