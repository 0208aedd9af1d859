"""``trainable`` modules with PEFT's ``modules_to_save`` semantics: one copy per adapter, so
switching, disabling, deleting and saving follow the adapter -- compared with PEFT's
ModulesToSaveWrapper on the same model -- while the module, its parameters and the
state_dict keys stay where they were."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftcompile as pc
from peftcompile.state import state_of
from conftest import MLP

peft = pytest.importorskip("peft")

X = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))


def out(m: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m(X)


def train_steps(m: nn.Module, steps: int = 3, seed: int = 0) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        m(X).square().mean().backward()
        opt.step()


def same_lora_(ours: nn.Module, theirs, name: str) -> None:
    """PEFT's adapter ``name`` gets our initial A/B (the two libraries draw them differently)."""
    from peftcompile.state import site_adapters

    with torch.no_grad():
        for _, _, c in site_adapters(ours):
            if name in c:
                layer = theirs.base_model.model.get_submodule(c.site)
                layer.lora_A[name].weight.copy_(c[name].lora_A)
                layer.lora_B[name].weight.copy_(c[name].lora_B)


def two_adapters():
    """Ours and PEFT's, same base, adapters 'a' and 'b' each training their own fc2 copy."""
    torch.manual_seed(0)
    base = MLP().eval()
    ours = copy.deepcopy(base)
    pc.adapt(ours, pc.AdapterSpec(pc.LoRA(r=2), targets=["fc1"], trainable=["fc2"]), "p")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=16, target_modules=["fc1"],
                                                                      modules_to_save=["fc2"]), adapter_name="p")
    same_lora_(ours, theirs, "p")
    return base, ours, theirs


def test_switching_disabling_and_training_follow_peft():
    base, ours, theirs = two_adapters()
    train_steps(ours)
    train_steps(theirs)
    assert torch.allclose(out(ours), out(theirs), atol=1e-6)
    # a second adapter starts from the ORIGINAL head, not from a's trained one
    pc.adapt(ours, pc.AdapterSpec(pc.LoRA(r=2), targets=["fc1"], trainable=["fc2"]), "q")
    theirs.add_adapter("q", peft.LoraConfig(r=2, lora_alpha=16, target_modules=["fc1"], modules_to_save=["fc2"]))
    theirs.set_adapter("q")
    same_lora_(ours, theirs, "q")
    assert torch.equal(ours.fc2.weight, base.fc2.weight)
    train_steps(ours, seed=1)
    train_steps(theirs, seed=1)
    assert torch.allclose(out(ours), out(theirs), atol=1e-6)
    for name in ("p", "q", "p"):
        pc.set_active(ours, name)
        theirs.set_adapter(name)
        assert torch.allclose(out(ours), out(theirs), atol=1e-6), name
    with pc.disabled(ours), theirs.disable_adapter():
        assert torch.allclose(out(ours), out(base), atol=1e-7)
        assert torch.allclose(out(theirs), out(base), atol=1e-7)
        assert torch.equal(ours.fc2.weight, base.fc2.weight)
    assert torch.allclose(out(ours), out(theirs), atol=1e-6)
    pc.disable_adapter_layers(ours)
    assert torch.allclose(out(ours), out(base), atol=1e-7)
    pc.enable_adapter_layers(ours)
    assert torch.allclose(out(ours), out(theirs), atol=1e-6)
    # the module stays the module: same object, same parameters, same state_dict keys as before
    assert isinstance(ours.fc2, nn.Linear) and not any("copies" in k for k in ours.state_dict())


def trained_pair():
    """(base, ours with adapters p and q each trained with its own head, {adapter: output});
    q is active."""
    base, ours, _ = two_adapters()
    train_steps(ours)
    pc.adapt(ours, pc.AdapterSpec(pc.LoRA(r=2), targets=["fc1"], trainable=["fc2"]), "q")
    train_steps(ours, seed=1)
    want = {}
    for n in ("p", "q"):
        pc.set_active(ours, n)
        want[n] = out(ours)
    return base, ours, want


