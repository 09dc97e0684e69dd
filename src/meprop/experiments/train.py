"""The experiment trainer: one run of one task with one method, logged, timed, resumable.

It is one user of the library, not the only way in: it builds the task's model, applies the
method (``sparsify_`` for meProp, a ``Simplifier`` for meSimp), and runs an ordinary loop
(``Trainer.fit``: build, data, then per epoch the steps, evaluations and checkpoints), which
calls what the method adds at fixed points (``meprop.experiments.parts``). Each run directory holds:

    config.json    the TrainConfig (rerun with ``meprop train --config config.json``)
    log.jsonl      one JSON object per evaluation (epoch or chunk): losses, scores, widths, and
                   cumulative seconds ("times"): forward, backward (linear_backward and
                   hidden_backward its parts), optimizer, analysis, simplify, eval, and train
                   (the training loop's wall-clock outside evaluations and checkpoints); an
                   epoch's last record also "mean_k" ({layer: mean k kept over the epoch's
                   steps}) when meProp layers report their ``last_k``
    last.pt        the checkpoint after the latest evaluation (each epoch, and each
                   ``eval_every`` steps; atomic; ``--resume`` continues from it, within an
                   epoch too, exactly as the uninterrupted run)
    best.pt        the checkpoint with the best dev score (model selection as in the paper)
    summary.json   best epoch, its dev and test scores, total times, final widths
    .lock          held (flock) by the run that writes the folder: a second one is refused

Every file but log.jsonl is replaced atomically. A kill leaves at worst log records after the
last checkpoint, a torn last log line and temporary files: a resume removes them. A training
loss that becomes NaN or infinite stops the run (``Diverged``), last.pt holding the last good
state.

Under torch.distributed (``meprop train --nproc N``, or torchrun) every rank runs ``run``:
``batch_size`` is the global batch, of which each rank trains on its own part
(``meprop.distributed.shard``), so the gradients are one process's on the same batches; every
rank evaluates (identical models, identical scores, no rank idles in a collective meanwhile);
rank 0 alone writes the run directory and prints.
"""

from __future__ import annotations

import functools
import json
import math
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from meprop import LazyAdam, checkpoint, distributed
from meprop.convert import sparsify_
from meprop.meact import MeAct

from .bn_stats import recompute_batchnorm
from .errors import Diverged
from .parts import (
    BackwardClocks,
    Distribution,
    MeActPart,
    MeanKLog,
    MeSimpPart,
    Part,
    UpdatePart,
)
from .progress import bars
from .run_config import METHODS, OPTIMIZERS, ConfigError, TrainConfig
from .rundir import (
    RunDirError,
    check_identity,
    check_run_dir,
    has_records,
    json_line,
    out_dir_checked,
    ranks_lock,
    read_log,
    remove_stray_files,
    repair_log,
    run_identity,
    run_lock,
    saved_extra,
    saved_step,
    write_atomic,
)
from .timing import Stopwatch

__all__ = [
    "TrainConfig",
    "METHODS",
    "OPTIMIZERS",
    "run",
    "Trainer",
    "make_optimizer",
    "ConfigError",
    "RunDirError",
    "Diverged",
    "read_log",
    "run_lock",
    "ranks_lock",
]


# The fastest of torch's implementations of each optimizer on the CPU, all of them computing
# the same update up to float rounding (``benchmarks/bench_optimizer.py``, MNIST MLP, 1 thread:
# Adam 0.82 ms default, 0.78 foreach, 0.32 fused; Adagrad 0.57 / 0.65 / 0.23; SGD 0.09 for all
# three). Fused kernels reject sparse gradients, so with ``sparse_grad`` the default one runs.
FAST = {"adam": {"fused": True}, "adagrad": {"fused": True}, "sgd": {}, "lazy_adam": {}}


def make_optimizer(
    name: str, params, lr: float, *, sparse_grad: bool = False
) -> torch.optim.Optimizer:
    """The trainer's optimizer ``name`` (``adam``, ``adagrad``, ``sgd``; torch's defaults but
    the learning rate; ``lazy_adam``: ``meprop.LazyAdam``) in its fastest implementation:
    ``fused`` for Adam and Adagrad, unless some parameter gets row-sparse gradients
    (``sparse_grad``) or this torch has no fused kernel for the parameters' device, where the
    default implementation runs."""
    cls = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD,
           "lazy_adam": LazyAdam}  # fmt: skip
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


