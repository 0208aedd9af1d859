"""The `peftcompile` command: inspect, merge and the demo (quick, end to end on the packaged MiniLM)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import peftcompile as pc
from peftcompile.cli import app
from peftcompile.models import load_model

runner = CliRunner()


def test_inspect_lists_sites():
    r = runner.invoke(app, ["inspect", "tiny-gpt2"])
    assert r.exit_code == 0, r.output
    assert "transformer.h.1.mlp.c_proj" in r.output and "conv1d" in r.output


def test_merge_writes_a_plain_checkpoint(tmp_path):
    from transformers import LlamaForCausalLM

    m, _ = load_model("tiny-llama")
    pc.adapt(m, pc.AdapterSpec(pc.GraLoRA(r=4, k=2, alpha=8)))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    pc.save_adapters(m, tmp_path / "adapter")
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        want = m(input_ids=ids).logits
    r = runner.invoke(app, ["merge", "tiny-llama", str(tmp_path / "adapter"), str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("peftcompile" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    """The main job on the real pretrained model: search, adapt, compiled training, export, parity."""
    from peftcompile.demo import DemoConfig, run_demo

    cfg = DemoConfig(out_dir=tmp_path, search_steps=4, train_steps=4, max_pairs=120,
                     batch_size=8, max_len=24, progress=False)
    res = run_demo(cfg, status=lambda s: None)
    assert 0 < res["placement"]["kept"] < res["placement"]["candidates"] == 36
    assert res["onnx"]["merged_max_rel_err"] <= 1e-4 and res["onnx"]["unmerged_max_rel_err"] <= 1e-4
    assert res["merge_max_abs_diff"] <= 1e-4
    assert all(torch.isfinite(torch.tensor(res[k])) for k in ("loss_first", "loss_last"))
    for k in ("zero_shot", "adapted"):  # retrieval metrics of the test split
        assert 0.0 <= res[k]["recall@1"] <= res[k]["recall@5"] <= 1.0 and 0.0 < res[k]["mrr"] <= 1.0
    for f in ("report.md", "results.json", "loss.png", "gates.png", "placement.json", "model.merged.onnx",
              "model.unmerged.onnx", "adapter/adapter_model.safetensors"):
        assert (tmp_path / f).is_file(), f
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["adapter_params"] > 0
