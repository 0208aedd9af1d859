"""From adapt() to a trained, merged, exported ONNX file, on a causal LM.

    python examples/finetune_causal_lm.py                       # tiny random Llama (seconds on CPU)
    python examples/finetune_causal_lm.py --model path/to/hf    # any local HF causal LM folder
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import peftcompile as pc
from peftcompile.export import to_onnx
from peftcompile.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--method", choices=["lora", "gralora", "rasa"], default="gralora")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("out/causal_lm"))
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()

    model, _ = load_model(args.model)
    method = {"lora": pc.LoRA(r=8, alpha=16), "gralora": pc.GraLoRA(r=8, k=2, alpha=16),
              "rasa": pc.RaSA(r=8, k=1, alpha=16)}[args.method]
    pc.adapt(model, pc.AdapterSpec(method, targets="all-linear"))
    print(pc.summary(model))

    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    step = model if args.no_compile else torch.compile(model, backend="peftcompile")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i in range(args.steps):
        opt.zero_grad()
        loss = step(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if i % 5 == 0 or i == args.steps - 1:
            print(f"step {i:3d}  loss {loss.item():.4f}")
    model.eval()

    args.out.mkdir(parents=True, exist_ok=True)
    pc.save_adapters(model, args.out / "adapter")
    unmerged = to_onnx(model, {"input_ids": ids[:2]}, args.out / "model.unmerged.onnx", merged=False)
    merged = to_onnx(model, {"input_ids": ids[:2]}, args.out / "model.merged.onnx", merged=True)
    print("ONNX:", unmerged.path, merged.path)
    plain = pc.merge_and_unload(model)
    plain.save_pretrained(args.out / "merged")
    print("merged HF checkpoint:", args.out / "merged")


if __name__ == "__main__":
    main()
