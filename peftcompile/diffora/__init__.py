"""DiffoRA: adapter placement by differentiable search (arXiv 2502.08905, reconstructed).

``search`` (:mod:`.search`) builds the candidate adapters on a copy of the model and
returns a :class:`~peftcompile.spec.Placement`; the gates and the bi-level loop live in
:mod:`.loop`; the heatmap in :mod:`.plot`::

    from peftcompile import diffora
    p = diffora.search(model, spec, train_batches, val_batches, budget=0.25, steps=100)
    diffora.plot_placement(p, "gates.png")
"""

from .loop import (
                   BiLevelSearch,
                   Gates,
                   LossFn,
                   SearchInputError,
                   SearchLossError,
                   StepLosses,
                   cycle_batches,
                   hf_loss,
                   soft_top_k,
)
from .plot import GateGrid, gate_grid, parse_site, plot_placement
from .search import SEARCH_ADAPTER, DiffoRASearch, n_kept, search

__all__ = [
                   "SEARCH_ADAPTER",
                   "BiLevelSearch",
                   "DiffoRASearch",
                   "GateGrid",
                   "Gates",
                   "LossFn",
                   "SearchInputError",
                   "SearchLossError",
                   "StepLosses",
                   "cycle_batches",
                   "gate_grid",
                   "hf_loss",
                   "n_kept",
                   "parse_site",
                   "plot_placement",
                   "search",
                   "soft_top_k",
]