def _warm_up(model: torch.nn.Module, task, cfg: TrainConfig) -> None:
    """One forward and backward on a training batch before any clock starts, leaving no trace:
    the random state is restored and the gradients dropped. It loads or builds the kernels and
    lets ``backend="auto"`` time its candidates for the first batch's shapes (once per machine,
    then read from its cache), so that neither counts in the run's timings and a run's results
    do not depend on whether it happened. (meSimp's later widths are timed when first met.)"""
    batch = next(iter(task.batches("train", cfg.batch_size, torch.Generator().manual_seed(0))))
    records = [m.k_record for m in model.modules() if hasattr(m, "k_record")]
    saved = [(r.y_max, r.last_k, r.calls, r.memory) for r in records]
    for r in records:  # past any dense warm-up steps (MePropConfig.warmup): the sparse path
        r.calls = 2**62
    with torch.random.fork_rng(devices=[]):
        task.loss(model, batch).backward()
    for p in model.parameters():
        p.grad = None
    for r, before in zip(records, saved, strict=True):  # adaptive k's state, memory, warm-up
        r.y_max, r.last_k, r.calls, r.memory = before


def run(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    echo=print,
    lock: bool = True,
    restart: bool = False,
    compact: bool = True,
) -> dict[str, Any]:
    """Train, select on dev, score the best checkpoint on test; returns the summary dict
    (``{}`` on ranks other than 0 of a multi-process run).

    ``lock``: hold the run folder's lock (``run_lock``) for the run, on rank 0; False when
    the caller holds it (``meprop train --nproc``'s launcher). ``restart`` (with ``resume``):
    a run whose last.pt is lost is trained again from step 0 instead of refused. ``compact``:
    with several processes, all-reduce only the gradient rows meProp kept
    (``meprop.ddp_hook``)."""
    from meprop.kernels import build, dispatch

    dispatch.pinned()  # a bad MEPROP_BACKEND or MEPROP_MARCH: refused before anything is written
    build.check_march()
    main = distributed.rank() == 0
    if not lock:
        held = ranks_lock(out_dir)
    elif main:
        held = run_lock(out_dir)
    else:
        held = nullcontext()
    with held:
        trainer = Trainer(
            cfg, out_dir, data_dir=data_dir, progress=progress, echo=echo, compact=compact
        )
        return trainer.fit(resume, restart=restart)


def _quiet(*args: Any, **kwargs: Any) -> None:
    """The echo of ranks other than 0."""


