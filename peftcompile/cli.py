"""``peftcompile`` command: demo, inspect, merge, export, search."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .methods import DEFAULT_METHOD, registered_methods

from .cliguard import adapter_folder as _adapter_folder
from .cliguard import check_output, guarded, set_debug
from .cliguard import model_folder as _model_folder

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Parameter-efficient fine-tuning as a compiler problem.")
console = Console()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error")) -> None:
    """Parameter-efficient fine-tuning as a compiler problem."""
    set_debug(debug)


@app.command()
@guarded
def demo(
    out: Path = typer.Option(Path("peftcompile-demo"), help="output folder (report, plots, adapter, ONNX files)"),
    quick: bool = typer.Option(False, help="few steps, for a smoke run"),
    compile: bool = typer.Option(True, help="fine-tune through torch.compile(backend='peftcompile')"),
    seed: int = typer.Option(0),
) -> None:
    """Fine-tune the packaged all-MiniLM-L6-v2 end to end for stdlib documentation retrieval: DiffoRA
    placement, GraLoRA, the compile backend, merge, ONNX export and onnxruntime parity; writes a report."""
    from .demo import DemoConfig, run_demo

    check_output(out, (), overwrite=True, is_dir=True)  # an existing folder is reused, a file is an error
    cfg = DemoConfig(out_dir=out, compile=compile, seed=seed)
    if quick:
        cfg.search_steps, cfg.train_steps, cfg.max_pairs = 4, 6, 120
    with console.status("starting") as st:
        res = run_demo(cfg, status=lambda s: (st.update(s), console.log(s)))
    t = Table(title="peftcompile demo")
    t.add_column("step")
    t.add_column("result")
    z, a = res["zero_shot"], res["adapted"]
    t.add_row("zero-shot test recall@1 / MRR", f"{z['recall@1']:.3f} / {z['mrr']:.3f}")
    t.add_row("DiffoRA kept sites", f"{res['placement']['kept']} / {res['placement']['candidates']}")
    t.add_row("fine-tune train loss", f"{res['loss_first']:.3f} -> {res['loss_last']:.3f}")
    t.add_row("adapted test recall@1 / MRR", f"{a['recall@1']:.3f} / {a['mrr']:.3f}")
    t.add_row("ONNX merged max rel err", f"{res['onnx']['merged_max_rel_err']:.2e}")
    t.add_row("ONNX unmerged max rel err", f"{res['onnx']['unmerged_max_rel_err']:.2e}")
    console.print(t)
    console.print(f"report: {out / 'report.md'}")


@app.command()
@guarded
def inspect(model: str = typer.Argument("minilm", help="'minilm', tiny-llama|tiny-gpt2|tiny-bert, or an HF folder"),
            adapter: Optional[Path] = typer.Option(None, help="a save_adapters directory to load first")) -> None:
    """List the linear sites peftcompile finds (and an adapter's summary)."""
    import peftcompile as pc
    from .models import load_model
    from .passes.capture import capture
    from .passes.match import match

    _model_folder(model)
    if adapter is not None:
        _adapter_folder(adapter)
    m, _ = load_model(model)
    cap = capture(m)
    t = Table(title=f"linear sites of {type(m).__name__}")
    for c in ("site", "kind", "in", "out"):
        t.add_column(c)
    for s in {s.name: s for s in match(cap)}.values():
        t.add_row(s.name, s.kind, str(s.in_features), str(s.out_features))
    if adapter is not None:  # before any output: a bad adapter prints only its error
        pc.load_adapters(m, adapter)
    console.print(t)
    if adapter is not None:
        console.print(str(pc.summary(m)))


@app.command()
@guarded
def merge(model: str = typer.Argument(..., help="base model: HF folder or example name"),
          adapter: Path = typer.Argument(..., help="a save_adapters directory"),
          out: Path = typer.Argument(..., help="folder for the merged plain HF checkpoint"),
          overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing OUT folder")) -> None:
    """Load an adapter, fold it into the base weights and save a plain checkpoint.

    OUT is written to a temporary sibling folder and moved into place when complete; it may
    not be (or lie inside) the MODEL or ADAPTER folder."""
    import peftcompile as pc
    from .atomic import atomic_replace_dir, temp_sibling_dir
    from .models import load_model

    check_output(out, [("model", _model_folder(model)), ("adapter", _adapter_folder(adapter))], overwrite,
                 is_dir=True)
    m, tok = load_model(model)
    pc.load_adapters(m, adapter)
    plain = pc.merge_and_unload(m)
    if not hasattr(plain, "save_pretrained"):
        raise typer.BadParameter(f"{type(plain).__name__} is not an HF model; use peftcompile.merge_and_unload in Python")
    with temp_sibling_dir(out) as tmp:
        plain.save_pretrained(tmp / "out")
        if tok is not None:
            tok.save_pretrained(tmp / "out")
        atomic_replace_dir(tmp / "out", out)
    console.print(f"merged checkpoint written to {out}")


@app.command()
def train(
    model: str = typer.Argument(..., help="HF model folder (hub-style local path), or tiny-llama|tiny-gpt2"),
    data: Path = typer.Option(..., "--data", help=".jsonl ('text', and 'label' to classify) or a text file"),
    out: Path = typer.Option(Path("peftcompile-train"), help="output folder: checkpoints, adapter, report"),
    eval_data: Optional[Path] = typer.Option(None, help="eval file (default: --eval-fraction of --data)"),
    eval_fraction: float = typer.Option(0.1),
    task: str = typer.Option("auto", help="auto | causal-lm | classification"),
    method: str = typer.Option(DEFAULT_METHOD, help=f"a registered method: {' | '.join(registered_methods())}"),
    r: int = typer.Option(16, "--r", "--rank", help="adapter rank (under torchrun spell it --rank: torchrun "
                          "reads --r as an abbreviation of its own options)"),
    k: int = typer.Option(2, help="GraLoRA blocks / RaSA shared rank"),
    alpha: Optional[float] = typer.Option(None, help="default 2*r"), hybrid_r: int = typer.Option(0),
    dropout: float = typer.Option(0.0),
    targets: str = typer.Option("all-linear", help="'all-linear', comma-separated suffixes or a regex"),
    diffora_budget: Optional[float] = typer.Option(None, help="place adapters by DiffoRA search, keep this fraction"),
    diffora_steps: int = typer.Option(50),
    steps: int = typer.Option(100, help="optimizer steps (<= 0: --epochs)"), epochs: float = typer.Option(1.0),
    batch_size: int = typer.Option(8, help="per process"), lr: float = typer.Option(2e-4),
    seq_len: int = typer.Option(128), save_steps: int = typer.Option(50), eval_steps: int = typer.Option(50),
    logging_steps: int = typer.Option(5), seed: int = typer.Option(0),
    compile: bool = typer.Option(True, help="torch.compile(backend='peftcompile')"),
    resume: Optional[str] = typer.Option(None, help="'last' or a checkpoint-N folder"),
    distributed: str = typer.Option("auto", help="auto | none | ddp | fsdp2 (ddp/fsdp2 under torchrun)"),
    progress: bool = typer.Option(True),
) -> None:
    """Fine-tune with an adapter: adapter-only checkpoints, resume, eval, report with plots;
    the same command under `torchrun --nproc-per-node N` (DDP or FSDP2)."""
    from .api import AdapterError
    from .train import TrainConfig, close_process_group, run_train

    cfg = TrainConfig(model=model, data=data, out=out, eval_data=eval_data, eval_fraction=eval_fraction, task=task,
                      method=method, r=r, k=k, alpha=alpha, hybrid_r=hybrid_r, dropout=dropout, targets=targets,
                      diffora_budget=diffora_budget, diffora_steps=diffora_steps, steps=steps, epochs=epochs,
                      batch_size=batch_size, lr=lr, seq_len=seq_len, save_steps=save_steps, eval_steps=eval_steps,
                      logging_steps=logging_steps, seed=seed, compile=compile, resume=resume,
                      distributed=distributed, progress=progress)
    try:
        res = run_train(cfg, log=console.log)
    except AdapterError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        console.print(f"loss {res['loss_first']:.4f} -> {res['loss_last']:.4f}; "
                      f"eval {res['eval'].get('eval_loss', float('nan')):.4f}; report: {out / 'report.md'}")
    close_process_group()


from .export.cli import export_command  # noqa: E402  (defined with the exporter)

app.command("export", help="Export a model (+ adapter) to ONNX, merged or unmerged, checked against onnxruntime.")(
    export_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
