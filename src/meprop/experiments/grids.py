"""The data of the experiment grids: the row type, its run folder's name, where a run was
made and a grid's time, and the paper's published figures.

Kept apart from ``meprop.experiments.reproduce`` (which runs grids) and ``meprop.experiments.report`` (which writes
their tables), so that both, and ``meprop.experiments.meact_report``, read them without importing each
other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .train import TrainConfig

__all__ = [
    "Row", "row_name", "provenance", "add_grid_seconds", "PAPER", "PAPER_MNIST", "PAPER_POS",
    "PAPER_PARSE",
]  # fmt: skip


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


def row_name(cfg: TrainConfig) -> str:
    """A run directory name that tells the row's settings apart."""
    return "-".join(
        part
        for part in [
            cfg.model if cfg.model != "mlp" else "",
            cfg.method,
            cfg.mode if cfg.method in ("meprop", "mesimp") else "",
            f"k{cfg.k}" if cfg.method != "dense" else "",
            cfg.optimizer,
            f"L{len(cfg.widths())}" if cfg.model == "mlp" else "",  # (a CNN's are its own)
            "w" + "x".join(map(str, sorted(set(cfg.widths())))) if cfg.model == "mlp" else "",
            f"d{cfg.dropout:g}",
            f"lr{cfg.lr:g}" if cfg.lr else "",
            "attn" if cfg.sparse_attention else "",
            "fc" if cfg.fc_only else "",
            "inner" if cfg.inner_only else "",
            adaptive_part(cfg),
            f"mem{cfg.memory:g}" if cfg.memory else "",
            f"wu{cfg.warmup}" if cfg.warmup else "",
            f"pbn{cfg.bn_batches}" if cfg.bn_batches else "",
        ]
        if part
    )


def adaptive_part(cfg: TrainConfig) -> str:
    """The row name's part for adaptive k ("" for a fixed k): rule, min_k and the rule's
    settings that differ from the defaults."""
    if not cfg.adaptive:
        return ""
    part = f"{cfg.adaptive}{cfg.min_k}"
    base = TrainConfig(task=cfg.task)
    names = ("s_min", "s_max", "damping") if cfg.adaptive == "tinyprop" else ("mass_share",)
    for name in names:
        if getattr(cfg, name) != getattr(base, name):
            part += f"_{name.replace('_', '')}{getattr(cfg, name):g}"
    return part


def provenance() -> dict:
    """Where a run was made: the machine (CPU, ISA, caches, threads), torch, meprop and its git
    commit (where the package sits in a git checkout)."""
    import subprocess

    import torch

    from meprop import __version__, machine

    commit = ""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "machine": machine.summary_line(),
        "torch": torch.__version__,
        "meprop": __version__,
        "commit": commit,
    }


def add_grid_seconds(grid_path: Path, seconds: float) -> None:
    """Add ``seconds`` to ``grid_path``'s total, read just before the write, so that another
    process adding its own time to the same grid in between is kept (the write is atomic)."""
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    spent = json.loads(grid_path.read_text()).get("seconds", 0.0) if grid_path.exists() else 0.0
    tmp = grid_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"seconds": spent + seconds}) + "\n")
    tmp.replace(grid_path)
