"""meProp on the byte-level transformer LM (``meprop.experiments.tasks.lm``): the per_example stall and
unified's gap to dense (docs/per_example.md).

Builds the task's model and data through the library (``LmTask``, ``sparsify_``) and trains
with its own loop (fused Adam, as the trainer's), so that meProp can go on a subset of the MLP
projections (``--layers fc``: only ``mlp.fc``, whose output is the MLP width; ``proj``: only
``mlp.proj``, whose output is d_model), with a k per layer kind, or a selection rule the library
lacks (``--rule union``, from ``probe_per_example.py``). Prints the dev bits per byte every
``--eval-every`` steps and at the end, and the median training-step time (forward, backward,
optimizer; the first 5 steps excluded). With ``--probe``: per window, the sign balance of the
kept output-gradient entries of ``mlp.fc`` (sum g / sum |g|; < 0: they push the pre-activations
up), the mean norm of the MLP's hidden activation, and the logits' norm.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_lm.py --method unified --k 64 \\
        --hidden 512 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from meprop import MePropConfig, sparsify_
from meprop.experiments.tasks.lm import LmTask
from meprop.experiments.train import TrainConfig
from meprop.machine import summary_line

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_per_example import GradMask, MaskedLinear, mask_rule  # noqa: E402


class SeqUnifiedFn(torch.autograd.Function):
    """Unified top-k per sequence: each window (row of the batch) keeps the k columns of its own
    largest sum of |g| over its T positions, instead of one set for the whole batch. Batched
    GEMMs on the compacted gradient (B, T, k) and the gathered weight rows (B, k, in), so it
    costs what unified costs; dW sums the windows' (k, in) blocks into their rows; the bias gets
    the full gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, k):
        ctx.save_for_backward(x, weight)
        ctx.k = k
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        b, t, n = g.shape
        k = min(ctx.k, n)
        idx = g.abs().sum(1).topk(k, dim=1).indices  # (B, k)
        gc = g.gather(2, idx[:, None, :].expand(b, t, k))  # (B, T, k)
        w = weight[idx]  # (B, k, in)
        dx = torch.bmm(gc, w)
        dw = torch.zeros_like(weight).index_add_(
            0, idx.flatten(), torch.bmm(gc.transpose(1, 2), x).reshape(b * k, -1)
        )
        return dx, dw, g.sum((0, 1)), None


class SeqUnifiedLinear(nn.Linear):
    def __init__(self, lin: nn.Linear, k: int):
        super().__init__(lin.in_features, lin.out_features)
        self.weight, self.bias, self.k = lin.weight, lin.bias, k

    def forward(self, x):
        return SeqUnifiedFn.apply(x, self.weight, self.bias, self.k)


# --layers: the name endings of the linear layers that get the selection
LAYERS = {"both": (".mlp.fc", ".mlp.proj"), "fc": (".mlp.fc",), "proj": (".mlp.proj",)}


def build(task, cfg, args, method: str) -> nn.Module:
    """The task's model from the seed, with ``method``'s selection on the ``--layers``."""
    torch.manual_seed(args.seed)
    model = task.build_model(cfg.widths(), cfg)
    k_of = {".mlp.fc": args.k, ".mlp.proj": args.k_proj or args.k}
    if method == "dense":
        return model
    for end in LAYERS[args.layers]:
        if args.rule:
            for block in model.blocks:
                name = end.split(".")[-1]
                lin = getattr(block.mlp, name)
                new = (
                    SeqUnifiedLinear(lin, k_of[end])
                    if args.rule == "seq"
                    else MaskedLinear(lin, k_of[end], args.rule)
                )
                setattr(block.mlp, name, new)
        else:
            sparsify_(
                model,
                MePropConfig(k=k_of[end], mode=method),
                filter_fn=lambda m, n, end=end: n.endswith(end),
            )
    return model


def make_opt(model: nn.Module, args) -> torch.optim.Optimizer:
    """Fused Adam; the weights of the meProp layers at ``--sparse-lr-mult`` times the lr."""
    sparse = [
        p
        for n, p in model.named_parameters()
        if args.sparse_lr_mult != 1
        and n.endswith(tuple(e[1:] + ".weight" for e in LAYERS[args.layers]))
    ]
    ids = {id(p) for p in sparse}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": rest}] + (
        [{"params": sparse, "lr": args.lr * args.sparse_lr_mult}] if sparse else []
    )
    return torch.optim.Adam(groups, lr=args.lr, fused=True)


