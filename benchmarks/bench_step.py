"""One full training step (forward, backward, optimizer) of the MNIST MLP, dense vs meProp.

784-500-500-10 (the paper's net), meProp with k on the hidden layers (the output layer dense),
and the same MLP at the hidden widths meSimp leaves it (``--mesimp-widths``; default 153,321:
the README's MNIST run of meSimp k=160 per_example, 20 epochs), dense and meProp. Every side
gets the optimizer the trainer builds (``meprop.experiments.train.make_optimizer``: torch's fused Adam
and Adagrad), so optimizer speed-ups count for dense as for meProp. The variants:

* Adam, dense gradients: the trainer's default; Adam's moments move every row each step, so
  the update costs as much as dense's.
* row-sparse gradients (``sparse_grad=True``) with SGD or Adagrad: only the touched rows are
  updated, with the same semantics as the dense-gradient step (rows with a zero gradient do
  not move under plain SGD; Adagrad's sums do not change there).
* row-sparse with SparseAdam (+ Adam for the other parameters): only the touched rows move.
  SparseAdam is *not* Adam: it is lazy, updating a row's moments and weights only in steps
  where the row has a gradient, where Adam decays the moments and moves every row every step.
  Its training differs from Adam's.
* row-sparse with ``meprop.LazyAdam`` (one optimizer for all parameters): the same lazy rule
  as SparseAdam, in one pass over the kept rows (C++), torch's fused Adam for the dense
  gradients. Compared with dense Adam, whose semantics it approximates.

Timed side by side in one run: the 10th percentile of per-step times, every variant timed in
turn in ``--rounds`` rounds, each keeping its fastest round (see ``_timing.py``). Prints
milliseconds per step, the ratio dense Adam (784-500-500-10) / variant, and the ratio to the
dense step at the variant's own widths with the optimizer whose semantics it has (Adam for
SparseAdam).

    python benchmarks/bench_step.py [--quick] [--k 20] [--threads 1] [--mesimp-widths 153,321]
    python benchmarks/bench_step.py --quick --hidden 2000,2000 --k 320 --threads 1
    python benchmarks/bench_step.py --quick --k 40 --threads 1 --memory 0.8
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch
from torch import nn

from _timing import best_of_rounds, cpu_name, environment, load_average
from meprop import MePropConfig, SparseLinear, hidden_layers, sparsify_
from meprop.experiments.train import make_optimizer

FULL = (500, 500)
# (label, mode or None for dense, sparse_grad, optimizer, the dense optimizer it is compared to)
VARIANTS = [
    ("dense, Adam", None, False, "adam", "adam"),
    ("dense, Adagrad", None, False, "adagrad", "adagrad"),
    ("dense, SGD", None, False, "sgd", "sgd"),
    ("meProp per_example, Adam", "per_example", False, "adam", "adam"),
    ("meProp unified, Adam", "unified", False, "adam", "adam"),
    ("meProp per_example, row-sparse SGD", "per_example", True, "sgd", "sgd"),
    ("meProp per_example, row-sparse Adagrad", "per_example", True, "adagrad", "adagrad"),
    ("meProp per_example, row-sparse SparseAdam (lazy)", "per_example", True, "sparseadam", "adam"),
    ("meProp unified, row-sparse SparseAdam (lazy)", "unified", True, "sparseadam", "adam"),
    ("meProp per_example, row-sparse LazyAdam", "per_example", True, "lazy_adam", "adam"),
    ("meProp unified, row-sparse LazyAdam", "unified", True, "lazy_adam", "adam"),
]
MESIMP_VARIANTS = [
    ("dense, Adam", None, False, "adam", "adam"),
    ("meProp per_example, Adam", "per_example", False, "adam", "adam"),
    ("meProp unified, Adam", "unified", False, "adam", "adam"),
]
LR = {"adam": 1e-3, "adagrad": 1e-2, "sgd": 0.1, "lazy_adam": 1e-3}
# --memory R adds these (MePropConfig.memory: the memorized sparse back-propagation's cost)
MEMORY_VARIANTS = [
    ("meProp per_example, Adam, memory", "per_example", False, "adam", "adam"),
    ("meProp unified, Adam, memory", "unified", False, "adam", "adam"),
]


def mlp(widths=FULL) -> nn.Sequential:
    layers, fan_in = [], 784
    for w in widths:
        layers += [nn.Linear(fan_in, w), nn.ReLU()]
        fan_in = w
    return nn.Sequential(*layers, nn.Linear(fan_in, 10))


def optimizers(model: nn.Module, kind: str) -> list[torch.optim.Optimizer]:
    """The trainer's optimizer ``kind`` for all parameters; SparseAdam takes the row-sparse
    weights and the trainer's Adam the others."""
    sparse = [
        m.weight for m in model.modules() if isinstance(m, SparseLinear) and m.config.sparse_grad
    ]
    if kind != "sparseadam":
        return [make_optimizer(kind, model.parameters(), LR[kind], sparse_grad=bool(sparse))]
    rest = [p for p in model.parameters() if all(p is not q for q in sparse)]
    return [torch.optim.SparseAdam(sparse, lr=1e-3), make_optimizer("adam", rest, 1e-3)]


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


