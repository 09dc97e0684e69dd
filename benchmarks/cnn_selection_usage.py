"""How evenly a CNN's meProp layers select their channels: an analysis, not a timing.

Trains the mnist task's ResNet (or LeNet) with meProp for ``--steps`` steps on MNIST (batch 50,
Adam, the trainer's settings) with every SparseConv2d's usage record on (``layer.usage``: per
channel, the examples that kept it), then prints the training loss (``dense``: the same
training without meProp, for comparison) and, per layer, the share of all selections held by
the k most selected channels (k / C_out if every channel were kept equally often) and the
channels never kept. A high share means the selection keeps returning to the same filters, so
the others learn only through the layers around them (docs/conv.md).

    MEPROP_DATA=... python benchmarks/cnn_selection_usage.py --model resnet --k 8 --steps 300
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
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = MnistTask(SimpleNamespace(dataset="mnist", train_limit=0, model=args.model))
    images, labels = task.splits["train"]
    for mode in args.modes.split(","):
        torch.manual_seed(args.seed)
        model = cnn.build_cnn(args.model, 10, 0.1)
        if mode != "dense":  # (dense: the training loss to compare with, no selection)
            model = cnn.sparsify(model, MePropConfig(k=args.k, mode=mode, memory=args.memory))
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
        print(f"\n{args.model}, {mode}{memory}, k={args.k} (widest), {args.steps} steps, seed "
              f"{args.seed}: training loss {loss:.3f} (mean of the last 50 steps)\n")  # fmt: skip
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


if __name__ == "__main__":
    sys.exit(main())
