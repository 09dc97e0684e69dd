"""Why per_example meProp trains unstably early on MNIST, and what fixes it (docs/per_example.md).

Trains the paper's MNIST MLP (784-500-500-10, ReLU, dropout, batch 50) with meProp on the two
hidden layers through the library's API (``sparsify_``, ``MePropConfig``), in its own loop, so
that the optimizer can be swapped for the candidate fixes:

- ``--opt adam`` (torch's, ``--eps``), ``lazyadam`` (Adam whose moments and step are updated only
  for the rows of a meProp layer's weight that got a gradient this step, each row with its own
  step count for the bias correction; other parameters plain Adam), ``adagrad``, ``sgd``;
- ``--clip`` (global gradient-norm clipping), ``--lr``, ``--k``, ``--mode``, ``--sparse-bias``.

With ``--probe`` it records, every ``--log-every`` steps of the first ``--probe-epochs`` epochs:
the mean loss, each layer's weight-gradient and update norms, the per-coordinate RMS of each
updated row's step in units of lr (mean and max over rows, and for rows whose last gradient
was long ago), the hidden activations' and logits' norms, and how the top-k selections spread
over the hidden units (distinct units, Gini, normalised entropy, share of the top 10%). The
selections are recomputed from the full output gradient (a tensor hook on each hidden layer's
output) with the same rule as the layer (top-k of |g| per row, or of the column sums).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_per_example.py --mode per_example \\
        --k 20 --epochs 3 --probe
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from torch import nn

from meprop import MePropConfig, sparsify_
from meprop.experiments.data import load_mnist
from meprop.experiments.tasks.mnist import build_mlp
from meprop.machine import summary_line


class LazyAdam(torch.optim.Optimizer):
    """Adam; for the parameters in ``row_sparse`` (2-D weights whose gradient is zero outside
    the rows meProp selected), only the rows with a non-zero gradient update their moments and
    take a step, each row with its own step count (a row's first update is lr-sized, as a dense
    Adam's first step). The other parameters: plain Adam."""

    def __init__(self, params, row_sparse, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.row_sparse = {id(p) for p in row_sparse}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, st = p.grad, self.state[p]
                if not st:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                    shape = (p.shape[0], 1) if id(p) in self.row_sparse else ()
                    st["t"] = torch.zeros(shape, dtype=p.dtype)
                m, v, t = st["m"], st["v"], st["t"]
                if id(p) in self.row_sparse:
                    rows = (g != 0).any(dim=1).nonzero().squeeze(1)
                    if rows.numel() == 0:
                        continue
                    gr = g[rows]
                    mr = m[rows].mul_(b1).add_(gr, alpha=1 - b1)
                    vr = v[rows].mul_(b2).addcmul_(gr, gr, value=1 - b2)
                    tr = t[rows] + 1
                    m[rows], v[rows], t[rows] = mr, vr, tr
                    step = (mr / (1 - b1**tr)) / ((vr / (1 - b2**tr)).sqrt() + eps)
                    p[rows] -= lr * step
                else:
                    t += 1
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    step = (m / (1 - b1 ** float(t))) / ((v / (1 - b2 ** float(t))).sqrt() + eps)
                    p -= lr * step


def mask_rule(g: torch.Tensor, k: int, rule: str) -> torch.Tensor:
    """The 0/1 mask a selection ``rule`` keeps of an output gradient ``g`` (rows = examples).

    per_example: each row's k largest |g|; unified: the k columns of largest sum |g|;
    symmetric: each row's k/2 most negative and k/2 most positive entries; union: every entry
    of the columns some row's per_example top-k picked (the same rows of dW as per_example,
    each dense over the batch)."""
    k = min(k, g.shape[1])
    mask = torch.zeros_like(g)
    if rule == "per_example":
        mask.scatter_(1, g.abs().topk(k, dim=1).indices, 1.0)
    elif rule == "unified":
        mask[:, g.abs().sum(0).topk(k).indices] = 1.0
    elif rule == "symmetric":
        h = k // 2
        mask.scatter_(1, g.topk(h, dim=1).indices, 1.0)
        mask.scatter_(1, (-g).topk(k - h, dim=1).indices, 1.0)
        mask *= g != 0
    elif rule == "unified_l2":
        mask[:, g.square().sum(0).topk(k).indices] = 1.0
    elif rule == "random_cols":
        mask[:, torch.randperm(g.shape[1], device=g.device)[:k]] = 1.0
    elif rule == "gumbel":
        # k columns drawn without replacement with probability proportional to sum |g|
        # (Gumbel top-k on the log score)
        score = g.abs().sum(0).clamp_min(1e-30).log()
        u = torch.rand_like(score).clamp_(1e-20, 1.0)
        mask[:, (score - (-u.log()).log()).topk(k).indices] = 1.0
    elif rule == "explore":
        # the k/2 columns of largest sum |g|, and k - k/2 drawn uniformly from the others
        score = g.abs().sum(0)
        top = score.topk(k // 2).indices
        rest = torch.ones_like(score, dtype=torch.bool)
        rest[top] = False
        others = rest.nonzero().squeeze(1)
        extra = others[torch.randperm(others.numel(), device=g.device)[: k - k // 2]]
        mask[:, torch.cat([top, extra])] = 1.0
    elif rule == "union":
        pick = torch.zeros_like(g).scatter_(1, g.abs().topk(k, dim=1).indices, 1.0)
        mask[:, pick.any(0)] = 1.0
    else:
        raise ValueError(rule)
    return mask


class GradMask(torch.autograd.Function):
    """Identity forward; backward keeps the entries of the gradient a rule selects (the
    reference form of meProp: mask, then the dense products)."""

    dense = False  # True: pass the whole gradient (probe_lm.py's --dense-steps)

    @staticmethod
    def forward(ctx, z, k, rule):
        ctx.k, ctx.rule = k, rule
        return z.view_as(z)

    @staticmethod
    def backward(ctx, g):
        if GradMask.dense:
            return g, None, None
        flat = g.reshape(-1, g.shape[-1])  # (rows, n): a sequence model's (B, T, n) too
        return (flat * mask_rule(flat, ctx.k, ctx.rule)).view_as(g), None, None


class UnionFn(torch.autograd.Function):
    """``union`` without the mask: the columns some row's top-k picked, compacted, through dense
    GEMMs (``meprop.ops.compact_products``, as unified's path); the bias from the full g."""

    @staticmethod
    def forward(ctx, x, weight, bias, k):
        ctx.save_for_backward(x, weight)
        ctx.k = k
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        from meprop.ops import compact_products

        x, weight = ctx.saved_tensors
        k = min(ctx.k, g.shape[1])
        cols = torch.zeros(g.shape[1], dtype=torch.bool)
        cols[g.abs().topk(k, dim=1).indices.flatten()] = True
        rows = cols.nonzero().squeeze(1)
        UnionFn.share.append(rows.numel() / g.shape[1])
        dx, dw_rows = compact_products(g.index_select(1, rows), rows, weight, x, True, True)
        dw = torch.zeros_like(weight).index_copy_(0, rows, dw_rows)
        return dx, dw, g.sum(0), None

    share: list[float] = []  # |columns kept| / n of each call (the GEMMs' share of dense)


class UnionLinear(nn.Linear):
    def __init__(self, lin: nn.Linear, k: int):
        super().__init__(lin.in_features, lin.out_features)
        self.weight, self.bias, self.k = lin.weight, lin.bias, k

    def forward(self, x):
        return UnionFn.apply(x, self.weight, self.bias, self.k)


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight gets the masked output gradient and whose bias the full one
    (``MePropConfig(sparse_bias=False)``'s semantics), for the selection rules the library does
    not have."""

    def __init__(self, lin: nn.Linear, k: int, rule: str):
        super().__init__(lin.in_features, lin.out_features)
        self.weight, self.bias, self.k, self.rule = lin.weight, lin.bias, k, rule

    def forward(self, x):
        if self.rule in ("unified_dw", "unified_dx"):
            # unified's selection on one of the two products only, the other dense (a
            # diagnostic: which half of meProp's backward costs accuracy): the value of
            # x W^T, its gradient to the sparse side masked and to the other side whole
            lin, w, xd = nn.functional.linear, self.weight, x.detach()
            if self.rule == "unified_dw":
                masked, whole = lin(xd, w), lin(x, w.detach())
            else:
                masked, whole = lin(x, w.detach()), lin(xd, w)
            z = GradMask.apply(masked, self.k, "unified") + whole - whole.detach()
            return z + self.bias
        z = GradMask.apply(nn.functional.linear(x, self.weight), self.k, self.rule)
        return z + self.bias


def gini(counts: torch.Tensor) -> float:
    c = counts.double().sort().values
    n = c.numel()
    if c.sum() == 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float((2 * (i * c).sum() / (n * c.sum())) - (n + 1) / n)


def concentration(counts: torch.Tensor) -> dict:
    c = counts.double()
    p = c / c.sum().clamp_min(1)
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(len(c)))
    top = c.sort(descending=True).values
    return {
        "distinct": int((c > 0).sum()),
        "gini": round(gini(c), 3),
        "entropy": round(entropy, 3),
        "top10pct_share": round(float(top[: len(c) // 10].sum() / c.sum().clamp_min(1)), 3),
    }


def build(args):
    torch.manual_seed(args.seed)
    model = build_mlp(784, [args.hidden, args.hidden], 10, args.dropout)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    hidden = linears[:-1]
    if args.rule:
        for j, m in enumerate(model):
            if m in hidden:
                model[j] = (
                    UnionLinear(m, args.k)
                    if args.rule == "union" and not args.probe
                    else MaskedLinear(m, args.k, args.rule)
                )
        linears = [m for m in model if isinstance(m, nn.Linear)]
        hidden = linears[:-1]
    elif args.mode != "dense":
        cfg = MePropConfig(k=args.k, mode=args.mode, sparse_bias=args.sparse_bias)
        ids = {id(m) for m in hidden}
        sparsify_(model, cfg, filter_fn=lambda mod, name: id(mod) in ids)
        linears = [m for m in model if isinstance(m, nn.Linear)]
        hidden = linears[:-1]
    params = list(model.parameters())
    if args.opt == "adam":
        opt = torch.optim.Adam(params, lr=args.lr, eps=args.eps)
    elif args.opt == "lazyadam":
        opt = LazyAdam(params, [m.weight for m in hidden], lr=args.lr, eps=args.eps)
    elif args.opt == "adagrad":
        opt = torch.optim.Adagrad(params, lr=args.lr)
    else:
        opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)
    return model, linears, hidden, opt


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean()) * 100
    model.train()
    return acc


class Probe:
    """Per-window records of one run (see the module docstring)."""

    def __init__(self, model, linears, hidden, k):
        self.model, self.linears, self.hidden, self.k = model, linears, hidden, k
        n = hidden[0].out_features
        self.sel = {  # selections per unit: the layer's own rule, per example and unified
            "per_example": [torch.zeros(n) for _ in hidden],
            "unified": [torch.zeros(n) for _ in hidden],
        }
        self.last_sel = [torch.full((m.out_features,), -1) for m in hidden]  # step last selected
        self.acts = [[] for _ in linears]
        self.handles = []
        for i, m in enumerate(linears):
            self.handles.append(m.register_forward_hook(self._fwd(i)))
        self.window: dict[str, list] = {}
        self.extra: dict[str, list] = {}
        self.mode = "per_example"
        self.step = 0

    def _fwd(self, i):
        def hook(mod, inp, out):
            if not mod.training:
                return
            a = out.detach()
            if i < len(self.hidden):
                a = a.clamp_min(0)  # ReLU of z: the hidden activation
                out.register_hook(self._bwd(i))
            self.acts[i].append(float(a.norm(dim=1).mean()))
            if i < len(self.hidden):
                self.extra.setdefault(f"active{i}", []).append(float((out > 0).float().mean()))

        return hook

    def _bwd(self, i):
        def hook(g):
            a = g.detach().abs()
            k = min(self.k, a.shape[1])
            idx = a.topk(k, dim=1).indices
            self.sel["per_example"][i] += torch.bincount(idx.flatten(), minlength=a.shape[1])
            cols = a.sum(0).topk(k).indices
            self.sel["unified"][i][cols] += 1
            # sign balance of the kept entries: sum(g) / sum(|g|) (< 0: they push z up)
            kept = g if self.mode == "dense" else g * mask_rule(g, k, self.mode)
            self.extra.setdefault(f"sign{i}", []).append(
                float(kept.sum() / kept.abs().sum().clamp_min(1e-30))
            )
            top = g.gather(1, idx)  # what per_example would keep of this gradient
            self.extra.setdefault(f"signpe{i}", []).append(
                float(top.sum() / top.abs().sum().clamp_min(1e-30))
            )
            self.extra.setdefault(f"signall{i}", []).append(
                float(g.sum() / a.sum().clamp_min(1e-30))
            )

        return hook

    def before(self):
        self.prev = [m.weight.detach().clone() for m in self.linears]

    def after(self, loss, lr, mode):
        rec = self.window
        rec.setdefault("loss", []).append(loss)
        for i, m in enumerate(self.linears):
            d = m.weight.detach() - self.prev[i]
            rec.setdefault(f"gnorm{i}", []).append(float(m.weight.grad.norm()))
            rec.setdefault(f"unorm{i}", []).append(float(d.norm()))
            rec.setdefault(f"wnorm{i}", []).append(float(m.weight.norm()))
            if i < len(self.hidden):
                rms = d.pow(2).mean(1).sqrt() / lr  # per-coordinate RMS step of each row, in lr
                has_grad = (m.weight.grad != 0).any(1)
                rec.setdefault(f"rows{i}", []).append(float(has_grad.float().mean()))
                rec.setdefault(f"rms_mean{i}", []).append(float(rms[has_grad].mean()))
                rec.setdefault(f"rms_max{i}", []).append(float(rms.max()))
                # rows with a gradient now whose previous one was >= 50 steps ago (or never)
                gap = self.step - self.last_sel[i]
                stale = has_grad & ((self.last_sel[i] < 0) | (gap >= 50))
                if stale.any():
                    rec.setdefault(f"rms_stale{i}", []).append(float(rms[stale].mean()))
                rec.setdefault(f"stale{i}", []).append(int(stale.sum()))
                self.last_sel[i][has_grad] = self.step
        for i, a in enumerate(self.acts):
            if a:
                rec.setdefault(f"act{i}", []).append(sum(a) / len(a))
            a.clear()
        for key, vals in self.extra.items():
            if vals:
                rec.setdefault(key, []).append(sum(vals) / len(vals))
            vals.clear()
        self.step += 1

    def flush(self) -> dict:
        out = {}
        for key, vals in self.window.items():
            if key.startswith("stale"):
                out[key] = sum(vals)
            else:
                out[key] = sum(vals) / len(vals)
        self.window = {}
        return out

    def selection(self, mode) -> dict:
        rule = "unified" if mode == "unified" else "per_example"  # union: per_example
        out = {f"layer{i}": concentration(c) for i, c in enumerate(self.sel[rule])}
        for counts in self.sel.values():
            for c in counts:
                c.zero_()
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", default="per_example", choices=["dense", "per_example", "unified"])
    p.add_argument("--k", type=int, default=20)
    p.add_argument(
        "--rule",
        default="",
        choices=["", "per_example", "unified", "symmetric", "union"],
        help="select with this script's masked reference (slow; for rules the library lacks)"
        " instead of the library's SparseLinear",
    )
    p.add_argument("--hidden", type=int, default=500)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--opt", default="adam", choices=["adam", "lazyadam", "adagrad", "sgd"])
    p.add_argument("--lr", type=float, default=0.0, help="0: adam 1e-3, adagrad 1e-2, sgd 0.1")
    p.add_argument("--eps", type=float, default=1e-8, help="Adam's eps")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    p.add_argument("--clip", type=float, default=0.0, help="max global grad norm (0: none)")
    p.add_argument("--sparse-bias", action="store_true", help="MePropConfig(sparse_bias=True)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--probe", action="store_true", help="record the per-window measurements")
    p.add_argument("--probe-epochs", type=int, default=2)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--json", default="", help="append the run's record to this JSON-lines file")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    if not args.lr:
        args.lr = {"adam": 1e-3, "lazyadam": 1e-3, "adagrad": 1e-2, "sgd": 0.1}[args.opt]
    print(f"# {summary_line()}; torch {torch.__version__}", flush=True)
    print(f"# {' '.join(sys.argv)}", flush=True)

    data = load_mnist("mnist", root=args.data_dir)
    (xtr, ytr), (xdev, ydev), (xte, yte) = data.train, data.dev, data.test
    model, linears, hidden, opt = build(args)
    probe = Probe(model, linears, hidden, args.k) if args.probe else None
    if probe is not None:
        probe.mode = args.rule or args.mode
    record = {"args": vars(args), "epochs": [], "windows": []}
    best = (-1.0, 0.0, 0)
    for epoch in range(args.epochs):
        gen = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        order = torch.randperm(len(ytr), generator=gen)
        losses, t0 = [], time.perf_counter()
        on = probe is not None and epoch < args.probe_epochs
        for s, i in enumerate(range(0, len(ytr), args.batch_size)):
            idx = order[i : i + args.batch_size]
            if on:
                probe.before()
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            if args.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            if on:
                # the gradients are read after the step: keep them (step does not clear them)
                opt.step()
                probe.after(float(loss.detach()), args.lr, args.mode)
                if (s + 1) % args.log_every == 0:
                    w = {"epoch": epoch, "step": s + 1, **probe.flush()}
                    record["windows"].append(w)
                    print(
                        "W e{epoch} s{step:4d} loss {loss:.3f} | g {g0:.3f} {g1:.3f} {g2:.3f}"
                        " | u {u0:.3f} {u1:.3f} {u2:.3f} | rms/lr {r0:.2f} {r1:.2f} max {m0:.1f}"
                        " {m1:.1f} stale {s0:.2f} {s1:.2f} | act {a0:.1f} {a1:.1f} logit {a2:.1f}"
                        " | w {w0:.1f} {w1:.1f} {w2:.1f} | on {o0:.2f} {o1:.2f}"
                        " | sign kept {k0:+.2f} {k1:+.2f} all {l0:+.2f} {l1:+.2f}"
                        " top-k {p0:+.2f} {p1:+.2f}".format(
                            epoch=epoch + 1,
                            step=s + 1,
                            loss=w["loss"],
                            **{f"g{j}": w[f"gnorm{j}"] for j in range(3)},
                            **{f"u{j}": w[f"unorm{j}"] for j in range(3)},
                            **{f"w{j}": w[f"wnorm{j}"] for j in range(3)},
                            **{f"a{j}": w[f"act{j}"] for j in range(3)},
                            r0=w["rms_mean0"],
                            r1=w["rms_mean1"],
                            m0=w["rms_max0"],
                            m1=w["rms_max1"],
                            s0=w.get("rms_stale0", float("nan")),
                            s1=w.get("rms_stale1", float("nan")),
                            o0=w["active0"],
                            o1=w["active1"],
                            k0=w["sign0"],
                            k1=w["sign1"],
                            l0=w["signall0"],
                            l1=w["signall1"],
                            p0=w["signpe0"],
                            p1=w["signpe1"],
                        ),
                        flush=True,
                    )
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        secs = time.perf_counter() - t0
        dev, test = accuracy(model, xdev, ydev), accuracy(model, xte, yte)
        if dev > best[0]:
            best = (dev, test, epoch + 1)
        e = {
            "epoch": epoch + 1,
            "train_loss": sum(losses) / len(losses),
            "first_100": sum(losses[:100]) / 100,
            "dev": dev,
            "test": test,
            "seconds": secs,
        }
        if on:
            e["selection"] = probe.selection(args.mode)
        if UnionFn.share:
            e["union_share"] = sum(UnionFn.share) / len(UnionFn.share)
            UnionFn.share.clear()
        record["epochs"].append(e)
        print(
            f"E epoch {epoch + 1} train loss {e['train_loss']:.3f} dev {dev:.2f} test {test:.2f}"
            f" ({secs:.1f} s)"
            + (f" union columns {e['union_share']:.3f} of n" if "union_share" in e else "")
            + (f" selection {e['selection']}" if on else ""),
            flush=True,
        )
    record["best"] = {"dev": best[0], "test": best[1], "epoch": best[2]}
    print(f"B best dev {best[0]:.2f} (epoch {best[2]}) test {best[1]:.2f}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    raise SystemExit(main())
