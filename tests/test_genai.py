"""onnxruntime-genai export (peftcompile.export.to_genai): og generation vs torch, adapters switched at run time.

Tiny models built from configs (hidden 64, 2 layers, vocab 96 != intermediate 128: the builder
treats a Linear with out_features == vocab as the LM head) with a WordLevel tokenizer. Each
base folder and each export is built once per session (the builder takes ~10 s a build).
Adapters are random and non-zero (std 0.15), so every adapter changes the greedy tokens.
Torch token references come from each adapted model merged (``merge_and_unload``, fp32 merge
error <= 1e-6; the eager adapted model is slow); the prefill logits are compared with the
unmerged adapted model itself.

Yardsticks: torch ``generate(do_sample=False)`` of the adapted model (peftcompile's math is
checked against PEFT in test_methods.py), the merged PEFT model for a PEFT LoRA checkpoint,
and the prefill logits (fp32: max abs error <= 1e-4 relative to the logits' scale).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

og = pytest.importorskip("onnxruntime_genai")

import peftcompile as pc  # noqa: E402
from peftcompile.export.genai import (GenaiAdapters, greedy, read_manifest,  # noqa: E402
                                      to_genai)

VOCAB, EOS = 96, 2
PROMPTS = [[1, 5, 9, 13], [1, 40, 41, 42, 43, 44], [1, 77, 23]]
NEW = 10
LOGIT_TOL = 1e-4
STD = 0.15  # adapter tensors' std: deltas a few times the base weights' (HF init std 0.02)


# ----------------------------------------------------------------------------- fixtures


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def _config(family: str, **kw):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=EOS,
               tie_word_embeddings=False)
    cfg.update(kw)
    return cls(**cfg)


def _base_dir(root: Path, family: str, seed: int = 0, tokenizer: bool = True, **kw) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(_config(family, **kw)).eval()
    d = root / f"{family}-{seed}-{'tok' if tokenizer else 'notok'}"
    m.save_pretrained(d)
    if tokenizer:
        _tokenizer().save_pretrained(d)
    return d


def _load(d: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d).eval()


def _adapter(base, spec: pc.AdapterSpec, seed: int, out: Path, std: float = STD):
    """A copy of ``base`` with a random non-zero adapter, saved to ``out``; returns the adapted model."""
    m = copy.deepcopy(base)
    pc.adapt(m, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    pc.save_adapters(m, out)
    return m


def _peft_lora(base, out: Path, seed: int):
    """A LoRA checkpoint written by PEFT itself; returns the merged PEFT model (the yardstick)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=6, target_modules=["o_proj", "up_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * STD)
    pm.save_pretrained(out)
    return pm.merge_and_unload().eval()


def _cut(seq: list[int]) -> list[int]:
    """Up to the first EOS (og stops there; HF generate may pad or stop differently)."""
    return seq[: seq.index(EOS)] if EOS in seq else seq


_GREEDY: dict = {}


def _torch_greedy(model, ids: list[int], n: int = NEW) -> list[int]:
    key = (id(model), tuple(ids), n)  # the session's models live as long as the cache
    if key not in _GREEDY:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
        _GREEDY[key] = (model, _cut(out[0].tolist()))
    return _GREEDY[key][1]


def _og_logits(model, ids: list[int], ad: GenaiAdapters | None = None, name: str | None = None) -> np.ndarray:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    gen = og.Generator(model, params)
    if name is not None:
        ad.activate(gen, name)
    gen.append_tokens(np.asarray([ids], dtype=np.int32))
    return np.array(gen.get_output("logits"), copy=True)[0]


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].numpy()


SPECS = {
    "lora": pc.AdapterSpec(pc.LoRA(r=4, alpha=8.0), targets=["q_proj", "v_proj", "down_proj"]),
    "gralora": pc.AdapterSpec(pc.GraLoRA(r=4, k=2, alpha=8.0, hybrid_r=2), targets="all-linear"),
    "rasa": pc.AdapterSpec(pc.RaSA(r=4, k=1, alpha=8.0), targets=["k_proj", "o_proj", "gate_proj", "up_proj"]),
}


