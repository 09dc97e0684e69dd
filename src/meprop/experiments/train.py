"""The experiment trainer: one run of one task with one method, logged, timed, resumable.

It is one user of the library, not the only way in: it builds the task's model, applies the
method (``sparsify_`` for meProp, a ``Simplifier`` for meSimp), and runs an ordinary loop
(``Trainer.fit``: build, data, then per epoch the steps, evaluations and checkpoints), which
calls what the method adds at fixed points (``meprop.experiments.parts``). Each run directory holds:

    config.json    the TrainConfig (rerun with ``meprop train --config config.json``)
    log.jsonl      one JSON object per evaluation (epoch or chunk): losses, scores, widths, and
                   cumulative seconds ("times"): forward, backward (linear_backward and
                   hidden_backward its parts), optimizer, analysis, simplify, eval, and train
                   (the training loop's wall-clock outside evaluations and checkpoints); an
                   epoch's last record also "mean_k" ({layer: mean k kept over the epoch's
                   steps}) when meProp layers report their ``last_k``
    last.pt        the checkpoint after the latest evaluation (each epoch, and each
                   ``eval_every`` steps; atomic; ``--resume`` continues from it, within an
                   epoch too, exactly as the uninterrupted run)
    best.pt        the checkpoint with the best dev score (model selection as in the paper)
    summary.json   best epoch, its dev and test scores, total times, final widths
    .lock          held (flock) by the run that writes the folder: a second one is refused

Every file but log.jsonl is replaced atomically. A kill leaves at worst log records after the
last checkpoint, a torn last log line and temporary files: a resume removes them. A training
loss that becomes NaN or infinite stops the run (``Diverged``), last.pt holding the last good
state.

Under torch.distributed (``meprop train --nproc N``, or torchrun) every rank runs ``run``:
``batch_size`` is the global batch, of which each rank trains on its own part
(``meprop.distributed.shard``), so the gradients are one process's on the same batches; every
rank evaluates (identical models, identical scores, no rank idles in a collective meanwhile);
rank 0 alone writes the run directory and prints.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import time
import typing
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from meprop import checkpoint, distributed
from meprop.config import MEACT_BACKENDS, AdaptiveK, MeActConfig, MePropConfig, MeSimpConfig
from meprop.convert import sparsify_
from meprop.meact import MeAct

from .parts import (
    BackwardClocks,
    Distribution,
    KLog,
    MeActPart,
    MeSimpPart,
    Part,
    UpdatePart,
)
from .progress import bars
from .timing import Stopwatch

__all__ = [
    "TrainConfig",
    "METHODS",
    "OPTIMIZERS",
    "run",
    "Trainer",
    "make_optimizer",
    "ConfigError",
    "RunDirError",
    "Diverged",
]

METHODS = ("dense", "meprop", "random", "kdim", "mesimp", "meact")
OPTIMIZERS = {"adam": 1e-3, "adagrad": 1e-2, "sgd": 0.1}  # name -> default learning rate
ACTIVATIONS = ("relu", "tanh", "cube", "gelu")  # gelu: the lm task's MLP
TAGS = ("xpos", "upos")  # the pos and parse tasks' tag column
#: Largest hidden width, and most weights between hidden layers (1 GiB of float32), that a
#: config may ask for: beyond them a typo (``--k 100000``) would try to allocate tens of GB.
MAX_WIDTH = 1 << 20
MAX_HIDDEN_WEIGHTS = 1 << 28
MEACT_FIELDS = ("start", "threshold", "cap", "storage")  # MeActConfig's names of meact_*


class ConfigError(ValueError):
    """A TrainConfig field, flag or config file with a wrong type or value (a user mistake:
    the command line prints the message alone and exits with status 2)."""

    user_mistake = True


class RunDirError(RuntimeError):
    """A run folder that cannot be used as asked: it holds another run, another process is
    writing to it, ``--resume`` finds nothing to resume or different settings (a user
    mistake)."""

    user_mistake = True


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; the run stopped, its last checkpoint is the
    last good one. (Not a traceback on the command line, but exit status 1.)"""

    user_mistake = True
    exit_status = 1


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
    analysis' statistic; ``meprop.analysis.UpdateMonitor``) at each evaluation. It costs about
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
        0.0, "learning rate (0: adam 1e-3, the lm task's 4e-3; adagrad 1e-2, sgd 0.1)"
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
        from .tasks import ADAM_LR, DEFAULTS, TASKS

        self._check_types()
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        # Fields left unset (0, "", dropout -1) take the task's defaults, so a saved config is
        # complete.
        for name, value in DEFAULTS[self.task].items():
            current = getattr(self, name)
            unset = current == -1 if name == "dropout" else not current
            if unset and not (name == "layers" and len(self.hidden) > 1):
                object.__setattr__(self, name, value)
        if not self.lr and self.optimizer == "adam" and self.task in ADAM_LR:
            object.__setattr__(self, "lr", ADAM_LR[self.task])
        if self.task != "mnist":  # the field picks MNIST or Fashion-MNIST; other tasks have one
            if self.dataset not in ("mnist", "ud_english_ewt"):  # "mnist": the field's default
                raise ConfigError(
                    f"dataset {self.dataset!r} applies to the mnist task only; the {self.task} "
                    "task trains on UD English EWT: leave --dataset out"
                )
            object.__setattr__(self, "dataset", "ud_english_ewt")
        elif self.dataset not in ("mnist", "fashion"):
            raise ConfigError(f"dataset must be 'mnist' or 'fashion', got {self.dataset!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        for name in ("k", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.adaptive:
            if self.adaptive not in ("tinyprop", "mass"):
                raise ConfigError(
                    f"adaptive must be 'tinyprop' or 'mass' (or empty: k fixed), got "
                    f"{self.adaptive!r}"
                )
            if self.method not in ("meprop", "mesimp"):
                raise ConfigError(
                    f"--adaptive applies to --method meprop or mesimp, not {self.method!r}"
                )
            try:
                MePropConfig(k=self.k, mode=self.mode, adapt=self.adapt_config())
            except (TypeError, ValueError) as e:
                raise ConfigError(f"adaptive k: {e}") from None
        for name in ("layers", "eval_every", "train_limit", "prune_interval", "seed",
                     "meact_start", "meact_cap"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seed >= 2**63:
            raise ConfigError(f"seed must be below 2**63, got {self.seed}")
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"hidden widths must be >= 1, got {list(self.hidden)}")
        if len(self.hidden) > 1 and self.layers not in (0, len(self.hidden)):
            raise ConfigError(
                f"hidden lists {len(self.hidden)} widths but layers={self.layers}: give one width "
                "and a number of layers, or one width per layer"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.cycle and (len(self.cycle) != 2 or min(self.cycle) < 1):
            raise ConfigError(
                f"cycle must be two epoch counts >= 1 (simplify, normal), got {list(self.cycle)}"
            )
        if self.lr < 0:
            raise ConfigError(f"lr must be >= 0 (0: the optimizer's default), got {self.lr}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.tags not in TAGS:
            raise ConfigError(f"tags must be 'xpos' or 'upos', got {self.tags!r}")
        if self.tags != "xpos" and self.task not in ("pos", "parse"):
            raise ConfigError(
                f"tags picks the pos and parse tasks' tag column, not {self.task}'s: leave "
                "--tags out"
            )
        if self.sparse_grad and self.method not in ("meprop", "random", "mesimp"):
            raise ConfigError(
                f"sparse_grad gives meProp's layers row-sparse gradients: it needs --method "
                f"meprop, random or mesimp, got {self.method}: leave --sparse-grad out"
            )
        if self.sparse_grad and self.optimizer == "adam":
            raise ConfigError(
                "sparse_grad: torch's Adam takes no sparse gradients: give --optimizer sgd or "
                "adagrad, or leave --sparse-grad out"
            )
        if self.track_updates is None:
            object.__setattr__(self, "track_updates", self.method == "meact")
        if not isinstance(self.sparse_attention, bool):
            raise ConfigError(
                f"sparse_attention must be true or false, got {self.sparse_attention!r}"
            )
        if self.sparse_attention and self.task != "lm":
            raise ConfigError(
                f"sparse_attention applies to the lm task only (its attention projections), "
                f"not {self.task}: leave --sparse-attention out"
            )
        if self.sparse_attention and self.method not in ("meprop", "random", "mesimp"):
            raise ConfigError(
                f"sparse_attention puts meProp on the attention projections: it needs --method "
                f"meprop, random or mesimp, got {self.method}"
            )
        if self.d_model and self.task != "lm":
            raise ConfigError(
                f"d_model is the lm task's transformer width, not {self.task}'s: leave "
                "--d-model out"
            )
        if self.task == "lm":
            from .tasks.lm import N_HEAD

            if self.d_model < 0 or self.d_model % N_HEAD:
                raise ConfigError(
                    f"d_model must be a positive multiple of the {N_HEAD} attention heads, got "
                    f"{self.d_model}: e.g. --d-model 128"
                )
        if self.fc_only and (
            self.task != "lm" or self.method not in ("meprop", "random", "mesimp")
        ):
            raise ConfigError(
                f"fc_only keeps the lm task's mlp.proj dense: it needs --task lm and --method "
                f"meprop, random or mesimp, got task {self.task}, method {self.method}"
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
        if self.method == "meact" and self.meact_start >= self.epochs:
            raise ConfigError(
                f"meact_start={self.meact_start} is not below epochs={self.epochs}: meAct would "
                "never start; give --meact-start below --epochs"
            )
        if (self.memory or self.warmup) and self.method not in ("meprop", "random", "mesimp"):
            flag = "--memory" if self.memory else "--warmup"
            raise ConfigError(
                f"{flag} applies to the meProp layers: it needs --method meprop, random or "
                f"mesimp, got {self.method}"
            )
        try:  # the library's own checks of these fields
            MePropConfig(k=self.k, mode=self.mode, backend=self.backend, scope=self.scope,
                         memory=self.memory, warmup=self.warmup)  # fmt: skip
            MeSimpConfig(prune_rate=self.prune_rate)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None
        if self.method == "meact" and self.backend not in MEACT_BACKENDS:
            raise ConfigError(
                f"backend {self.backend!r} is not one of meAct's: --method meact runs "
                f"{MEACT_BACKENDS}; give one of them, or leave --backend out"
            )
        if self.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(
                "backend 'triton' runs on CUDA tensors, and the trainer trains on the CPU: give "
                "--backend auto (or native, numba, torch, dense), or leave --backend out"
            )
        try:
            self.meact_config()
        except (ValueError, TypeError) as e:  # its fields are meact_*
            raise ConfigError(
                f"meact_{e}" if str(e).split()[0] in MEACT_FIELDS else str(e)
            ) from None

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

    def meprop_config(self) -> MePropConfig | None:
        if self.method in ("dense", "kdim", "meact"):
            return None
        mode = "random" if self.method == "random" else self.mode
        return MePropConfig(
            k=self.k,
            mode=mode,
            sparse_grad=self.sparse_grad,
            backend=self.backend,
            scope=self.scope,
            adapt=self.adapt_config(),
            memory=self.memory,
            warmup=self.warmup,
        )

    def adapt_config(self) -> AdaptiveK | None:
        """Adaptive k's settings (``--adaptive``), or None for a fixed k."""
        if not self.adaptive:
            return None
        return AdaptiveK(
            min_k=self.min_k,
            rule=self.adaptive,
            s_min=self.s_min,
            s_max=self.s_max,
            damping=self.damping,
            share=self.mass_share,
        )

    def mesimp_config(self, steps_per_epoch: int) -> MeSimpConfig:
        """meSimp's settings, its interval and cycle counted in steps."""
        interval = self.prune_interval or max(1, steps_per_epoch // 4)
        cycle = None
        if self.cycle:
            cycle = (self.cycle[0] * steps_per_epoch, self.cycle[1] * steps_per_epoch)
        return MeSimpConfig(prune_rate=self.prune_rate, interval=interval, cycle=cycle)

    def meact_config(self) -> MeActConfig:
        return MeActConfig(
            start_epoch=self.meact_start,
            threshold=self.meact_threshold,
            cap=self.meact_cap,
            storage=self.meact_storage,
            # (the other methods' backends are meProp's: checked by MePropConfig)
            backend=self.backend if self.method == "meact" else "auto",
        )

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


# The fastest of torch's implementations of each optimizer on the CPU, all of them computing
# the same update up to float rounding (``benchmarks/bench_optimizer.py``, MNIST MLP, 1 thread:
# Adam 0.82 ms default, 0.78 foreach, 0.32 fused; Adagrad 0.57 / 0.65 / 0.23; SGD 0.09 for all
# three). Fused kernels reject sparse gradients, so with ``sparse_grad`` the default one runs.
FAST = {"adam": {"fused": True}, "adagrad": {"fused": True}, "sgd": {}}


def make_optimizer(
    name: str, params, lr: float, *, sparse_grad: bool = False
) -> torch.optim.Optimizer:
    """The trainer's optimizer ``name`` (``adam``, ``adagrad``, ``sgd``; torch's defaults but
    the learning rate) in its fastest implementation: ``fused`` for Adam and Adagrad, unless
    some parameter gets row-sparse gradients (``sparse_grad``) or this torch has no fused
    kernel for the parameters' device, where the default implementation runs."""
    cls = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
    if name not in cls:
        raise ValueError(f"optimizer must be one of {tuple(cls)}, got {name!r}")
    params = list(params)
    fast = {} if sparse_grad else FAST[name]
    if fast:
        try:
            return cls[name](params, lr=lr, **fast)
        except (RuntimeError, TypeError):  # no fused kernel here (device, dtype, torch version)
            pass
    return cls[name](params, lr=lr)


def _warm_up(model: torch.nn.Module, task, cfg: TrainConfig) -> None:
    """One forward and backward on a training batch before any clock starts, leaving no trace:
    the random state is restored and the gradients dropped. It loads or builds the kernels and
    lets ``backend="auto"`` time its candidates for the first batch's shapes (once per machine,
    then read from its cache), so that neither counts in the run's timings and a run's results
    do not depend on whether it happened. (meSimp's later widths are timed when first met.)"""
    batch = next(iter(task.batches("train", cfg.batch_size, torch.Generator().manual_seed(0))))
    records = [m.k_record for m in model.modules() if hasattr(m, "k_record")]
    saved = [(r.y_max, r.last_k, r.calls, r.memory) for r in records]
    for r in records:  # past any dense warm-up steps (MePropConfig.warmup): the sparse path
        r.calls = 2**62
    with torch.random.fork_rng(devices=[]):
        task.loss(model, batch).backward()
    for p in model.parameters():
        p.grad = None
    for r, before in zip(records, saved, strict=True):  # adaptive k's state, memory, warm-up
        r.y_max, r.last_k, r.calls, r.memory = before


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` at once: a kill leaves the old file or the new one."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        error = checkpoint.write_error(path, e)
        if error is not None:
            raise error from None
        raise


def _json_line(path: Path, record: dict) -> None:
    """Append one record in one write (a kill may tear only the last line: see _repair_log)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise checkpoint.write_error(path, e) from None


def read_log(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a log.jsonl, and a note for each line that is not one (a torn line, a
    damaged one): the valid lines before and after it are kept."""
    records, notes = [], []
    if not path.exists():
        return records, notes
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            notes.append(f"{path} line {number} is not a log record (torn or damaged): left out")
            continue
        records.append(record)
    return records, notes


def _repair_log(path: Path, step: int) -> list[str]:
    """Keep the log records of the checkpoint's steps (``step <= step``): those written after
    the checkpoint that a resume continues from are written again. A damaged line is dropped
    and named (the returned notes); the valid lines around it are kept."""
    records, notes = read_log(path)
    keep = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= step]
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
    return notes


#: Settings that a resume may change (a larger --epochs extends the run): not part of a run's
#: identity.
EXTENDABLE = ("epochs",)


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """What every checkpoint of a run carries: a hash of the settings that define the run
    (all of them but ``EXTENDABLE``), the seed, and the settings themselves (to name what
    differs)."""
    import hashlib

    settings = {k: v for k, v in cfg.to_dict().items() if k not in EXTENDABLE}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return {"id": digest, "seed": cfg.seed, "settings": settings}


def settings_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The settings whose values differ between two config dicts: {name: (a's, b's)}."""
    return {k: (a.get(k), b.get(k)) for k in {**a, **b} if a.get(k) != b.get(k)}


def describe_diff(diff: dict[str, tuple[Any, Any]], there: str, here: str) -> str:
    """``hidden: [50] there, [80] here; seed: ...`` for ``settings_diff``'s result."""
    return "; ".join(
        f"{k}: {json.dumps(a)} {there}, {json.dumps(b)} {here}"
        for k, (a, b) in sorted(diff.items())
    )


def check_identity(path: Path, extra: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse (``RunDirError``) a checkpoint written by a run other than ``cfg``'s (another
    seed, other settings): a copied-in or stale file would otherwise be continued as this
    run. Checkpoints of versions before run identities pass."""
    saved = extra.get("run")
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        return
    mine = run_identity(cfg)
    if saved.get("id") == mine["id"]:
        return
    diff = settings_diff(saved["settings"], mine["settings"]) or {
        "id": (saved.get("id"), mine["id"])
    }
    raise RunDirError(
        f"{path} was written by another run than the one in config.json: "
        f"{describe_diff(diff, f'in {path.name}', 'in config.json')}. Put back the run's own "
        f"{path.name} and config.json, or start a new run in another --out"
    )


def _out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    _check_out_path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(
            f"--out {out} is a file, not a folder: choose another --out (a run folder)"
        ) from None
    except OSError as e:
        raise RunDirError(
            f"cannot create the run folder {out}: {e.strerror}: choose another --out"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunDirError(f"the run folder {out} is not writable: choose another --out")
    return out


def _flock(path: Path, mode: int, create: bool = True) -> int | None:
    """An open descriptor of ``path`` holding ``flock`` ``mode`` (non-blocking), or None
    (held by another; without ``create``, a missing file counts as free: -1)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        return -1
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def run_lock(out_dir: str | Path):
    """Hold the run folder's lock (``.lock``, an exclusive ``flock``) while the block runs.

    A second run on the same folder is refused with ``RunDirError`` instead of writing into
    it. The lock goes with the process that holds it, however it ends (a kill included). The
    ranks of a ``--nproc`` run hold ``.ranks.lock`` (``ranks_lock``) besides their launcher's
    ``.lock``: ranks still ending after their launcher was killed keep the folder refused."""
    import fcntl

    out = _out_dir(out_dir)
    fd = _flock(out / ".lock", fcntl.LOCK_EX)
    if fd is None:
        holder = (out / ".lock").read_text(errors="replace").strip() or "?"
        raise RunDirError(
            f"{out} is in use by another run (process {holder}): wait for it to end, or "
            "choose another --out"
        )
    try:
        ranks = _flock(out / ".ranks.lock", fcntl.LOCK_EX, create=False)
        if ranks is None:
            raise RunDirError(
                f"{out} is in use by the processes of a multi-process run whose launcher "
                "ended: wait a moment for them to end, or choose another --out"
            )
        if ranks >= 0:
            os.close(ranks)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield out
    finally:
        os.close(fd)


@contextmanager
def ranks_lock(out_dir: str | Path):
    """Held by every rank of a run whose launcher holds ``run_lock`` (a shared ``flock``)."""
    import fcntl

    out = _out_dir(out_dir)
    fd = _flock(out / ".ranks.lock", fcntl.LOCK_SH)
    if fd is None:  # pragma: no cover - run_lock holds it only for an instant
        raise RunDirError(f"{out} is in use by another run: choose another --out")
    try:
        yield out
    finally:
        os.close(fd)


def _has_records(log: Path) -> int:
    """How many non-empty lines ``log`` holds (0 where it is absent)."""
    try:
        return sum(1 for line in log.read_text(errors="replace").splitlines() if line.strip())
    except FileNotFoundError:
        return 0
    except IsADirectoryError:
        raise RunDirError(f"{log} is a folder, not a run's log: choose another --out") from None


def check_run_dir(
    cfg: TrainConfig, out_dir: str | Path, resume: bool, restart: bool = False
) -> TrainConfig | None:
    """Refuse a run folder that does not fit the request (``RunDirError``): a new run where one
    is already (without ``resume``; a folder whose run never logged a record, such as one
    stopped while starting, is started again), ``resume`` where there is no run, ``resume``
    with settings other than the run's (only ``epochs`` may change, to extend it), or
    ``resume`` of a run that logged evaluations but lost its ``last.pt`` (``restart``: start
    it again from step 0). Returns the run's saved config on resume (None for a new run).
    Reads only."""
    out = Path(out_dir)
    cfg_path = out / "config.json"
    _check_out_path(out)
    records = _has_records(out / "log.jsonl") if out.is_dir() else 0
    if not resume:
        if records or (out / "last.pt").exists():
            raise RunDirError(
                f"{out} already holds a run: pass --resume to continue it, or choose another --out"
            )
        return None
    if not cfg_path.exists():
        raise RunDirError(
            f"--resume: {out} holds no run to resume (no config.json): check --out, or drop "
            "--resume to start a new run there"
        )
    try:
        saved = TrainConfig.from_file(cfg_path)
    except ConfigError as e:
        raise RunDirError(f"--resume: {e}") from None
    diff = {
        k: (v, getattr(cfg, k))
        for k, v in saved.to_dict().items()
        if k != "epochs" and v != cfg.to_dict()[k]
    }
    if diff:
        raise RunDirError(
            f"--resume with settings that differ from {cfg_path}: "
            + ", ".join(f"{k}: saved {a!r}, given {b!r}" for k, (a, b) in diff.items())
            + " (only --epochs may change): drop those flags, or start a new run elsewhere"
        )
    # A kill between the first log record and the first checkpoint leaves one record and no
    # last.pt: started again. More records (or a finished run) without last.pt: it was lost.
    lost = not (out / "last.pt").exists() and (records > 1 or (out / "summary.json").exists())
    if lost and not restart:
        raise RunDirError(
            f"--resume: {out} holds a run with {records} logged evaluation"
            f"{'s' * (records != 1)} but no last.pt to continue from: put its last.pt back, "
            "or pass --restart to train it again from step 0 (its log is replaced)"
        )
    return saved


def _check_out_path(out: Path) -> None:
    """Refuse an --out that cannot be a run folder: a file, a dangling symbolic link, a loop."""
    try:
        os.stat(out)
    except FileNotFoundError:
        if out.is_symlink():
            raise RunDirError(
                f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist: "
                "create that folder, or choose another --out"
            ) from None
        return
    except OSError as e:  # ELOOP (a link loop), ENAMETOOLONG, ...
        raise RunDirError(f"--out {out}: {e.strerror}: choose another --out") from None
    if not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder: choose another --out")


def _remove_stray_files(out: Path) -> None:
    """Temporary files of writes that a kill interrupted (checkpoints, config, log)."""
    for p in out.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def run(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    echo=print,
    lock: bool = True,
    restart: bool = False,
    compact: bool = True,
) -> dict[str, Any]:
    """Train, select on dev, score the best checkpoint on test; returns the summary dict
    (``{}`` on ranks other than 0 of a multi-process run).

    ``lock``: hold the run folder's lock (``run_lock``) for the run, on rank 0; False when
    the caller holds it (``meprop train --nproc``'s launcher). ``restart`` (with ``resume``):
    a run whose last.pt is lost is trained again from step 0 instead of refused. ``compact``:
    with several processes, all-reduce only the gradient rows meProp kept
    (``meprop.ddp_hook``)."""
    from meprop.kernels import build, dispatch

    dispatch.pinned()  # a bad MEPROP_BACKEND or MEPROP_MARCH: refused before anything is written
    build.check_march()
    main = distributed.rank() == 0
    if not lock:
        held = ranks_lock(out_dir)
    elif main:
        held = run_lock(out_dir)
    else:
        held = nullcontext()
    with held:
        trainer = Trainer(
            cfg, out_dir, data_dir=data_dir, progress=progress, echo=echo, compact=compact
        )
        return trainer.fit(resume, restart=restart)


def _quiet(*args: Any, **kwargs: Any) -> None:
    """The echo of ranks other than 0."""


class Trainer:
    """One run, read top to bottom in ``fit``: the run folder, build, restore (on resume),
    then per epoch the steps, with an evaluation and a checkpoint every ``eval_every`` steps
    and at the epoch's end; last, the best checkpoint scored on test.

    What the run adds to that loop it calls at fixed points: ``dist`` (a ``Distribution``:
    DDP, shards, seeds, rank-0 saves) and ``parts`` (``meprop.experiments.parts``: the update statistic,
    meSimp, meAct, the per-layer k; after each step, at each evaluation and checkpoint)."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        data_dir: str | Path | None = None,
        progress: bool = True,
        echo=print,
        compact: bool = True,
    ) -> None:
        self.cfg, self.out, self.data_dir = cfg, Path(out_dir), data_dir
        self.dist = Distribution(compact=compact)
        self.progress = progress and self.dist.main
        self.echo = echo if self.dist.main else _quiet
        self.log_path, self.last_path, self.best_path = (
            self.out / name for name in ("log.jsonl", "last.pt", "best.pt")
        )
        self.sw = Stopwatch()  # seconds per phase, the log's "times"
        self.identity = run_identity(cfg)  # in every checkpoint: a resume checks it
        # Where the run is: saved in every checkpoint, restored on resume.
        self.state: dict[str, Any] = dict(
            epoch=0, batch=0, step=0, best_score=-math.inf, best_epoch=-1, times={}
        )

    def fit(self, resume: bool = False, restart: bool = False) -> dict[str, Any]:
        saved = self._open_folder(resume, restart)
        self._build()
        self._restore(resume, saved)
        self.dist.prepare(self.model)
        self._bind()
        first, skip = self.state["epoch"], self.state["batch"]
        for epoch in range(first, self.cfg.epochs):
            self._epoch(epoch, skip=skip if epoch == first else 0)
        self.clocks.close()
        return self._finish() if self.dist.main else {}  # rank 0 writes the summary

    # -- build -------------------------------------------------------------------------------

    def _open_folder(self, resume: bool, restart: bool = False) -> TrainConfig | None:
        """Refuse a folder that does not fit the request, create it, clear a kill's leftovers;
        returns the run's saved config on resume."""
        saved = check_run_dir(self.cfg, self.out, resume, restart)
        _out_dir(self.out)
        self.dist.barrier()  # every rank has checked the folder before rank 0 writes to it
        if self.dist.main:
            _remove_stray_files(self.out)
        return saved

    def _build(self) -> None:
        """The task, its model with meProp swapped in, a warm-up step, the optimizer, the
        method's parts."""
        from .tasks import get_task

        cfg = self.cfg
        self.task = task = get_task(cfg, self.data_dir)
        torch.manual_seed(cfg.seed)
        self.model = model = task.build_model(cfg.widths(), cfg)
        mp = cfg.meprop_config()
        if mp is not None:
            sparsify_(model, mp, filter_fn=task.sparsify_filter(model))
        _warm_up(model, task, cfg)
        sparse_grad = mp is not None and mp.sparse_grad
        self.opt = make_optimizer(
            cfg.optimizer, model.parameters(), cfg.learning_rate(), sparse_grad=sparse_grad
        )
        self.steps_per_epoch = task.steps_per_epoch(cfg.batch_size)
        self.simplifier = None
        if cfg.method == "mesimp":
            simp = cfg.mesimp_config(self.steps_per_epoch)
            self.simplifier = self.dist.simplifier(model, simp, self.opt)
        self.parts = self._parts()
        self.clocks = BackwardClocks(self.sw.totals, task.hidden_layers)

    def _parts(self) -> list[Part]:
        """What the run adds to the loop, in the order it runs after each step (the update
        statistic before meSimp, which may replace the Parameters it watches)."""
        cfg, model, parts = self.cfg, self.model, []
        if cfg.track_updates:
            parts.append(UpdatePart(model))
        if self.simplifier is not None:
            parts.append(MeSimpPart(self.simplifier))
        if cfg.method == "meact":
            if self.dist.world > 1:
                raise ConfigError(
                    f"--method meact runs in one process (its per-example state is not "
                    f"sharded), got {self.dist.world} processes: drop --nproc"
                )
            examples = self.task.num_examples("train")
            meact = MeAct(model, cfg.meact_config(), examples, self.task.sparsify_filter(model))
            parts.append(MeActPart(meact, cfg.task))
        parts.append(KLog(model))
        return parts

    def _restore(self, resume: bool, saved: TrainConfig | None) -> None:
        """On resume, last.pt's state (model, optimizer, meSimp, the parts, where the run is);
        then config.json (with a new --epochs) and the log cut back to the checkpoint's steps."""
        cfg = self.cfg
        if resume and not self.last_path.exists() and _has_records(self.log_path):
            self.echo(
                f"no {self.last_path}: training the run again from step 0 (its log, best.pt "
                "and summary.json are replaced)"
            )
            if self.dist.main:
                for name in ("summary.json", "best.pt"):
                    (self.out / name).unlink(missing_ok=True)
        if resume and self.last_path.exists():
            extra = checkpoint.load(
                self.last_path,
                self.model,
                self.opt,
                simplifier=self.simplifier,
                check=functools.partial(check_identity, self.last_path, cfg=cfg),
            )
            self.state = {"batch": 0, **extra["state"]}
            self.dist.load(extra)
            for part in self.parts:
                part.load(extra)
            epoch, batch = self.state["epoch"], self.state["batch"]
            done = epoch + (batch > 0)
            if cfg.epochs < done:
                raise RunDirError(
                    f"--resume --epochs {cfg.epochs}: the run in {self.out} has trained "
                    f"{epoch + batch / self.steps_per_epoch:g} epochs already: give "
                    f"--epochs {done} or more, or leave it out"
                )
            where = f"epoch {epoch}" + (f", batch {batch}" if batch else "")
            if self.best_path.exists():  # scored on test at the end: refused now, not then
                check_identity(self.best_path, _saved_extra(self.best_path), cfg)
            self.echo(f"resumed from {self.last_path} at {where}")
        if saved is not None and saved.epochs != cfg.epochs:
            self.echo(
                f"--epochs {cfg.epochs} replaces the run's {saved.epochs} (config.json updated)"
            )
        if self.dist.main:
            _write_atomic(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            # drops the records after last.pt, and damaged lines (named)
            for note in _repair_log(self.log_path, self.state["step"]):
                self.echo(note)
        self.sw.totals.update(self.state["times"])

    def _bind(self) -> None:
        """Hook the backward clocks and the parts onto the model's current Parameters."""
        self.clocks.rebind(self.model)
        for part in self.parts:
            part.rebind(self.model)

    # -- the loop ----------------------------------------------------------------------------

    def _epoch(self, epoch: int, skip: int = 0) -> None:
        """One pass over the training batches (from batch ``skip``: resumed within the epoch),
        with an evaluation and a checkpoint every ``eval_every`` steps and at its end."""
        cfg, n = self.cfg, self.steps_per_epoch
        eval_every = cfg.eval_every or n
        self.model.train()
        for part in self.parts:
            part.start_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # the batches' order
        self.dist.seed(cfg.seed, epoch, resumed=skip > 0)
        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        bar = tqdm(
            total=n,
            initial=skip,
            desc=desc,
            leave=False,
            disable=not bars(self.progress),  # a file or pipe: the epoch lines alone
            dynamic_ncols=True,
        )
        losses = []
        # "train": wall-clock seconds of the training loop (batches, steps, bookkeeping) outside
        # evaluations and checkpoints; the other phases are its timed parts.
        lap = time.perf_counter()
        for i, batch in enumerate(self.task.batches("train", cfg.batch_size, gen)):
            if i < skip:
                continue  # done before the checkpoint (the batches are drawn from gen alone)
            loss = self._step(batch)
            losses.append(loss.detach())
            bar.update(1)
            if (i + 1) % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", best=f"{self.state['best_score']:.4f}")
            if (i + 1) % eval_every and i + 1 != n:
                continue  # not an evaluation point
            train_loss = self.dist.mean(torch.stack(losses).mean())
            losses.clear()
            self.sw.totals["train"] += time.perf_counter() - lap
            epoch_float = epoch + (i + 1) / n
            if not math.isfinite(train_loss):  # the same on every rank (a mean over them)
                bar.close()
                raise self._diverged(train_loss, epoch_float)
            record = self._evaluate(epoch_float, train_loss, end_of_epoch=i + 1 == n)
            self._checkpoint(epoch, i + 1)
            if i + 1 == n:
                self.echo(self._epoch_line(epoch, record))
            self.model.train()
            lap = time.perf_counter()
        bar.close()

    def _step(self, batch) -> torch.Tensor:
        """One optimizer step on a global batch (this rank's part of it); returns its loss."""
        with ExitStack() as forward:  # the parts' contexts of a training forward (meAct's)
            for part in self.parts:
                forward.enter_context(part.forward_context(batch))
            batch, share = self.dist.shard(batch, self.task)  # one process: (batch, 1.0)
            with self.sw("forward"):
                loss = self.task.loss(self.dist.net, batch)
                if share != 1.0:  # a rank's part of uneven size: weigh its mean loss
                    loss = loss * share
        with self.sw("backward"):
            loss.backward()
        self.clocks.lap()
        with self.sw("optimizer"):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        for part in self.parts:
            with self.sw(part.phase) if part.phase else nullcontext():
                if part.after_step():  # new Parameters (meSimp): rewrap DDP, hook onto them
                    self.dist.rewrap()
                    self._bind()
        self.state["step"] += 1
        return loss

    def _evaluate(self, epoch_float: float, train_loss: float, end_of_epoch: bool) -> dict:
        """Dev and train scores with the parts' fields, logged (rank 0); best.pt when the dev
        score is the best so far (model selection as in the paper)."""
        task, state = self.task, self.state
        with self.sw("eval"):
            dev = task.evaluate(self.model, "dev")
            train_score = task.evaluate(self.model, "train_eval")
        record = {
            "epoch": round(epoch_float, 4),
            "step": state["step"],
            "train_loss": train_loss,
            **{f"dev_{k}": v for k, v in dev.items()},
            **{f"train_{k}": v for k, v in train_score.items()},
            "times": {k: round(v, 4) for k, v in self.sw.totals.items()},
        }
        for part in self.parts:
            record.update(part.record(end_of_epoch))
        if self.dist.main:
            _json_line(self.log_path, record)
        score = dev[task.metric]
        if score > state["best_score"]:
            state["best_score"], state["best_epoch"] = score, epoch_float
            self.dist.save(self.best_path, self.model, state=dict(state), run=self.identity)
        return record

    def _checkpoint(self, epoch: int, done: int) -> None:
        """last.pt, which a resume continues from, after each evaluation (with --eval-every
        too: a kill loses at most the steps since the last evaluation). ``done``: the epoch's
        batches trained."""
        state = self.state
        end = done == self.steps_per_epoch
        state["epoch"], state["batch"] = (epoch + 1, 0) if end else (epoch, done)
        state["times"] = dict(self.sw.totals)
        extra = {k: v for part in self.parts for k, v in part.state().items()}
        extra.update(self.dist.state())  # a collective
        self.dist.save(
            self.last_path,
            self.model,
            self.opt,
            simplifier=self.simplifier,
            state=dict(state),
            run=self.identity,
            **extra,
        )

    # -- messages and the end ----------------------------------------------------------------

    def _epoch_line(self, epoch: int, record: dict) -> str:
        metric = self.task.metric
        widths = f"  widths {record['widths']}" if "widths" in record else ""
        if "active" in record:
            widths += "  active " + " ".join(f"{v:.1f}" for v in record["active"].values())
        return (
            f"epoch {epoch + 1}/{self.cfg.epochs}  loss {record['train_loss']:.4f}  "
            f"dev {metric} {record['dev_' + metric]:.4f}{widths}"
        )

    def _diverged(self, train_loss: float, epoch_float: float) -> Diverged:
        state, last = self.state, self.last_path
        kept = (
            f"{last} keeps the last good state (epoch "
            f"{state['epoch'] + state['batch'] / self.steps_per_epoch:g}, step "
            f"{_saved_step(last)})"
            if last.exists()
            else "no checkpoint was written before"
        )
        return Diverged(
            f"the training loss became {train_loss} at epoch {epoch_float:g} (step "
            f"{state['step']}): the run stopped; {kept}. Lower --lr (now "
            f"{self.cfg.learning_rate():g}) or change the settings, and start a new run "
            "in another --out"
        )

    def _finish(self) -> dict[str, Any]:
        """Model selection as in the paper: the best dev checkpoint is scored on test; writes
        summary.json and returns it."""
        cfg, task, state, sw = self.cfg, self.task, self.state, self.sw
        ends = {"final_widths": None, "meact": None}  # the parts' (before best.pt resizes)
        for part in self.parts:
            ends.update(part.summary())
        checkpoint.load(
            self.best_path,
            self.model,
            restore_rng=False,
            check=functools.partial(check_identity, self.best_path, cfg=cfg),
        )
        with sw("eval"):
            test = task.evaluate(self.model, "test")
        summary = {
            "config": cfg.to_dict(),
            "best_epoch": state["best_epoch"],
            f"dev_{task.metric}": state["best_score"],
            **{f"test_{k}": v for k, v in test.items()},
            "times": {k: round(v, 4) for k, v in sw.totals.items()},
            "steps": state["step"],
            "widths": cfg.widths(),
            "final_widths": ends["final_widths"],
            "best_widths": task.widths(self.model),
            "metric": task.metric,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "meact": ends["meact"],
            "threads": torch.get_num_threads(),
            "processes": self.dist.world,
            "torch": torch.__version__,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        _write_atomic(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.echo(
            f"best epoch {state['best_epoch']:g}: dev {task.metric} {state['best_score']:.4f}, "
            f"test {task.metric} {test[task.metric]:.4f}  (backward {sw.totals['backward']:.1f} "
            f"s, linear part {sw.totals['linear_backward']:.1f} s)"
        )
        return summary


def _saved_extra(path: Path) -> dict[str, Any]:
    """A checkpoint's extra values ({} where it cannot be read: its load says why, later)."""
    try:
        extra = torch.load(path, map_location="cpu", weights_only=True)["extra"]
    except Exception:  # noqa: BLE001 - torch raises many kinds for a bad file
        return {}
    return extra if isinstance(extra, dict) else {}


def _saved_step(path: Path) -> int | str:
    """The step a checkpoint was written at, or "?" (only for a message)."""
    state = _saved_extra(path).get("state")
    return state.get("step", "?") if isinstance(state, dict) else "?"
