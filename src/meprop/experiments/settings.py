"""Settings fields: a dataclass field whose metadata carries its command-line flag's help and
choices (``meprop.experiments.cli`` builds ``meprop train``'s flags from them).

A run's ``TrainConfig`` is assembled from groups of such fields, each declared next to what it
configures: the run's own (``run_config.RunSettings``), each task's (``tasks.mnist``,
``tasks.pos``, ``tasks.lm``) and each method's (``methods``: meProp's layers, adaptive k,
meSimp, meAct).
"""

from __future__ import annotations

from dataclasses import field, fields
from typing import Any

from meprop.config import MePropConfig

__all__ = ["setting", "meprop_setting"]


def setting(default: Any, help: str | None = None, choices: tuple | None = None) -> Any:
    """A settings field whose metadata holds its command-line help and choices."""
    meta = {k: v for k, v in (("help", help), ("choices", choices)) if v is not None}
    return field(default=default, metadata=meta)


def meprop_setting(default: Any, name: str, **override: Any) -> Any:
    """A settings field with the help and choices of ``MePropConfig``'s field ``name``
    (``override`` replaces some)."""
    meta = next(f.metadata for f in fields(MePropConfig) if f.name == name)
    return field(default=default, metadata={**meta, **override})
