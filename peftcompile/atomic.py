"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Everything is first written to a temporary sibling (same directory, so same filesystem)
and then moved into place with :func:`os.replace`, which is atomic on POSIX and Windows.
A crash leaves at most a ``.<name>.tmp-*`` sibling behind, never a truncated target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from .errors import AdapterError

__all__ = ["atomic_write_bytes", "atomic_write_text", "temp_sibling_dir", "atomic_replace_files",
           "atomic_replace_dir", "check_writable"]


def check_writable(path: str | Path, what: str = "output", *, is_dir: bool = False) -> Path:
    """Raise :class:`AdapterError` unless ``path`` can be (re)written; returns it as a Path.

    Checked without writing anything: ``path`` is not a directory (or, with ``is_dir``, not a
    file), its nearest existing ancestor is a directory that this process may write into.
    """
    p = Path(path)
    if not is_dir and p.is_dir():
        raise AdapterError(f"{what} {p} is a directory; pass a file path")
    if is_dir and p.exists() and not p.is_dir():
        raise AdapterError(f"{what} {p} is a file; pass a folder path")
    anc = p.parent
    while not anc.exists():
        if anc == anc.parent:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise AdapterError(f"{what} {p}: {anc} is not a directory, so {p.parent} cannot be created; "
                           f"choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise AdapterError(f"{what} {p}: {anc} is not writable; choose a writable folder")
    return p


def _tmp_name(path: Path) -> str:
    return f".{path.name}.tmp-"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and :func:`os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_name(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def temp_sibling_dir(path: str | Path) -> Iterator[Path]:
    """A fresh temporary directory next to ``path`` (created with its parents); removed on exit.

    Write files under their final names in it, then :func:`atomic_replace_files` them into
    ``path``'s directory (or :func:`atomic_replace_dir` the whole directory onto ``path``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(path), dir=path.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_replace_files(tmpdir: str | Path, dest_dir: str | Path, order: Sequence[str] = ()) -> list[Path]:
    """Move every file of ``tmpdir`` (flat) into ``dest_dir`` with :func:`os.replace`.

    ``order`` lists names to move last, in that order: the file that commits the set (an
    ``.onnx`` whose metadata describes its side files) goes last, so a crash in between
    leaves the old commit file next to new side files, which a fingerprint check rejects.
    Each file is replaced atomically; the set as a whole is not.
    """
    tmpdir, dest_dir = Path(tmpdir), Path(dest_dir)
    names = sorted(p.name for p in tmpdir.iterdir() if p.is_file())
    last = [n for n in order if n in names]
    moved = []
    for n in [n for n in names if n not in last] + last:
        os.replace(tmpdir / n, dest_dir / n)
        moved.append(dest_dir / n)
    return moved


def atomic_replace_dir(tmpdir: str | Path, dest: str | Path) -> Path:
    """Put the directory ``tmpdir`` at ``dest`` (replacing an existing ``dest`` directory).

    POSIX cannot replace a non-empty directory in one step: the old one is renamed aside
    first and removed only after the new one is in place, so ``dest`` is always either the
    complete old folder or the complete new one (for an instant, absent).
    """
    tmpdir, dest = Path(tmpdir), Path(dest)
    old = None
    if dest.exists():
        if not dest.is_dir():
            raise AdapterError(f"{dest} exists and is not a folder; remove it or choose another output")
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    try:
        os.replace(tmpdir, dest)
    except BaseException:
        if old is not None:
            os.replace(old / dest.name, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest
