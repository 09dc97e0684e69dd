"""The paper's tasks, each an object the trainer drives (see ``meprop.train``).

A task provides: ``metric`` (the dev/test score's name), ``build_model(widths, dropout)``,
``sparsify_filter(model)``, ``hidden_layers(model)``, ``steps_per_epoch(batch_size)``,
``batches(split, batch_size, generator)``, ``loss(model, batch)`` and
``evaluate(model, split) -> dict`` for the splits ``train_eval`` (a fixed training subset, for
learning curves), ``dev`` and ``test``.
"""

from __future__ import annotations

__all__ = ["TASKS", "get_task"]

TASKS = ("mnist",)


def get_task(cfg, data_dir=None):
    if cfg.task == "mnist":
        from .mnist import MnistTask

        return MnistTask(cfg, data_dir)
    raise ValueError(f"task must be one of {TASKS}, got {cfg.task!r}")