def _build_llama(root: Path) -> None:
    """Files only: base folder, adapters, the fp32 export and its description (res.pkl)."""
    base_dir = _base_dir(root, "llama")
    base = _load(base_dir)
    for i, (n, spec) in enumerate(SPECS.items()):
        _adapter(base, spec, i + 1, root / f"ad_{n}")
    _peft_lora(base, root / "ad_peft", seed=7)
    res = to_genai(base_dir, {n: root / f"ad_{n}" for n in [*SPECS, "peft"]}, root / "genai_fp32")
    (root / "res.pkl").write_bytes(pickle.dumps(res))


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """Tiny Llama base + LoRA (subset, r=4), GraLoRA (k=2, hybrid, all-linear: rank 10), RaSA
    (another subset, rank 5) and a PEFT LoRA checkpoint, exported once (fp32, unmerged).

    Under pytest-xdist the files are built once per run (the first worker, under a file lock)
    and shared by the workers; each worker loads its own models from them.
    """
    from filelock import FileLock
    from peft import PeftModel

    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "genai_llama"  # this run's, shared by its workers
        with FileLock(str(root) + ".lock"):
            if not (root / "res.pkl").is_file():
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir()
                _build_llama(root)
    else:
        root = tmp_path_factory.mktemp("genai_llama")
        _build_llama(root)
    base_dir = root / "llama-0-tok"
    base = _load(base_dir)
    dirs = {n: root / f"ad_{n}" for n in [*SPECS, "peft"]}
    adapted = {n: pc.load_adapters(copy.deepcopy(base), dirs[n]) for n in SPECS}
    models = {n: pc.merge_and_unload(copy.deepcopy(m)) for n, m in adapted.items()}
    # PEFT's own merged model is the reference for the PEFT checkpoint
    peft_merged = PeftModel.from_pretrained(copy.deepcopy(base), dirs["peft"]).merge_and_unload().eval()
    models["peft"] = adapted["peft"] = peft_merged
    res = pickle.loads((root / "res.pkl").read_bytes())
    model = og.Model(str(res.path))
    ad = GenaiAdapters(res.path, model)
    for n in dirs:
        ad.load(n)
    return {"root": root, "base_dir": base_dir, "base": base, "models": models, "adapted": adapted, "dirs": dirs,
            "res": res, "og": model, "ad": ad}


# ----------------------------------------------------------------------------- fp32, switchable


@pytest.mark.parametrize("name", ["lora", "gralora", "rasa", "peft"])
def test_tokens_and_logits_equal_torch(llama, name):
    model, ad, ref = llama["og"], llama["ad"], llama["models"][name]
    changed = 0
    for ids in PROMPTS:
        got = _cut(greedy(model, ids, NEW, ad, name))
        assert got == _torch_greedy(ref, ids), f"{name}: og greedy tokens differ from torch for prompt {ids}"
        changed += got != _torch_greedy(llama["base"], ids)
    assert changed, f"{name}: the adapter changed no token: the test could not tell it from the base"
    ids = PROMPTS[1] + [7, 11, 19]
    want = _torch_logits(llama["adapted"][name], ids)
    err = np.abs(_og_logits(model, ids, ad, name) - want).max() / np.abs(want).max()
    assert err <= LOGIT_TOL, f"{name}: prefill logits rel err {err:.2e}"


def test_no_adapter_is_base(llama):
    for ids in PROMPTS:
        assert _cut(greedy(llama["og"], ids, NEW)) == _torch_greedy(llama["base"], ids)
    ids = PROMPTS[0]
    want = _torch_logits(llama["base"], ids)
    assert np.abs(_og_logits(llama["og"], ids) - want).max() / np.abs(want).max() <= LOGIT_TOL


def test_switch_at_run_time_without_reload(llama):
    """One og.Model, adapters switched per generator (a, b, none, a again) give each one's own tokens."""
    model, ad, models = llama["og"], llama["ad"], llama["models"]
    ids = PROMPTS[2]
    order = ["gralora", "lora", None, "rasa", "gralora", None, "lora"]
    for name in order:
        ref = llama["base"] if name is None else models[name]
        assert _cut(greedy(model, ids, NEW, ad, name)) == _torch_greedy(ref, ids), f"after switching to {name}"


