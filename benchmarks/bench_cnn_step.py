"""One full training step (forward, backward, Adam) of the mnist task's CNNs, dense vs meProp.

The networks of ``meprop train mnist --model lenet|resnet`` (``meprop.experiments.tasks.cnn``),
meProp on every convolution and hidden linear layer at k = 1/8 and 1/16 of the channels
(``--k`` counts the widest convolution's: LeNet 16, the ResNet 64), the head dense, and
per_position at 1/8 (its selection by the C++ kernel, by torch.topk, and with memory 0.8; the
linear layers per_example, as the task converts them); a batch of MNIST-shaped images
(random: the time does not depend on the values). Every side gets the trainer's optimizer
(``make_optimizer``: fused Adam). The ResNet also with meProp on each block's first convolution only (the task's
``--inner-only``), at 1/8 and 1/16. ``--compacted``: also unified and per_example at 1/8 with
every convolution's backward on PyTorch's compacted form (no direct C++ kernel; the linear
layers as always), to measure what the kernel adds. Timed side by side in one run, every variant in turn in
``--rounds`` rounds, each keeping its fastest (``_timing.py``). Prints milliseconds per step
and the ratio dense / variant.

    python benchmarks/bench_cnn_step.py [--models lenet,resnet] [--batch 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import nn

from _timing import best_of_rounds, conv_forced, cpu_name, environment, load_average
from meprop import MePropConfig
from meprop.experiments.tasks import cnn
from meprop.experiments.train import make_optimizer

WIDEST = {"lenet": 16, "resnet": 64}
PER_POSITION = {
    "per_position": dict(mode="per_position"),
    "per_position, torch.topk selection": dict(mode="per_position", backend="masked"),
    "per_position, memory 0.8": dict(mode="per_position", memory=0.8),
}


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = make_optimizer("adam", model.parameters(), 1e-3)

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: the dispatch's timing, the optimizer state
        step()
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="lenet,resnet")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--compacted", action="store_true", help="also 1/8 without the direct kernel")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}; {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
          f"load {load_average()}")  # fmt: skip
    print(environment())
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 784), torch.randint(0, 10, (args.batch,))
    print("| model | variant | k (widest conv) | ms/step | dense / variant |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in args.models.split(","):
        base = cnn.build_cnn(name, 10, dropout=0.1)
        widest = WIDEST[name]
        variants = {"dense": make_step(copy.deepcopy(base), x, y)}
        for share, k in (("1/8", widest // 8), ("1/16", widest // 16)):
            for mode in ("unified", "per_example"):
                model = cnn.sparsify(copy.deepcopy(base), MePropConfig(k=k, mode=mode))
                variants[f"{mode} {share}|{k}"] = make_step(model, x, y)
        # the ResNet with meProp on each block's first convolution only (--inner-only)
        for share, k in (("1/8", widest // 8), ("1/16", widest // 16)) if name == "resnet" else ():
            for mode in ("unified", "per_example"):
                model = copy.deepcopy(base)
                inner = cnn.sparsified_layers(model, inner_only=True)
                cnn.sparsify(model, MePropConfig(k=k, mode=mode), inner)
                variants[f"{mode} {share}, inner convolutions|{k}"] = make_step(model, x, y)
        k = widest // 8
        for mode in ("unified", "per_example") if args.compacted else ():
            model = cnn.sparsify(copy.deepcopy(base), MePropConfig(k=k, mode=mode))
            step = conv_forced(make_step(model, x, y), "torch")
            step()  # (its warm-up)
            variants[f"{mode} 1/8, compacted convolutions|{k}"] = step
        # per_position at 1/8 (PER_POSITION's three forms)
        for label, kw in PER_POSITION.items():
            model = cnn.sparsify(copy.deepcopy(base), MePropConfig(k=k, **kw))
            variants[f"{label} 1/8|{k}"] = make_step(model, x, y)
        times = best_of_rounds(variants, args.rounds, args.min_time)
        dense = times["dense"]
        for label, t in times.items():
            variant, _, k = label.partition("|")
            print(f"| {name} | {variant} | {k or '-'} | {1e3 * t:.2f} | {dense / t:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
