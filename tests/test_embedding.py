"""LoRA on nn.Embedding sites (PEFT's ``lora.Embedding``): matching, parity with PEFT, lifecycle,
checkpoints (ours and PEFT's), tied weights, refusals."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import peftcompile as pc
from peftcompile.errors import AdapterWarning
from peftcompile.state import site_adapters, state_of

from conftest import randomize_adapters_, tiny_llama

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOL = 1e-5


class EmbNet(nn.Module):
    """A plain module: an embedding (with padding_idx) feeding a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.fc = nn.Linear(8, 6)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def _ids(n: int = 20, shape=(2, 5)) -> torch.Tensor:
    return torch.randint(0, n, shape, generator=torch.Generator().manual_seed(1))


def _peft_twin(base: nn.Module, ours: nn.Module, targets: list[str], r: int = 4, alpha: float = 8.0) -> nn.Module:
    """PEFT's LoraConfig on a copy of ``base`` with our adapter's tensors copied in."""
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    ours_p = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" not in n:
                continue
            site, kind = n.removeprefix("base_model.model.").rsplit(".lora_", 1)
            param = {"A.default.weight": "lora_A", "B.default.weight": "lora_B",
                     "embedding_A.default": "lora_A", "embedding_B.default": "lora_B"}[kind]
            p.copy_(ours_p[f"{site}.peftcompile.default.{param}"])
    return pm.eval()


def _adapt_llama(tie: bool = False, targets=("embed_tokens", "q_proj")):
    torch.manual_seed(0)
    base = tiny_llama(tie_word_embeddings=tie).eval()
    m = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdapterWarning)
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4, alpha=8), tuple(targets)))
    randomize_adapters_(m)
    return base, m.eval()


def test_embedding_is_a_site_only_when_named():
    m = EmbNet()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets="all-linear"))
    assert [c.site for _, _, c in site_adapters(m)] == ["fc"]
    m = EmbNet()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["emb"]))
    (c,) = [c for _, _, c in site_adapters(m)]
    assert (c.site, c.kind, c.in_features, c.out_features) == ("emb", "embedding", 20, 8)
    a = c["default"]
    # PEFT's embedding init: A zeros, B normal, so the model is unchanged at start
    assert a.lora_A.shape == (2, 20) and a.lora_B.shape == (8, 2)
    assert torch.count_nonzero(a.lora_A) == 0 and torch.count_nonzero(a.lora_B) > 0


def test_methods_without_embedding_form_refuse_by_name(linear_only):
    # every built-in method has an embedding form (GraLoRA / RaSA: tests/test_block_kinds.py)
    m = EmbNet()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(pc.AdapterError, match=r"linonly: cannot adapt nn.Embedding site\(s\) \['emb'\]"):
        pc.adapt(m, pc.AdapterSpec(linear_only, targets=["emb", "fc"]))
    assert state_of(m) is None and type(m.__dict__.get("forward")) is not object
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_max_norm_embedding_is_refused():
    m = EmbNet()
    m.emb.max_norm = 1.0
    with pytest.raises(pc.AdapterError, match="max_norm"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["emb"]))
    assert state_of(m) is None


def test_plain_module_matches_peft_and_trains_only_the_adapter():
    torch.manual_seed(0)
    base = EmbNet().eval()
    m = copy.deepcopy(base)
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4, alpha=8), targets=["emb", "fc"]))
    randomize_adapters_(m)
    ids = _ids()
    ids[0, 0] = 0  # padding row
    pm = _peft_twin(base, m, ["emb", "fc"])
    y = m(ids)
    assert (y - base(ids)).abs().max() > 1e-2  # the adapter does something
    assert torch.allclose(y, pm(ids), atol=TOL)
    y.square().sum().backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in m.named_parameters() if p.requires_grad}
    assert grads and all("peftcompile" in n for n in grads)
    # padding_idx is passed through: no gradient reaches A's padding column
    a = m.emb.peftcompile["default"]
    assert torch.count_nonzero(a.lora_A.grad[:, 0]) == 0 and torch.count_nonzero(a.lora_A.grad) > 0


