"""Precise BatchNorm statistics: recompute a network's BatchNorm running averages with the
weights it is evaluated with (``--bn-batches N``, the ResNet of ``--model resnet``).

BatchNorm normalises with the batch's own statistics in training and with running averages
in evaluation (each step moves them by ``momentum`` = 0.1 towards the batch's). Where the
weights move between the batches those averages cover, they describe a network that no longer
exists, and evaluation scores a network other than the one trained (Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", arXiv 2105.07576, call the remedy *precise BN*). meProp
makes this worse on the small ResNet: its filters move a few at a time, each by Adam's full
step when it is kept (docs/conv.md measures it). ``recompute_batchnorm`` resets every
BatchNorm layer's averages and sets them to the plain mean over N batches, in training mode
for the BatchNorm layers only (dropout off) and without gradients, as
``torch.optim.swa_utils.update_bn`` does, but without touching the global random number
generator (dropout's draws would change the rest of training) or other layers' modes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["recompute_batchnorm"]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, inputs: Iterable[Tensor]) -> int:
    """Set every BatchNorm layer's running mean and variance to their mean over the batches
    of ``inputs`` (each a model input), run in evaluation mode but for the BatchNorm layers;
    every module's mode and momentum are restored. Returns the number of batches."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer to recompute")
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch counts alike
        m.train()
    count = 0
    try:
        for x in inputs:
            model(x)
            count += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
    return count
