"""Where the datasets live: an explicit ``--data-dir``, then ``$MEPROP_DATA``, then a user cache.

Every data root has the same layout as the shared copy (``shared/data``): one folder per
dataset, ``mnist/``, ``fashion_mnist/`` and ``ud_english_ewt/``, holding the original files.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DataError", "ENV_VAR", "cache_dir", "data_roots", "resolve_data_root"]

#: Environment variable naming a data root (CI sets it to the shared copy).
ENV_VAR = "MEPROP_DATA"


class DataError(RuntimeError):
    """Base class of the data layer's errors: a missing, corrupt or malformed dataset file.

    They are the user's to fix (the message says how): the command line prints the message
    alone, without a traceback, and exits with status 2."""

    user_mistake = True


def cache_dir() -> Path:
    """The per-user fallback root: ``$XDG_CACHE_HOME/meprop``, else ``~/.cache/meprop``.

    The folder need not exist yet; downloads create it.
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "meprop"
    return Path.home() / ".cache" / "meprop"


def _checked_dir(path: str | os.PathLike[str], what: str, fix: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        state = "does not exist" if not p.exists() else "is not a directory"
        raise DataError(f"{what} {str(path)!r} {state}. {fix}")
    return p.resolve()


def data_roots(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """All data roots in search order: ``data_dir``, ``$MEPROP_DATA``, the user cache.

    The roots that are not configured are left out (the cache is always last). A configured
    root that is not a directory raises :class:`DataError` rather than being skipped: a typo
    in ``--data-dir`` or ``MEPROP_DATA`` should not silently send us to download elsewhere.
    """
    roots: list[Path] = []
    if data_dir is not None and str(data_dir) != "":
        roots.append(
            _checked_dir(
                data_dir,
                "data directory",
                "Pass --data-dir (data_dir=) an existing folder laid out like shared/data "
                "(mnist/, fashion_mnist/, ud_english_ewt/), or leave it out to use "
                f"${ENV_VAR} or the cache {cache_dir()}.",
            )
        )
    env = os.environ.get(ENV_VAR, "")
    if env:
        roots.append(
            _checked_dir(
                env,
                f"${ENV_VAR} =",
                f"Set {ENV_VAR} to an existing folder laid out like shared/data, or unset it "
                f"to use the cache {cache_dir()}.",
            )
        )
    cache = cache_dir()
    roots.append(cache.resolve() if cache.exists() else cache)
    # The same folder may be named twice (e.g. --data-dir equal to $MEPROP_DATA).
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def resolve_data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root to use: ``data_dir`` if given, else ``$MEPROP_DATA``, else the cache.

    This is also where missing files are downloaded to. Raises :class:`DataError` naming the
    path and the fix when ``data_dir`` (or ``$MEPROP_DATA``) is not an existing directory.
    """
    return data_roots(data_dir)[0]
