"""The paper's tasks, each an object the trainer drives (see ``meprop.experiments.train``).

A task provides: ``metric`` (the dev/test score that selects the best epoch),
``build_model(widths, cfg)``, ``sparsify_filter(model)``, ``hidden_layers(model)`` (the modules
meProp sparsifies: their backward is timed apart), ``widths(model)`` (current hidden widths, a
list), ``steps_per_epoch(batch_size)``, ``batches(split, batch_size, generator)``,
``loss(model, batch)`` and ``evaluate(model, split) -> dict`` for the splits ``train_eval`` (a
fixed training subset, for learning curves), ``dev`` and ``test``.

``DEFAULTS`` holds each task's defaults for the ``TrainConfig`` fields left at 0 (or "");
``ADAM_LR`` its Adam learning rate where it is not the trainer's 1e-3.
"""

from __future__ import annotations

__all__ = [
    "TASKS", "DEFAULTS", "ADAM_LR", "RECIPES", "TAGS", "task_class", "get_task",
    "take_defaults", "check_config",
]  # fmt: skip

from ..errors import ConfigError
from .pos import TAGS  # the pos and parse tasks' tag column

TASKS = ("mnist", "pos", "parse", "lm")

# The paper's settings where it gives them (hidden 500, Adam); the rest chosen to train well on
# these data in reasonable time on a CPU.
DEFAULTS: dict[str, dict] = {
    # 784-500-500-10, 20 epochs; batches of 50 and dropout 0.1 as the authors' PyTorch script
    # (without dropout, per-example top-k training is unstable here: see the README).
    "mnist": {"layers": 2, "batch_size": 50, "epochs": 20, "activation": "relu", "dropout": 0.1},
    # one bi-LSTM layer of 500 cells per direction; batches of 16 sentences; dropout 0.5 on
    # the LSTM's output.
    "pos": {"layers": 1, "batch_size": 16, "epochs": 10, "activation": "tanh", "dropout": 0.5},
    # Chen & Manning's parser with the paper's hidden layer of 500, cube activation; batches
    # of (parser state, gold transition) examples.
    "parse": {"layers": 1, "batch_size": 1000, "epochs": 10, "activation": "cube", "dropout": 0.5},
    # a byte-level transformer LM: 4 pre-norm blocks, windows of 128 bytes, batches of 32
    # windows, no dropout (the activation is the MLP's GELU).
    "lm": {"layers": 4, "batch_size": 32, "epochs": 1, "activation": "gelu", "dropout": 0.0},
}

# Adam's learning rate where a task's differs from the trainer's 1e-3 (chosen on dev: the lm
# grid's "tuning" group, dense at lr 1e-3 / 2e-3 / 4e-3 / 8e-3).
ADAM_LR: dict[str, float] = {"lm": 4e-3}

# What ``meprop train TASK --method meprop`` runs when none of --k, --mode, --memory, --warmup,
# --adaptive, --optimizer, --sparse-grad is given (and no --config): the time-to-accuracy
# grid's best recipe where one was measured (docs/results/tta/report.md). MNIST: unified k=160
# (32% of the paper's 500) with LazyAdam on row-sparse gradients: in the mnist-w500-levers group
# (5 seeds) the soonest to dense's best - 0.2 point (0.73x [0.48, 1.09] of dense's time; unified
# k=80 with LazyAdam, the previous recipe, 0.98x); with seeds 6-8 of the confirm group, 8 seeds
# pooled, 0.98x / 0.86x [0.63, 1.17] / 0.77x dense's time to best - 0.5 / 0.2 / 0.1 point, in
# about dense's steps (0.95x to best - 0.2), test -0.06 [-0.17, +0.06], at load 4; seeds 9-16 at
# low load: 0.61x [0.50, 0.76], test -0.07 [-0.19, +0.06]. (At width 2000, k=320 of
# 2000 with LazyAdam: 0.46x [0.39, 0.54], 6 seeds.) Other tasks: the fields' defaults (k=20,
# per_example).
# Parser: per_example k=20 without memory (the fields' defaults), the tta grid's parse group (5
# seeds: 0.56x [0.44, 0.72] of dense's time to dense's best - 0.2, test +0.35 [+0.02, +0.69];
# with memory one seed of five never got within 0.2 point).
RECIPES: dict[str, dict] = {
    "mnist": {"k": 160, "mode": "unified", "optimizer": "lazy_adam", "sparse_grad": True},
    "parse": {"k": 20, "mode": "per_example"},
}


def task_class(name: str):
    """The class of task ``name`` (imports it; loads no data)."""
    if name == "mnist":
        from .mnist import MnistTask

        return MnistTask
    if name == "pos":
        from .pos import PosTask

        return PosTask
    if name == "parse":
        from .parse import ParseTask

        return ParseTask
    if name == "lm":
        from .lm import LmTask

        return LmTask
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")


def get_task(cfg, data_dir=None):
    """The task object for ``cfg.task`` (loads its data)."""
    return task_class(cfg.task)(cfg, data_dir)


