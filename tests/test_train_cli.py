"""`peftcompile train` end to end: one process (causal LM, classification + DiffoRA, resume), and
the same command under torchrun with 2 gloo processes (DDP, then FSDP2 resuming DDP's checkpoint)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import peftcompile as pc
from peftcompile.cli import app
from peftcompile.train import TrainConfig, run_train

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "in", "the", "park", "and", "birds", "sang", "songs"]


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory) -> Path:
    rng = random.Random(0)
    f = tmp_path_factory.mktemp("data") / "lm.jsonl"
    f.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(12))}) + "\n"
                         for _ in range(40)))
    return f


def cfg(data, out, **kw) -> TrainConfig:
    base = dict(model="tiny-llama", data=data, out=out, steps=4, save_steps=2, eval_steps=2, logging_steps=1,
                batch_size=4, lr=1e-2, seq_len=16, method="gralora", r=4, k=2, compile=False, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_single_process_causal_lm_and_resume(lm_data, tmp_path):
    out = tmp_path / "run"
    res = run_train(cfg(lm_data, out), log=lambda s: None)
    assert res["global_step"] == 4 and res["task"] == "causal-lm" and res["distributed"] == "none"
    assert res["loss_last"] < res["loss_first"] and "eval_loss" in res["eval"]
    for f in ("report.md", "report.json", "loss.png", "adapter/adapter_model.safetensors"):
        assert (out / f).is_file(), f
    for ck in ("checkpoint-2", "checkpoint-4"):
        names = {p.name for p in (out / ck).iterdir()}
        assert "adapter_model.safetensors" in names and "optimizer.pt" in names and "model.safetensors" not in names
    # the adapter reproduces the last checkpoint and loads into a fresh base
    a, b = load_file(str(out / "adapter/adapter_model.safetensors")), load_file(str(out / "checkpoint-4/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    from peftcompile.models import tiny_llama

    fresh = tiny_llama()
    pc.load_adapters(fresh, out / "adapter")
    # resume: two more steps from checkpoint-4
    res2 = run_train(cfg(lm_data, out, steps=6, resume="last"), log=lambda s: None)
    assert res2["global_step"] == 6 and res2["resumed_from"].endswith("checkpoint-4")
    assert "resumed from" in (out / "report.md").read_text()


def test_classification_from_hf_folder_with_diffora(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path / "tiny-llama-hf"
    LlamaForSequenceClassification(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               pad_token_id=0)).save_pretrained(folder)
    rng = random.Random(1)
    rows = [{"text": " ".join(rng.choice(WORDS[:8] if i % 2 else WORDS[8:]) for _ in range(8)),
             "label": "a" if i % 2 else "b"} for i in range(40)]
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_train(cfg(tmp_path / "cls.jsonl", tmp_path / "out", model=str(folder), method="lora",
                        diffora_budget=0.5, diffora_steps=4, steps=4, lr=2e-2), log=lambda s: None)
    assert res["task"] == "classification" and res["labels"] == ["a", "b"]
    # 2 layers x 7 linear sites; the head trains fully instead; budget 0.5 keeps half
    assert res["diffora"]["candidates"] == 14 and res["diffora"]["kept"] == 7 == res["n_sites"]
    assert 0.0 <= res["eval"]["eval_accuracy"] <= 1.0
    saved = load_file(str(tmp_path / "out/adapter/adapter_model.safetensors"))
    assert any(k.startswith("trainable.score.") for k in saved)  # the new head trains and is saved with the adapter


def test_bad_inputs(lm_data, tmp_path):
    r = CliRunner()
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    res = r.invoke(app, ["train", "tiny-llama", "--data", str(lm_data), "--distributed", "ddp"], env=env)
    assert res.exit_code == 2 and "torchrun --nproc-per-node" in res.output
    res = r.invoke(app, ["train", "tiny-llama", "--data", str(lm_data), "--out", str(tmp_path / "none"),
                         "--resume", "last"])
    assert res.exit_code == 2 and "no checkpoint-N folder" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    res = r.invoke(app, ["train", "tiny-llama", "--data", str(bad)])
    assert res.exit_code == 2 and "bad.jsonl:2" in res.output
    res = r.invoke(app, ["train", "tiny-llama", "--data", str(lm_data), "--method", "dora"])
    assert res.exit_code == 2 and "choose one of" in res.output
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------- torchrun, 2 gloo processes
def torchrun(args: list[str], timeout: float = 120) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "peftcompile.cli", "train", *args]
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out = p.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and both ranks
        pytest.fail(f"torchrun {args} did not finish in {timeout}s")
    assert p.returncode == 0, out[-5000:]
    return out


def test_torchrun_ddp_then_fsdp2_resume(lm_data, tmp_path):
    common = ["--data", str(lm_data), "--steps", "4", "--save-steps", "2", "--eval-steps", "2", "--logging-steps",
              "1", "--batch-size", "2", "--lr", "1e-2", "--seq-len", "16", "--method", "rasa", "--rank", "4", "--k",
              "1", "--no-compile", "--no-progress"]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp2"
    torchrun(["tiny-llama", "--out", str(ddp), "--distributed", "ddp", *common])
    rep = json.loads((ddp / "report.json").read_text())
    assert rep["world_size"] == 2 and rep["distributed"] == "ddp" and not rep["sharded"]
    assert rep["loss_last"] < rep["loss_first"]
    assert {p.name for p in (ddp / "checkpoint-2").iterdir()} >= {"adapter_model.safetensors", "optimizer.pt",
                                                                  "rng_state_0.pth", "rng_state_1.pth"}
    # FSDP2 resumes DDP's checkpoint-2 (adapter loaded onto shards, named optimizer state, step, RNG)
    torchrun(["tiny-llama", "--out", str(fsdp), "--distributed", "fsdp2", "--resume", str(ddp / "checkpoint-2"),
              *common])
    rep2 = json.loads((fsdp / "report.json").read_text())
    assert rep2["sharded"] and rep2["distributed"] == "fsdp2" and rep2["global_step"] == 4
    la = {h["step"]: h["loss"] for h in rep["log_history"] if "loss" in h}
    lb = {h["step"]: h["loss"] for h in rep2["log_history"] if "loss" in h}
    assert lb[3] == pytest.approx(la[3], rel=1e-5) and lb[4] == pytest.approx(la[4], rel=1e-5)
    a, b = load_file(str(ddp / "adapter/adapter_model.safetensors")), load_file(str(fsdp / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
