"""The parser's costs, measured side by side in one run: oracle features, decoding, backward.

1. Building the training examples (static oracle + the 48 features per state, in Python):
   microseconds per state, on UD English EWT train.
2. Greedy decoding of EWT dev, batched across sentences: sentences per second, and the share
   of the time spent in the model's forward (the rest is Python: features, legality,
   transitions). ``--checkpoint best.pt`` decodes with a trained parser (a run of
   ``meprop train parse``; its config.json beside it), else with an untrained one.
3. The hidden layer's backward at the parser's shapes, (B, 2400) -> 500, dense nn.Linear against
   meProp (k=20 per_example and unified), timed with ``torch.utils.benchmark`` as in
   ``bench_backward.py``, and whole training steps (forward, backward, Adam) of the parser.

    python benchmarks/bench_parser.py [--quick] [--checkpoint runs/parse/best.pt]

Needs UD English EWT (``$MEPROP_DATA`` or ``--data-dir``) for parts 1 and 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.benchmark import Timer

import meprop
from _timing import cpu_name
from meprop import MePropConfig, SparseLinear, sparsify_
from meprop.experiments.data import load_ud_ewt
from meprop.experiments.tasks.arcstandard import is_projective, oracle_examples
from meprop.experiments.tasks.parse import ParserMLP, Vocab, parse
from meprop.experiments.train import TrainConfig


class Timed(nn.Module):
    """Wraps a model; sums the seconds spent in its forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seconds, self.rows = model, 0.0, 0

    def forward(self, x):
        t0 = time.perf_counter()
        y = self.model(x)
        self.seconds += time.perf_counter() - t0
        self.rows += x.shape[0]
        return y


def bench_examples(train, vocab: Vocab) -> None:
    t0 = time.perf_counter()
    states = skipped = 0
    for s in train:
        if not is_projective(s.heads):
            skipped += 1
            continue
        _, gold = oracle_examples(s.heads, vocab.label_ids(s), *vocab.encode(s), vocab.transitions)
        states += len(gold)
    dt = time.perf_counter() - t0
    print(
        f"examples: {len(train)} sentences ({skipped} non-projective skipped), {states} states "
        f"in {dt:.2f} s: {1e6 * dt / states:.1f} us/state"
    )


def bench_decoding(model: nn.Module, dev, vocab: Vocab, batch_sizes) -> None:
    model.eval()
    for batch in batch_sizes:
        # one sentence at a time: the first 200 dev sentences only (it is slow)
        subset = dev if batch > 1 else dev[:200]
        enc = sorted((vocab.encode(s) for s in subset), key=lambda e: len(e[0]))
        timed = Timed(model)
        t0 = time.perf_counter()
        parse(timed, enc, vocab.transitions, batch_size=batch)
        dt = time.perf_counter() - t0
        print(
            f"decoding dev ({len(enc)} sentences, {timed.rows} states), {batch} sentences per "
            f"batch: {len(enc) / dt:.0f} sentences/s; forward {100 * timed.seconds / dt:.0f}% "
            f"of {dt:.2f} s"
        )


def bench_backward(batches, k: int, min_time: float) -> None:
    print("| batch | variant | hidden backward ms | dense / variant | step ms | dense / variant |")
    print("|---|---|---|---|---|---|")
    for batch in batches:
        x = torch.randn(batch, 2400, requires_grad=True)
        g = torch.randn(batch, 500)
        dense = nn.Linear(2400, 500)
        base = ParserMLP(12000, 50, 51, 103, [500])
        feats = torch.randint(0, 50, (batch, 48))
        gold = torch.randint(0, 103, (batch,))
        t_dense = t_step = None
        for label, mode in (
            ("dense", None),
            ("per_example", "per_example"),
            ("unified", "unified"),
        ):
            if mode is None:
                layer, model = dense, copy.deepcopy(base)
            else:
                layer = SparseLinear(2400, 500, config=MePropConfig(k=k, mode=mode))
                layer.load_state_dict(dense.state_dict())
                model = copy.deepcopy(base)
                sparsify_(model, MePropConfig(k=k, mode=mode), filter_fn=lambda m, n: n == "mlp.0")
            y = layer(x)
            params = [x, *layer.parameters()]

            def backward(y=y, params=params, g=g):
                for p in params:
                    p.grad = None
                y.backward(g, retain_graph=True)

            opt = torch.optim.Adam(model.parameters(), lr=1e-3)

            def step(model=model, opt=opt, feats=feats, gold=gold):
                loss = nn.functional.cross_entropy(model(feats), gold)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            backward()
            step()  # warm-up: compiles the kernels on first use
            t_b = Timer("f()", globals={"f": backward}).blocked_autorange(min_run_time=min_time)
            t_s = Timer("f()", globals={"f": step}).blocked_autorange(min_run_time=min_time)
            t_dense = t_dense or t_b.median
            t_step = t_step or t_s.median
            print(
                f"| {batch} | {label} | {1e3 * t_b.median:.2f} | {t_dense / t_b.median:.1f}x | "
                f"{1e3 * t_s.median:.1f} | {t_step / t_s.median:.2f}x |",
                flush=True,
            )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes, a training subset")
    ap.add_argument("--checkpoint", type=Path, help="a trained parser's best.pt or last.pt")
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--min-time", type=float, default=1.0)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"# {cpu_name()}; torch {torch.__version__}; {torch.get_num_threads()} threads")
    data = load_ud_ewt(root=args.data_dir, splits=("train", "dev"))
    train = data["train"][:2000] if args.quick else data["train"]
    tags = "xpos"
    if args.checkpoint is not None:
        cfg = TrainConfig.from_dict(
            json.loads((args.checkpoint.parent / "config.json").read_text())
        )
        train = data["train"][: cfg.train_limit] if cfg.train_limit else data["train"]
        tags = cfg.tags
    vocab = Vocab(train, tags)
    bench_examples(train, vocab)
    if args.checkpoint is not None:
        model = ParserMLP(
            len(vocab.words),
            len(vocab.tags),
            len(vocab.transitions.names),
            len(vocab.transitions),
            cfg.widths(),
            dropout=cfg.dropout,
            activation=cfg.activation,
        )
        meprop.load(args.checkpoint, model, restore_rng=False)
        print(
            f"decoding with {args.checkpoint} (hidden {[w.out_features for w in model.hidden_layers()]})"
        )
    else:
        model = ParserMLP(
            len(vocab.words), len(vocab.tags), len(vocab.transitions.names), len(vocab.transitions)
        )
    bench_decoding(model, data["dev"], vocab, (1000,) if args.quick else (1, 100, 1000))
    bench_backward((100, 1000) if args.quick else (100, 1000, 10000), args.k, args.min_time)
    return 0


if __name__ == "__main__":
    sys.exit(main())