def test_subset_and_mixed_rank_layout(llama):
    """The adapters cover different sites with different ranks; each pair has its own rank axis."""
    import onnx

    res = llama["res"]
    meta = {n: json.loads((res.path / f"{n}.adapter.json").read_text()) for n in llama["dirs"]}
    ranks = {n: {s["rank"] for s in m["sites"].values()} for n, m in meta.items()}
    assert ranks == {"lora": {4}, "gralora": {10}, "rasa": {5}, "peft": {2}}
    assert len(meta["lora"]["sites"]) == 6 and len(meta["gralora"]["sites"]) == 14 and len(meta["rasa"]["sites"]) == 8
    assert set(res.adapter_inputs) == set(meta["gralora"]["sites"])  # the union
    g = onnx.load(str(res.path / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: i for i in g.input}
    inits = {t.name: t for t in g.initializer}
    rank_dims = []
    for site, p in res.adapter_inputs.items():
        a, b = inputs[p["A"]].type.tensor_type.shape.dim, inputs[p["B"]].type.tensor_type.shape.dim
        assert a[0].dim_value == p["in"] and b[1].dim_value == p["out"]
        assert a[1].dim_param and a[1].dim_param == b[0].dim_param
        rank_dims.append(a[1].dim_param)
        assert list(inits[p["A"]].dims) == [p["in"], 0] and list(inits[p["B"]].dims) == [0, p["out"]]
    assert len(set(rank_dims)) == len(rank_dims), "rank axes must not be shared between pairs"
    assert res.sizes["base"] > 0 and all(res.sizes[n] > 0 for n in llama["dirs"])


def test_gralora_and_rasa_are_exact_lora(llama):
    """The converted pairs reproduce each site's delta weight exactly (as_lora, fp32)."""
    import onnxruntime as ort

    from peftcompile.state import site_adapters

    res = llama["res"]
    for name in ("gralora", "rasa"):
        work = copy.deepcopy(llama["base"])
        pc.load_adapters(work, llama["dirs"][name])
        fmt = ort.AdapterFormat.read_adapter(str(res.adapters[name]))
        params = {k: np.array(v.numpy(), copy=True) for k, v in fmt.get_parameters().items()}  # views: copy
        for _, _, cont in site_adapters(work):
            p = res.adapter_inputs[cont.site]
            dw = (params[p["A"]] @ params[p["B"]]).T  # [out, in]
            want = cont["default"].delta_weight().detach().numpy()
            assert np.abs(dw - want).max() <= 1e-6 * max(1.0, np.abs(want).max()), cont.site


# ----------------------------------------------------------------------------- int4 base, float adapters


def _agreement(og_model, ref, ad=None, name=None, n_seqs=8, length=24) -> float:
    """Next-token top-1 agreement of og with torch on random token sequences (one prefill each)."""
    hits = total = 0
    for i in range(n_seqs):
        g = torch.Generator().manual_seed(100 + i)
        seq = [1] + torch.randint(4, VOCAB, (length - 1,), generator=g).tolist()
        want = _torch_logits(ref, seq).argmax(-1)
        got = _og_logits(og_model, seq, ad, name).argmax(-1)
        hits += int((want == got).sum())
        total += len(seq)
    return hits / total


def test_int4_base_with_float_adapters(llama, record_property):
    import onnx

    names = ("lora", "gralora", "rasa")
    res = to_genai(llama["base_dir"], {n: llama["dirs"][n] for n in names},
                   llama["root"] / "genai_int4", precision="int4")
    g = onnx.load(str(res.path / "model.onnx"), load_external_data=False).graph
    lora_ops = {n.op_type for n in g.node if "/lora_" in n.name and "MatMul" in n.name}
    base_ops = {n.op_type for n in g.node if n.name.endswith("proj/MatMul_Q4") or n.name.endswith("proj/MatMul")}
    assert lora_ops == {"MatMul"}, f"LoRA MatMuls must stay float, got {lora_ops}"
    assert "MatMulNBits" in base_ops
    assert res.sizes["base"] < 0.5 * llama["res"].sizes["base"]
    model = og.Model(str(res.path))
    ad = GenaiAdapters(res.path, model)
    for n in names:
        ad.load(n)
    base_agree = _agreement(model, llama["base"])
    agree = {n: _agreement(model, llama["models"][n], ad, n) for n in names}
    # the adapter must act: the int4+adapter model must agree with the adapted torch model far
    # more than with the base
    cross = _agreement(model, llama["base"], ad, "gralora")
    record_property("int4_agreement", {"base": base_agree, **agree, "gralora_vs_base": cross})
    print(f"int4 top-1 agreement with fp32 torch: base {base_agree:.3f}, "
          + ", ".join(f"{k} {v:.3f}" for k, v in agree.items()) + f" (gralora-int4 vs fp32 base: {cross:.3f})")
    # Measured (8 x 24 positions): base 0.86; lora 0.77, gralora 0.87, rasa 0.81. The adapted
    # models sit a little below the base on some adapters (their activations differ; int4 merged
    # LoRA does worse still, see the README); 0.15 is the accepted gap.
    assert base_agree >= 0.75
    for n, a in agree.items():
        assert a >= base_agree - 0.15, f"{n}: int4+adapter agreement {a:.3f} vs int4 base's own {base_agree:.3f}"
        assert a > cross + 0.2


# ----------------------------------------------------------------------------- merged, other family, CLI


def test_merged_export_via_cli(llama):
    """``peftcompile export --format genai --merged`` over an existing folder with --overwrite."""
    import onnx
    from typer.testing import CliRunner

    from peftcompile.cli import app

    out = llama["root"] / "genai_merged"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    args = ["export", str(llama["base_dir"]), "--format", "genai", "-a", f"rasa={llama['dirs']['rasa']}", "-o",
            str(out), "--merged"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "already exists" in " ".join(r.output.split()), r.output  # rich wraps lines
    assert (out / "stale.txt").is_file()
    r = CliRunner().invoke(app, args + ["--overwrite"])
    assert r.exit_code == 0, r.output
    assert not (out / "stale.txt").exists()
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert not [i.name for i in g.input if "lora" in i.name] and not [n for n in g.node if "lora" in n.name]
    assert read_manifest(out)["merged"] is True
    model = og.Model(str(out))
    for ids in PROMPTS:
        assert _cut(greedy(model, ids, NEW)) == _torch_greedy(llama["models"]["rasa"], ids)
    with pytest.raises(pc.AdapterError, match="merged export"):
        GenaiAdapters(out, model)


def test_qwen2_family(tmp_path):
    base_dir = _base_dir(tmp_path, "qwen2", seed=3)
    base = _load(base_dir)
    models = {
        "lora": _adapter(base, pc.AdapterSpec(pc.LoRA(r=2, alpha=4.0), targets=["q_proj", "k_proj", "up_proj"]), 11,
                         tmp_path / "lora"),
        "gralora": _adapter(base, pc.AdapterSpec(pc.GraLoRA(r=4, k=2, alpha=8.0), targets="all-linear"), 12,
                            tmp_path / "gralora"),
    }
    res = to_genai(base_dir, {n: tmp_path / n for n in models}, tmp_path / "genai")
    model = og.Model(str(res.path))
    ad = GenaiAdapters(res.path, model)
    for n in models:
        ad.load(n)
    for ids in PROMPTS:
        assert _cut(greedy(model, ids, NEW)) == _torch_greedy(base, ids)
        for n, m in models.items():
            assert _cut(greedy(model, ids, NEW, ad, n)) == _torch_greedy(m, ids), (n, ids)


# ----------------------------------------------------------------------------- bad input


def test_adapter_from_another_base_fails_before_writing(llama, tmp_path):
    other = _load(_base_dir(tmp_path, "llama", seed=1, hidden_size=32, intermediate_size=96, tokenizer=False))
    _adapter(other, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"]), 0, tmp_path / "other")
    out = tmp_path / "out"
    with pytest.raises(pc.AdapterError, match=r"adapter 'x' does not fit this base model.*shape"):
        to_genai(llama["base_dir"], {"x": tmp_path / "other"}, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    with pytest.raises(pc.AdapterError, match=r"'GPT2LMHeadModel' is not supported by the onnxruntime-genai builder"):
        to_genai(d, {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer(llama, tmp_path):
    d = _base_dir(tmp_path, "llama", tokenizer=False)
    with pytest.raises(pc.AdapterError, match=r"no tokenizer files.*tokenizer\.json"):
        to_genai(d, {}, tmp_path / "out")
    with pytest.raises(pc.AdapterError, match="pass tokenizer="):
        to_genai(llama["base"], {}, tmp_path / "out")


def test_existing_output_refused(llama, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(pc.AdapterError, match="already exists; pass overwrite=True"):
        to_genai(llama["base_dir"], {"lora": llama["dirs"]["lora"]}, out)


@pytest.mark.parametrize("kw, match", [
    (dict(precision="fp16", device="cpu"), "fp16 is CUDA-only"),
    (dict(precision="int8", device="cpu"), "not a target"),
    (dict(merged=True), "exactly one adapter"),
])
def test_bad_options(llama, tmp_path, kw, match):
    ads = {n: llama["dirs"][n] for n in ("lora", "rasa")}
    with pytest.raises(pc.AdapterError, match=match):
        to_genai(llama["base_dir"], ads, tmp_path / "out", **kw)


def test_unsupported_method_options(llama, tmp_path):
    # whole trained modules (AdapterSpec.trainable) have no LoRA form
    m = copy.deepcopy(llama["base"])
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"], trainable=["lm_head"]))
    pc.save_adapters(m, tmp_path / "head")
    with pytest.raises(pc.AdapterError, match="trains whole modules"):
        to_genai(llama["base_dir"], {"head": tmp_path / "head"}, tmp_path / "out")
    # PEFT DoRA: the builder would silently drop the magnitude vector; refused
    d = tmp_path / "dora"
    shutil.copytree(llama["dirs"]["peft"], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(pc.AdapterError, match="use_dora"):
        to_genai(llama["base_dir"], {"dora": d}, tmp_path / "out")
    with pytest.raises(pc.AdapterError, match="file-name-safe"):
        to_genai(llama["base_dir"], {"a/b": llama["dirs"]["lora"]}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_genai_adapters_checks_before_loading(llama, tmp_path):
    """GenaiAdapters refuses an adapter for another base, without its spec JSON, or of wrong shape."""
    from peftcompile.export import write_ort_adapter

    res = llama["res"]
    d = tmp_path / "copy"
    shutil.copytree(res.path, d)
    ad = GenaiAdapters(d, llama["og"])
    # another base: the fingerprint differs
    meta = json.loads((d / "lora.adapter.json").read_text())
    (d / "lora.adapter.json").write_text(json.dumps({**meta, "base_fingerprint": "0" * 64}))
    with pytest.raises(pc.AdapterError, match="converted for another base model"):
        ad.load("lora")
    # no spec JSON
    os.remove(d / "rasa.adapter.json")
    with pytest.raises(pc.AdapterError, match="no rasa.adapter.json"):
        ad.load("rasa")
    # wrong shape (an adapter for a wider model under the right names)
    p = next(iter(res.adapter_inputs.values()))
    write_ort_adapter(d / "wide.onnx_adapter", {p["A"]: np.zeros((p["in"] * 2, 4), np.float32),
                                                p["B"]: np.zeros((4, p["out"]), np.float32)})
    (d / "wide.adapter.json").write_text(json.dumps({**meta, "adapter": "wide", "tensors": {p["A"]: 0, p["B"]: 0}}))
    with pytest.raises(pc.AdapterError, match=r"does not fit.*model wants \[in="):
        ad.load("wide")
    assert ad.loaded == {}
    ad.load("gralora")  # an intact one still loads
    assert list(ad.loaded) == ["gralora"]
