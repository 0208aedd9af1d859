"""``peftcompile`` command: demo, inspect, merge, export, search."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Parameter-efficient fine-tuning as a compiler problem.")
console = Console()


@app.command()
def demo(
    out: Path = typer.Option(Path("peftcompile-demo"), help="output folder (report, plots, adapter, ONNX files)"),
    quick: bool = typer.Option(False, help="few steps, for a smoke run"),
    compile: bool = typer.Option(True, help="fine-tune through torch.compile(backend='peftcompile')"),
    seed: int = typer.Option(0),
) -> None:
    """Fine-tune the packaged all-MiniLM-L6-v2 end to end for stdlib documentation retrieval: DiffoRA
    placement, GraLoRA, the compile backend, merge, ONNX export and onnxruntime parity; writes a report."""
    from .demo import DemoConfig, run_demo

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
def inspect(model: str = typer.Argument("minilm", help="'minilm', tiny-llama|tiny-gpt2|tiny-bert, or an HF folder"),
            adapter: Optional[Path] = typer.Option(None, help="a save_adapters directory to load first")) -> None:
    """List the linear sites peftcompile finds (and an adapter's summary)."""
    import peftcompile as pc
    from .models import load_model
    from .passes.capture import capture
    from .passes.match import match

    m, _ = load_model(model)
    cap = capture(m)
    t = Table(title=f"linear sites of {type(m).__name__}")
    for c in ("site", "kind", "in", "out"):
        t.add_column(c)
    for s in {s.name: s for s in match(cap)}.values():
        t.add_row(s.name, s.kind, str(s.in_features), str(s.out_features))
    console.print(t)
    if adapter is not None:
        pc.load_adapters(m, adapter)
        console.print(str(pc.summary(m)))


@app.command()
def merge(model: str = typer.Argument(..., help="base model: HF folder or example name"),
          adapter: Path = typer.Argument(..., help="a save_adapters directory"),
          out: Path = typer.Argument(..., help="folder for the merged plain HF checkpoint")) -> None:
    """Load an adapter, fold it into the base weights and save a plain checkpoint."""
    import peftcompile as pc
    from .models import load_model

    m, tok = load_model(model)
    pc.load_adapters(m, adapter)
    plain = pc.merge_and_unload(m)
    if not hasattr(plain, "save_pretrained"):
        raise typer.BadParameter(f"{type(plain).__name__} is not an HF model; use peftcompile.merge_and_unload in Python")
    plain.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    console.print(f"merged checkpoint written to {out}")


from .export.cli import export_command  # noqa: E402  (defined with the exporter)

app.command("export", help="Export a model (+ adapter) to ONNX, merged or unmerged, checked against onnxruntime.")(
    export_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
