"""How evenly a CNN's meProp layers select their channels: an analysis, not a timing.

Trains the mnist task's ResNet (or LeNet) with meProp for ``--steps`` steps on MNIST (batch 50,
Adam, the trainer's settings) with every SparseConv2d's usage record on (``layer.usage``: per
channel, the examples that kept it), then prints the training loss (``dense``: the same
training without meProp, for comparison) and, per layer, the share of all selections held by
the k most selected channels (k / C_out if every channel were kept equally often) and the
channels never kept. A high share means the selection keeps returning to the same filters, so
the others learn only through the layers around them (docs/conv.md).

``--layers`` (ResNet) picks which convolutions select: ``all`` (the task's default), ``inner``
(each block's first convolution: the task's ``--inner-only``), ``second`` (each block's second
convolution alone), ``not-second`` (all but the second convolutions). With ``--dev`` it also
prints the accuracy on 2,000 dev images with BatchNorm in batch-statistics mode (dropout off):
after a few hundred steps the running averages lag the weights.

    MEPROP_DATA=... python benchmarks/cnn_selection_usage.py --model resnet --k 8 --steps 300
    MEPROP_DATA=... python benchmarks/cnn_selection_usage.py --modes unified --steps 400 \
        --layers all,inner,second,not-second --dev
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import torch

from meprop import MePropConfig, SparseConv2d
from meprop.experiments.tasks import cnn
from meprop.experiments.tasks.mnist import MnistTask
from meprop.experiments.train import make_optimizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="resnet", choices=("lenet", "resnet"))
    ap.add_argument("--k", type=int, default=8, help="channels the widest convolution keeps")
    ap.add_argument("--modes", default="dense,unified,per_example")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--memory", type=float, default=0.0, help="MePropConfig.memory (0: off)")
    ap.add_argument("--layers", default="all", help="ResNet: all,inner,second,not-second")
    ap.add_argument("--dev", action="store_true", help="also the dev accuracy (batch stats)")
    args = ap.parse_args(argv)
    runs = [(mode, "all") for mode in args.modes.split(",") if mode == "dense"]
    runs += [(mode, layers) for layers in args.layers.split(",")
             for mode in args.modes.split(",") if mode != "dense"]  # fmt: skip
    torch.set_num_threads(1)
    task = MnistTask(SimpleNamespace(dataset="mnist", train_limit=0, model=args.model))
    images, labels = task.splits["train"]
    for mode, layers in runs:
        torch.manual_seed(args.seed)
        model = cnn.build_cnn(args.model, 10, 0.1)
        if mode != "dense":  # (dense: the training loss to compare with, no selection)
            config = MePropConfig(k=args.k, mode=mode, memory=args.memory)
            _sparsify(model, config, layers)
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseConv2d)]
        for _, m in convs:
            m.usage = (torch.zeros(m.out_channels), torch.zeros(1))
        opt = make_optimizer("adam", model.parameters(), 1e-3)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
        losses = []
        for step in range(args.steps):
            idx = order[step * 50 : (step + 1) * 50]
            loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        loss = sum(losses[-50:]) / len(losses[-50:])  # the last 50 steps' mean
        memory = f", memory {args.memory:g}" if args.memory else ""
        where = f", {layers} convolutions" if mode != "dense" else ""
        dev = f", dev accuracy {100 * _dev_accuracy(model, task):.2f}%" if args.dev else ""
        print(f"\n{args.model}, {mode}{memory}{where}, k={args.k} (widest), {args.steps} steps, "
              f"seed {args.seed}: training loss {loss:.3f} (mean of the last 50 steps){dev}\n")  # fmt: skip
        if not convs:
            continue
        print("| layer | C_out | k | top-k channels' share of selections | if even | never kept |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, m in convs:
            counts = m.usage[0]
            share = (counts / counts.sum()).sort(descending=True).values[: m.config.k].sum()
            even = m.config.k / m.out_channels
            never = int((counts == 0).sum())
            print(
                f"| {name} | {m.out_channels} | {m.config.k} | {share:.2f} | {even:.2f} | {never} |"
            )
    return 0


def _sparsify(model: torch.nn.Module, config: MePropConfig, layers: str) -> None:
    """meProp (``tasks.cnn.sparsify``: each layer the task's share of its channels) on the
    task's layers (``all``), or on a ResNet's blocks' first (``inner``) or second (``second``)
    convolutions, or on all but the second (``not-second``)."""
    if layers == "all":
        cnn.sparsify(model, config)
        return
    if layers not in ("inner", "second", "not-second"):
        raise SystemExit(f"--layers takes all, inner, second or not-second, got {layers!r}")
    if not any(isinstance(m, cnn.BasicBlock) for m in model.modules()):
        raise SystemExit(f"--layers {layers} needs --model resnet (residual blocks)")
    if layers == "inner":  # (the task's --inner-only)
        picked = cnn.sparsified_layers(model, inner_only=True)
    else:  # the blocks' second convolutions, or every convolution but those
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        picked = [m for n, m in convs if n.endswith(".conv2") == (layers == "second")]
    cnn.sparsify(model, config, picked)


@torch.no_grad()
def _dev_accuracy(model: torch.nn.Module, task) -> float:
    """Accuracy on the first 2,000 dev images, BatchNorm on batch statistics (batches of 500),
    dropout off."""
    images, labels = task.splits["dev"]
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    hits = sum(
        int((model(images[i : i + 500]).argmax(1) == labels[i : i + 500]).sum())
        for i in range(0, 2000, 500)
    )
    return hits / 2000


if __name__ == "__main__":
    sys.exit(main())
