"""The data of the experiment grids: the row type and the paper's published figures.

Kept apart from ``meprop.reproduce`` (which runs grids) and ``meprop.report`` (which writes
their tables), so that both, and ``meprop.meact_report``, read them without importing each
other.
"""

from __future__ import annotations

from dataclasses import dataclass

from .train import TrainConfig

__all__ = ["Row", "PAPER", "PAPER_MNIST", "PAPER_POS", "PAPER_PARSE"]


@dataclass(frozen=True)
class Row:
    name: str  # run directory name, unique in the grid
    group: str  # the table or plot it belongs to
    label: str
    config: TrainConfig


# Published figures (test scores %, hidden 500, Adam unless noted; Penn Treebank for POS
# and parsing, where our data is UD English EWT): the targets.
PAPER_MNIST = {
    "dense": 98.20,
    "meprop k=80": 98.27,
    "speedup k=80": 5.9,
    "mesimp": 98.31,
    "mesimp width": 154,
    "adagrad dense": 97.52,
    "adagrad meprop k=10": 98.00,
    "random 4%": 90.5,
    "topk 4%": 98.0,
    "kdim 4%": 96.4,
}
PAPER_POS = {
    "dense": 97.22,
    "meprop k=10": 97.25,
    "speedup k=10": 37.1,
    "mesimp": 97.25,
    "mesimp width": 60,
    "adagrad dense": 96.93,
    "adagrad meprop k=5": 97.25,
}
PAPER_PARSE = {
    "dense": 89.80,
    "meprop k=20": 89.84,
    "speedup k=20": 18.6,
    "mesimp": 90.11,
    "mesimp width": 51,
    "adagrad dense": 88.92,
    "adagrad meprop k=20": 88.95,
    "adagrad speedup k=20": 18.1,
}
PAPER = {"mnist": PAPER_MNIST, "pos": PAPER_POS, "parse": PAPER_PARSE}
