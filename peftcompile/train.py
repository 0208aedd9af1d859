"""``peftcompile train``: fine-tune an HF model folder on a JSONL / text file with an adapter.

The job is :class:`~peftcompile.integrations.transformers.PeftcompileTrainer` (HF Trainer with
adapter-only checkpoints) plus the parts a user would otherwise write: reading the data,
building the adapter (targets or a DiffoRA search), the compile backend, progress, periodic
checkpoints, resume, evaluation and a report with plots. The same command runs in one process
or under ``torchrun --nproc-per-node N`` (``--distributed ddp|fsdp2``); the process group
backend is gloo on CPU and nccl on GPU (accelerate picks it), no code change.

Data (``--data``):
* ``.jsonl``: one object per line; causal LM reads ``text``; classification reads ``text`` and
  ``label`` (a string or an int). The task defaults to classification when rows have a label.
* any other file: one causal-LM example per non-empty line.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterError
from .methods import DEFAULT_METHOD
from .distributed import is_sharded

__all__ = ["ByteTokenizer", "TrainConfig", "read_examples", "run_train"]

DISTRIBUTED = ("auto", "none", "ddp", "fsdp2")


@dataclass
class TrainConfig:
    """Options of ``peftcompile train`` (one field per CLI option)."""

    model: str
    data: Path
    out: Path = Path("peftcompile-train")
    eval_data: Path | None = None
    eval_fraction: float = 0.1
    task: str = "auto"  # auto | causal-lm | classification
    method: str = DEFAULT_METHOD
    r: int = 16
    k: int = 2
    alpha: float | None = None  # default 2 r
    hybrid_r: int = 0
    dropout: float = 0.0
    targets: str = "all-linear"  # "all-linear", a comma list of suffixes, or a regex
    diffora_budget: float | None = None
    diffora_steps: int = 50
    steps: int = 100
    epochs: float = 1.0  # used when steps <= 0
    batch_size: int = 8  # per process
    lr: float = 2e-4
    seq_len: int = 128
    save_steps: int = 50
    eval_steps: int = 50
    logging_steps: int = 5
    save_total_limit: int | None = 3
    seed: int = 0
    compile: bool = True
    resume: str | None = None  # "last" or a checkpoint folder
    distributed: str = "auto"
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- data
def read_examples(path: Path) -> list[dict]:
    """Rows of a JSONL file (dicts) or lines of a text file (``{"text": line}``)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"--data {path}: no such file; pass a .jsonl file or a text file with one example per line")
    rows = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AdapterError(f"{path}:{i} is not valid JSON ({e}); one JSON object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise AdapterError(f"{path}:{i}: each line needs a string field 'text' (and 'label' to classify)")
            rows.append(row)
    else:
        rows = [{"text": line} for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise AdapterError(f"--data {path} has no examples")
    return rows


class ByteTokenizer:
    """Fallback for model folders without a tokenizer (e.g. random tiny models): UTF-8 bytes
    folded into the vocabulary, ids 3.. (0 pad, 1 bos, 2 eos as the tiny configs use)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size, self.pad_token_id = vocab_size, 0

    def encode(self, text: str) -> list[int]:
        return [3 + b % (self.vocab_size - 3) for b in text.encode()]

    def save_pretrained(self, path) -> None:  # Trainer calls this on its processing_class
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "byte_tokenizer.json").write_text(json.dumps({"vocab_size": self.vocab_size}))


def _encode(tok, text: str) -> list[int]:
    if isinstance(tok, ByteTokenizer):
        return tok.encode(text)
    return tok(text, add_special_tokens=True)["input_ids"]


class TokenRows(torch.utils.data.Dataset):
    """Fixed-length rows (padding masked out of the loss and attention)."""

    def __init__(self, rows: Sequence[dict], tok, seq_len: int, labels: list[str] | None) -> None:
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.items = []
        for row in rows:
            ids = _encode(tok, row["text"])[:seq_len] or [pad]
            n = len(ids)
            item = {"input_ids": torch.tensor(ids + [pad] * (seq_len - n)),
                    "attention_mask": torch.tensor([1] * n + [0] * (seq_len - n))}
            if labels is None:
                item["labels"] = torch.tensor(ids + [-100] * (seq_len - n))
            else:
                item["labels"] = torch.tensor(labels.index(str(row["label"])))
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


# ---------------------------------------------------------------- model and adapter
def _load(cfg: TrainConfig, task: str, labels: list[str] | None):
    from .models import EXAMPLES

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.model in EXAMPLES:
        if task != "causal-lm" or cfg.model == "tiny-bert":
            raise AdapterError(f"--model {cfg.model}: the built-in tiny examples train as causal LMs only "
                               f"(tiny-llama, tiny-gpt2); pass an HF model folder for classification")
        torch.manual_seed(cfg.seed)
        model = EXAMPLES[cfg.model]()
        return model, ByteTokenizer(model.config.vocab_size)
    path = Path(cfg.model)
    if not (path / "config.json").is_file():
        raise AdapterError(f"--model {cfg.model!r} is neither a tiny example ({sorted(EXAMPLES)}) nor a model "
                           f"folder with config.json")
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={x: i for i, x in enumerate(labels)})
    try:
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
    except (OSError, ValueError, TypeError):
        tok = ByteTokenizer(model.config.vocab_size)
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _method(cfg: TrainConfig):
    """The method config from the registry: the options the method's config has are passed
    (``--k`` means blocks for one method and shared rank for another), the others ignored."""
    import dataclasses

    from .methods import registered_methods

    methods = registered_methods()
    if cfg.method not in methods:
        raise AdapterError(f"--method {cfg.method!r} is unknown; choose one of {sorted(methods)}")
    cls = methods[cfg.method].config_cls
    alpha = cfg.alpha if cfg.alpha is not None else 2.0 * cfg.r
    given = {"r": cfg.r, "alpha": alpha, "dropout": cfg.dropout, "k": cfg.k, "hybrid_r": cfg.hybrid_r}
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in given.items() if k in fields})


def _targets(t: str):
    if t == "all-linear" or any(c in t for c in "^$()[]*+?\\|"):
        return t
    return [x.strip() for x in t.split(",") if x.strip()]


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------- progress and report
def _progress_callback(total: int):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        """One rich progress bar with the latest loss (rank 0 only)."""

        def __init__(self) -> None:
            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.bar.start()
                self.task = self.bar.add_task("train", total=state.max_steps or total, info="",
                                              completed=state.global_step)

        def on_step_end(self, args, state, control, **kw):
            if self.task is not None:
                self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.task is not None and logs:
                info = " ".join(f"{k} {v:.4g}" for k, v in logs.items() if k in ("loss", "eval_loss", "eval_accuracy"))
                if info:
                    self.bar.update(self.task, info=info)

        def on_train_end(self, args, state, control, **kw):
            if self.task is not None:
                self.bar.stop()
                self.task = None

    return RichProgress()


def _plot(history: list[dict], file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def _write_report(cfg: TrainConfig, res: dict, out: Path) -> None:
    _plot(res["log_history"], out / "loss.png")
    (out / "report.json").write_text(json.dumps(res, indent=2, default=str))
    ev = res.get("eval", {})
    lines = [
        f"# peftcompile train: {cfg.model}",
        "",
        f"- task: {res['task']}; examples: {res['n_train']} train / {res['n_eval']} eval",
        f"- adapter: {res['method']} on {res['n_sites']} sites ({res['adapter_params']:,} params, "
        f"{res['trainable_percent']:.3f}% trainable)" + (f"; DiffoRA kept {res['diffora']['kept']} of "
                                                         f"{res['diffora']['candidates']}" if res.get("diffora") else ""),
        f"- processes: {res['world_size']} ({res['distributed']}); compile backend: {res['compiled']}",
        f"- steps: {res['global_step']} (resumed from {res['resumed_from']})" if res["resumed_from"] else
        f"- steps: {res['global_step']}",
        f"- train loss: first {res['loss_first']:.4f}, last {res['loss_last']:.4f}",
    ]
    if ev:
        lines.append("- eval: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, (int, float))))
    lines += [f"- adapter checkpoint: `{res['adapter_dir']}` ({res['adapter_bytes']:,} bytes)",
              f"- wall time: {res['seconds']:.1f} s", "", "![loss](loss.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


# ---------------------------------------------------------------- the job
def _check_distributed(cfg: TrainConfig) -> str:
    if cfg.distributed not in DISTRIBUTED:
        raise AdapterError(f"--distributed {cfg.distributed!r}: choose one of {DISTRIBUTED}")
    world = _world()
    if cfg.distributed in ("ddp", "fsdp2") and world < 2:
        raise AdapterError(
            f"--distributed {cfg.distributed} needs several processes but none were launched (WORLD_SIZE unset or 1, "
            f"so no process group can be initialised). Launch with: torchrun --nproc-per-node 2 -m peftcompile.cli "
            f"train ... --distributed {cfg.distributed}")
    if cfg.distributed == "auto":
        return "ddp" if world > 1 else "none"
    if cfg.distributed == "none" and world > 1:
        raise AdapterError("--distributed none under torchrun (WORLD_SIZE > 1): use ddp or fsdp2, or run one process")
    return cfg.distributed


def close_process_group() -> None:
    """Tear down the process group (set up by accelerate under torchrun) before the interpreter
    exits: gloo threads still alive at exit abort a rank now and then ("terminate called without
    an active exception", seen under load in tests/test_train_cli.py)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Run the job; returns the report dict (rank 0 also writes report.md, report.json, loss.png)."""
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from . import AdapterSpec, adapt, summary
    from .integrations.transformers import PeftcompileTrainer

    t0 = time.time()
    mode = _check_distributed(cfg)
    method = _method(cfg)
    rows = read_examples(cfg.data)
    task = cfg.task
    if task == "auto":
        task = "classification" if all("label" in r for r in rows) else "causal-lm"
    if task not in ("causal-lm", "classification"):
        raise AdapterError(f"--task {task!r}: choose auto, causal-lm or classification")
    if task == "classification" and not all("label" in r for r in rows):
        raise AdapterError(f"--task classification: every row of {cfg.data} needs a 'label'")
    eval_rows = read_examples(cfg.eval_data) if cfg.eval_data else []
    if not eval_rows and cfg.eval_fraction > 0 and len(rows) >= 4:
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, int(round(len(rows) * cfg.eval_fraction)))
        eval_rows = [rows[i] for i in order[:n_eval]]
        rows = [rows[i] for i in order[n_eval:]]
    labels = sorted({str(r["label"]) for r in rows + eval_rows}) if task == "classification" else None
    resume = None
    if cfg.resume:
        if cfg.resume == "last":
            resume = get_last_checkpoint(str(cfg.out)) if Path(cfg.out).is_dir() else None
        else:
            resume = cfg.resume
            if not Path(resume).is_dir():
                raise AdapterError(f"--resume {resume}: no such checkpoint folder; pass a checkpoint-N folder or 'last'")
        if resume is None:
            raise AdapterError(f"--resume last: no checkpoint-N folder in {cfg.out}; train once without --resume")

    model, tok = _load(cfg, task, labels)
    train_ds = TokenRows(rows, tok, cfg.seq_len, labels)
    eval_ds = TokenRows(eval_rows, tok, cfg.seq_len, labels) if eval_rows else None
    trainable = ["classifier", "score"] if task == "classification" else None
    # a classification head trains fully (and is saved with the adapter), so it gets no adapter itself
    spec = AdapterSpec(method, targets=_targets(cfg.targets), exclude=trainable, trainable=trainable)
    diffora_info = None
    if cfg.diffora_budget is not None:
        from . import diffora

        if _is_main():
            log(f"DiffoRA search: budget {cfg.diffora_budget}, {cfg.diffora_steps} steps")
        split = max(1, len(train_ds) // 5)
        def batch(items: list[dict]) -> dict:
            return {k: torch.stack([it[k] for it in items]) for k in items[0]}

        tb = [batch(train_ds.items[i:i + cfg.batch_size]) for i in range(split, len(train_ds), cfg.batch_size)]
        vb = [batch(train_ds.items[i:i + cfg.batch_size]) for i in range(0, split, cfg.batch_size)]
        placement = diffora.search(model, spec, tb or vb, vb, budget=cfg.diffora_budget, steps=cfg.diffora_steps,
                                   warmup=cfg.diffora_steps // 2, seed=cfg.seed, progress=False)
        diffora_info = {"kept": len(placement.sites), "candidates": len(placement.gates), "sites": placement.sites}
        adapt(model, spec, placement=placement)
    else:
        adapt(model, spec)
    summ = summary(model)

    use_cpu = not torch.cuda.is_available()
    kw: dict[str, Any] = dict(
        output_dir=str(cfg.out), per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, max_steps=cfg.steps if cfg.steps > 0 else -1, num_train_epochs=cfg.epochs,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, seed=cfg.seed, data_seed=cfg.seed, report_to=[],
        use_cpu=use_cpu, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        eval_strategy="steps" if eval_ds is not None else "no", eval_steps=cfg.eval_steps,
        lr_scheduler_type="cosine", warmup_steps=min(10, max(cfg.steps // 10, 0)),
    )
    if mode == "ddp":
        kw.update(ddp_find_unused_parameters=False)  # every adapter param takes part in each step
    if cfg.compile:
        kw.update(torch_compile=True, torch_compile_backend="peftcompile")
    kw.update(cfg.extra)
    args = TrainingArguments(**kw)
    compute_metrics = None
    if task == "classification":
        def compute_metrics(p):
            pred = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
            return {"accuracy": float((pred.argmax(-1) == p.label_ids).mean())}
    callbacks = [_progress_callback(cfg.steps)] if cfg.progress else []
    trainer = PeftcompileTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                 processing_class=None if isinstance(tok, ByteTokenizer) else tok,
                                 compute_metrics=compute_metrics, callbacks=callbacks,
                                 # fully_shard per decoder layer + root by peftcompile rather than accelerate
                                 # (whose FSDP plugin is GPU-only): the same code on CPU/gloo and GPU/nccl
                                 fsdp2=mode == "fsdp2")
    if cfg.progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the rich bar shows the losses instead of printed dicts
    log = log if _is_main() else (lambda s: None)
    log(f"training {summ.adapter_params:,} adapter params on {len(train_ds)} examples, {_world()} process(es), "
        f"mode {mode}, compile {cfg.compile}")
    trainer.train(resume_from_checkpoint=resume)
    sharded = is_sharded(trainer.model)
    if (mode == "fsdp2") != sharded:  # never report FSDP2 for a run that was not sharded (or vice versa)
        raise AdapterError(f"--distributed {mode}: after training the model is {'' if sharded else 'not '}sharded; "
                           f"accelerate did not apply the requested parallelism")
    ev = trainer.evaluate() if eval_ds is not None else {}
    adapter_dir = cfg.out / "adapter"
    trainer.save_model(str(adapter_dir))  # every rank (gathers shards); rank 0 writes
    hist = trainer.state.log_history
    losses = [h["loss"] for h in hist if "loss" in h]
    res = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "task": task, "labels": labels, "n_train": len(train_ds), "n_eval": len(eval_ds) if eval_ds else 0,
        "method": repr(method), "n_sites": sum(len(v) for v in summ.sites.values()),
        "adapter_params": summ.adapter_params, "trainable_percent": summ.trainable_percent,
        "diffora": diffora_info, "world_size": _world(), "distributed": mode, "sharded": sharded, "compiled": cfg.compile,
        "global_step": trainer.state.global_step, "resumed_from": resume,
        "loss_first": losses[0] if losses else math.nan, "loss_last": losses[-1] if losses else math.nan,
        "eval": ev, "log_history": hist, "adapter_dir": str(adapter_dir),
        "adapter_bytes": _dir_bytes(adapter_dir) if _is_main() else None, "seconds": time.time() - t0,
    }
    if _is_main():
        _write_report(cfg, res, cfg.out)
    return res