def time_steps(task, cfg, args) -> int:
    """Training steps of dense and of the run's method on the same batches, in turn (so both
    see the same moments of a shared machine): the median of each and their ratio."""
    models = {m: build(task, cfg, args, m) for m in ("dense", args.method)}
    opts = {m: make_opt(v, args) for m, v in models.items()}
    times: dict[str, list[float]] = {m: [] for m in models}
    gen = torch.Generator().manual_seed(args.seed)
    for i, batch in enumerate(task.batches("train", args.batch_size, gen)):
        if i >= args.time_steps:
            break
        for m, model in models.items():
            t0 = time.perf_counter()
            task.loss(model, batch).backward()
            opts[m].step()
            opts[m].zero_grad(set_to_none=True)
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(t[3:]) * 1000 for m, t in times.items()}
    print(
        f"T dense {med['dense']:.1f} ms/step, {args.method} {med[args.method]:.1f} ms/step:"
        f" {med['dense'] / med[args.method]:.2f}x ({args.time_steps} steps each, in turn)",
        flush=True,
    )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", default="unified", choices=["dense", "per_example", "unified"])
    p.add_argument("--k", type=int, default=64, help="k of mlp.fc (and of mlp.proj, see --k-proj)")
    p.add_argument("--k-proj", type=int, default=0, help="k of mlp.proj (0: --k)")
    p.add_argument("--layers", default="both", choices=["both", "fc", "proj"])
    p.add_argument(
        "--rule",
        default="",
        choices=[
            "",
            "per_example",
            "unified",
            "union",
            "seq",
            "unified_l2",
            "random_cols",
            "gumbel",
            "explore",
            "unified_dw",
            "unified_dx",
        ],
        help="this script's selection instead of the library's: a masked reference, or seq"
        " (unified per window, batched GEMMs)",
    )
    p.add_argument("--hidden", type=int, default=512, help="MLP width (d_model = hidden / 4)")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--dense-steps",
        type=int,
        default=0,
        help="with --rule: the first N steps back-propagate the whole gradient (dense warm-up)",
    )
    p.add_argument(
        "--sparse-lr-mult",
        type=float,
        default=1.0,
        help="learning-rate multiplier for the meProp layers' weights (e.g. sqrt(n/k))",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between dev evaluations")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--probe", action="store_true")
    p.add_argument(
        "--time-steps",
        type=int,
        default=0,
        help="only time this many steps of dense and of --method in turn (no training run)",
    )
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--json", default="")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    print(f"# {summary_line()}; torch {torch.__version__}", flush=True)
    print(f"# {' '.join(sys.argv)}", flush=True)

    cfg = TrainConfig(
        task="lm", hidden=(args.hidden,), layers=args.blocks, train_limit=args.train_limit
    )
    task = LmTask(cfg, args.data_dir)
    if args.time_steps:
        return time_steps(task, cfg, args)
    model = build(task, cfg, args, args.method)
    k_of = {".mlp.fc": args.k, ".mlp.proj": args.k_proj or args.k}
    opt = make_opt(model, args)

    stats: dict[str, list] = {}
    if args.probe:
        rule = args.rule or args.method
        rule = "unified" if rule == "seq" else rule  # (the probe's sign: batch-wide unified)

        def fwd_fc(mod, inp, out):
            if not out.requires_grad:
                return
            stats.setdefault("act", []).append(float(nn.functional.gelu(out).norm(dim=-1).mean()))

            def bwd(g):
                g = g.reshape(-1, g.shape[-1])
                kept = g if rule == "dense" else g * mask_rule(g, k_of[".mlp.fc"], rule)
                stats.setdefault("sign_kept", []).append(float(kept.sum() / kept.abs().sum()))
                stats.setdefault("sign_all", []).append(float(g.sum() / g.abs().sum()))

            out.register_hook(bwd)

        def fwd_head(mod, inp, out):
            if not out.requires_grad:
                return
            stats.setdefault("logit", []).append(float(out.norm(dim=-1).mean()))

        for block in model.blocks:
            block.mlp.fc.register_forward_hook(fwd_fc)
        model.head.register_forward_hook(fwd_head)

    record = {"args": vars(args), "evals": [], "windows": []}
    step, times, window = 0, [], []
    for epoch in range(args.epochs):
        model.train()
        gen = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        for batch in task.batches("train", args.batch_size, gen):
            GradMask.dense = step < args.dense_steps
            t0 = time.perf_counter()
            loss = task.loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            window.append(float(loss.detach()))
            step += 1
            if args.probe and step % args.log_every == 0:
                w = {"step": step, "loss": sum(window) / len(window)}
                w.update({k: sum(v) / len(v) for k, v in stats.items()})
                stats.clear()
                window.clear()
                record["windows"].append(w)
                print(
                    "W "
                    + " ".join(f"{k} {v:.3f}" if k != "step" else f"{v}" for k, v in w.items()),
                    flush=True,
                )
            if args.eval_every and step % args.eval_every == 0:
                dev = task.evaluate(model, "dev")["bpb"]
                record["evals"].append({"step": step, "dev_bpb": dev})
                print(f"D step {step} dev bpb {dev:.4f}", flush=True)
    dev = task.evaluate(model, "dev")["bpb"]
    ms = statistics.median(times[5:]) * 1000
    record.update(dev_bpb=dev, ms_per_step=ms, steps=step)
    print(f"R {args.method} dev bpb {dev:.4f} steps {step} median {ms:.1f} ms/step", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    raise SystemExit(main())
