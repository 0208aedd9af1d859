"""Tiny models built from configs (random weights, no download) shared by all tests."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 128


class MLP(nn.Module):
    """Plain module: traced whole by capture."""

    def __init__(self, d_in: int = 16, d_hidden: int = 32, d_out: int = 8, p: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(self.fc1(x))))


class FunctionalMLP(nn.Module):
    """Calls F.linear on its own parameters (call_function sites)."""

    def __init__(self, d_in: int = 16, d_hidden: int = 32, d_out: int = 8) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(d_hidden, d_in) / d_in**0.5)
        self.b_in = nn.Parameter(torch.zeros(d_hidden))
        self.w_out = nn.Parameter(torch.randn(d_out, d_hidden) / d_hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.gelu(F.linear(x, self.w_in, self.b_in)), self.w_out)


def tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def tiny_gpt2(**kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(kw)
    return GPT2LMHeadModel(GPT2Config(**cfg))


def tiny_bert(**kw):
    from transformers import BertConfig, BertModel

    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64)
    cfg.update(kw)
    return BertModel(BertConfig(**cfg))


HF_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def hf_output(out) -> torch.Tensor:
    """The main tensor of an HF output (logits or last hidden state)."""
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def randomize_adapters_(model: nn.Module, std: float = 0.5, seed: int = 0) -> None:
    """Give every trainable (adapter) parameter random values so deltas are non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
