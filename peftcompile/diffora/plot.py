"""The DiffoRA gate heatmap: gates laid out as layers x module types, kept sites framed."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..spec import Placement

__all__ = ["GateGrid", "gate_grid", "parse_site", "plot_placement"]

_NUM = re.compile(r"^\d+$")


def parse_site(name: str) -> tuple[str, int | None, str]:
    """(block prefix, layer index, module type) from a site name.

    The first all-digit component is the layer: ``model.layers.3.self_attn.q_proj`` ->
    ("model.layers", 3, "self_attn.q_proj"); ``blocks.2`` -> ("blocks", 2, "blocks");
    a name without one -> ("", None, name).
    """
    parts = name.split(".")
    for i, p in enumerate(parts):
        if _NUM.match(p):
            prefix = ".".join(parts[:i])
            return prefix, int(p), ".".join(parts[i + 1:]) or prefix or p
    return "", None, name


@dataclass
class GateGrid:
    """Gate values laid out as layers x module types (NaN where a layer lacks that type)."""

    rows: list[str]  # layer labels ("3", or "encoder.layer.3" when prefixes differ; "(no layer)")
    cols: list[str]  # module types, in first-seen order
    values: np.ndarray  # [rows, cols] gate values
    kept: np.ndarray  # [rows, cols] bool: cell holds a kept site
    cell: dict[str, tuple[int, int]]  # site -> (row, col)
    ylabel: str


def gate_grid(placement: Placement) -> GateGrid:
    """Arrange a placement's gates by (layer, module type) using :func:`parse_site`.

    Rows with the same block prefix are sorted by index; sites without an index share
    the last row, "(no layer)".
    """
    gates = dict(placement.gates)
    for s in placement.sites:
        gates.setdefault(s, float("nan"))
    if not gates:
        raise ValueError("placement has no sites and no gates to plot")
    parsed = {s: parse_site(s) for s in gates}
    prefixes = list(dict.fromkeys(p for p, i, _ in parsed.values() if i is not None))
    rows = sorted({(p, i) for p, i, _ in parsed.values() if i is not None},
                  key=lambda r: (prefixes.index(r[0]), r[1]))
    if any(i is None for _, i, _ in parsed.values()):
        rows.append(("", None))
    cols = list(dict.fromkeys(t for _, _, t in parsed.values()))
    values = np.full((len(rows), len(cols)), np.nan)
    kept = np.zeros((len(rows), len(cols)), dtype=bool)
    cell = {}
    keep = set(placement.sites)
    for s, (p, i, t) in parsed.items():
        r, c = rows.index((p, i)), cols.index(t)
        values[r, c] = gates[s]
        kept[r, c] |= s in keep
        cell[s] = (r, c)

    def label(p: str, i: int | None) -> str:
        if i is None:
            return "(no layer)"
        return str(i) if len(prefixes) == 1 else f"{p}.{i}"

    ylabel = prefixes[0] if len(prefixes) == 1 and prefixes[0] else "layer"
    return GateGrid([label(*r) for r in rows], cols, values, kept, cell, ylabel)


def plot_placement(placement: Placement, path: str | Path, *, title: str | None = None) -> Path:
    """Heatmap of gate values (rows: layers, columns: module types); kept sites framed in red.

    Written with the Agg canvas directly, so no pyplot state or global backend is touched.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    g = gate_grid(placement)
    nr, nc = g.values.shape
    fig = Figure(figsize=(max(4.0, 1.5 + 0.9 * nc), max(2.5, 1.4 + 0.35 * nr)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: no site there
    im = ax.imshow(np.ma.masked_invalid(g.values), cmap=cmap, aspect="auto")
    fig.colorbar(im, ax=ax, label="gate γ")
    ax.set_xticks(range(nc), labels=g.cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(nr), labels=g.rows, fontsize=8)
    ax.set_xlabel("module type")
    ax.set_ylabel(g.ylabel)
    for r, c in zip(*np.nonzero(g.kept)):
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    if g.values.size <= 400:  # numbers stay legible only on small grids
        for r, c in zip(*np.nonzero(~np.isnan(g.values))):
            bright = im.norm(g.values[r, c]) > 0.6  # viridis turns yellow: dark text there
            ax.text(c, r, f"{g.values[r, c]:.3f}", ha="center", va="center", fontsize=6,
                    color="black" if bright else "white")
    n_cand = len(placement.gates) or len(placement.sites)
    ax.set_title(title or f"DiffoRA gates: {len(placement.sites)}/{n_cand} sites kept (red)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    # atomic: a temp sibling, then os.replace (no half-written PNG if savefig fails)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
