"""The experiment trainer: one run of one task with one method, logged, timed, resumable.

It is one user of the library, not the only way in: it builds the task's model, applies the
method (``sparsify_`` for meProp, a ``Simplifier`` for meSimp), and runs an ordinary loop.
Each run directory holds:

    config.json    the TrainConfig (rerun with ``meprop train --config config.json``)
    log.jsonl      one JSON object per evaluation (epoch or chunk): losses, scores, widths, and
                   cumulative seconds ("times"): forward, backward (linear_backward and
                   hidden_backward its parts), optimizer, analysis, simplify, eval, and train
                   (the training loop's wall-clock outside evaluations and checkpoints)
    last.pt        the latest checkpoint (atomic; ``--resume`` continues from it)
    best.pt        the checkpoint with the best dev score (model selection as in the paper)
    summary.json   best epoch, its dev and test scores, total times, final widths

Under torch.distributed (``meprop train --nproc N``, or torchrun) every rank runs ``run``:
``batch_size`` is the global batch, of which each rank trains on its own part
(``meprop.distributed.shard``), so the gradients are one process's on the same batches; every
rank evaluates (identical models, identical scores, no rank idles in a collective meanwhile);
rank 0 alone writes the run directory and prints.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checkpoint, distributed
from .analysis import UpdateMonitor
from .config import MeActConfig, MePropConfig, MeSimpConfig
from .convert import sparsify_
from .simplify import Simplifier
from .timing import BackwardTimer, Stopwatch, linear_maps

__all__ = ["TrainConfig", "METHODS", "OPTIMIZERS", "run", "make_optimizer"]

METHODS = ("dense", "meprop", "random", "kdim", "mesimp", "meact")
OPTIMIZERS = {"adam": 1e-3, "adagrad": 1e-2, "sgd": 0.1}  # name -> default learning rate
ACTIVATIONS = ("relu", "tanh", "cube")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run (one row of a results table).

    ``method``: ``dense``; ``meprop`` (top-k, ``mode`` per_example or unified); ``random``
    (random-k); ``kdim`` (a dense net whose hidden layers have width k); ``mesimp`` (meProp plus
    a Simplifier); ``meact`` (dense training, then meAct's active-only forwards per example
    from epoch ``meact_start``, counting from 0). A dense net at meSimp's final widths is
    ``dense`` with ``hidden=(154, 160)``.

    ``track_updates``: log the mean absolute parameter change per step (``update``, the meAct
    analysis' statistic; ``meprop.analysis.UpdateMonitor``) at each evaluation. It costs about
    a tenth of a dense MNIST step, so it is off unless asked for, except for ``meact``, whose
    analysis reads it (None, the default, resolves to ``method == "meact"``; a config made with
    ``dataclasses.replace`` from a resolved one keeps the resolved value).
    """

    task: str = "mnist"
    dataset: str = "mnist"
    method: str = "meprop"
    k: int = 20
    mode: str = "per_example"
    hidden: tuple[int, ...] = (500,)
    layers: int = 0  # hidden layers; 0: len(hidden) if it lists several widths, else the task's
    dropout: float = -1.0  # -1: the task's (mnist 0.1, pos 0.5, parse 0.5)
    optimizer: str = "adam"
    lr: float = 0.0  # 0: the optimizer's default (adam 1e-3, adagrad 1e-2, sgd 0.1)
    batch_size: int = 0  # 0: the task's default
    epochs: int = 0  # 0: the task's default
    seed: int = 1
    eval_every: int = 0  # steps between dev evaluations; 0: once per epoch
    train_limit: int = 0  # use only the first N training examples; 0: all
    prune_rate: float = 0.1
    prune_interval: int = 0  # steps between meSimp prunings; 0: a quarter of an epoch
    cycle: tuple[int, ...] = ()  # meSimp cycle in epochs: (simplify, normal); () = off
    sparse_grad: bool = False
    backend: str = "auto"
    activation: str = ""  # hidden activation; "": the task's (mnist relu, parse cube)
    tags: str = "xpos"  # pos: the tag column, xpos (Penn Treebank tags) or upos
    scope: str = "local"  # unified top-k under --nproc: each rank's rows, or the global batch
    meact_start: int = 10  # meact: first epoch (from 0) with active-only forwards
    meact_threshold: float = 0.5  # meact: least share (%) of the accumulated |gradient|
    meact_cap: int = 0  # meact: most active neurons per example and layer; 0: no cap
    meact_storage: str = "float16"  # meact: dtype of the per-example state
    # log the mean |parameter change| per step ("update"); None: only for meact (its analysis)
    track_updates: bool | None = None

    def __post_init__(self) -> None:
        from .tasks import DEFAULTS, TASKS

        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        # Fields left unset (0, "", dropout -1) take the task's defaults, so a saved config is
        # complete.
        for name, value in DEFAULTS[self.task].items():
            current = getattr(self, name)
            unset = current < 0 if name == "dropout" else not current
            if unset and not (name == "layers" and len(self.hidden) > 1):
                object.__setattr__(self, name, value)
        if self.task != "mnist":  # the field picks MNIST or Fashion-MNIST; other tasks have one
            if self.dataset not in ("mnist", "ud_english_ewt"):  # "mnist": the field's default
                raise ValueError(
                    f"dataset {self.dataset!r} applies to the mnist task only; the {self.task} "
                    "task trains on UD English EWT: leave --dataset out"
                )
            object.__setattr__(self, "dataset", "ud_english_ewt")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "cycle", tuple(int(c) for c in self.cycle))
        for name in ("k", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden widths must be >= 1, got {self.hidden}")
        if self.layers < 0 or (len(self.hidden) > 1 and self.layers not in (0, len(self.hidden))):
            raise ValueError(
                f"hidden lists {len(self.hidden)} widths but layers={self.layers}: give one width "
                "and a number of layers, or one width per layer"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.cycle and len(self.cycle) != 2:
            raise ValueError(f"cycle must be two epoch counts (simplify, normal), got {self.cycle}")
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.tags not in ("xpos", "upos"):
            raise ValueError(f"tags must be 'xpos' or 'upos', got {self.tags!r}")
        if self.track_updates is None:
            object.__setattr__(self, "track_updates", self.method == "meact")
        elif not isinstance(self.track_updates, bool):
            raise ValueError(f"track_updates must be true or false, got {self.track_updates!r}")
        # validates these fields
        MePropConfig(k=self.k, mode=self.mode, backend=self.backend, scope=self.scope)
        MeSimpConfig(prune_rate=self.prune_rate)
        self.meact_config()  # validates the meact_* fields
        if self.method == "meact" and self.meact_start >= self.epochs:
            raise ValueError(
                f"meact_start={self.meact_start} is not below epochs={self.epochs}: meAct would "
                "never start; give --meact-start below --epochs"
            )

    def widths(self) -> list[int]:
        """Hidden-layer widths: one per layer (``kdim``: k everywhere)."""
        widths = list(self.hidden) if len(self.hidden) > 1 else list(self.hidden) * self.layers
        return [self.k] * len(widths) if self.method == "kdim" else widths

    def learning_rate(self) -> float:
        return self.lr or OPTIMIZERS[self.optimizer]

    def meprop_config(self) -> MePropConfig | None:
        if self.method in ("dense", "kdim", "meact"):
            return None
        mode = "random" if self.method == "random" else self.mode
        return MePropConfig(
            k=self.k,
            mode=mode,
            sparse_grad=self.sparse_grad,
            backend=self.backend,
            scope=self.scope,
        )

    def meact_config(self) -> MeActConfig:
        return MeActConfig(
            start_epoch=self.meact_start,
            threshold=self.meact_threshold,
            cap=self.meact_cap,
            storage=self.meact_storage,
            backend=self.backend,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"], d["cycle"] = list(self.hidden), list(self.cycle)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**d)


# The fastest of torch's implementations of each optimizer on the CPU, all of them computing
# the same update up to float rounding (``benchmarks/bench_optimizer.py``, MNIST MLP, 1 thread:
# Adam 0.82 ms default, 0.78 foreach, 0.32 fused; Adagrad 0.57 / 0.65 / 0.23; SGD 0.09 for all
# three). Fused kernels reject sparse gradients, so with ``sparse_grad`` the default one runs.
FAST = {"adam": {"fused": True}, "adagrad": {"fused": True}, "sgd": {}}


def make_optimizer(
    name: str, params, lr: float, *, sparse_grad: bool = False
) -> torch.optim.Optimizer:
    """The trainer's optimizer ``name`` (``adam``, ``adagrad``, ``sgd``; torch's defaults but
    the learning rate) in its fastest implementation: ``fused`` for Adam and Adagrad, unless
    some parameter gets row-sparse gradients (``sparse_grad``) or this torch has no fused
    kernel for the parameters' device, where the default implementation runs."""
    cls = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
    if name not in cls:
        raise ValueError(f"optimizer must be one of {tuple(cls)}, got {name!r}")
    params = list(params)
    fast = {} if sparse_grad else FAST[name]
    if fast:
        try:
            return cls[name](params, lr=lr, **fast)
        except (RuntimeError, TypeError):  # no fused kernel here (device, dtype, torch version)
            pass
    return cls[name](params, lr=lr)


def _examples(meact, batch, task: str):
    """meAct's context for a training forward (it needs the batch's example numbers)."""
    if meact is None:
        return nullcontext()
    ids = getattr(batch, "ids", None)
    if ids is None:
        raise ValueError(
            f"the {task} task's batches do not carry example numbers (an IndexedBatch), which "
            "meAct needs: use --method meact with the mnist task"
        )
    return meact.batch(ids)


def _warm_up(model: torch.nn.Module, task, cfg: TrainConfig) -> None:
    """One forward and backward on a training batch before any clock starts, leaving no trace:
    the random state is restored and the gradients dropped. It loads or builds the kernels and
    lets ``backend="auto"`` time its candidates for the first batch's shapes (once per machine,
    then read from its cache), so that neither counts in the run's timings and a run's results
    do not depend on whether it happened. (meSimp's later widths are timed when first met.)"""
    batch = next(iter(task.batches("train", cfg.batch_size, torch.Generator().manual_seed(0))))
    with torch.random.fork_rng(devices=[]):
        task.loss(model, batch).backward()
    for p in model.parameters():
        p.grad = None


def _json_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def run(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    echo=print,
) -> dict[str, Any]:
    """Train, select on dev, score the best checkpoint on test; returns the summary dict
    (``{}`` on ranks other than 0 of a multi-process run)."""
    from .tasks import get_task

    world = distributed.world_size()
    main = distributed.rank() == 0
    if not main:
        progress, echo = False, lambda *a, **k: None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, log_path, last_path, best_path = (
        out / "config.json",
        out / "log.jsonl",
        out / "last.pt",
        out / "best.pt",
    )
    if resume and cfg_path.exists():
        # Only the number of epochs may change on resume (to extend a finished run).
        saved = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
        diff = {
            k: (v, getattr(cfg, k))
            for k, v in saved.to_dict().items()
            if k != "epochs" and v != cfg.to_dict()[k]
        }
        if diff:
            raise ValueError(
                f"--resume with settings that differ from {cfg_path}: "
                + ", ".join(f"{k}: saved {a!r}, given {b!r}" for k, (a, b) in diff.items())
            )
    elif not resume and log_path.exists():
        raise FileExistsError(f"{out} already holds a run: pass --resume or choose another --out")
    distributed.barrier()  # every rank has checked the folder before rank 0 writes to it
    if main:
        cfg_path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    task = get_task(cfg, data_dir)
    torch.manual_seed(cfg.seed)
    model = task.build_model(cfg.widths(), cfg)
    mp = cfg.meprop_config()
    if mp is not None:
        sparsify_(model, mp, filter_fn=task.sparsify_filter(model))
    _warm_up(model, task, cfg)
    opt = make_optimizer(
        cfg.optimizer,
        model.parameters(),
        cfg.learning_rate(),
        sparse_grad=mp is not None and mp.sparse_grad,
    )
    steps_per_epoch = task.steps_per_epoch(cfg.batch_size)
    simp = None
    if cfg.method == "mesimp":
        interval = cfg.prune_interval or max(1, steps_per_epoch // 4)
        cycle = None
        if cfg.cycle:
            cycle = (cfg.cycle[0] * steps_per_epoch, cfg.cycle[1] * steps_per_epoch)
        simplifier = distributed.DistributedSimplifier if world > 1 else Simplifier
        simp = simplifier(
            model, MeSimpConfig(prune_rate=cfg.prune_rate, interval=interval, cycle=cycle), opt
        )

    meact = None
    if cfg.method == "meact":
        from .meact import MeAct

        if world > 1:
            raise ValueError(
                f"--method meact runs in one process (its per-example state is not sharded), "
                f"got {world} processes: drop --nproc"
            )
        meact = MeAct(
            model, cfg.meact_config(), task.num_examples("train"), task.sparsify_filter(model)
        )

    state = {"epoch": 0, "step": 0, "best_score": -math.inf, "best_epoch": -1, "times": {}}
    if resume and last_path.exists():
        extra = checkpoint.load(last_path, model, opt, simplifier=simp)
        state = extra["state"]
        if meact is not None:
            meact.load_state_dict(extra["meact"])
        echo(f"resumed from {last_path} at epoch {state['epoch']}")
    net = distributed.wrap(model) if world > 1 else model  # what forward runs through
    # The mean |parameter change| per step, logged per evaluation (the meAct analysis).
    monitor = UpdateMonitor(model.parameters()) if cfg.track_updates else None
    sw = Stopwatch()
    sw.totals.update(state["times"])

    def timers() -> dict[str, BackwardTimer]:
        # "linear_backward": every Linear and LSTM; "hidden_backward": the layers meProp
        # sparsifies (what its speedup is about).
        return {
            "linear_backward": BackwardTimer(linear_maps(model)),
            "hidden_backward": BackwardTimer(task.hidden_layers(model)),
        }

    layer_timers = timers()
    eval_every = cfg.eval_every or steps_per_epoch

    def evaluate(epoch_float: float, train_loss: float) -> None:
        with sw("eval"):
            dev = task.evaluate(model, "dev")
            train_score = task.evaluate(model, "train_eval")
        score = dev[task.metric]
        record = {
            "epoch": round(epoch_float, 4),
            "step": state["step"],
            "train_loss": train_loss,
            **{f"dev_{k}": v for k, v in dev.items()},
            **{f"train_{k}": v for k, v in train_score.items()},
            "times": {k: round(v, 4) for k, v in sw.totals.items()},
        }
        if simp is not None:
            record["widths"] = simp.sizes()
        if monitor is not None:
            record["update"] = monitor.read()
        if meact is not None:
            record["meact"] = meact.applies
            active = meact.read_active()
            if active:
                record["active"] = active  # mean active neurons per example, per layer
        if main:
            _json_line(log_path, record)
        if score > state["best_score"]:
            state["best_score"], state["best_epoch"] = score, epoch_float
            distributed.save(best_path, model, state=dict(state))

    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        if meact is not None:
            meact.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        distributed.seed_rank(cfg.seed, epoch)  # several ranks: each its own dropout masks
        losses, bar = (
            [],
            tqdm(
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                leave=False,
                disable=not progress,
                dynamic_ncols=True,
            ),
        )
        # "train": wall-clock seconds of the training loop (batches, steps, bookkeeping) outside
        # evaluations and checkpoints; the phases above are its timed parts.
        lap = time.perf_counter()
        for i, batch in enumerate(task.batches("train", cfg.batch_size, gen)):
            with _examples(meact, batch, cfg.task):
                batch, share = distributed.shard(batch, task)  # one process: (batch, 1.0)
                with sw("forward"):
                    loss = task.loss(net, batch)
                    if share != 1.0:  # a rank's part of uneven size: weigh its mean loss
                        loss = loss * share
            with sw("backward"):
                loss.backward()
            for key, timer in layer_timers.items():
                sw.totals[key] += timer.lap()
            with sw("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
            if monitor is not None:
                with sw("analysis"):
                    monitor.step()
            if simp is not None:
                with sw("simplify"):
                    if simp.step():  # new Parameters: hook the timers (and DDP) onto them
                        if world > 1:
                            net = net.rewrap()
                        for timer in layer_timers.values():
                            timer.remove()
                        layer_timers = timers()
                        if monitor is not None:
                            monitor.rebind(model.parameters())
            state["step"] += 1
            losses.append(loss.detach())
            bar.update(1)
            if (i + 1) % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", best=f"{state['best_score']:.4f}")
            if (i + 1) % eval_every == 0 or i + 1 == steps_per_epoch:
                train_loss = distributed.mean_over_ranks(torch.stack(losses).mean()).item()
                losses.clear()
                sw.totals["train"] += time.perf_counter() - lap
                evaluate(epoch + (i + 1) / steps_per_epoch, train_loss)
                model.train()
                lap = time.perf_counter()
        bar.close()
        state["epoch"] = epoch + 1
        state["times"] = dict(sw.totals)
        meact_state = {} if meact is None else {"meact": meact.state_dict()}
        distributed.save(last_path, model, opt, simplifier=simp, state=dict(state), **meact_state)
        if not main:
            continue
        last = json.loads(log_path.read_text().splitlines()[-1])
        widths = f"  widths {last['widths']}" if "widths" in last else ""
        if "active" in last:
            widths += "  active " + " ".join(f"{v:.1f}" for v in last["active"].values())
        echo(
            f"epoch {epoch + 1}/{cfg.epochs}  loss {last['train_loss']:.4f}  "
            f"dev {task.metric} {last['dev_' + task.metric]:.4f}{widths}"
        )
    for timer in layer_timers.values():
        timer.remove()
    if not main:  # rank 0 scores the best checkpoint and writes the summary
        return {}

    # Model selection as in the paper: the best dev checkpoint is scored on test.
    final_widths = simp.sizes() if simp is not None else None
    checkpoint.load(best_path, model, restore_rng=False)
    with sw("eval"):
        test = task.evaluate(model, "test")
    summary = {
        "config": cfg.to_dict(),
        "best_epoch": state["best_epoch"],
        f"dev_{task.metric}": state["best_score"],
        **{f"test_{k}": v for k, v in test.items()},
        "times": {k: round(v, 4) for k, v in sw.totals.items()},
        "steps": state["step"],
        "widths": cfg.widths(),
        "final_widths": final_widths,
        "best_widths": task.widths(model),
        "metric": task.metric,
        "parameters": sum(p.numel() for p in model.parameters()),
        "meact": None
        if meact is None
        else {"memory_bytes": meact.memory_bytes(), "examples": meact.num_examples},
        "threads": torch.get_num_threads(),
        "processes": world,
        "torch": torch.__version__,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo(
        f"best epoch {state['best_epoch']:g}: dev {task.metric} {state['best_score']:.4f}, "
        f"test {task.metric} {test[task.metric]:.4f}  (backward {sw.totals['backward']:.1f} s, "
        f"linear part {sw.totals['linear_backward']:.1f} s)"
    )
    return summary
