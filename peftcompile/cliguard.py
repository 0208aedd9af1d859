"""Command-line error handling shared by every ``peftcompile`` command.

A failing command prints one line (``error: ...``) and exits with code 2; the traceback is
shown only with the global ``--debug`` option. Also the output-path checks the commands
share: an output never goes into the command's own input folders and never replaces an
existing one without ``--overwrite``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

import click
import typer

from .atomic import check_writable
from .errors import AdapterError

__all__ = ["set_debug", "debug_enabled", "guarded", "check_output", "model_folder", "adapter_folder", "EXIT_ERROR"]

EXIT_ERROR = 2
_STATE = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


def set_debug(on: bool) -> None:
    """Show tracebacks (``--debug``) instead of the one-line error."""
    _STATE["debug"] = bool(on)


def debug_enabled() -> bool:
    return _STATE["debug"]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, AdapterError):
        return text or type(e).__name__
    # Not one of ours: name the exception type, the message alone may be cryptic ('sites').
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def guarded(fn: F) -> F:
    """Wrap a command: any exception becomes ``error: <one line>`` and exit code 2 (re-raised
    with ``--debug``). ``typer.Exit``/click's own usage errors pass through untouched."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, click.exceptions.Exit, click.exceptions.Abort, KeyboardInterrupt):
            raise
        except click.ClickException as e:
            if debug_enabled():
                raise
            typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            raise typer.Exit(code=EXIT_ERROR) from None
        except Exception as e:  # noqa: BLE001 - the point: no traceback for the user
            if debug_enabled():
                raise
            hint = "" if isinstance(e, AdapterError) else " (run with --debug for the traceback)"
            typer.echo(f"error: {_one_line(e)}{hint}", err=True)
            raise typer.Exit(code=EXIT_ERROR) from None

    return wrapper  # type: ignore[return-value]


def _inside(p: Path, folder: Path) -> bool:
    p, folder = p.resolve(), folder.resolve()
    return p == folder or folder in p.parents


def check_output(out: Path, inputs: Iterable[tuple[str, Path | None]], overwrite: bool, *, is_dir: bool) -> Path:
    """Refuse an output equal to or inside an input folder, an existing output without
    ``overwrite``, or an unwritable location; raises :class:`AdapterError`."""
    out = Path(out)
    for what, folder in inputs:
        if folder is not None and folder.is_dir() and _inside(out, folder):
            raise AdapterError(f"output {out} is inside the input {what} folder {folder}; writing there would change "
                               f"the input. Choose an output outside it")
    if out.exists() and not overwrite:
        raise AdapterError(f"output {out} already exists; pass --overwrite to replace it, or choose another path")
    check_writable(out, "output", is_dir=is_dir)
    return out


def model_folder(model: str) -> Optional[Path]:
    """The folder a model argument reads from (None for the built-in tiny examples)."""
    from .models import EXAMPLES, minilm_dir

    if model in EXAMPLES:
        return None
    if model == "minilm":
        return minilm_dir()
    p = Path(model)
    if not p.exists():
        raise AdapterError(f"model {model!r} is neither an example ({['minilm', *EXAMPLES]}) nor an existing "
                                f"folder")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise AdapterError(f"model {model!r} is not an HF model folder (no config.json in it)")
    return p


def adapter_folder(adapter: Path) -> Path:
    """``adapter`` if it is an adapter folder (has adapter_config.json); else AdapterError."""
    if not adapter.exists():
        raise AdapterError(f"adapter folder not found: {adapter}")
    if not adapter.is_dir() or not (adapter / "adapter_config.json").is_file():
        raise AdapterError(f"{adapter} is not an adapter folder (no adapter_config.json); pass a folder written "
                           f"by peftcompile.save_adapters")
    cfg = adapter / "adapter_config.json"
    try:
        ok = isinstance(json.loads(cfg.read_text()), dict)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg} is not valid JSON ({e}); write the adapter with peftcompile.save_adapters") from None
    if not ok:
        raise AdapterError(f"{cfg} is not a JSON object; write the adapter with peftcompile.save_adapters")
    return adapter
