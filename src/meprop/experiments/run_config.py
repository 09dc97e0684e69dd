"""A run's settings: ``TrainConfig``, one row of a results table, as its ``config.json``.

Each field's metadata gives its command-line flag's help and choices (``meprop.experiments.cli``
builds the flags from them). Fields left unset take the task's defaults (``tasks.DEFAULTS``),
so a saved config is complete. Checks: the run's own settings here; the settings that belong
to one task (``tags``; the lm task's ``d_model``, ``sparse_attention``, ``fc_only``) in
``tasks.check_config``, those that belong to one method (meProp's k, mode, adaptive k, memory;
meSimp's pruning and cycle; meAct's) in ``methods``, next to what they configure.
"""

from __future__ import annotations

import functools
import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from meprop.config import AdaptiveK, MeActConfig, MePropConfig, MeSimpConfig

from . import methods, tasks
from .errors import ConfigError
from .methods import METHODS
from .tasks import TAGS
from .tasks.cnn import MODELS

__all__ = ["TrainConfig", "ConfigError", "METHODS", "OPTIMIZERS", "ACTIVATIONS", "TAGS"]

# name -> default learning rate; lazy_adam: meprop.LazyAdam (Adam on the rows that got a gradient)
OPTIMIZERS = {"adam": 1e-3, "lazy_adam": 1e-3, "adagrad": 1e-2, "sgd": 0.1}
ACTIVATIONS = ("relu", "tanh", "cube", "gelu")  # gelu: the lm task's MLP
#: Largest hidden width, and most weights between hidden layers (1 GiB of float32), that a
#: config may ask for: beyond them a typo (``--k 100000``) would try to allocate tens of GB.
MAX_WIDTH = 1 << 20
MAX_HIDDEN_WEIGHTS = 1 << 28


def _field(default: Any, help: str | None = None, choices: tuple | None = None) -> Any:
    """A TrainConfig field whose metadata holds its command-line help and choices."""
    meta = {k: v for k, v in (("help", help), ("choices", choices)) if v is not None}
    return field(default=default, metadata=meta)


def _meprop(name: str, **override: Any) -> dict[str, Any]:
    """The help and choices of MePropConfig's field ``name`` (``override`` replaces some)."""
    meta = next(f.metadata for f in fields(MePropConfig) if f.name == name)
    return {**meta, **override}


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


