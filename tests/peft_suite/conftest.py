"""Fixtures of the ported PEFT suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """PEFT's tiny models are a few hundred flops per op: with two intra-op threads on a busy
    2-core CI machine each op waited ~40-160 ms for the other thread (measured), with one it takes
    ~0.3 ms. Restored afterwards for the rest of the session."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
