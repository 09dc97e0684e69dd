"""MNIST / Fashion-MNIST with an MLP: input -> hidden layers (ReLU, dropout) -> 10 classes.

The paper's setting is 784-500-500-10 with Adam (lr 1e-3); its split takes the first 5,000
training images as the dev set. meProp goes on the hidden layers; the output layer stays dense.
``--model lenet`` or ``resnet`` trains a convolutional network instead (``tasks.cnn``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meprop.convert import hidden_layers, sparsify_
from meprop.meact import IndexedBatch
from meprop.nn import Cube

from ..data import load_mnist
from ..settings import setting
from . import cnn

__all__ = ["build_mlp", "MnistTask", "MnistSettings"]


@dataclass(frozen=True)
class MnistSettings:
    """The mnist task's own settings (a run's ``TrainConfig`` has them)."""

    dataset: str = setting("mnist", "MNIST-style dataset (mnist task)", ("mnist", "fashion"))
    model: str = setting(
        "mlp",
        "mnist task: the network, the paper's MLP (mlp) or a CNN (lenet: LeNet-5; resnet: a "
        "small ResNet; --k then counts the widest convolution's channels, the other layers "
        "keep the same share; --layers does not apply, --hidden only as 4 widths for lenet "
        "(conv1, conv2, fc1, fc2) or 6 for resnet (the blocks' first convolutions))",
        cnn.MODELS,
    )
    bn_batches: int = setting(
        0,
        "mnist task, --model resnet: before each evaluation recompute the BatchNorm running "
        "statistics over this many training batches with the weights evaluated (precise BN; "
        "0: training's running averages). Its seconds count as training time",
    )
    inner_only: bool = setting(
        False,
        "mnist task, --model resnet: meProp on each residual block's first convolution only; "
        "the stem, the blocks' second convolutions and the shortcuts, whose outputs are added "
        "into the residual sum, stay dense (selecting in both convolutions of a block slows "
        "training most: docs/conv.md)",
    )


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "cube": Cube}


def build_mlp(
    d_in: int, widths: list[int], classes: int, dropout: float = 0.0, activation: str = "relu"
) -> nn.Sequential:
    """``nn.Sequential`` of Linear -> activation (-> Dropout) per hidden layer, then a Linear
    head.

    A plain Sequential, so meSimp finds its producer -> consumer pairs by itself.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(d_in, width), ACTIVATIONS[activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d_in = width
    layers.append(nn.Linear(d_in, classes))
    return nn.Sequential(*layers)


class MnistTask:
    metric = "accuracy"
    train_eval_size = 5000  # training examples scored each epoch for the learning curves
    dev_size = 5000  # the paper's split: the first 5,000 training images are the dev set

    def __init__(self, cfg, data_dir=None) -> None:
        data = load_mnist(cfg.dataset, root=data_dir, dev_size=self.dev_size)
        train = data.train
        if cfg.train_limit:
            train = type(train)(train.images[: cfg.train_limit], train.labels[: cfg.train_limit])
        self.splits = {
            "train": train,
            "train_eval": type(train)(
                train.images[: self.train_eval_size], train.labels[: self.train_eval_size]
            ),
            "dev": data.dev,
            "test": data.test,
        }
        self.d_in = train.images.shape[1]
        self.classes = data.num_classes
        self.cnn = cfg.model != "mlp"  # a convolutional network (tasks.cnn), not the MLP
        self.inner_only = bool(getattr(cfg, "inner_only", False))  # (ResNet: blocks' conv1)

    def build_model(self, widths: list[int], cfg) -> nn.Sequential:
        if self.cnn:  # (widths of the CNN's own count only: --hidden W1,W2,W3,W4 for lenet)
            own = len(widths) == len(cnn.WIDTHS[cfg.model])
            return cnn.build_cnn(cfg.model, self.classes, cfg.dropout, widths if own else None)
        return build_mlp(self.d_in, widths, self.classes, cfg.dropout, cfg.activation)

    def sparsify(self, model, config):
        """meProp on the hidden layers (a CNN: ``tasks.cnn.sparsify``, k per layer)."""
        if self.cnn:
            return cnn.sparsify(model, config, self.hidden_layers(model))
        return sparsify_(model, config, filter_fn=self.sparsify_filter(model))

    def sparsify_filter(self, model):
        return hidden_layers(model)

    def hidden_layers(self, model) -> list[nn.Module]:
        if self.cnn:
            return cnn.sparsified_layers(model, inner_only=self.inner_only)
        linears = [m for m in model if isinstance(m, nn.Linear)]
        return linears[:-1]

    def widths(self, model) -> list[int]:
        return [
            m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for m in self.hidden_layers(model)
        ]

    @staticmethod
    def dense_hidden(final_widths: dict[str, int]) -> tuple[int, ...]:
        """The hidden widths of a dense net the size of a meSimp'd one (one per layer)."""
        return tuple(final_widths.values())

    def num_examples(self, split: str) -> int:
        return len(self.splits[split].labels)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.splits["train"].labels) // batch_size)

    def batches(self, split: str, batch_size: int, generator: torch.Generator):
        x, y = self.splits[split]
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            yield IndexedBatch((x[idx], y[idx]), idx)  # unpacks as (x, y); .ids for meAct

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)  # mean over the batch

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict[str, float]:
        was_training = model.training
        model.eval()
        x, y = self.splits[split]
        correct = sum(
            int((model(x[i : i + 2000]).argmax(1) == y[i : i + 2000]).sum())
            for i in range(0, len(y), 2000)
        )
        model.train(was_training)
        return {"accuracy": correct / max(1, len(y))}
