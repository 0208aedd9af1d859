"""``peftcompile export``: a model + adapter to ONNX (merged or unmerged), checked with onnxruntime.

Wire it with ``app.command("export")(export_command)``; the signature is typer's
(``Annotated`` parameters), and it is a plain function too (tests call it directly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..cliguard import adapter_folder, check_output, guarded, model_folder

__all__ = ["export_command", "run_export"]

console = Console()


def _load_adapter(model, adapter: Path) -> None:
    import json

    import peftcompile as pc

    from ..errors import AdapterError

    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"--adapter {adapter} has no adapter_config.json; pass a save_adapters (or PEFT) folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_file} is not valid JSON ({e})") from None
    if isinstance(cfg, dict) and "peft_type" in cfg:
        pc.load_peft_adapter(model, adapter)
    else:
        pc.load_adapters(model, adapter)


def _example_inputs(model, batch: int, seq_len: int) -> dict:
    import torch

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise typer.BadParameter(f"{type(model).__name__} has no config.vocab_size; export it with "
                                 f"peftcompile.export.to_onnx and your own example inputs")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run_export(model: str, adapter: Optional[Path], output: Path, merged: bool = True, batch: int = 2,
               seq_len: int = 8, verify: bool = True, tol: float = 1e-4, allow_plain: bool = False,
               status=None) -> dict:
    """The steps of ``peftcompile export``; returns what was written and the parity error."""
    import torch

    from ..models import load_model
    from . import OrtAdapterSession, to_onnx
    from .onnx import _split_inputs

    say = status or (lambda s: None)
    say(f"loading {model}")
    m, _ = load_model(model)
    if adapter is not None:
        say(f"loading adapter {adapter}")
        _load_adapter(m, adapter)
    inputs = _example_inputs(m, batch, seq_len)
    say(f"exporting {'merged' if merged else 'unmerged'} ONNX (torch.export -> onnxscript -> optimize)")
    res = to_onnx(m, inputs, output, merged=merged, allow_plain=allow_plain)
    out = {"export": res, "max_rel_err": None}
    if verify:
        say("checking against PyTorch with onnxruntime (CPU)")
        # Other batch and sequence sizes than the export's: the axes are dynamic.
        check = _example_inputs(m, batch + 1, seq_len + 3)
        split = _split_inputs(m, check)  # the call the export traced (use_cache=False for HF LMs)
        args, kwargs = split.fill(split.tensors)
        with torch.no_grad():
            o = m(*args, **kwargs)
        want = o.logits if getattr(o, "logits", None) is not None else getattr(o, "last_hidden_state", o)
        sess = OrtAdapterSession(res.path)
        if res.ort_adapter is not None:
            sess.bind(res.ort_adapter)
        got = torch.as_tensor(next(iter(sess.run(check).values())))
        out["max_rel_err"] = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
        out["ok"] = out["max_rel_err"] <= tol
    return out


@guarded  # one-line errors, exit code 2; tracebacks with --debug
def export_command(
    model: Annotated[str, typer.Argument(help="base model: an HF model folder, 'minilm', or an example "
                                              "(tiny-llama, tiny-gpt2, tiny-bert)")],
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", "-a", help="adapter folder (save_adapters or "
                                                         "PEFT save_pretrained); --format genai: repeat it, as "
                                                         "NAME=DIR")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="the .onnx file to write (--format genai: the "
                                         "folder)")] = Path("model.onnx"),
    merged: Annotated[Optional[bool], typer.Option("--merged/--unmerged", help="fold the adapter into the weights, "
                                                   "or keep it as named graph inputs (+ .adapter.safetensors and "
                                                   ".onnx_adapter files) to swap adapters at run time [default: "
                                                   "merged for onnx, unmerged for genai]")] = None,
    fmt: Annotated[str, typer.Option("--format", help="onnx: one forward pass (this file); genai: an "
                                     "onnxruntime-genai folder (KV cache, tokenizer, generation loop) with "
                                     "switchable adapters")] = "onnx",
    precision: Annotated[str, typer.Option(help="--format genai: fp32 | int4 | fp16 (CUDA)")] = "fp32",
    device: Annotated[str, typer.Option(help="--format genai: cpu | cuda")] = "cpu",
    batch: Annotated[int, typer.Option(help="example batch size (the batch axis stays dynamic)")] = 2,
    seq_len: Annotated[int, typer.Option(help="example sequence length (the sequence axis stays dynamic)")] = 8,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="compare onnxruntime with PyTorch")] = True,
    tol: Annotated[float, typer.Option(help="max relative error accepted by --verify")] = 1e-4,
    allow_plain: Annotated[bool, typer.Option("--allow-plain", help="export the base model when no adapter is "
                                              "given")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output file (--format genai: "
                                            "folder)")] = False,
) -> None:
    """Export a model with its adapter to ONNX (merged or unmerged) and check it with onnxruntime."""
    from ..errors import AdapterError

    if fmt == "genai":
        return _genai_command(model, adapter or [], output, bool(merged), precision, device, overwrite)
    if fmt != "onnx":
        raise AdapterError(f"--format: unknown format {fmt!r}; use onnx or genai")
    if adapter and len(adapter) > 1:
        raise AdapterError("--adapter: --format onnx exports one adapter; use --format genai to switch several")
    adapter = Path(adapter[0]) if adapter else None
    merged = True if merged is None else merged
    # Paths first: a bad path must not cost a model load and an export.
    if output.suffix != ".onnx":
        raise AdapterError(f"--output must end in .onnx, got {output}")
    folders = [("model", model_folder(model))]
    if adapter is not None:
        folders.append(("adapter", adapter_folder(adapter)))
    check_output(output, folders, overwrite, is_dir=False)
    try:
        with console.status("starting") as st:
            out = run_export(model, adapter, output, merged, batch, seq_len, verify, tol, allow_plain,
                             status=lambda s: (st.update(s), console.log(s)))
    except AdapterError as e:
        if "allow_plain" not in str(e):
            raise
        raise AdapterError(f"{e} (here: pass --adapter DIR, or --allow-plain)") from None
    res = out["export"]
    t = Table(title=f"peftcompile export ({'merged' if res.merged else 'unmerged'})")
    t.add_column("item")
    t.add_column("value")
    t.add_row("ONNX file", f"{res.path} ({res.path.stat().st_size / 1e6:.2f} MB)")
    t.add_row("inputs", ", ".join(res.input_names))
    t.add_row("outputs", ", ".join(res.output_names))
    if res.adapter_inputs:
        zero_rank = any(0 in (a.default_shape or ()) for a in res.adapter_inputs.values())
        t.add_row("adapter inputs", f"{len(res.adapter_inputs)} ({'zero-rank' if zero_rank else 'zero-valued'} "
                                    f"defaults: runs as the base model when unbound)")
        t.add_row("adapter files", f"{res.sidecar}\n{res.ort_adapter}")
    if out["max_rel_err"] is not None:
        colour = "green" if out["ok"] else "red"
        t.add_row("onnxruntime vs PyTorch", f"[{colour}]max rel err {out['max_rel_err']:.2e}[/{colour}] (tol {tol:g})")
    console.print(t)
    if out["max_rel_err"] is not None and not out["ok"]:
        raise typer.Exit(code=1)


def _genai_command(model: str, adapters: list[str], output: Path, merged: bool, precision: str, device: str,
                   overwrite: bool) -> None:
    """``--format genai``: peftcompile.export.to_genai, then a table of what was written."""
    from ..errors import AdapterError
    from .genai import to_genai

    named = {}
    for a in adapters:
        name, sep, d = a.partition("=")
        name, d = (name, d) if sep else (Path(a).name, a)
        named[name] = Path(d)
    try:
        with console.status("building with the onnxruntime-genai model builder"):
            res = to_genai(model, named, output, precision=precision, device=device, merged=merged,
                           overwrite=overwrite)
    except FileNotFoundError as e:
        raise AdapterError(str(e)) from None
    t = Table(title=f"peftcompile export --format genai ({'merged' if merged else 'switchable adapters'})")
    t.add_column("item")
    t.add_column("value")
    t.add_row("folder", f"{res.path} ({res.architecture}, {res.precision}, {res.device})")
    t.add_row("base model", f"{res.sizes['base'] / 1e6:.2f} MB")
    for n, p in res.adapters.items():
        t.add_row(f"adapter {n}", f"{p.name} ({res.sizes[n] / 1e6:.3f} MB)")
    console.print(t)
