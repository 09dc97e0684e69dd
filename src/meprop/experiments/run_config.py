"""A run's settings: ``TrainConfig``, one row of a results table, as its ``config.json``.

Each field's metadata gives its command-line flag's help and choices (``meprop.experiments.cli``
builds the flags from them); the fields are declared in groups next to what they configure
(``RunSettings`` below, each task's and each method's in its module). Fields left unset take
the task's defaults (``tasks.DEFAULTS``), so a saved config is complete. Checks: the run's own
settings here; the settings that belong to one task (``tags``; the lm task's ``d_model``,
``sparse_attention``, ``fc_only``) in ``tasks.check_config``, those that belong to one method
(meProp's k, mode, adaptive k, memory; meSimp's pruning and cycle; meAct's) in ``methods``,
next to what they configure.
"""

from __future__ import annotations

import functools
import json
import math
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from meprop.config import AdaptiveK, MeActConfig, MePropConfig, MeSimpConfig

from . import methods, tasks
from .errors import ConfigError
from .methods import METHODS, AdaptiveSettings, MeActSettings, MePropSettings, MeSimpSettings
from .settings import setting
from .tasks import TAGS
from .tasks.lm import LMSettings
from .tasks.mnist import MnistSettings
from .tasks.pos import TaggerSettings

__all__ = ["TrainConfig", "ConfigError", "METHODS", "OPTIMIZERS", "ACTIVATIONS", "TAGS"]

# name -> default learning rate; lazy_adam: meprop.LazyAdam (Adam on the rows that got a gradient)
OPTIMIZERS = {"adam": 1e-3, "lazy_adam": 1e-3, "adagrad": 1e-2, "sgd": 0.1}
ACTIVATIONS = ("relu", "tanh", "cube", "gelu")  # gelu: the lm task's MLP
#: Largest hidden width, and most weights between hidden layers (1 GiB of float32), that a
#: config may ask for: beyond them a typo (``--k 100000``) would try to allocate tens of GB.
MAX_WIDTH = 1 << 20
MAX_HIDDEN_WEIGHTS = 1 << 28


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


@dataclass(frozen=True)
class RunSettings:
    """The settings every run has, whatever its task and method."""

    task: str = "mnist"
    method: str = setting(
        "meprop",
        "dense | meprop (top-k) | random (random-k) | kdim (dense net of width k) | "
        "mesimp (meProp + simplification) | meact (dense, then minimal effort activation)",
        METHODS,
    )
    hidden: tuple[int, ...] = setting(
        (500,), "hidden width, or one width per layer: 500 or 154,160"
    )
    layers: int = setting(
        0, "number of hidden layers when --hidden gives one width (0: the task's)"
    )  # 0 with several widths in hidden: len(hidden)
    dropout: float = setting(
        -1.0,
        "dropout rate after each hidden layer (-1: the task's; mnist 0.1, pos 0.5, parse 0.5)",
    )
    optimizer: str = setting("adam", choices=tuple(OPTIMIZERS))
    lr: float = setting(
        0.0, "learning rate (0: adam and lazy_adam 1e-3, the lm task's 4e-3; adagrad 1e-2, sgd 0.1)"
    )
    batch_size: int = setting(
        0,
        "mini-batch size (0: the task's; mnist 50 images, pos 16 sentences, parse 1000 "
        "transitions)",
    )
    epochs: int = setting(0, "training epochs (0: the task's)")
    seed: int = 1
    eval_every: int = setting(0, "steps between dev evaluations (0: once per epoch)")
    train_limit: int = setting(
        0, "use only the first N training examples (pos, parse: sentences; 0: all)"
    )
    # (gelu: the lm task's own activation, not a choice on the command line)
    activation: str = setting(
        "", "hidden activation (default: the task's; mnist relu, parse cube)", ACTIVATIONS[:3]
    )