def test_tiny_llama_matches_peft_merge_unmerge_disable():
    base, m = _adapt_llama()
    ids = _ids(base.config.vocab_size)
    pm = _peft_twin(base, m, ["embed_tokens", "q_proj"])
    with torch.no_grad():
        y = m(ids).logits
        assert (y - base(ids).logits).abs().max() > 1e-2
        assert torch.allclose(y, pm(ids).logits, atol=TOL)
        with pc.disabled(m):
            assert torch.allclose(m(ids).logits, base(ids).logits, atol=TOL)
        w0 = m.model.embed_tokens.weight.clone()
        pc.merge(m)
        a = m.model.embed_tokens.peftcompile["default"]
        assert torch.allclose(m.model.embed_tokens.weight - w0, (a.lora_B @ a.lora_A).T * 2.0, atol=TOL)
        assert torch.allclose(m(ids).logits, y, atol=TOL)
        pc.unmerge(m)
        assert torch.equal(m.model.embed_tokens.weight, w0) or torch.allclose(m.model.embed_tokens.weight, w0,
                                                                              atol=1e-6)
        assert torch.allclose(m(ids).logits, y, atol=TOL)
        pm_merged = pm.merge_and_unload()
        out = pc.merge_and_unload(m)
        assert type(out.model.embed_tokens) is nn.Embedding and state_of(out) is None
        assert torch.allclose(out.model.embed_tokens.weight, pm_merged.model.embed_tokens.weight, atol=TOL)
        assert torch.allclose(out(ids).logits, y, atol=TOL)


def test_tied_embedding_runs_unmerged_and_refuses_merge():
    with pytest.warns(AdapterWarning, match="merge\\(\\) will refuse"):
        torch.manual_seed(0)
        base = tiny_llama(tie_word_embeddings=True).eval()
        m = copy.deepcopy(base)
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4, alpha=8), ("embed_tokens",)))
    assert m.lm_head.weight is m.model.embed_tokens.weight
    randomize_adapters_(m)
    m.eval()
    ids = _ids(base.config.vocab_size)
    pm = _peft_twin(base, m, ["embed_tokens"])
    with torch.no_grad():
        y = m(ids).logits
        assert torch.allclose(y, pm(ids).logits, atol=TOL)
        w0 = m.model.embed_tokens.weight.clone()
        for call in (pc.merge, pc.merge_and_unload):
            with pytest.raises(pc.AdapterError, match="cannot merge into"):
                call(m)
            assert torch.equal(m.model.embed_tokens.weight, w0)
            assert torch.equal(m(ids).logits, y)


def test_save_load_round_trip_ours(tmp_path):
    base, m = _adapt_llama()
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        y = m(ids).logits
    pc.save_adapters(m, tmp_path / "a")
    m2 = copy.deepcopy(base)
    pc.load_adapters(m2, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(m2.eval()(ids).logits, y)
    assert m2.model.embed_tokens.peftcompile["default"].embedding is not None


def test_peft_checkpoints_both_ways(tmp_path):
    base, m = _adapt_llama()
    ids = _ids(base.config.vocab_size)
    pm = _peft_twin(base, m, ["embed_tokens", "q_proj"])
    with torch.no_grad():
        y = m(ids).logits
    # PEFT's save_pretrained -> load_peft_adapter
    pm.save_pretrained(tmp_path / "peft")
    m2 = copy.deepcopy(base)
    pc.load_peft_adapter(m2, tmp_path / "peft")
    assert {c.site: c.kind for _, _, c in site_adapters(m2)}["model.embed_tokens"] == "embedding"
    with torch.no_grad():
        assert torch.allclose(m2.eval()(ids).logits, y, atol=TOL)
    # ours in PEFT's format -> PeftModel.from_pretrained
    pc.save_adapters(m, tmp_path / "ours", format="peft")
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    pm2 = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.allclose(pm2(ids).logits, y, atol=TOL)


def test_all_linear_never_adapts_embeddings_and_tied_functional_head_keeps_its_name():
    _, m = _adapt_llama(targets=("embed_tokens",))
    assert [c.site for _, _, c in site_adapters(m)] == ["model.embed_tokens"]
    m = tiny_llama()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets="all-linear"))
    assert all(c.kind != "embedding" for _, _, c in site_adapters(m))


