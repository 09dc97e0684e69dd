"""Convolutional networks for the MNIST task (``--model lenet`` or ``resnet``), and how meProp
goes on them.

* ``lenet``: LeNet-5 on 28x28 images: conv 5x5 1->6 (padding 2), ReLU, max-pool 2; conv 5x5
  6->16, ReLU, max-pool 2; then 400-120-84-10 with ReLU (dropout after each hidden layer).
* ``resnet``: a small ResNet: a 3x3 stem 1->16 with BatchNorm, 3 stages of 2 basic blocks
  (16, 32, 64 channels; the 2nd and 3rd stages halve the resolution, a 1x1 convolution on
  their shortcut), global average pooling, dropout, a linear head.

meProp (``sparsify``) goes on every convolution and hidden linear layer, the head stays dense
(``--mode per_position``: the convolutions select per position, the linear layers per
example); ``--inner-only`` (ResNet): on each block's first convolution alone, whose output
feeds the block's second convolution and not the residual sum.
meSimp (``--method mesimp``) removes LeNet's filters and hidden units (each layer's consumer
found along the chain) and, in the ResNet, the filters of each block's first convolution
(with its BatchNorm and the second convolution's input channels: ``ResNet.simplify_pairs``);
the stem, the blocks' second convolutions and the shortcuts feed residual sums, whose channels
every block shares, and keep their width.
``--k`` is the number of output channels kept by the widest convolution; every other
sparsified layer keeps the same share of its outputs (at least 1): with ``resnet``, k=8 keeps
2 of 16, 4 of 32 and 8 of 64 channels (1/8 everywhere).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from meprop import MePropConfig, Pair, sparsify_
from meprop.convert import number_depths

__all__ = ["MODELS", "build_cnn", "sparsify", "sparsified_layers", "layer_k"]

MODELS = ("mlp", "lenet", "resnet")  # mlp: the paper's (meprop.experiments.tasks.mnist)

# The widths of the layers meSimp shrinks, as ``--hidden`` gives them to build a net of other
# widths (a dense net at the widths a meSimp run ended with): LeNet's conv1, conv2, fc1, fc2;
# the ResNet's six blocks' inner widths (each block's first convolution).
WIDTHS = {"lenet": (6, 16, 120, 84), "resnet": (16, 16, 32, 32, 64, 64)}


def build_lenet(classes: int, dropout: float, widths=WIDTHS["lenet"]) -> nn.Sequential:
    c1, c2, f1, f2 = widths

    def drop() -> list[nn.Module]:
        return [nn.Dropout(dropout)] if dropout > 0 else []

    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),  # the task's images come as (B, 784) rows
        nn.Conv2d(1, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # (B, c1, 14, 14)
        nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, c2, 5, 5)
        nn.Flatten(),
        nn.Linear(c2 * 25, f1), nn.ReLU(), *drop(),
        nn.Linear(f1, f2), nn.ReLU(), *drop(),
        nn.Linear(f2, classes),
    )  # fmt: skip


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (a 1x1 convolution where the shape
    changes): He et al.'s basic block."""

    def __init__(self, c_in: int, c_out: int, stride: int, inner: int | None = None) -> None:
        super().__init__()
        inner = inner or c_out  # the first convolution's width (meSimp shrinks it)
        self.conv1 = nn.Conv2d(c_in, inner, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Sequential):
    """The small ResNet: an ``nn.Sequential`` (its state_dict keys are the plain chain's) that
    tells meSimp which convolutions it may shrink (``meprop.simplify.find_pairs``)."""

    def simplify_pairs(self) -> list[Pair]:
        return [
            Pair(f"{i}.conv1", (f"{i}.conv2",), (f"{i}.bn1",))
            for i, block in enumerate(self)
            if isinstance(block, BasicBlock)
        ]


def build_resnet(
    classes: int, dropout: float, widths=(16, 32, 64), inner=WIDTHS["resnet"]
) -> nn.Sequential:
    blocks: list[nn.Module] = []
    c_in = widths[0]
    for stage, c in enumerate(widths):
        for b in range(2):
            mid = inner[2 * stage + b]
            blocks.append(BasicBlock(c_in, c, stride=2 if stage and not b else 1, inner=mid))
            c_in = c
    return ResNet(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
        *blocks,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        *([nn.Dropout(dropout)] if dropout > 0 else []),
        nn.Linear(c_in, classes),
    )  # fmt: skip


def build_cnn(model: str, classes: int, dropout: float, widths=None) -> nn.Sequential:
    """The network ``model``, at the widths of ``WIDTHS[model]`` or ``widths`` (as many)."""
    if model not in WIDTHS:
        raise ValueError(f"model must be 'lenet' or 'resnet' (a CNN), got {model!r}")
    widths = tuple(widths) if widths else WIDTHS[model]
    if len(widths) != len(WIDTHS[model]):
        raise ValueError(
            f"{model} takes {len(WIDTHS[model])} widths {WIDTHS[model]}, got {list(widths)}"
        )
    if model == "lenet":
        return build_lenet(classes, dropout, widths)
    return build_resnet(classes, dropout, inner=widths)


def sparsified_layers(model: nn.Module, inner_only: bool = False) -> list[nn.Module]:
    """The layers meProp goes on: every convolution and every linear layer but the head
    (``inner_only``: a ResNet's blocks' first convolutions alone)."""
    if inner_only:
        blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
        if not blocks:
            raise ValueError("inner_only picks a ResNet's blocks' first convolutions: this "
                             "model has no residual blocks (use it with --model resnet)")  # fmt: skip
        return [b.conv1 for b in blocks]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return convs + linears[:-1]


def _outputs(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def layer_k(k: int, outputs: int, widest: int) -> int:
    """The k of a layer with ``outputs`` outputs: the share k / ``widest`` of them, >= 1."""
    return max(1, round(k * outputs / widest))


def sparsify(model: nn.Module, config: MePropConfig, layers=None) -> nn.Module:
    """meProp on ``layers`` (default ``sparsified_layers(model)``), each keeping the share of
    its outputs that ``config.k`` is of the widest convolution's channels among them (with
    adaptive k, that share is the layer's upper bound, and ``min_k`` at most it)."""
    layers = sparsified_layers(model) if layers is None else layers
    widest = max(m.out_channels for m in layers if isinstance(m, nn.Conv2d))
    for m in layers:
        mode = config.mode
        if mode == "per_position" and isinstance(m, nn.Linear):
            mode = "per_example"  # (a linear layer's row is its one position)
        k = layer_k(config.k, _outputs(m), widest)
        adapt = config.adapt
        if adapt is not None and adapt.min_k > k:  # (a narrow layer's share is below --min-k)
            adapt = dataclasses.replace(adapt, min_k=k)
        sparsify_(m, dataclasses.replace(config, k=k, mode=mode, adapt=adapt))
    number_depths(model)  # adaptive k's depths over the whole net, not per layer's call
    return model