class Trainer:
    """One run, read top to bottom in ``fit``: the run folder, build, restore (on resume),
    then per epoch the steps, with an evaluation and a checkpoint every ``eval_every`` steps
    and at the epoch's end; last, the best checkpoint scored on test.

    What the run adds to that loop it calls at fixed points: ``dist`` (a ``Distribution``:
    DDP, shards, seeds, rank-0 saves) and ``parts`` (``meprop.experiments.parts``: the update statistic,
    meSimp, meAct, the per-layer k; after each step, at each evaluation and checkpoint)."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        data_dir: str | Path | None = None,
        progress: bool = True,
        echo=print,
        compact: bool = True,
    ) -> None:
        self.cfg, self.out, self.data_dir = cfg, Path(out_dir), data_dir
        self.dist = Distribution(compact=compact)
        self.progress = progress and self.dist.main
        self.echo = echo if self.dist.main else _quiet
        self.log_path, self.last_path, self.best_path = (
            self.out / name for name in ("log.jsonl", "last.pt", "best.pt")
        )
        self.sw = Stopwatch()  # seconds per phase, the log's "times"
        self.identity = run_identity(cfg)  # in every checkpoint: a resume checks it
        # Where the run is: saved in every checkpoint, restored on resume.
        self.state: dict[str, Any] = dict(
            epoch=0, batch=0, step=0, best_score=-math.inf, best_epoch=-1, times={}
        )

    def fit(self, resume: bool = False, restart: bool = False) -> dict[str, Any]:
        saved = self._open_folder(resume, restart)
        self._build()
        self._restore(resume, saved)
        self.dist.prepare(self.model)
        self._bind()
        first, skip = self.state["epoch"], self.state["batch"]
        for epoch in range(first, self.cfg.epochs):
            self._epoch(epoch, skip=skip if epoch == first else 0)
        self.clocks.close()
        return self._finish() if self.dist.main else {}  # rank 0 writes the summary

    # -- build -------------------------------------------------------------------------------

    def _open_folder(self, resume: bool, restart: bool = False) -> TrainConfig | None:
        """Refuse a folder that does not fit the request, create it, clear a kill's leftovers;
        returns the run's saved config on resume."""
        saved = check_run_dir(self.cfg, self.out, resume, restart)
        out_dir_checked(self.out)
        self.dist.barrier()  # every rank has checked the folder before rank 0 writes to it
        if self.dist.main:
            remove_stray_files(self.out)
        return saved

    def _build(self) -> None:
        """The task, its model with meProp swapped in, a warm-up step, the optimizer, the
        method's parts."""
        from .tasks import get_task

        cfg = self.cfg
        self.task = task = get_task(cfg, self.data_dir)
        torch.manual_seed(cfg.seed)
        self.model = model = task.build_model(cfg.widths(), cfg)
        mp = cfg.meprop_config()
        if mp is not None:  # (a task may place meProp itself: per-layer k, ...)
            if hasattr(task, "sparsify"):
                task.sparsify(model, mp)
            else:
                sparsify_(model, mp, filter_fn=task.sparsify_filter(model))
        _warm_up(model, task, cfg)
        sparse_grad = mp is not None and mp.sparse_grad
        self.opt = make_optimizer(
            cfg.optimizer, model.parameters(), cfg.learning_rate(), sparse_grad=sparse_grad
        )
        self.steps_per_epoch = task.steps_per_epoch(cfg.batch_size)
        self.simplifier = None
        if cfg.method == "mesimp":
            simp = cfg.mesimp_config(self.steps_per_epoch)
            self.simplifier = self.dist.simplifier(model, simp, self.opt)
        self.parts = self._parts()
        self.clocks = BackwardClocks(self.sw.totals, task.hidden_layers)

    def _parts(self) -> list[Part]:
        """What the run adds to the loop, in the order it runs after each step (the update
        statistic before meSimp, which may replace the Parameters it watches)."""
        cfg, model, parts = self.cfg, self.model, []
        if cfg.track_updates:
            parts.append(UpdatePart(model))
        if self.simplifier is not None:
            parts.append(MeSimpPart(self.simplifier))
        if cfg.method == "meact":
            if self.dist.world > 1:
                raise ConfigError(
                    f"--method meact runs in one process (its per-example state is not "
                    f"sharded), got {self.dist.world} processes: drop --nproc"
                )
            examples = self.task.num_examples("train")
            meact = MeAct(model, cfg.meact_config(), examples, self.task.sparsify_filter(model))
            parts.append(MeActPart(meact, cfg.task))
        parts.append(MeanKLog(model))
        return parts

    def _restore(self, resume: bool, saved: TrainConfig | None) -> None:
        """On resume, last.pt's state (model, optimizer, meSimp, the parts, where the run is);
        then config.json (with a new --epochs) and the log cut back to the checkpoint's steps."""
        cfg = self.cfg
        if resume and not self.last_path.exists() and has_records(self.log_path):
            self.echo(
                f"no {self.last_path}: training the run again from step 0 (its log, best.pt "
                "and summary.json are replaced)"
            )
            if self.dist.main:
                for name in ("summary.json", "best.pt"):
                    (self.out / name).unlink(missing_ok=True)
        if resume and self.last_path.exists():
            extra = checkpoint.load(
                self.last_path,
                self.model,
                self.opt,
                simplifier=self.simplifier,
                check=functools.partial(check_identity, self.last_path, cfg=cfg),
            )
            self.state = {"batch": 0, **extra["state"]}
            self.dist.load(extra)
            for part in self.parts:
                part.load(extra)
            epoch, batch = self.state["epoch"], self.state["batch"]
            done = epoch + (batch > 0)
            if cfg.epochs < done:
                raise RunDirError(
                    f"--resume --epochs {cfg.epochs}: the run in {self.out} has trained "
                    f"{epoch + batch / self.steps_per_epoch:g} epochs already: give "
                    f"--epochs {done} or more, or leave it out"
                )
            where = f"epoch {epoch}" + (f", batch {batch}" if batch else "")
            if self.best_path.exists():  # scored on test at the end: refused now, not then
                check_identity(self.best_path, saved_extra(self.best_path), cfg)
            self.echo(f"resumed from {self.last_path} at {where}")
        if saved is not None and saved.epochs != cfg.epochs:
            self.echo(
                f"--epochs {cfg.epochs} replaces the run's {saved.epochs} (config.json updated)"
            )
        if self.dist.main:
            write_atomic(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            # drops the records after last.pt, and damaged lines (named)
            for note in repair_log(self.log_path, self.state["step"]):
                self.echo(note)
        self.sw.totals.update(self.state["times"])

    def _bind(self) -> None:
        """Hook the backward clocks and the parts onto the model's current Parameters."""
        self.clocks.rebind(self.model)
        for part in self.parts:
            part.rebind(self.model)

    # -- the loop ----------------------------------------------------------------------------

    def _epoch(self, epoch: int, skip: int = 0) -> None:
        """One pass over the training batches (from batch ``skip``: resumed within the epoch),
        with an evaluation and a checkpoint every ``eval_every`` steps and at its end."""
        cfg, n = self.cfg, self.steps_per_epoch
        eval_every = cfg.eval_every or n
        self.model.train()
        for part in self.parts:
            part.start_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # the batches' order
        self.dist.seed(cfg.seed, epoch, resumed=skip > 0)
        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        bar = tqdm(
            total=n,
            initial=skip,
            desc=desc,
            leave=False,
            disable=not bars(self.progress),  # a file or pipe: the epoch lines alone
            dynamic_ncols=True,
        )
        losses = []
        # "train": wall-clock seconds of the training loop (batches, steps, bookkeeping) outside
        # evaluations and checkpoints; the other phases are its timed parts.
        lap = time.perf_counter()
        for i, batch in enumerate(self.task.batches("train", cfg.batch_size, gen)):
            if i < skip:
                continue  # done before the checkpoint (the batches are drawn from gen alone)
            loss = self._step(batch)
            losses.append(loss.detach())
            bar.update(1)
            if (i + 1) % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", best=f"{self.state['best_score']:.4f}")
            if (i + 1) % eval_every and i + 1 != n:
                continue  # not an evaluation point
            train_loss = self.dist.mean(torch.stack(losses).mean())
            losses.clear()
            self.sw.totals["train"] += time.perf_counter() - lap
            epoch_float = epoch + (i + 1) / n
            if not math.isfinite(train_loss):  # the same on every rank (a mean over them)
                bar.close()
                raise self._diverged(train_loss, epoch_float)
            record = self._evaluate(epoch_float, train_loss, end_of_epoch=i + 1 == n)
            self._checkpoint(epoch, i + 1)
            if i + 1 == n:
                self.echo(self._epoch_line(epoch, record))
            self.model.train()
            lap = time.perf_counter()
        bar.close()

    def _step(self, batch) -> torch.Tensor:
        """One optimizer step on a global batch (this rank's part of it); returns its loss."""
        with ExitStack() as forward:  # the parts' contexts of a training forward (meAct's)
            for part in self.parts:
                forward.enter_context(part.forward_context(batch))
            batch, share = self.dist.shard(batch, self.task)  # one process: (batch, 1.0)
            with self.sw("forward"):
                loss = self.task.loss(self.dist.net, batch)
                if share != 1.0:  # a rank's part of uneven size: weigh its mean loss
                    loss = loss * share
        with self.sw("backward"):
            loss.backward()
        self.clocks.lap()
        with self.sw("optimizer"):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        for part in self.parts:
            with self.sw(part.phase) if part.phase else nullcontext():
                if part.after_step():  # new Parameters (meSimp): rewrap DDP, hook onto them
                    self.dist.rewrap()
                    self._bind()
        self.state["step"] += 1
        return loss

    def _evaluate(self, epoch_float: float, train_loss: float, end_of_epoch: bool) -> dict:
        """Dev and train scores with the parts' fields, logged (rank 0); best.pt when the dev
        score is the best so far (model selection as in the paper)."""
        task, state = self.task, self.state
        if self.cfg.bn_batches:  # precise BN (bn_stats): part of training's time
            before = self.sw.totals["bn_stats"]
            with self.sw("bn_stats"):
                recompute_batchnorm(self.model, self._bn_inputs())
            self.sw.totals["train"] += self.sw.totals["bn_stats"] - before
        with self.sw("eval"):
            dev = task.evaluate(self.model, "dev")
            train_score = task.evaluate(self.model, "train_eval")
        record = {
            "epoch": round(epoch_float, 4),
            "step": state["step"],
            "train_loss": train_loss,
            **{f"dev_{k}": v for k, v in dev.items()},
            **{f"train_{k}": v for k, v in train_score.items()},
            "times": {k: round(v, 4) for k, v in self.sw.totals.items()},
        }
        for part in self.parts:
            record.update(part.record(end_of_epoch))
        if self.dist.main:
            json_line(self.log_path, record)
        score = dev[task.metric]
        if score > state["best_score"]:
            state["best_score"], state["best_epoch"] = score, epoch_float
            self.dist.save(self.best_path, self.model, state=dict(state), run=self.identity)
        return record

    def _bn_inputs(self):
        """The first ``bn_batches`` training batches' inputs in an order drawn for this step
        (the same on a resume; the training batches' generator is not touched)."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + self.state["step"]) % 2**63)
        batches = self.task.batches("train", cfg.batch_size, gen)
        return (batch[0] for batch, _ in zip(batches, range(cfg.bn_batches), strict=False))

    def _checkpoint(self, epoch: int, done: int) -> None:
        """last.pt, which a resume continues from, after each evaluation (with --eval-every
        too: a kill loses at most the steps since the last evaluation). ``done``: the epoch's
        batches trained."""
        state = self.state
        end = done == self.steps_per_epoch
        state["epoch"], state["batch"] = (epoch + 1, 0) if end else (epoch, done)
        state["times"] = dict(self.sw.totals)
        extra = {k: v for part in self.parts for k, v in part.state().items()}
        extra.update(self.dist.state())  # a collective
        self.dist.save(
            self.last_path,
            self.model,
            self.opt,
            simplifier=self.simplifier,
            state=dict(state),
            run=self.identity,
            **extra,
        )

    # -- messages and the end ----------------------------------------------------------------

    def _epoch_line(self, epoch: int, record: dict) -> str:
        metric = self.task.metric
        widths = f"  widths {record['widths']}" if "widths" in record else ""
        if "active" in record:
            widths += "  active " + " ".join(f"{v:.1f}" for v in record["active"].values())
        return (
            f"epoch {epoch + 1}/{self.cfg.epochs}  loss {record['train_loss']:.4f}  "
            f"dev {metric} {record['dev_' + metric]:.4f}{widths}"
        )

    def _diverged(self, train_loss: float, epoch_float: float) -> Diverged:
        state, last = self.state, self.last_path
        kept = (
            f"{last} keeps the last good state (epoch "
            f"{state['epoch'] + state['batch'] / self.steps_per_epoch:g}, step "
            f"{saved_step(last)})"
            if last.exists()
            else "no checkpoint was written before"
        )
        return Diverged(
            f"the training loss became {train_loss} at epoch {epoch_float:g} (step "
            f"{state['step']}): the run stopped; {kept}. Lower --lr (now "
            f"{self.cfg.learning_rate():g}) or change the settings, and start a new run "
            "in another --out"
        )

    def _finish(self) -> dict[str, Any]:
        """Model selection as in the paper: the best dev checkpoint is scored on test; writes
        summary.json and returns it."""
        cfg, task, state, sw = self.cfg, self.task, self.state, self.sw
        ends = {"final_widths": None, "meact": None}  # the parts' (before best.pt resizes)
        for part in self.parts:
            ends.update(part.summary())
        checkpoint.load(
            self.best_path,
            self.model,
            restore_rng=False,
            check=functools.partial(check_identity, self.best_path, cfg=cfg),
        )
        with sw("eval"):
            test = task.evaluate(self.model, "test")
        summary = {
            "config": cfg.to_dict(),
            "best_epoch": state["best_epoch"],
            f"dev_{task.metric}": state["best_score"],
            **{f"test_{k}": v for k, v in test.items()},
            "times": {k: round(v, 4) for k, v in sw.totals.items()},
            "steps": state["step"],
            # (a CNN's are its own, not the MLP's --hidden: those of the sparsified layers)
            "widths": cfg.widths() if cfg.model == "mlp" else task.widths(self.model),
            "final_widths": ends["final_widths"],
            "best_widths": task.widths(self.model),
            "metric": task.metric,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "meact": ends["meact"],
            "threads": torch.get_num_threads(),
            "processes": self.dist.world,
            "torch": torch.__version__,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_atomic(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.echo(
            f"best epoch {state['best_epoch']:g}: dev {task.metric} {state['best_score']:.4f}, "
            f"test {task.metric} {test[task.metric]:.4f}  (backward {sw.totals['backward']:.1f} "
            f"s, linear part {sw.totals['linear_backward']:.1f} s)"
        )
        return summary