def steps_for(widths, variants, k: int, x, y, memory: float = 0.0) -> dict:
    base = mlp(widths)
    steps = {}
    for label, mode, sparse_grad, opt, _ in variants:
        model = copy.deepcopy(base)
        if mode is not None:
            mem = memory if label.endswith(", memory") else 0.0
            sparsify_(
                model,
                MePropConfig(k=k, mode=mode, sparse_grad=sparse_grad, memory=mem),
                filter_fn=hidden_layers(model),
            )
        steps[(widths, label)] = make_step(model, optimizers(model, opt), x, y)
    return steps


def _widths(text: str) -> tuple[int, ...]:
    return tuple(int(w) for w in text.split(","))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 50 only")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--hidden", type=_widths, default=FULL, help="hidden widths (500,500)")
    ap.add_argument("--batches", type=_widths, default=(10, 50, 100), help="e.g. 10,50,100")
    ap.add_argument(
        "--mesimp-widths",
        type=_widths,
        default=(153, 321),
        help="hidden widths meSimp ends with (default: the README's MNIST meSimp k=160 run)",
    )
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each keeps its fastest")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument(
        "--memory", type=float, default=0.0,
        help="also time meProp with MePropConfig(memory=R) (per_example and unified, Adam)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    full = VARIANTS + (MEMORY_VARIANTS if args.memory else [])
    if args.threads:
        torch.set_num_threads(args.threads)
    # torch's Adagrad builds sparse tensors without checks and says so at every step.
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    torch.manual_seed(0)
    simp, wide = args.mesimp_widths, args.hidden
    print(
        f"# {cpu_name()}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
        f"load average {load_average()}"
    )
    print(
        f"# MLP 784-{'-'.join(map(str, wide))}-10 and 784-{'-'.join(map(str, simp))}-10 "
        "(meSimp's widths); "
        f"k={args.k} on the hidden layers; optimizers as the trainer builds them "
        "(fused Adam, Adagrad)"
    )
    print(environment())
    print(
        f"| batch | hidden | variant | ms/step | dense Adam {','.join(map(str, wide))} / variant | "
        "dense at its widths, same optimizer / variant |"
    )
    print("|---|---|---|---|---|---|")
    for batch in (50,) if args.quick else args.batches:
        x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
        steps = steps_for(wide, full, args.k, x, y, args.memory)
        steps.update(steps_for(simp, MESIMP_VARIANTS, args.k, x, y))
        t = best_of_rounds(steps, args.rounds, args.min_time)
        ref = t[(wide, "dense, Adam")]
        for widths, variants in ((wide, full), (simp, MESIMP_VARIANTS)):
            for label, _, _, _, dense_opt in variants:
                sec = t[(widths, label)]
                same = {"adam": "dense, Adam", "adagrad": "dense, Adagrad", "sgd": "dense, SGD"}
                own = t[(widths, same[dense_opt])] / sec
                print(
                    f"| {batch} | {','.join(map(str, widths))} | {label} | {1e3 * sec:.3f} | "
                    f"{ref / sec:.2f}x | {own:.2f}x |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