@dataclass(frozen=True)
class TrainConfig:
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
    """

    # Each field's metadata gives its command-line flag's help and choices (meprop.experiments.cli).
    task: str = "mnist"
    dataset: str = _field("mnist", "MNIST-style dataset (mnist task)", ("mnist", "fashion"))
    method: str = _field(
        "meprop",
        "dense | meprop (top-k) | random (random-k) | kdim (dense net of width k) | "
        "mesimp (meProp + simplification) | meact (dense, then minimal effort activation)",
        METHODS,
    )
    k: int = _field(20, **_meprop("k"))
    # ("random" selection is --method random)
    mode: str = _field(
        "per_example",
        "top-k selection: per example, unified over the mini-batch, or symmetric (per example, "
        "half the largest positive and half the largest negative entries: keeps the sign "
        "balance, docs/per_example.md)",
        ("per_example", "unified", "symmetric"),
    )
    model: str = _field(
        "mlp",
        "mnist task: the network, the paper's MLP (mlp) or a CNN (lenet: LeNet-5; resnet: a "
        "small ResNet; --k then counts the widest convolution's channels, the other layers "
        "keep the same share; --hidden and --layers do not apply)",
        MODELS,
    )
    hidden: tuple[int, ...] = _field((500,), "hidden width, or one width per layer: 500 or 154,160")
    layers: int = _field(
        0, "number of hidden layers when --hidden gives one width (0: the task's)"
    )  # 0 with several widths in hidden: len(hidden)
    dropout: float = _field(
        -1.0,
        "dropout rate after each hidden layer (-1: the task's; mnist 0.1, pos 0.5, parse 0.5)",
    )
    optimizer: str = _field("adam", choices=tuple(OPTIMIZERS))
    lr: float = _field(
        0.0, "learning rate (0: adam and lazy_adam 1e-3, the lm task's 4e-3; adagrad 1e-2, sgd 0.1)"
    )
    batch_size: int = _field(
        0,
        "mini-batch size (0: the task's; mnist 50 images, pos 16 sentences, parse 1000 "
        "transitions)",
    )
    epochs: int = _field(0, "training epochs (0: the task's)")
    seed: int = 1
    eval_every: int = _field(0, "steps between dev evaluations (0: once per epoch)")
    train_limit: int = _field(
        0, "use only the first N training examples (pos, parse: sentences; 0: all)"
    )
    prune_rate: float = _field(
        0.1, "meSimp: drop units selected in fewer than this share of top-k selections"
    )
    prune_interval: int = _field(0, "meSimp: steps between prunings (0: a quarter of an epoch)")
    cycle: tuple[int, ...] = _field(
        (), "meSimp cycle in epochs: SIMPLIFY,NORMAL (optimizer reset at each period start)"
    )  # (): no cycle
    sparse_grad: bool = _field(False, **_meprop("sparse_grad"))
    backend: str = _field("auto", **_meprop("backend"))
    # (gelu: the lm task's own activation, not a choice on the command line)
    activation: str = _field(
        "", "hidden activation (default: the task's; mnist relu, parse cube)", ACTIVATIONS[:3]
    )
    tags: str = _field(
        "xpos", "pos and parse tasks: tag column, xpos (Penn Treebank) or upos", TAGS
    )
    scope: str = _field(
        "local",
        **_meprop(
            "scope",
            help="unified top-k with --nproc > 1: columns ranked by each rank's rows (local) or "
            "by the global batch's, as one process would (global; not for the pos task's LSTM)",
        ),
    )
    meact_start: int = _field(10, "meact: first epoch, counting from 0, with active-only forwards")
    meact_threshold: float = _field(
        0.5,
        "meact: a neuron is active for an example when its share of the accumulated "
        "|gradient| is at least this percentage",
    )
    meact_cap: int = _field(
        0, "meact: at most this many active neurons per example and layer (0: no cap)"
    )
    meact_storage: str = _field(
        "float16",
        "meact: dtype of the per-example state (accumulations, cached outputs)",
        ("float16", "float32"),
    )
    track_updates: bool | None = _field(
        None,
        "log the mean |parameter change| per step (update) at each evaluation; costs about a "
        "tenth of a dense MNIST step (None: only with --method meact)",
    )
    sparse_attention: bool = _field(
        False,
        "lm task: meProp on the attention projections (qkv, out) too, at the same k (k at or "
        "above a projection's width leaves it dense); default: the MLP only",
    )
    d_model: int = _field(
        0,
        "lm task: the transformer's width (0: a quarter of the first hidden width, a multiple "
        "of the 4 heads); a dense net at a meSimp run's widths keeps the run's d_model",
    )
    fc_only: bool = _field(
        False,
        "lm task: meProp on mlp.fc only (its output is the MLP width), mlp.proj (output "
        "d_model) dense; default: both MLP projections",
    )
    adaptive: str = _field(
        "",
        "adaptive k (meprop.AdaptiveK): each backward chooses its k in [--min-k, --k] by "
        "TinyProp's rule or the gradient mass rule; default: k fixed",
        ("tinyprop", "mass"),
    )
    min_k: int = _field(1, "adaptive k: the least k")
    s_min: float = _field(0.0, "adaptive tinyprop: the least share of a layer's width kept")
    s_max: float = _field(1.0, "adaptive tinyprop: the largest share of a layer's width kept")
    damping: float = _field(1.0, "adaptive tinyprop: share factor per layer from the output")
    mass_share: float = _field(0.9, "adaptive mass: share of each row's |gradient| kept")
    memory: float = _field(
        0.0,
        "memorized sparse back-propagation: the share of the gradient that top-k dropped "
        "carried into the next step (0: off; MSBP's ratio 0.8; meprop.MePropConfig.memory)",
    )
    warmup: int = _field(
        0,
        "steps that run dense (the full gradient) before top-k starts (0: top-k from the "
        "first step; meprop.MePropConfig.warmup)",
    )

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
                     "meact_start", "meact_cap"):  # fmt: skip
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