def test_save_load_carry_each_adapters_own_head(tmp_path):
    _, ours, want = trained_pair()
    pc.set_active(ours, "p")
    pc.save_adapters(ours, tmp_path / "q", name="q")  # q is inactive: its head comes from its copy
    pc.save_adapters(ours, tmp_path / "p", name="p")
    torch.manual_seed(0)
    fresh = MLP().eval()
    pc.load_adapters(fresh, tmp_path / "p")
    pc.load_adapters(fresh, tmp_path / "q")  # loaded, not activated: p's head stays in place
    assert torch.equal(out(fresh), want["p"])
    pc.set_active(fresh, "q")
    assert torch.equal(out(fresh), want["q"])


def test_delete_unload_and_base_state_dict():
    base, ours, _ = trained_pair()
    trained_b = ours.fc2.weight.detach().clone()
    sd = pc.get_base_model_state_dict(ours)
    assert torch.equal(sd["fc2.weight"], base.fc2.weight)  # the original, not b's trained head
    pc.set_active(ours, "p")
    y_a = out(ours)
    pc.delete_adapter(ours, "q")
    assert torch.equal(out(ours), y_a)
    pc.set_active(ours, "p")
    # unload keeps the head the active adapter trained (PEFT keeps the active copy)
    head = ours.fc2.weight.detach().clone()
    pc.unload(ours)
    assert torch.equal(ours.fc2.weight, head) and not torch.equal(head, trained_b)
    assert not hasattr(ours, "peftcompile_copies") and state_of(ours) is None


def test_set_base_model_state_dict_updates_the_original_head():
    base, ours, _ = two_adapters()
    train_steps(ours)
    sd = pc.get_base_model_state_dict(ours)
    new = {k: v + 1.0 for k, v in sd.items()}
    trained = ours.fc2.weight.detach().clone()
    pc.set_base_model_state_dict(ours, new)
    assert torch.equal(ours.fc2.weight, trained)  # the adapter's own head is untouched
    with pc.disabled(ours):
        assert torch.equal(ours.fc2.weight, new["fc2.weight"])


def test_two_active_adapters_training_one_module_are_refused():
    _, ours, _ = two_adapters()
    pc.adapt(ours, pc.AdapterSpec(pc.LoRA(r=2), targets=["fc1"], trainable=["fc2"]), "q")
    before = (state_of(ours).active, ours.fc2.weight.detach().clone())
    with pytest.raises(pc.AdapterError, match="both train fc2"):
        pc.set_active(ours, ["p", "q"])
    assert (state_of(ours).active, ours.fc2.weight.detach().clone())[0] == before[0]
    assert torch.equal(ours.fc2.weight, before[1])


def test_compiled_model_sees_each_adapters_head(fresh_dynamo):
    """The swap is an in-place copy into the same parameters, which compiled graphs read."""
    from conftest import CountingBackend

    _, ours, want = trained_pair()
    compiled = torch.compile(ours, backend=CountingBackend())
    with torch.no_grad():
        for n in ("p", "q", "p"):
            pc.set_active(ours, n)
            assert torch.allclose(compiled(X), want[n], atol=1e-6), n
        with pc.disabled(ours):
            assert torch.allclose(compiled(X), out(copy.deepcopy(ours)), atol=1e-6)


# ------------------------------------------------------------------ PEFT checkpoints with modules_to_save
def _seq_cls():
    from transformers import LlamaForSequenceClassification

    from conftest import tiny_llama

    cfg = tiny_llama().config
    cfg.num_labels, cfg.pad_token_id = 3, 0
    torch.manual_seed(0)
    return LlamaForSequenceClassification(cfg).eval()


def test_peft_seq_cls_checkpoint_both_ways(tmp_path):
    """PEFT's SEQ_CLS task adds the head to modules_to_save; its checkpoint loads here with
    equal logits, and ours (format="peft") loads in PeftModel with equal logits."""
    from conftest import VOCAB

    base = _seq_cls()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False))
    with torch.no_grad():
        pm.base_model.model.score.modules_to_save["default"].weight.normal_()
    pm.eval()
    x = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path / "peft")
    ours = _seq_cls()
    ours.load_state_dict(sd)
    with torch.no_grad():
        plain = ours(input_ids=x).logits
    pc.load_peft_adapter(ours, tmp_path / "peft")
    assert pc.adapters_of(ours)["default"].trainable == ("score",)
    with torch.no_grad():
        got = ours(input_ids=x).logits
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        with pc.disabled(ours):  # the original head, as PEFT's disable_adapter
            assert torch.equal(ours(input_ids=x).logits, plain)
    pc.save_adapters(ours, tmp_path / "ours", format="peft")
    fresh = _seq_cls()
    fresh.load_state_dict(sd)
    back = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(input_ids=x).logits - want).abs().max() <= 1e-5 * want.abs().max()


