"""Real-text tasks that need no download, from the docstrings of Python's standard library.

``docstring_pairs``: retrieval, (callable name + signature) -> first docstring paragraph
(the demo's task and FIDELITY's). ``docstring_task``: a small topic classification.

Topic classification: sentences are the first paragraphs of docstrings, labelled by the
topic of the module they document (math, text, files, time, network). Docstrings shared
by several topics are dropped, classes are balanced. Every split is seeded, so a task is
the same on every machine with the same Python minor version.
"""

from __future__ import annotations

import importlib
import inspect
import random
from dataclasses import dataclass

__all__ = ["TOPICS", "TextTask", "docstring_task", "PAIR_MODULES", "PairTask", "docstring_pairs"]

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


# --- retrieval: (name + signature) -> docstring ------------------------------------------

#: Standard-library modules the retrieval pairs come from (pure imports, no side effects).
PAIR_MODULES: tuple[str, ...] = tuple("""
os os.path shutil pathlib glob tempfile fnmatch filecmp fileinput stat math cmath statistics fractions decimal
random numbers string re textwrap difflib unicodedata codecs locale gettext time datetime calendar zoneinfo sched
socket ssl selectors urllib.parse urllib.request urllib.error http.client http.server http.cookies http.cookiejar
email.message email.utils email.parser smtplib imaplib ftplib poplib mimetypes ipaddress uuid json csv configparser
tomllib plistlib netrc base64 binascii quopri struct hashlib hmac secrets zlib gzip bz2 lzma zipfile tarfile
collections collections.abc itertools functools operator heapq bisect array queue weakref copy pprint reprlib enum
graphlib dataclasses types typing contextlib abc threading multiprocessing subprocess concurrent.futures asyncio
signal mmap logging logging.handlers argparse getopt shlex inspect ast dis tokenize keyword token traceback warnings
importlib pkgutil zipimport unittest doctest timeit cProfile pstats platform sysconfig html html.parser
xml.etree.ElementTree xml.dom.minidom wave colorsys pickle shelve sqlite3 io
""".split())


@dataclass
class PairTask:
    """(query, document) pairs: the query names a stdlib callable with its signature, the
    document is the first paragraph of its docstring. ``val``/``test`` documents are the
    retrieval candidates of their split."""

    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def docstring_pairs(n_val: int = 200, n_test: int = 300, seed: int = 0, max_pairs: int | None = None) -> PairTask:
    """Retrieval pairs ``("re.search(pattern, string, flags=0)", "Scan through string ...")``.

    Every public callable (and method of a public class) of :data:`PAIR_MODULES` whose
    docstring's first paragraph has 20-300 characters and does not start with its own name
    (that would give the answer away). A paragraph shared by several callables is dropped
    (ambiguous target), so each document has exactly one query. About 2,400 pairs on
    Python 3.11; the seeded split is the same on every machine with the same Python
    minor version. ``max_pairs`` caps the total (before the split) for quick runs.
    """
    import warnings

    by_doc: dict[str, list[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated members warn on access
        for mod in PAIR_MODULES:
            try:
                m = importlib.import_module(mod)
            except ImportError:  # optional modules (e.g. ssl, sqlite3 missing from a build)
                continue
            root = mod.split(".")[0]
            for name, obj in sorted(vars(m).items()):
                if name.startswith("_") or not (callable(obj) or inspect.isclass(obj)):
                    continue
                if str(getattr(obj, "__module__", "") or "").split(".")[0].lstrip("_") != root.lstrip("_"):
                    continue  # re-exported from another module: documented there
                items = [(f"{mod}.{name}", obj)]
                if inspect.isclass(obj):
                    items += [(f"{mod}.{name}.{k}", v) for k, v in sorted(vars(obj).items())
                              if not k.startswith("_") and callable(v)]
                for qual, o in items:
                    d = inspect.getdoc(o)
                    if not d:
                        continue
                    p = d.strip().split("\n\n")[0].replace("\n", " ")
                    short = qual.rsplit(".", 1)[-1]
                    if not (20 <= len(p) <= 300) or p.startswith(short + "(") or p.startswith(qual):
                        continue
                    by_doc.setdefault(p, []).append(qual + _signature(o))
    pairs = sorted((qs[0], doc) for doc, qs in by_doc.items() if len(qs) == 1)
    rng = random.Random(seed)
    rng.shuffle(pairs)
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
        n_val, n_test = min(n_val, len(pairs) // 5), min(n_test, len(pairs) // 5)
    val, test, train = pairs[:n_val], pairs[n_val:n_val + n_test], pairs[n_val + n_test:]
    return PairTask(train, val, test)