def take_defaults(cfg) -> None:
    """Fill the fields of ``cfg`` (a ``TrainConfig``) left unset (0, "", dropout -1) with its
    task's defaults, so that a saved config is complete; the dataset of the tasks that have
    one."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {cfg.task!r}")
    for name, value in DEFAULTS[cfg.task].items():
        current = getattr(cfg, name)
        unset = current == -1 if name == "dropout" else not current
        if unset and not (name == "layers" and len(cfg.hidden) > 1):
            object.__setattr__(cfg, name, value)
    if not cfg.lr and cfg.optimizer in ("adam", "lazy_adam") and cfg.task in ADAM_LR:
        object.__setattr__(cfg, "lr", ADAM_LR[cfg.task])
    if cfg.task != "mnist":  # the field picks MNIST or Fashion-MNIST; other tasks have one
        if cfg.dataset not in ("mnist", "ud_english_ewt"):  # "mnist": the field's default
            raise ConfigError(
                f"dataset {cfg.dataset!r} applies to the mnist task only; the {cfg.task} "
                "task trains on UD English EWT: leave --dataset out"
            )
        object.__setattr__(cfg, "dataset", "ud_english_ewt")
    elif cfg.dataset not in ("mnist", "fashion"):
        raise ConfigError(f"dataset must be 'mnist' or 'fashion', got {cfg.dataset!r}")


def check_config(cfg) -> None:
    """The settings of ``cfg`` that belong to one task: ``tags`` (pos, parse) and the lm
    task's ``sparse_attention``, ``d_model``, ``fc_only``."""
    if cfg.tags not in TAGS:
        raise ConfigError(f"tags must be 'xpos' or 'upos', got {cfg.tags!r}")
    if cfg.tags != "xpos" and cfg.task not in ("pos", "parse"):
        raise ConfigError(
            f"tags picks the pos and parse tasks' tag column, not {cfg.task}'s: leave --tags out"
        )
    if not isinstance(cfg.sparse_attention, bool):
        raise ConfigError(f"sparse_attention must be true or false, got {cfg.sparse_attention!r}")
    if cfg.sparse_attention and cfg.task != "lm":
        raise ConfigError(
            f"sparse_attention applies to the lm task only (its attention projections), "
            f"not {cfg.task}: leave --sparse-attention out"
        )
    if cfg.d_model and cfg.task != "lm":
        raise ConfigError(
            f"d_model is the lm task's transformer width, not {cfg.task}'s: leave --d-model out"
        )
    if cfg.fc_only and cfg.task != "lm":
        raise ConfigError(
            f"fc_only keeps the lm task's mlp.proj dense: it needs --task lm and --method "
            f"meprop, random or mesimp, got task {cfg.task}, method {cfg.method}"
        )
    if cfg.task == "lm":
        from .lm import check_config as check_lm

        check_lm(cfg)
    _check_model(cfg)


def _check_model(cfg) -> None:
    """``model``: the mnist task's network; a CNN takes the methods and modes its
    convolutions serve (meprop.SparseConv2d)."""
    from .cnn import MODELS, WIDTHS

    if cfg.model not in MODELS:
        raise ConfigError(f"model must be one of {MODELS}, got {cfg.model!r}")
    if cfg.bn_batches and cfg.model != "resnet":
        raise ConfigError(
            f"--bn-batches recomputes BatchNorm statistics: only --model resnet has BatchNorm "
            f"layers, not --model {cfg.model}"
        )
    if cfg.inner_only and (cfg.model != "resnet" or cfg.method == "dense"):
        raise ConfigError(
            f"--inner-only puts meProp on a ResNet's blocks' first convolutions only: it needs "
            f"--model resnet and a sparse method, got --model {cfg.model} --method {cfg.method}"
        )
    if cfg.model == "mlp":
        if cfg.method != "dense" and cfg.mode == "per_position":
            raise ConfigError(
                "--mode per_position selects channels at each position of a convolution's "
                "output: it takes --model lenet or resnet (mnist task); linear layers' "
                "per_example already selects per row"
            )
        return
    if cfg.task != "mnist":
        raise ConfigError(
            f"model picks the mnist task's network, not the {cfg.task} task's: leave --model out"
        )
    if cfg.method not in ("dense", "meprop", "random", "mesimp"):
        raise ConfigError(
            f"--model {cfg.model} trains with --method dense, meprop, random or mesimp, not "
            f"{cfg.method}"
        )
    own = len(WIDTHS[cfg.model])
    if len(cfg.hidden) > 1 and len(cfg.hidden) != own:
        raise ConfigError(
            f"--model {cfg.model} takes --hidden as {own} widths {list(WIDTHS[cfg.model])} "
            f"(the layers meSimp shrinks), got {list(cfg.hidden)}"
        )
    if cfg.method != "dense" and cfg.mode == "symmetric":
        raise ConfigError(
            f"--model {cfg.model}: its convolutions select output channels by their summed "
            "|gradient|, which has no sign (meprop.SparseConv2d): use --mode per_example, "
            "unified or per_position"
        )