def test_peft_checkpoint_with_an_unknown_module_to_save_is_refused(tmp_path):
    import json

    base = _seq_cls()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["classifier"]  # names nothing on this model, while the file holds score.weight
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    m = _seq_cls()
    with pytest.raises(pc.AdapterError, match="unexpected tensor .*score.weight"):
        pc.load_peft_adapter(m, tmp_path)
    assert state_of(m) is None


@pytest.mark.parametrize("task", ["SEQ_CLS", peft.TaskType.SEQ_CLS])
def test_task_type_adds_peft_heads_and_all_linear_leaves_them_out(task):
    """PEFT's SEQ_CLS: the head joins modules_to_save and is never a target."""
    pm = peft.get_peft_model(_seq_cls(), peft.LoraConfig(r=2, task_type="SEQ_CLS", target_modules="all-linear"))
    ours = _seq_cls()
    pc.adapt(ours, pc.AdapterSpec(pc.LoRA(r=2), targets="all-linear", task_type=task))
    spec = pc.adapters_of(ours)["default"]
    assert spec.trainable == ("classifier", "score") and spec.task_type == "SEQ_CLS"
    assert set(pc.summary(ours).sites["default"]) == {n.removeprefix("base_model.model.")
                                                      for n in pm.targeted_module_names}
    assert ours.score.weight.requires_grad
    assert pc.AdapterSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("kw,match", [
    ({"task_type": "CLASSIFY"}, "not one of PEFT's task types"),
    ({"task_type": "SEQ_CLS", "trainable": "^score$"}, "pass trainable as a list"),
])
def test_bad_task_type(kw, match):
    with pytest.raises(pc.AdapterError, match=match):
        pc.AdapterSpec(pc.LoRA(r=2), **kw)


def test_mixed_batches_with_per_adapter_heads_are_refused():
    """A trainable module holds one adapter's values: rows of different adapters would silently
    share them, so such a mixed batch is refused (one batch per adapter works)."""
    _, ours, want = trained_pair()
    ours.eval()
    with pytest.raises(pc.AdapterError, match="train whole modules"):
        with torch.no_grad():
            ours(X, adapter_names=["p", "q", "p", "q"])
    assert state_of(ours).active == ("q",)
    pc.set_active(ours, "q")
    with torch.no_grad():
        assert torch.equal(ours(X, adapter_names=["q"] * 4), want["q"])


def test_original_head_gets_no_gradient_inside_disabled():
    """Inside disabled() the head holds the original values, which must not train (a step on
    them would be dropped at exit); outside, the adapter's own head trains again."""
    _, ours, _ = trained_pair()
    ours.train()
    with pc.disabled(ours):
        assert not ours.fc2.weight.requires_grad and not ours.fc2.bias.requires_grad
        assert not ours(X).requires_grad  # nothing that runs while disabled trains
    assert ours.fc2.weight.requires_grad and ours(X).requires_grad


def test_disabled_with_a_trainable_module_compiles_once_more_then_never(fresh_dynamo):
    """README (switching table): freezing the original head inside disabled() changes a guarded
    requires_grad, so that state compiles once; going back and forth then compiles nothing."""
    from conftest import CountingBackend

    m = pc.adapt(MLP().train(), pc.AdapterSpec(pc.LoRA(r=2), targets=["fc1"], trainable=["fc2"]))
    counting = CountingBackend()
    compiled = torch.compile(m, backend=counting)
    for _ in range(2):
        compiled(X).sum().backward()
        with pc.disabled(m):
            compiled(X)
    assert counting.frames == 2
