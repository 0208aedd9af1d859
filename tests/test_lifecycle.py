"""The adapter lifecycle PEFT users rely on (issue #12, items 1, 2 and 4): delete, unload,
persistent disable/enable, loading for inference vs training, safe merge, merge warnings,
base-model state dicts. Each compares with the plain model or PEFT's behaviour.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import peftcompile as pc
from peftcompile.errors import AdapterWarning
from peftcompile.state import SHARED_ATTR, site_adapters, state_of

from conftest import MLP, randomize_adapters_, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:.*has a single site")


def two_adapters():
    torch.manual_seed(0)
    base = MLP().eval()
    m = pc.adapt(copy.deepcopy(base), pc.AdapterSpec(pc.LoRA(r=4, alpha=8), targets="all-linear"))
    pc.adapt(m, pc.AdapterSpec(pc.GraLoRA(r=4, k=2, alpha=8), targets=["fc1"]), name="b")
    randomize_adapters_(m)
    return base, m


def test_delete_adapter_removes_its_tensors_and_keeps_the_other():
    base, m = two_adapters()
    x = torch.randn(3, 16)
    pc.set_active(m, "default")
    with torch.no_grad():
        want = m(x)
    pc.delete_adapter(m, "b")
    assert set(pc.adapters_of(m)) == {"default"}
    assert not any("b" in c for _, _, c in site_adapters(m))
    assert not any(".b." in k for k in m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(x), want)


def test_deleting_the_active_adapter_activates_the_first_remaining_one():
    _, m = two_adapters()  # "b" is active
    pc.delete_adapter(m, "b")
    assert state_of(m).active == ("default",)


def test_delete_rasa_adapter_removes_shared_tensors():
    m = tiny_llama(num_hidden_layers=2)
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"]))
    pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1), targets=["v_proj"]), name="r")
    assert "r" in getattr(m, SHARED_ATTR)
    pc.delete_adapter(m, "r")
    assert "r" not in getattr(m, SHARED_ATTR)
    assert not any("rasa" in k for k in m.state_dict())


def test_delete_last_adapter_unloads_and_merged_delete_is_refused():
    base, m = two_adapters()
    pc.set_active(m, "default")
    pc.merge(m)
    with pytest.raises(pc.AdapterError, match="merged.*unmerge"):
        pc.delete_adapter(m, "default")
    pc.unmerge(m)
    pc.delete_adapter(m, "default")
    pc.delete_adapter(m, "b")
    assert state_of(m) is None
    assert m.state_dict().keys() == base.state_dict().keys()
    x = torch.randn(3, 16)
    torch.testing.assert_close(m(x), base(x))
    with pytest.raises(pc.AdapterError, match="no peftcompile adapters"):
        pc.delete_adapter(m, "b")


def test_unload_restores_the_base_model_without_merging():
    base, m = two_adapters()
    pc.unload(m)
    x = torch.randn(3, 16)
    torch.testing.assert_close(m(x), base(x), rtol=0, atol=0)
    assert m.state_dict().keys() == base.state_dict().keys()
    assert all(p.requires_grad for p in m.parameters())  # the original flags
    _, m = two_adapters()
    pc.merge(m)
    with pytest.raises(pc.AdapterError, match="merged"):
        pc.unload(m)


def test_disable_enable_adapter_layers_persist():
    base, m = two_adapters()
    x = torch.randn(3, 16)
    with torch.no_grad():
        on = m(x)
        pc.disable_adapter_layers(m)
        torch.testing.assert_close(m(x), base(x))
        torch.testing.assert_close(m(x), base(x))
        with pc.disabled(m):  # nesting the context keeps it disabled afterwards
            pass
        torch.testing.assert_close(m(x), base(x))
        pc.enable_adapter_layers(m)
        torch.testing.assert_close(m(x), on)


def test_load_for_inference_by_default_and_no_switch_into_an_adapted_model(tmp_path):
    _, m = two_adapters()
    pc.save_adapters(m, tmp_path / "b", name="b")
    pc.save_adapters(m, tmp_path / "d", name="default")
    torch.manual_seed(0)
    fresh = MLP().eval()
    pc.load_adapters(fresh, tmp_path / "d")  # from_pretrained: active, frozen
    assert state_of(fresh).active == ("default",)
    assert not any(p.requires_grad for p in fresh.parameters())
    pc.load_adapters(fresh, tmp_path / "b")  # load_adapter: stored, not switched to
    assert state_of(fresh).active == ("default",)
    pc.set_active(fresh, "b", inference_mode=False)
    assert all(p.requires_grad for _, _, c in site_adapters(fresh) if "b" in c for p in c["b"].parameters())
    other = pc.load_adapters(MLP().eval(), tmp_path / "d", is_trainable=True)
    assert {n for n, p in other.named_parameters() if p.requires_grad} == {
        n for n in dict(other.named_parameters()) if "peftcompile" in n}
    third = pc.load_adapters(pc.load_adapters(MLP().eval(), tmp_path / "d"), tmp_path / "b", activate=True)
    assert state_of(third).active == ("b",)


def test_safe_merge_refuses_non_finite_weights_before_writing():
    _, m = two_adapters()
    with torch.no_grad():
        m.fc1.peftcompile["b"].gralora_B[0, 0, 0] = float("inf")
    w = [m.fc1.weight.detach().clone(), m.fc2.weight.detach().clone()]
    with pytest.raises(pc.AdapterError, match="fc1: merging.*NaN/inf"):
        pc.merge(m, safe_merge=True)
    assert torch.equal(m.fc1.weight, w[0]) and torch.equal(m.fc2.weight, w[1])
    assert all(not c.merged for _, _, c in site_adapters(m))


def test_merge_and_unmerge_warn_when_there_is_nothing_to_do():
    _, m = two_adapters()
    with pytest.warns(AdapterWarning, match="nothing to unmerge"):
        pc.unmerge(m)
    pc.merge(m)
    with pytest.warns(AdapterWarning, match="already merged"):
        pc.merge(m)


def test_base_model_state_dict_round_trip():
    base, m = two_adapters()
    pc.merge(m)  # the base state dict is the unmerged weights even now
    sd = pc.get_base_model_state_dict(m)
    assert sd.keys() == base.state_dict().keys()
    for k, v in base.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=1e-6)
    pc.unmerge(m)
    new = {k: v + 1 for k, v in base.state_dict().items()}
    pc.set_base_model_state_dict(m, new)
    torch.testing.assert_close(m.fc1.weight, new["fc1.weight"])
    with pytest.raises(pc.AdapterError, match="missing"):
        pc.set_base_model_state_dict(m, {"fc1.weight": new["fc1.weight"]})


@pytest.mark.parametrize("family", ["mlp", "llama"])
@pytest.mark.parametrize("method", [pc.LoRA(r=4, alpha=8), pc.GraLoRA(r=4, k=2, alpha=8, hybrid_r=2)],
                         ids=["lora", "gralora"])
def test_save_in_peft_format_loads_in_peft_with_equal_outputs(tmp_path, family, method):
    from peft import PeftModel

    torch.manual_seed(0)
    if family == "mlp":
        base, x = MLP().eval(), {"x": torch.randn(3, 16)}
    else:
        base, x = tiny_llama(num_hidden_layers=1).eval(), {"input_ids": torch.randint(3, 100, (2, 6))}
    m = pc.adapt(copy.deepcopy(base), pc.AdapterSpec(method, targets="all-linear"))
    randomize_adapters_(m, std=0.1)
    pc.save_adapters(m, tmp_path / "p", format="peft")
    cfg = __import__("json").loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert "weights_sha256" not in cfg  # a pure PEFT config (PEFT warns on unknown keys)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT reads it without complaint
        pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    out = lambda mod: mod(**x).logits if family == "llama" else mod(**x)  # noqa: E731
    with torch.no_grad():
        want, got = out(m), out(pm)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        back = pc.load_peft_adapter(copy.deepcopy(base), tmp_path / "p")
        torch.testing.assert_close(out(back), want, rtol=0, atol=0)


def test_peft_format_refuses_what_peft_cannot_hold_and_detects_a_mixed_checkpoint(tmp_path):
    m = tiny_llama(num_hidden_layers=2)
    pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1), targets=["q_proj"]))
    with pytest.raises(pc.AdapterError, match="has no PEFT format"):
        pc.save_adapters(m, tmp_path / "r", format="peft")
    assert not (tmp_path / "r").exists()
    with pytest.raises(pc.AdapterError, match="rank_pattern.*GRALORA"):
        pc.save_adapters(pc.adapt(MLP(), pc.AdapterSpec(pc.GraLoRA(r=4, k=2), targets=["fc1", "fc2"],
                                                        rank_pattern={"fc2": 8})), tmp_path / "t", format="peft")
    assert not (tmp_path / "t").exists()
    _, a = two_adapters()
    pc.set_active(a, "default")
    pc.save_adapters(a, tmp_path / "c", format="peft")
    # a config from another save (here: another alpha) next to these weights is caught
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 16
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    with pytest.raises(pc.AdapterError, match="sha256 differs"):
        pc.load_peft_adapter(MLP(), tmp_path / "c")


def test_safe_merge_checks_the_weight_in_its_own_dtype():
    """A merged fp16 weight that overflows to inf is refused, though its fp32 sum is finite."""
    m = pc.adapt(MLP().half(), pc.AdapterSpec(pc.LoRA(r=2, alpha=2), targets=["fc1"]))
    with torch.no_grad():
        a = m.fc1.peftcompile["default"]
        a.lora_A.fill_(1.0)
        a.lora_B.fill_(4e4)  # delta = 2 * 4e4 = 8e4 > fp16 max (65504), finite in fp32
    w = m.fc1.weight.detach().clone()
    with pytest.raises(pc.AdapterError, match="NaN/inf"):
        pc.merge(m, safe_merge=True)
    assert torch.equal(m.fc1.weight, w)
