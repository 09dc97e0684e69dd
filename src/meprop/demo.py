"""A one-minute demonstration: the same MLP trained with dense backprop and with meProp.

The data is synthetic (a random teacher network labels Gaussian inputs), so it runs anywhere
without downloads. It prints each run's final loss and accuracy and the time spent in backward.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from .config import MePropConfig
from .convert import hidden_layers, sparsify_


def make_data(n: int, d_in: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    teacher = torch.randn(d_in, classes, generator=gen)
    return x, (x @ teacher).argmax(1)


def train(model: nn.Module, x, y, steps: int, batch: int, seed: int) -> dict[str, float]:
    """Adam, cross-entropy; returns the final loss, accuracy on (x, y) and backward seconds."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    backward_s = 0.0
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,))
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss.backward()
        backward_s += time.perf_counter() - t0
        opt.step()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    return {"loss": loss.item(), "accuracy": acc, "backward_s": backward_s}


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    x, y = make_data(args.examples, args.input, 10, args.seed)
    torch.manual_seed(args.seed)
    dense = nn.Sequential(
        nn.Linear(args.input, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, 10),
    )
    sparse = sparsify_(
        copy.deepcopy(dense), MePropConfig(k=args.k, mode=args.mode), filter_fn=hidden_layers(dense)
    )
    results = {}
    for name, model in (("dense", dense), (f"meprop k={args.k}", sparse)):
        results[name] = r = train(model, x, y, args.steps, args.batch, args.seed)
        print(
            f"{name:>14}: loss {r['loss']:.4f}  train accuracy {r['accuracy']:.4f}  "
            f"backward {r['backward_s']:.2f} s"
        )
    d, s = (r["backward_s"] for r in results.values())
    print(
        f"backward time ratio (dense / meProp): {d / s:.2f}x  "
        f"[{torch.get_num_threads()} threads, torch {torch.__version__}]"
    )
    return results


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a small MLP on synthetic data, dense vs meProp",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--k", type=int, default=20, help="top-k kept per example")
    p.add_argument("--mode", default="per_example", choices=("per_example", "unified", "random"))
    p.add_argument("--hidden", type=int, default=500)
    p.add_argument("--input", type=int, default=784)
    p.add_argument("--examples", type=int, default=20000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
