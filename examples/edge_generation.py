"""On-device generation with onnxruntime-genai and hot-swappable LoRA / GraLoRA / RaSA adapters.

    pip install -e ".[genai]"
    python examples/edge_generation.py --out edge-demo      # ~1-2 min on 2 CPU cores

Offline: a small Llama is built from a config (random weights, WordLevel tokenizer), three
adapters with random non-zero weights stand in for fine-tuned ones (LoRA on q/v, GraLoRA k=2 on
every projection, RaSA on the attention projections), and ``peftcompile.export.to_genai``
writes one fp32 and one int4 onnxruntime-genai folder holding the base graph once and each
adapter as a small ``.onnx_adapter`` file. The script then generates with og (KV cache,
generation loop) with each adapter switched in at run time, checks the greedy tokens
against torch, and measures tokens/s (base vs adapter active) and file sizes.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import peftcompile as pc
from peftcompile.export.genai import GenaiAdapters, greedy, to_genai


def make_base(out: Path, hidden: int, layers: int, vocab: int) -> Path:
    """A Llama-family HF folder with tokenizer files (what the genai builder reads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    torch.manual_seed(0)
    # intermediate != vocab: the builder takes any Linear with out_features == vocab for the LM head
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 15) // 16 * 16,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    # no EOS in the generated text: the timing runs generate a fixed number of tokens
    cfg.eos_token_id = None
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_adapters(base_dir: Path, out: Path) -> dict[str, Path]:
    """Three adapters with random non-zero weights (stand-ins for fine-tuned ones)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    specs = {
        "lora": pc.AdapterSpec(pc.LoRA(r=8, alpha=16.0), targets=["q_proj", "v_proj"]),
        "gralora": pc.AdapterSpec(pc.GraLoRA(r=8, k=2, alpha=16.0), targets="all-linear"),
        "rasa": pc.AdapterSpec(pc.RaSA(r=8, k=1, alpha=16.0), targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
    }
    dirs = {}
    for i, (name, spec) in enumerate(specs.items()):
        m = copy.deepcopy(base)
        pc.adapt(m, spec)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        dirs[name] = pc.save_adapters(m, out / name)
    return dirs


def torch_model(base_dir: Path, adapter: Path | None):
    """The reference: the adapted model merged, fp32 torch."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if adapter is not None:
        pc.load_adapters(m, adapter)
        m = pc.merge_and_unload(m)
    return m


def torch_tokens(m, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        return m.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0].tolist()


def tokens_per_s(model, ad: GenaiAdapters, names: list[str | None], ids: list[int], n: int,
                 repeats: int) -> dict[str | None, float]:
    """New tokens / wall time of a whole generation (prefill included), median of ``repeats``.

    The runs of base and adapters are interleaved so that load from other processes on a
    shared machine spreads over all of them alike.
    """
    rates: dict[str | None, list[float]] = {k: [] for k in names}
    for name in names:  # warm-up
        greedy(model, ids, n, ad if name else None, name)
    for _ in range(repeats):
        for name in names:
            t = time.perf_counter()
            out = greedy(model, ids, n, ad if name else None, name)
            rates[name].append((len(out) - len(ids)) / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in rates.items()}


def top1_agreement(model, ad: GenaiAdapters, name: str | None, ref, vocab: int, n_seqs: int = 8,
                   length: int = 32) -> float:
    """Next-token top-1 agreement of og with a torch model on random token sequences (prefill logits)."""
    import onnxruntime_genai as og

    hits = total = 0
    for i in range(n_seqs):
        g = torch.Generator().manual_seed(100 + i)
        seq = [1] + torch.randint(4, vocab, (length - 1,), generator=g).tolist()
        with torch.no_grad():
            want = ref(torch.tensor([seq]), use_cache=False).logits[0].argmax(-1).numpy()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length + 1)
        gen = og.Generator(model, params)
        if name:
            ad.activate(gen, name)
        gen.append_tokens(np.asarray([seq], dtype=np.int32))
        got = np.asarray(gen.get_output("logits"))[0].argmax(-1)
        hits += int((want == got).sum())
        total += length
    return hits / total


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("edge-demo"))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    base_dir = make_base(args.out / "hf_base", args.hidden, args.layers, args.vocab)
    adapters = make_adapters(base_dir, args.out / "adapters")
    results: dict = {"model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
                     "new_tokens": args.new_tokens}

    for precision in ("fp32", "int4"):
        t = time.perf_counter()
        res = to_genai(base_dir, adapters, args.out / f"genai_{precision}", precision=precision)
        build_s = time.perf_counter() - t
        model = og.Model(str(res.path))
        ad = GenaiAdapters(res.path, model)
        for name in adapters:
            ad.load(name)
        # og.Tokenizer(model) is the on-device tokenizer for real checkpoints (BPE / SentencePiece);
        # it cannot parse this toy WordLevel tokenizer, so the builder's copy is read with transformers
        tok = AutoTokenizer.from_pretrained(res.path)
        ids = tok("<s> w10 w11 w12 w13")["input_ids"]
        print(f"\n== {precision}: {res.path} (built in {build_s:.1f} s)")
        rows = {}
        names = [None, *adapters]
        rates = tokens_per_s(model, ad, names, ids, args.new_tokens, args.repeats)
        for name in names:
            out = greedy(model, ids, 12, ad if name else None, name)
            ref = torch_model(base_dir, adapters.get(name))
            same = common_prefix(out[len(ids):], torch_tokens(ref, ids, 12)[len(ids):])
            agree = top1_agreement(model, ad, name, ref, args.vocab)
            rows[name or "base"] = {"tokens_per_s": round(rates[name], 1), "same_tokens_as_torch_fp32": f"{same}/12",
                                    "top1_agreement_with_torch_fp32": round(agree, 3)}
            print(f"{name or 'base':8s} {rates[name]:8.1f} tok/s  first {same:2d}/12 tokens equal torch fp32, "
                  f"top-1 agreement {agree:.3f}  {tok.decode(out[len(ids):])}")
        sizes = {k: v for k, v in res.sizes.items()}
        print("sizes: " + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in sizes.items()))
        results[precision] = {"generation": rows, "sizes_bytes": sizes, "build_s": round(build_s, 1)}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
