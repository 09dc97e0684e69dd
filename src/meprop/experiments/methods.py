"""The methods a run trains with, and their settings: what each method reads of a
``TrainConfig``, how it is checked, and the library config it becomes.

* ``dense`` and ``kdim`` (a dense net whose hidden layers have width k): no settings of their
  own.
* ``meprop`` (top-k), ``random`` (random-k) and ``mesimp`` (meProp plus a ``Simplifier``): the
  meProp layers' settings, ``k``, ``mode``, ``backend``, ``scope``, ``sparse_grad``, adaptive k
  (``adaptive``, ``min_k``, ``s_min``, ``s_max``, ``damping``, ``mass_share``), ``memory``,
  ``warmup``; meSimp's ``prune_rate``, ``prune_interval``, ``cycle``.
* ``meact`` (dense training, then meAct's active-only forwards): ``meact_start``,
  ``meact_threshold``, ``meact_cap``, ``meact_storage``, ``backend``.

The functions take the run's config (a ``TrainConfig``) and raise ``ConfigError``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from meprop.config import MEACT_BACKENDS, AdaptiveK, MeActConfig, MePropConfig, MeSimpConfig

from .errors import ConfigError
from .settings import meprop_setting, setting

__all__ = [
    "METHODS", "SPARSE", "check_config", "meprop_config", "adapt_config", "mesimp_config",
    "meact_config", "MePropSettings", "AdaptiveSettings", "MeSimpSettings", "MeActSettings",
]  # fmt: skip

METHODS = ("dense", "meprop", "random", "kdim", "mesimp", "meact")
SPARSE = ("meprop", "random", "mesimp")  # the methods whose layers run meProp's backward
MEACT_FIELDS = ("start", "threshold", "cap", "storage")  # MeActConfig's names of meact_*


@dataclass(frozen=True)
class MePropSettings:
    """The meProp layers' settings (``--method meprop``, ``random``, ``mesimp``; ``backend``
    also meAct's), checked by ``check_config``."""

    k: int = meprop_setting(20, "k")
    # (random: MePropConfig's word for random-k; a run records it as --method random)
    mode: str = setting(
        "per_example",
        "top-k selection: per example, unified over the mini-batch, or symmetric (per example, "
        "half the largest positive and half the largest negative entries: keeps the sign "
        "balance, docs/per_example.md); random: random-k, the paper's control, the same run "
        "as --method random; per_position (--model lenet/resnet): k channels at each output "
        "position of the convolutions",
        ("per_example", "unified", "symmetric", "random", "per_position"),
    )
    sparse_grad: bool = meprop_setting(False, "sparse_grad")
    backend: str = meprop_setting("auto", "backend")
    scope: str = meprop_setting(
        "local",
        "scope",
        help="unified top-k with --nproc > 1: columns ranked by each rank's rows (local) or "
        "by the global batch's, as one process would (global; not for the pos task's LSTM)",
    )
    memory: float = setting(
        0.0,
        "memorized sparse back-propagation: the share of the gradient that top-k dropped "
        "carried into the next step (0: off; MSBP's ratio 0.8; meprop.MePropConfig.memory)",
    )
    warmup: int = setting(
        0,
        "steps that run dense (the full gradient) before top-k starts (0: top-k from the "
        "first step; meprop.MePropConfig.warmup)",
    )


@dataclass(frozen=True)
class AdaptiveSettings:
    """Adaptive k (``meprop.AdaptiveK``) of the meProp layers."""

    adaptive: str = setting(
        "",
        "adaptive k (meprop.AdaptiveK): each backward chooses its k in [--min-k, --k] by "
        "TinyProp's rule or the gradient mass rule; default: k fixed",
        ("tinyprop", "mass"),
    )
    min_k: int = setting(1, "adaptive k: the least k")
    s_min: float = setting(0.0, "adaptive tinyprop: the least share of a layer's width kept")
    s_max: float = setting(1.0, "adaptive tinyprop: the largest share of a layer's width kept")
    damping: float = setting(1.0, "adaptive tinyprop: share factor per layer from the output")
    mass_share: float = setting(0.9, "adaptive mass: share of each row's |gradient| kept")


@dataclass(frozen=True)
class MeSimpSettings:
    """meSimp's pruning and cycle (``--method mesimp``)."""

    prune_rate: float = setting(
        0.1, "meSimp: drop units selected in fewer than this share of top-k selections"
    )
    prune_interval: int = setting(0, "meSimp: steps between prunings (0: a quarter of an epoch)")
    cycle: tuple[int, ...] = setting(
        (), "meSimp cycle in epochs: SIMPLIFY,NORMAL (optimizer reset at each period start)"
    )  # (): no cycle


@dataclass(frozen=True)
class MeActSettings:
    """meAct's settings (``--method meact``) and the update statistic it reads."""

    meact_start: int = setting(10, "meact: first epoch, counting from 0, with active-only forwards")
    meact_threshold: float = setting(
        0.5,
        "meact: a neuron is active for an example when its share of the accumulated "
        "|gradient| is at least this percentage",
    )
    meact_cap: int = setting(
        0, "meact: at most this many active neurons per example and layer (0: no cap)"
    )
    meact_storage: str = setting(
        "float16",
        "meact: dtype of the per-example state (accumulations, cached outputs)",
        ("float16", "float32"),
    )
    track_updates: bool | None = setting(
        None,
        "log the mean |parameter change| per step (update) at each evaluation; costs about a "
        "tenth of a dense MNIST step (None: only with --method meact)",
    )