def test_peft_checkpoint_with_another_base_embedding_is_refused(tmp_path):
    base, m = _adapt_llama()
    pm = _peft_twin(base, m, ["embed_tokens", "q_proj"])
    pm.save_pretrained(tmp_path / "peft")
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(1.0)
    with pytest.raises(pc.AdapterError, match="differs from the model's"):
        pc.load_peft_adapter(other, tmp_path / "peft")
    assert state_of(other) is None


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_embedding_is_reference_math_and_linears_stay_fused():
    from torch._dynamo.utils import counters

    from conftest import compile_fast, counted, param_grads

    base, m = _adapt_llama()
    m.train()
    ref = copy.deepcopy(m)
    ids = _ids(base.config.vocab_size)
    out = compile_fast(m)(ids).logits
    expected = ref(ids).logits
    torch.testing.assert_close(out, expected, atol=TOL, rtol=TOL)
    out.square().mean().backward()
    expected.square().mean().backward()
    ga, gb = param_grads(m), param_grads(ref)
    assert ga.keys() == gb.keys() and any("embed_tokens" in k for k in ga)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=TOL, rtol=TOL)
    # two q_proj sites fused; the one embedding region is counted skipped (reference math)
    assert counters["peftcompile"]["fused_lora"] == 2
    assert counters["peftcompile"]["skipped_lora"] == counted("skipped_") == 1


def test_onnx_unmerged_and_merged_match_pytorch(tmp_path):
    import numpy as np

    pytest.importorskip("onnxruntime")
    from peftcompile.export import OrtAdapterSession, to_onnx

    base, m = _adapt_llama()
    other = copy.deepcopy(m)
    randomize_adapters_(other, seed=1)
    ids = _ids(base.config.vocab_size, (2, 7))
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        ref, ref_other = m(**inp).logits, other(**inp).logits
    assert (ref - ref_other).abs().max() > 1e-2

    def run(sess, adapter) -> torch.Tensor:
        out = sess.bind(adapter).run(inp) if adapter is not None else sess.run(inp)
        return torch.as_tensor(np.asarray(out[0] if isinstance(out, (list, tuple)) else next(iter(out.values()))))

    unmerged = to_onnx(m, inp, tmp_path / "u.onnx", merged=False)
    sess = OrtAdapterSession(unmerged.path)
    assert torch.allclose(run(sess, unmerged.sidecar), ref, atol=1e-4)
    assert torch.allclose(run(sess, pc.save_adapters(other, tmp_path / "other")), ref_other, atol=1e-4)
    with torch.no_grad(), pc.disabled(m):
        ref_base = m(**inp).logits
    assert torch.allclose(run(OrtAdapterSession(unmerged.path), None), ref_base, atol=1e-4)  # zero-rank defaults
    merged = to_onnx(m, inp, tmp_path / "m.onnx", merged=True)
    assert torch.allclose(run(OrtAdapterSession(merged.path), None), ref, atol=1e-4)


def test_weighted_cat_of_embedding_adapters_is_exact():
    torch.manual_seed(0)
    m = EmbNet().eval()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2, alpha=4), targets=["emb"]), "a")
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=3, alpha=3), targets=["emb"]), "b")
    randomize_adapters_(m)
    ids = _ids()
    with torch.no_grad():
        outs = {}
        for n in ("a", "b"):
            pc.set_active(m, n)
            outs[n] = m(ids)
        with pc.disabled(m):
            y0 = m(ids)
        pc.add_weighted_adapter(m, ["a", "b"], [0.5, -2.0], "ab", combination_type="cat")
        pc.set_active(m, "ab")
        expected = y0 + 0.5 * (outs["a"] - y0) - 2.0 * (outs["b"] - y0)
        assert m.emb.peftcompile["ab"].embedding is not None
        assert torch.allclose(m(ids), expected, atol=TOL)


def test_mixed_adapter_batch_routes_embedding_rows():
    base, m = _adapt_llama(targets=("embed_tokens",))
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2, alpha=4), ("embed_tokens",)), "b")
    randomize_adapters_(m, seed=3)
    m.eval()
    ids = _ids(base.config.vocab_size, (3, 5))
    with torch.no_grad():
        per = {}
        for n in ("default", "b"):
            pc.set_active(m, n)
            per[n] = m(ids).logits
        y = m(ids, adapter_names=["b", "__base__", "default"]).logits
        assert torch.allclose(y[0], per["b"][0], atol=TOL)
        assert torch.allclose(y[1], base(ids).logits[1], atol=TOL)
        assert torch.allclose(y[2], per["default"][2], atol=TOL)


