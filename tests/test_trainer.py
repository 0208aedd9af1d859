"""HF Trainer integration: adapter-only checkpoints, exact resume, save_model, compile backend."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import VOCAB, tiny_llama
from safetensors.torch import load_file

import peftcompile as pc

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments

from peftcompile.integrations.transformers import PeftcompileTrainer

os.environ.setdefault("ACCELERATE_USE_CPU", "1")


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 12, seq: int = 8, seed: int = 3):
        self.ids = torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def model(adapter_seed: int = 0, method=None):
    torch.manual_seed(0)  # the same base model every time (checkpoints hold the adapter only)
    m = tiny_llama()
    pc.adapt(m, pc.AdapterSpec(method or pc.GraLoRA(r=4, k=2, alpha=8), targets=["q_proj", "v_proj", "down_proj"]))
    if adapter_seed:  # other adapter values, so resuming has to load them
        g = torch.Generator().manual_seed(adapter_seed)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g))
    return m


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=6, save_steps=3, logging_steps=1,
                learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, save_strategy="steps",
                disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="linear", warmup_steps=2)
    base.update(kw)
    return TrainingArguments(**base)


def losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    t = PeftcompileTrainer(model=model(), args=args(out), train_dataset=Rows())
    t.train()
    return out, losses(t), t


def test_checkpoints_are_adapter_only(first_run, tmp_path):
    out, _, t = first_run
    for step in (3, 6):
        ck = out / f"checkpoint-{step}"
        names = {p.name for p in ck.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.pt",
                "scheduler.pt", "rng_state.pth", "training_args.bin"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin"}
        assert json.loads((ck / "trainer_state.json").read_text())["global_step"] == step
    # what plain Trainer writes for the same model: the whole model
    full = tmp_path / "full"
    Trainer(model=t.model, args=args(full)).save_model(str(full))
    adapter = (out / "checkpoint-3" / "adapter_model.safetensors").stat().st_size
    whole = (full / "model.safetensors").stat().st_size
    assert adapter * 10 < whole, (adapter, whole)  # tiny model: 7.9 KB vs 117 KB
    # the last checkpoint holds the trained adapter
    final = load_file(str(out / "checkpoint-6" / "adapter_model.safetensors"))
    own = pc.state.adapter_params(t.model, "default")
    assert final.keys() == own.keys() and all(torch.equal(final[k], own[k].detach()) for k in final)


def test_resume_continues_identically(first_run, tmp_path):
    out, ref_losses, t = first_run
    # a fresh model with other adapter values: everything must come from the checkpoint
    t2 = PeftcompileTrainer(model=model(adapter_seed=7), args=args(tmp_path), train_dataset=Rows())
    t2.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    got = losses(t2)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's trainer_state.json
    for s in (1, 2, 3, 4, 5, 6):
        assert got[s] == pytest.approx(ref_losses[s], rel=1e-6, abs=1e-7), (s, got[s], ref_losses[s])
    a = pc.state.adapter_params(t.model, "default")
    b = pc.state.adapter_params(t2.model, "default")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    assert t2.state.global_step == 6


def test_save_model_writes_adapter_that_loads(first_run, tmp_path):
    _, _, t = first_run
    t.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "model.safetensors").exists()
    fresh = tiny_llama()
    pc.load_adapters(fresh, tmp_path / "final")
    x = Rows().ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=x).logits, t.model.eval()(input_ids=x).logits,
                                   atol=0, rtol=0)


def test_compile_backend_matches_eager(tmp_path):
    kw = dict(max_steps=2, save_steps=100, warmup_steps=0)
    eager = PeftcompileTrainer(model=model(), args=args(tmp_path / "e", **kw), train_dataset=Rows())
    eager.train()
    comp = PeftcompileTrainer(model=model(), args=args(tmp_path / "c", torch_compile=True,
                                                       torch_compile_backend="peftcompile", **kw),
                              train_dataset=Rows())
    comp.train()
    le, lc = losses(eager), losses(comp)
    assert le.keys() == lc.keys() == {1, 2}
    for s in le:
        assert lc[s] == pytest.approx(le[s], rel=1e-4)
    assert torch._dynamo.utils.counters["peftcompile"]["fused_gralora"] > 0
    comp.save_model(str(tmp_path / "c-final"))
    assert (tmp_path / "c-final" / "adapter_model.safetensors").is_file()


def test_bad_inputs(tmp_path):
    with pytest.raises(pc.AdapterError, match="without peftcompile adapters"):
        PeftcompileTrainer(model=tiny_llama(), args=args(tmp_path / "x"), train_dataset=Rows())
    (tmp_path / "not-a-ckpt").mkdir()
    (tmp_path / "not-a-ckpt" / "trainer_state.json").write_text("{}")
    m = model()
    before = {k: v.clone() for k, v in pc.state.adapter_params(m, "default").items()}
    t = PeftcompileTrainer(model=m, args=args(tmp_path / "y"), train_dataset=Rows())
    with pytest.raises(pc.AdapterError, match="no peftcompile adapter_config.json"):
        t.train(resume_from_checkpoint=str(tmp_path / "not-a-ckpt"))
    after = pc.state.adapter_params(m, "default")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_best_model_at_end_loads_that_adapter(tmp_path):
    t = PeftcompileTrainer(model=model(), train_dataset=Rows(), eval_dataset=Rows(n=4, seed=9),
                           args=args(tmp_path, eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                                     metric_for_best_model="loss", greater_is_better=False))
    t.train()
    best = t.state.best_model_checkpoint
    assert best is not None and best.endswith(("checkpoint-3", "checkpoint-6"))
    with torch.no_grad():  # whichever checkpoint won, loading it must overwrite these values
        for p in t.model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    t._load_best_model()  # what Trainer calls at the end of train() with load_best_model_at_end
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    own = pc.state.adapter_params(t.model, "default")
    assert saved.keys() == own.keys() and all(torch.equal(saved[k], own[k].detach()) for k in saved)
