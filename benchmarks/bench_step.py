"""One full training step (forward, backward, optimizer) of the MNIST MLP 784-500-500-10.

Dense nn.Linear with Adam against meProp (k=20 on the hidden layers, the output layer dense)
with Adam, and with row-sparse gradients under Adagrad and SparseAdam (only the touched rows
are updated), timed side by side in one run: the 10th percentile of per-step times, every
variant timed in turn in ``--rounds`` rounds, each keeping its fastest round (see
``_timing.py``). Prints milliseconds per step and the ratio dense Adam / variant.

    python benchmarks/bench_step.py [--quick] [--k 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch
from torch import nn

from _timing import best_of_rounds, environment, load_average
from meprop import MePropConfig, SparseLinear, hidden_layers, sparsify_


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10)
    )


def optimizers(model: nn.Module, kind: str) -> list[torch.optim.Optimizer]:
    """``kind`` for all parameters; SparseAdam needs the dense ones on a second optimizer."""
    if kind == "adam":
        return [torch.optim.Adam(model.parameters(), lr=1e-3)]
    if kind == "adagrad":
        return [torch.optim.Adagrad(model.parameters(), lr=1e-2)]
    sparse = [
        m.weight for m in model.modules() if isinstance(m, SparseLinear) and m.config.sparse_grad
    ]
    rest = [p for p in model.parameters() if all(p is not q for q in sparse)]
    return [torch.optim.SparseAdam(sparse, lr=1e-3), torch.optim.Adam(rest, lr=1e-3)]


def make_step(model, opts, x, y):
    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()

    for _ in range(3):  # warm-up: kernels, optimizer state
        step()
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each keeps its fastest")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # torch's Adagrad builds sparse tensors without checks and says so at every step.
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    torch.manual_seed(0)
    print(
        f"# torch {torch.__version__}; {torch.get_num_threads()} threads; MLP 784-500-500-10; "
        f"k={args.k} on the hidden layers; load average {load_average()}"
    )
    print(environment())
    print("| batch | variant | ms/step | dense Adam / variant |")
    print("|---|---|---|---|")
    variants = [
        ("meProp per_example, Adam", "per_example", False, "adam"),
        ("meProp unified, Adam", "unified", False, "adam"),
        ("meProp per_example, row-sparse Adagrad", "per_example", True, "adagrad"),
        ("meProp per_example, row-sparse SparseAdam", "per_example", True, "sparseadam"),
        ("meProp unified, row-sparse SparseAdam", "unified", True, "sparseadam"),
    ]
    for batch in (100,) if args.quick else (10, 100):
        base = mlp()
        x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
        dense_ada = copy.deepcopy(base)
        steps = {
            "dense, Adam": make_step(base, optimizers(base, "adam"), x, y),
            "dense, Adagrad": make_step(dense_ada, optimizers(dense_ada, "adagrad"), x, y),
        }
        for label, mode, sparse_grad, opt in variants:
            model = copy.deepcopy(base)
            sparsify_(
                model,
                MePropConfig(k=args.k, mode=mode, sparse_grad=sparse_grad),
                filter_fn=hidden_layers(model),
            )
            steps[label] = make_step(model, optimizers(model, opt), x, y)
        t = best_of_rounds(steps, args.rounds, args.min_time)
        for label, sec in t.items():
            print(f"| {batch} | {label} | {1e3 * sec:.3f} | {t['dense, Adam'] / sec:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