# ------------------------------------------------------------------ scaled embeddings (Gemma 3)
def _tiny_gemma3(tie: bool = False):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval()


def test_scaled_embedding_matches_peft_merges_and_loads_both_ways(tmp_path):
    """Gemma 3's Gemma3TextScaledWordEmbedding (forward = lookup * embed_scale): the delta is scaled
    too, as PEFT's ``_get_embed_scale``; merge (W += dW) then equals the unmerged model."""
    base = _tiny_gemma3()
    assert type(base.model.embed_tokens) is not nn.Embedding and float(base.model.embed_tokens.embed_scale) != 1
    m = copy.deepcopy(base)
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4, alpha=8), ["embed_tokens", "q_proj"]))
    randomize_adapters_(m)
    pm = _peft_twin(base, m, ["embed_tokens", "q_proj"])
    ids = _ids(64, (2, 7))
    with torch.no_grad():
        want, y = pm(input_ids=ids).logits, m(input_ids=ids).logits
        assert (want - base(input_ids=ids).logits).abs().max() > 1e-2
        assert ((y - want).abs().max() / want.abs().max()).item() <= TOL
        pm.save_pretrained(tmp_path / "peft")
        pc.save_adapters(m, tmp_path / "ours", format="peft")
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        assert ((back(input_ids=ids).logits - want).abs().max() / want.abs().max()).item() <= TOL
        loaded = pc.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
        assert ((loaded(input_ids=ids).logits - want).abs().max() / want.abs().max()).item() <= TOL
        pc.merge(m)
        assert ((m(input_ids=ids).logits - want).abs().max() / want.abs().max()).item() <= TOL
        pc.unmerge(m)
        assert ((m(input_ids=ids).logits - want).abs().max() / want.abs().max()).item() <= TOL


def test_scaled_embedding_compiles_and_exports(tmp_path):
    from peftcompile.export import OrtAdapterSession, to_onnx
    from conftest import compile_fast

    base = _tiny_gemma3()
    m = copy.deepcopy(base)
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4, alpha=8), ["embed_tokens"]))
    randomize_adapters_(m)
    ids = _ids(64, (2, 7))
    with torch.no_grad():
        want = m(input_ids=ids).logits
        torch._dynamo.reset()
        torch.testing.assert_close(compile_fast(m)(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        torch._dynamo.reset()
    exp = to_onnx(m, {"input_ids": ids}, tmp_path / "g.onnx", merged=False)
    got = next(iter(OrtAdapterSession(exp.path).bind(exp.sidecar).run({"input_ids": ids}).values()))
    assert ((torch.as_tensor(got) - want).abs().max() / want.abs().max()).item() <= 1e-4


class ReshapingEmbedding(nn.Embedding):
    """A subclass whose forward is not the lookup (nor a scaled one): not a site."""

    def forward(self, ids):
        return super().forward(ids).flip(-1)


def test_embedding_subclass_with_its_own_forward_is_refused():
    m = EmbNet()
    m.emb = ReshapingEmbedding(20, 8)
    with pytest.raises(pc.AdapterError, match=r"matched no linear site"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["emb"]))
    assert state_of(m) is None


def test_plain_embedding_subclass_without_forward_is_a_site():
    class Tagged(nn.Embedding):
        pass

    m = EmbNet()
    m.emb = Tagged(20, 8, padding_idx=0)
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["emb"]))
    randomize_adapters_(m)
    pm = _peft_twin_plain(m)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(m(ids), pm(ids), atol=1e-6, rtol=1e-5)


def _peft_twin_plain(ours):
    base = copy.deepcopy(ours)
    pc.unload(base)
    return _peft_twin(base, ours, ["emb"], r=2, alpha=16.0)


@pytest.mark.parametrize("method", [pc.LoRA(r=2), pc.GraLoRA(r=2, k=2), pc.RaSA(r=2, k=1)], ids=lambda c: c.name)
def test_sparse_embedding_is_refused_by_name(method):
    m = EmbNet()
    m.emb.sparse = True
    with pytest.raises(pc.AdapterError, match=r"\['emb'\] with sparse=True.*sparse=False"):
        pc.adapt(m, pc.AdapterSpec(method, targets=["emb"]))
    assert state_of(m) is None
