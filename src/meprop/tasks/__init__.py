"""The paper's tasks, each an object the trainer drives (see ``meprop.train``).

A task provides: ``metric`` (the dev/test score that selects the best epoch),
``build_model(widths, cfg)``, ``sparsify_filter(model)``, ``hidden_layers(model)`` (the modules
meProp sparsifies: their backward is timed apart), ``widths(model)`` (current hidden widths, a
list), ``steps_per_epoch(batch_size)``, ``batches(split, batch_size, generator)``,
``loss(model, batch)`` and ``evaluate(model, split) -> dict`` for the splits ``train_eval`` (a
fixed training subset, for learning curves), ``dev`` and ``test``.

``DEFAULTS`` holds each task's defaults for the ``TrainConfig`` fields left at 0 (or "").
"""

from __future__ import annotations

__all__ = ["TASKS", "DEFAULTS", "task_class", "get_task"]

TASKS = ("mnist", "pos", "parse")

# The paper's settings where it gives them (hidden 500, Adam); the rest chosen to train well on
# these data in reasonable time on a CPU.
DEFAULTS: dict[str, dict] = {
    # 784-500-500-10, batch 100, 20 epochs.
    "mnist": {"layers": 2, "batch_size": 100, "epochs": 20, "activation": "relu"},
    # one bi-LSTM layer of 500 cells per direction; batches of 16 sentences.
    "pos": {"layers": 1, "batch_size": 16, "epochs": 10, "activation": "tanh"},
    # Chen & Manning's parser with the paper's hidden layer of 500, cube activation; batches
    # of (parser state, gold transition) examples.
    "parse": {"layers": 1, "batch_size": 1000, "epochs": 10, "activation": "cube"},
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
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")


def get_task(cfg, data_dir=None):
    """The task object for ``cfg.task`` (loads its data)."""
    return task_class(cfg.task)(cfg, data_dir)
