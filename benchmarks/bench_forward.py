"""Forward (inference) time of a meSimp-simplified model against the full-size dense one.

meSimp removes units physically, so a simplified model's forward is cheaper. This script takes
a finished run (its ``config.json`` and a checkpoint), builds the task's full-size model with
random weights and the same model resized to the checkpoint's widths, and times both forwards
side by side in one run (``torch.utils.benchmark``, median), on inputs shaped like the task's
(MNIST: batches of images; other tasks: the first dev batch). Prints milliseconds, the ratio,
and the parameter counts, with the machine, torch version and thread count.

    python benchmarks/bench_forward.py runs/mnist-mesimp-k160-seed1
    python benchmarks/bench_forward.py runs/mnist-mesimp-k160-seed1 --checkpoint last.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

import meprop
from _timing import cpu_name
from meprop.experiments.tasks import get_task
from meprop.experiments.train import TrainConfig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", type=Path, help="a run directory (config.json and a checkpoint)")
    ap.add_argument("--checkpoint", default="best.pt")
    ap.add_argument("--batches", default="1,100,1000", help="batch sizes (mnist task)")
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--min-time", type=float, default=0.5)
    args = ap.parse_args(argv)

    cfg = TrainConfig.from_dict(json.loads((args.run / "config.json").read_text()))
    task = get_task(cfg, args.data_dir)
    full = task.build_model(cfg.widths(), cfg).eval()
    small = task.build_model(cfg.widths(), cfg).eval()
    meprop.load(args.run / args.checkpoint, small, restore_rng=False)
    print(
        f"# {cpu_name()}; torch {torch.__version__}; "
        f"{torch.get_num_threads()} threads; task {cfg.task}; widths {task.widths(full)} -> "
        f"{task.widths(small)}; parameters {sum(p.numel() for p in full.parameters()):,} -> "
        f"{sum(p.numel() for p in small.parameters()):,}"
    )
    if cfg.task == "mnist":
        x = task.splits["test"].images
        inputs = {f"batch {b}": (x[:b],) for b in map(int, args.batches.split(","))}
    else:  # one batch of the task's own shape: dev sentences (pos), parser states (parse)
        split = "train" if cfg.task == "parse" else "dev"  # parse batches only training states
        batch = next(task.batches(split, cfg.batch_size, torch.Generator().manual_seed(0)))
        inputs = {f"{split} batch of {cfg.batch_size}": batch[:1] + batch[2:]}
    print("| input | full ms | simplified ms | ratio |")
    print("|---|---|---|---|")
    for name, inp in inputs.items():
        times = []
        for model in (full, small):
            with torch.no_grad():
                t = Timer("model(*inp)", globals={"model": model, "inp": inp})
                times.append(t.blocked_autorange(min_run_time=args.min_time).median)
        print(
            f"| {name} | {1e3 * times[0]:.3f} | {1e3 * times[1]:.3f} | {times[0] / times[1]:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
