"""Tiny models built from configs (random weights, no download) shared by all tests."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from peftcompile.models import TINY_VOCAB as VOCAB, tiny_bert, tiny_gpt2, tiny_llama  # noqa: F401 (re-exported)
from peftcompile.methods import LoRA

# CI runs two xdist workers on two cores and the models are tiny: a second intra-op thread per
# worker only waits for a core (test_lifecycle + test_io: 15.3 s -> 8.0 s measured).
torch.set_num_threads(1)


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


class ResidualBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(h))


class ResidualStack(nn.Module):
    """Residual tanh blocks: a plain module, captured whole; sites blocks.N.fc (DiffoRA problems)."""

    def __init__(self, d: int = 32, n: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


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


# ---------------------------------------------------------------- compile-backend tests
#: aot_autograd without inductor's code generation: the same lowering and op autograd, in
#: seconds instead of C++ builds on a shared 2-core machine.
FAST = {"peftcompile.compiler": "aot_eager"}


@pytest.fixture
def fresh_dynamo():
    """A clean dynamo cache and counters around a test (backend tests use it module-wide)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def token_ids(seq: int = 8, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def compile_fast(model, **options):
    return torch.compile(model, backend="peftcompile", options={**FAST, **options})


def counted(prefix: str) -> int:
    """Sum of the backend's counters starting with ``prefix`` ("fused_", "skipped_")."""
    from torch._dynamo.utils import counters

    return sum(v for k, v in counters["peftcompile"].items() if k.startswith(prefix))


def param_grads(model) -> dict[str, torch.Tensor]:
    # aot_autograd returns zeros where eager leaves None (e.g. BERT's pooler, unused by the loss)
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


class CountingBackend:
    """peftcompile (aot_eager inside) that counts the graphs it compiles."""

    def __init__(self, **options):
        self.frames, self.options = 0, {**FAST, **options}

    def __call__(self, gm, example_inputs):
        from peftcompile.backend import peftcompile_backend

        self.frames += 1
        return peftcompile_backend(gm, example_inputs, options=self.options)


def ort_output(sess, inputs, adapter=None) -> torch.Tensor:
    """The first output of an ``OrtAdapterSession`` run (``adapter``: bound first), as a tensor."""
    import numpy as np

    out = sess.bind(adapter).run(inputs) if adapter is not None else sess.run(inputs)
    return torch.as_tensor(np.asarray(out[0] if isinstance(out, (list, tuple)) else next(iter(out.values()))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- a method with a linear form only
@dataclasses.dataclass(frozen=True)
class LinearOnly(LoRA):
    """LoRA's math registered as a method without embedding / conv / parameter forms (every built-in
    method has them), to test the refusals of the site kinds a method cannot adapt."""


@pytest.fixture
def linear_only():
    from peftcompile.methods import get_method, register_method, unregister_method

    register_method(dataclasses.replace(get_method("lora"), name="linonly", config_cls=LinearOnly, peft=None,
                                        embed=None, embed_init=None, conv=None, param_form=None))
    yield LinearOnly(r=2)
    unregister_method("linonly")