@dataclass(frozen=True)
class TrainConfig(
    MeActSettings,
    MeSimpSettings,
    AdaptiveSettings,
    MePropSettings,
    LMSettings,
    TaggerSettings,
    MnistSettings,
    RunSettings,
):
    """Everything that defines a run (one row of a results table).

    ``method``: ``dense``; ``meprop`` (top-k, ``mode`` per_example or unified); ``random``
    (random-k); ``kdim`` (a dense net whose hidden layers have width k); ``mesimp`` (meProp plus
    a Simplifier); ``meact`` (dense training, then meAct's active-only forwards per example
    from epoch ``meact_start``, counting from 0). A dense net at meSimp's final widths is
    ``dense`` with ``hidden=(154, 160)``.

    ``track_updates``: log the mean absolute parameter change per step (``update``, the meAct
    analysis' statistic; ``meprop.update_monitor.UpdateMonitor``) at each evaluation. It costs about
    a tenth of a dense MNIST step, so it is off unless asked for, except for ``meact``, whose
    analysis reads it (None, the default, resolves to ``method == "meact"``; a config made with
    ``dataclasses.replace`` from a resolved one keeps the resolved value).

    Its fields come from the groups above it in this order (each group declared next to what it
    configures: ``RunSettings`` here, the tasks' in ``tasks.mnist``, ``tasks.pos``,
    ``tasks.lm``, the methods' in ``methods``); flags, ``config.json`` and attributes are flat.
    """

    def __post_init__(self) -> None:
        self._check_types()
        tasks.take_defaults(self)
        self._check_run()
        tasks.check_config(self)  # the task's own settings
        methods.check_config(self)  # the method's own settings
        if self.track_updates is None:
            object.__setattr__(self, "track_updates", self.method == "meact")

    def _check_run(self) -> None:
        """The settings every run has: optimizer, sizes, counts, seed, widths."""
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        for name in ("k", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("layers", "eval_every", "train_limit", "prune_interval", "seed",
                     "meact_start", "meact_cap", "bn_batches"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seed >= 2**63:
            raise ConfigError(f"seed must be below 2**63, got {self.seed}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr < 0:
            raise ConfigError(f"lr must be >= 0 (0: the optimizer's default), got {self.lr}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        self._check_widths()

    def _check_widths(self) -> None:
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"hidden widths must be >= 1, got {list(self.hidden)}")
        if len(self.hidden) > 1 and self.layers not in (0, len(self.hidden)):
            raise ConfigError(
                f"hidden lists {len(self.hidden)} widths but layers={self.layers}: give one width "
                "and a number of layers, or one width per layer"
            )
        widths = self.widths()
        weights = sum(a * b for a, b in zip(widths, widths[1:], strict=False))
        if max(widths) > MAX_WIDTH or weights > MAX_HIDDEN_WEIGHTS:
            what = "k" if self.method == "kdim" else "hidden"
            raise ConfigError(
                f"{what}: hidden layers of widths {widths} are too large ({weights:.3g} weights "
                f"between hidden layers, at most {MAX_HIDDEN_WEIGHTS:.3g}; widths at most "
                f"{MAX_WIDTH}): give a smaller --{what}"
            )

    def _check_types(self) -> None:
        """Each field's type (as a JSON file or a caller may get it wrong), before any use."""
        hints = _field_types()
        for f in fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            where = f"{f.name} (--{f.name.replace('_', '-')})"
            if hint is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"{where} must be an integer, got {value!r}")
            elif hint is float:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"{where} must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise ConfigError(f"{where} must be a finite number, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            elif hint is str:
                if not isinstance(value, str):
                    raise ConfigError(f"{where} must be a string, got {value!r}")
            elif typing.get_origin(hint) is tuple:
                if isinstance(value, int) and not isinstance(value, bool):
                    value = (value,)  # one width
                if not isinstance(value, list | tuple) or any(
                    isinstance(v, bool) or not isinstance(v, int) for v in value
                ):
                    raise ConfigError(
                        f"{where} must be a list of integers (a JSON array, or N,N on the "
                        f"command line), got {value!r}"
                    )
                object.__setattr__(self, f.name, tuple(value))
            elif value is not None and not isinstance(value, bool):  # bool | None
                raise ConfigError(f"{where} must be true, false or null, got {value!r}")

    def widths(self) -> list[int]:
        """Hidden-layer widths: one per layer (``kdim``: k everywhere)."""
        widths = list(self.hidden) if len(self.hidden) > 1 else list(self.hidden) * self.layers
        return [self.k] * len(widths) if self.method == "kdim" else widths

    def learning_rate(self) -> float:
        return self.lr or OPTIMIZERS[self.optimizer]

    # The library configs of the run's method (``methods``: what each method reads).
    def meprop_config(self) -> MePropConfig | None:
        return methods.meprop_config(self)

    def adapt_config(self) -> AdaptiveK | None:
        return methods.adapt_config(self)

    def mesimp_config(self, steps_per_epoch: int) -> MeSimpConfig:
        return methods.mesimp_config(self, steps_per_epoch)

    def meact_config(self) -> MeActConfig:
        return methods.meact_config(self)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"], d["cycle"] = list(self.hidden), list(self.cycle)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a TrainConfig is a JSON object of fields, got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(
                f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """The config in a JSON file (a run's config.json), with ``overrides`` applied; every
        error names the file."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"config file {path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                f"{e.msg}): fix it, or rewrite it from a run's config.json"
            ) from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} must hold a JSON object, got {d!r}")
        try:
            return cls.from_dict({**d, **overrides})
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
