"""A small real-text classification task that needs no download.

Sentences are the first paragraphs of docstrings of Python's standard library,
labelled by the topic of the module they document (math, text, files, time,
network). Docstrings shared by several topics are dropped, classes are balanced,
and the split is seeded, so the task is the same on every machine with the same
Python minor version.
"""

from __future__ import annotations

import importlib
import inspect
import random
from dataclasses import dataclass

__all__ = ["TOPICS", "TextTask", "docstring_task"]

TOPICS: dict[str, list[str]] = {
    "math": ["math", "cmath", "statistics", "fractions", "decimal"],
    "text": ["string", "re", "textwrap", "difflib", "unicodedata"],
    "files": ["os", "os.path", "shutil", "pathlib", "glob", "tempfile"],
    "time": ["time", "datetime", "calendar", "zoneinfo"],
    "network": ["socket", "urllib.parse", "http.client", "ssl", "email.message"],
}


@dataclass
class TextTask:
    labels: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]


def _first_paragraph(obj, name: str) -> str | None:
    d = inspect.getdoc(obj)
    if not d:
        return None
    p = d.strip().split("\n\n")[0].replace("\n", " ")
    return p if 20 <= len(p) <= 300 and not p.startswith(name + "(") else None


def _docs(module: str) -> set[str]:
    m = importlib.import_module(module)
    root = module.split(".")[0]
    out = set()
    for name, obj in vars(m).items():
        if name.startswith("_"):
            continue
        objs = [(name, obj)]
        if inspect.isclass(obj) and getattr(obj, "__module__", "").split(".")[0] == root:
            objs += [(k, v) for k, v in vars(obj).items() if not k.startswith("_")]
        for n, o in objs:
            if callable(o) or inspect.isclass(o):
                p = _first_paragraph(o, n)
                if p:
                    out.add(p)
    return out


def docstring_task(per_class: int = 60, seed: int = 0, val_frac: float = 0.2, test_frac: float = 0.2) -> TextTask:
    """Balanced topic classification of stdlib docstrings, split train/val/test."""
    by_topic = {t: set().union(*(_docs(m) for m in mods)) for t, mods in TOPICS.items()}
    seen: dict[str, int] = {}
    for docs in by_topic.values():
        for d in docs:
            seen[d] = seen.get(d, 0) + 1
    rng = random.Random(seed)
    labels = list(TOPICS)
    train, val, test = [], [], []
    for i, t in enumerate(labels):
        docs = sorted(d for d in by_topic[t] if seen[d] == 1)
        rng.shuffle(docs)
        docs = docs[:per_class]
        n_val, n_test = int(len(docs) * val_frac), int(len(docs) * test_frac)
        val += [(d, i) for d in docs[:n_val]]
        test += [(d, i) for d in docs[n_val:n_val + n_test]]
        train += [(d, i) for d in docs[n_val + n_test:]]
    for split in (train, val, test):
        rng.shuffle(split)
    return TextTask(labels, train, val, test)