def check_config(cfg) -> None:
    """Every method setting of ``cfg``: the meProp layers', meSimp's and meAct's."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.mode == "random":  # the library's word (MePropConfig(mode="random")): one run
        if cfg.method not in ("meprop", "random"):
            raise ConfigError(
                f"--mode random is random-k selection in meProp's layers: it needs --method "
                f"meprop (or --method random), got {cfg.method}"
            )
        object.__setattr__(cfg, "method", "random")
        object.__setattr__(cfg, "mode", "per_example")
    _check_meprop(cfg)
    _check_mesimp(cfg)
    _check_meact(cfg)


def _check_meprop(cfg) -> None:
    if cfg.adaptive:
        if cfg.adaptive not in ("tinyprop", "mass"):
            raise ConfigError(
                f"adaptive must be 'tinyprop' or 'mass' (or empty: k fixed), got {cfg.adaptive!r}"
            )
        if cfg.method not in ("meprop", "mesimp"):
            raise ConfigError(
                f"--adaptive applies to --method meprop or mesimp, not {cfg.method!r}"
            )
        try:
            MePropConfig(k=cfg.k, mode=cfg.mode, adapt=adapt_config(cfg))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"adaptive k: {e}") from None
    if cfg.sparse_grad and cfg.method not in SPARSE:
        raise ConfigError(
            f"sparse_grad gives meProp's layers row-sparse gradients: it needs --method "
            f"meprop, random or mesimp, got {cfg.method}: leave --sparse-grad out"
        )
    if cfg.sparse_grad and cfg.optimizer == "adam":
        raise ConfigError(
            "sparse_grad: torch's Adam takes no sparse gradients: give --optimizer lazy_adam "
            "(Adam on the rows that got a gradient), sgd or adagrad, or leave --sparse-grad out"
        )
    if cfg.optimizer == "lazy_adam" and cfg.method in SPARSE and not cfg.sparse_grad:
        raise ConfigError(
            "--optimizer lazy_adam updates the rows that got a gradient, and learns them from "
            "row-sparse gradients: add --sparse-grad (without it every row has a gradient, "
            "zero or not, and lazy_adam is --optimizer adam at more cost)"
        )
    if (cfg.memory or cfg.warmup) and cfg.method not in SPARSE:
        flag = "--memory" if cfg.memory else "--warmup"
        raise ConfigError(
            f"{flag} applies to the meProp layers: it needs --method meprop, random or "
            f"mesimp, got {cfg.method}"
        )
    try:  # the library's own checks of these fields
        MePropConfig(k=cfg.k, mode=cfg.mode, backend=cfg.backend, scope=cfg.scope,
                     memory=cfg.memory, warmup=cfg.warmup)  # fmt: skip
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    if cfg.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            "backend 'triton' runs on CUDA tensors, and the trainer trains on the CPU: give "
            "--backend auto (or native, numba, torch, dense), or leave --backend out"
        )


def _check_mesimp(cfg) -> None:
    if cfg.cycle and (len(cfg.cycle) != 2 or min(cfg.cycle) < 1):
        raise ConfigError(
            f"cycle must be two epoch counts >= 1 (simplify, normal), got {list(cfg.cycle)}"
        )
    try:
        MeSimpConfig(prune_rate=cfg.prune_rate)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def _check_meact(cfg) -> None:
    if cfg.method == "meact" and cfg.meact_start >= cfg.epochs:
        raise ConfigError(
            f"meact_start={cfg.meact_start} is not below epochs={cfg.epochs}: meAct would "
            "never start; give --meact-start below --epochs"
        )
    if cfg.method == "meact" and cfg.backend not in MEACT_BACKENDS:
        raise ConfigError(
            f"backend {cfg.backend!r} is not one of meAct's: --method meact runs "
            f"{MEACT_BACKENDS}; give one of them, or leave --backend out"
        )
    try:
        meact_config(cfg)
    except (ValueError, TypeError) as e:  # its fields are meact_*
        raise ConfigError(f"meact_{e}" if str(e).split()[0] in MEACT_FIELDS else str(e)) from None


def meprop_config(cfg) -> MePropConfig | None:
    """The meProp layers' config (None for the methods that train dense)."""
    if cfg.method not in SPARSE:
        return None
    return MePropConfig(
        k=cfg.k,
        mode="random" if cfg.method == "random" else cfg.mode,
        sparse_grad=cfg.sparse_grad,
        backend=cfg.backend,
        scope=cfg.scope,
        adapt=adapt_config(cfg),
        memory=cfg.memory,
        warmup=cfg.warmup,
    )


def adapt_config(cfg) -> AdaptiveK | None:
    """Adaptive k's settings (``--adaptive``), or None for a fixed k."""
    if not cfg.adaptive:
        return None
    return AdaptiveK(
        min_k=cfg.min_k,
        rule=cfg.adaptive,
        s_min=cfg.s_min,
        s_max=cfg.s_max,
        damping=cfg.damping,
        share=cfg.mass_share,
    )


def mesimp_config(cfg, steps_per_epoch: int) -> MeSimpConfig:
    """meSimp's settings, its interval and cycle counted in steps."""
    interval = cfg.prune_interval or max(1, steps_per_epoch // 4)
    cycle = None
    if cfg.cycle:
        cycle = (cfg.cycle[0] * steps_per_epoch, cfg.cycle[1] * steps_per_epoch)
    return MeSimpConfig(prune_rate=cfg.prune_rate, interval=interval, cycle=cycle)


def meact_config(cfg) -> MeActConfig:
    return MeActConfig(
        start_epoch=cfg.meact_start,
        threshold=cfg.meact_threshold,
        cap=cfg.meact_cap,
        storage=cfg.meact_storage,
        # (the other methods' backends are meProp's: checked by MePropConfig)
        backend=cfg.backend if cfg.method == "meact" else "auto",
    )
