"""The small objects the trainer's loop (``meprop.experiments.train``) calls at fixed points.

The loop itself is build, data, then per epoch: steps, evaluation, checkpoint. What a run adds
to it sits here as small objects that the loop calls at the same points whichever of them a run
has, so that it has no branch for any of them:

* ``Distribution``: the run's processes, as accelerate's ``Accelerator`` prepares a model and
  loop: wraps the model in DDP (and rewraps it after meSimp), shards each global batch, seeds
  each rank, averages the loss, saves on rank 0. In one process each method is the identity.
* ``Part``s, called after each optimizer step and at each evaluation and checkpoint:
  ``MeSimpPart`` (usage counting, shrinking, the cycle's optimizer resets: the
  ``Simplifier``), ``MeActPart`` (the epoch and the example numbers meAct needs),
  ``UpdatePart`` (the mean |parameter change| per step) and ``MeanKLog`` (the mean k each layer
  kept over an epoch).
* ``BackwardClocks``: the seconds of the linear maps' backward, within the backward.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from meprop import distributed
from meprop.config import MeSimpConfig
from meprop.meact import MeAct
from meprop.simplify import Simplifier
from meprop.update_monitor import UpdateMonitor

from .timing import BackwardTimer, linear_maps

__all__ = [
    "Distribution",
    "Part",
    "MeSimpPart",
    "MeActPart",
    "UpdatePart",
    "MeanKLog",
    "BackwardClocks",
]


class Distribution:
    """The run's processes as the loop sees them; one process makes each method the identity.

    Every rank trains on its own part of each global batch (``shard``) through the DDP wrapper
    ``net`` (``prepare``); the ranks' models stay identical, so rank 0 alone writes
    (``main``, ``save``). ``compact``: DDP all-reduces only the gradient rows meProp kept
    (``meprop.ddp_hook``)."""

    def __init__(self, compact: bool = True) -> None:
        self.compact = compact
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.main = self.rank == 0
        self.net: nn.Module | None = None  # what the forward runs through
        self._rank_rng: list[Tensor] | None = None  # every rank's RNG state, from last.pt

    def prepare(self, model: nn.Module) -> nn.Module:
        """The module the forward runs through: ``model`` itself, or its DDP wrapper."""
        self.net = distributed.wrap(model, compact=self.compact) if self.world > 1 else model
        return self.net

    def rewrap(self) -> None:
        """After meSimp replaced the Parameters (a collective)."""
        if self.world > 1:
            self.net = self.net.rewrap()

    def simplifier(self, model: nn.Module, config: MeSimpConfig, optimizer) -> Simplifier:
        """A Simplifier whose pruning decisions every rank takes alike."""
        cls = distributed.DistributedSimplifier if self.world > 1 else Simplifier
        return cls(model, config, optimizer)

    def shard(self, batch, task) -> tuple[Any, float]:
        """This rank's part of a global batch and the weight of its mean loss."""
        return distributed.shard(batch, task)

    def seed(self, seed: int, epoch: int, resumed: bool) -> None:
        """Each rank its own dropout masks and random-k picks for the epoch; an epoch resumed
        within takes this rank's RNG state as it was saved (one process: last.pt restored it)."""
        if not resumed:
            distributed.seed_rank(seed, epoch)
        elif self._rank_rng is not None and len(self._rank_rng) == self.world:
            torch.set_rng_state(self._rank_rng[self.rank])

    def mean(self, value: Tensor) -> float:
        """The mean over the ranks (a collective), as a float."""
        return distributed.mean_over_ranks(value).item()

    def barrier(self) -> None:
        distributed.barrier()

    def save(self, path, model: nn.Module, optimizer=None, **extra: Any) -> None:
        """A checkpoint of the whole job, written by rank 0 (atomically); on every rank."""
        distributed.save(path, model, optimizer, **extra)

    def state(self) -> dict[str, Any]:
        """Every rank's torch RNG state (a collective), for an exact resume within an epoch."""
        if self.world == 1:
            return {}
        mine = torch.get_rng_state()
        states = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(states, mine)
        return {"rank_rng": states}

    def load(self, extra: dict[str, Any]) -> None:
        self._rank_rng = extra.get("rank_rng")


class Part:
    """A piece of a run that the loop calls at its fixed points; each default does nothing.

    ``phase``: the Stopwatch phase that times ``after_step`` (None: not timed apart)."""

    phase: str | None = None

    def start_epoch(self, epoch: int) -> None:
        """Before the epoch's first step (counting from 0)."""

    def forward_context(self, batch) -> AbstractContextManager:
        """The context of a training forward on ``batch`` (the global batch)."""
        return nullcontext()

    def after_step(self) -> bool:
        """After each optimizer step; True when the model's Parameters were replaced."""
        return False

    def rebind(self, model: nn.Module) -> None:
        """The model's Parameters are new (the run starts, a checkpoint resized them, meSimp
        shrank them): watch these from now on."""

    def record(self, end_of_epoch: bool) -> dict[str, Any]:
        """Fields of the evaluation's log record."""
        return {}

    def state(self) -> dict[str, Any]:
        """Values for last.pt, given back to ``load`` on resume."""
        return {}

    def load(self, extra: dict[str, Any]) -> None:
        """The values ``state`` saved (a resume)."""

    def summary(self) -> dict[str, Any]:
        """Fields of summary.json, at the end of training."""
        return {}


class MeSimpPart(Part):
    """meSimp: the Simplifier counts the top-k usage, shrinks the model every interval and, with
    a cycle, resets the optimizer at each period's start."""

    phase = "simplify"

    def __init__(self, simplifier: Simplifier) -> None:
        self.simplifier = simplifier

    def after_step(self) -> bool:
        return self.simplifier.step()

    def record(self, end_of_epoch: bool) -> dict[str, Any]:
        return {"widths": self.simplifier.sizes()}

    def summary(self) -> dict[str, Any]:
        return {"final_widths": self.simplifier.sizes()}


class MeActPart(Part):
    """meAct: tells it the epoch, and runs each training forward with the batch's example
    numbers (an ``IndexedBatch``'s ``ids``)."""

    def __init__(self, meact: MeAct, task_name: str) -> None:
        self.meact, self.task_name = meact, task_name

    def start_epoch(self, epoch: int) -> None:
        self.meact.set_epoch(epoch)

    def forward_context(self, batch) -> AbstractContextManager:
        ids = getattr(batch, "ids", None)
        if ids is None:
            raise ValueError(
                f"the {self.task_name} task's batches do not carry example numbers (an "
                "IndexedBatch), which meAct needs: use --method meact with the mnist task"
            )
        return self.meact.batch(ids)

    def record(self, end_of_epoch: bool) -> dict[str, Any]:
        record: dict[str, Any] = {"meact": self.meact.applies}
        active = self.meact.read_active()
        if active:
            record["active"] = active  # mean active neurons per example, per layer
        return record

    def state(self) -> dict[str, Any]:
        return {"meact": self.meact.state_dict()}

    def load(self, extra: dict[str, Any]) -> None:
        self.meact.load_state_dict(extra["meact"])

    def summary(self) -> dict[str, Any]:
        return {
            "meact": {
                "memory_bytes": self.meact.memory_bytes(),
                "examples": self.meact.num_examples,
            }
        }


class UpdatePart(Part):
    """The mean |parameter change| per step since the last evaluation (``update``; the meAct
    analysis' statistic, ``UpdateMonitor``)."""

    phase = "analysis"

    def __init__(self, model: nn.Module) -> None:
        self.monitor = UpdateMonitor(model.parameters())

    def after_step(self) -> bool:
        self.monitor.step()
        return False

    def rebind(self, model: nn.Module) -> None:
        self.monitor.rebind(model.parameters())

    def record(self, end_of_epoch: bool) -> dict[str, Any]:
        return {"update": self.monitor.read()}


class MeanKLog(Part):
    """The mean k each meProp layer kept over an epoch's steps (``mean_k``), read from the
    layers' ``last_k`` (the mean k of their latest backward; None or absent: nothing to log)
    after each step: one Python float per layer and step, no tensor sync.

    The sums run over the whole epoch, a resume within it included (they are in last.pt); the
    epoch's last record logs them, when some layer set ``last_k``. Under several processes the
    log holds rank 0's (each rank selects on its own part of the batch)."""

    def __init__(self, model: nn.Module) -> None:
        self.rebind(model)
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def rebind(self, model: nn.Module) -> None:
        # only the layers that report a k: the per-step loop reads those
        self._modules = [(n, m) for n, m in model.named_modules() if hasattr(m, "last_k")]

    def after_step(self) -> bool:
        for name, module in self._modules:
            k = module.last_k
            if k is not None:
                self._sums[name] = self._sums.get(name, 0.0) + float(k)
                self._counts[name] = self._counts.get(name, 0) + 1
        return False

    def record(self, end_of_epoch: bool) -> dict[str, Any]:
        if not end_of_epoch:
            return {}
        means = {n: self._sums[n] / c for n, c in self._counts.items()}
        self._sums, self._counts = {}, {}  # the next epoch's
        return {"mean_k": means} if means else {}

    def state(self) -> dict[str, Any]:
        # and adaptive k's memory (TinyProp's largest error per layer), so a resumed run
        # chooses the k's an uninterrupted one would
        records = {n: m.k_record for n, m in self._modules if hasattr(m, "k_record")}
        y_max = {n: r.y_max for n, r in records.items()}
        # and the warm-up steps taken and the memory (MePropConfig.warmup, memory)
        calls = {n: r.calls for n, r in records.items()}
        memory = {n: r.memory for n, r in records.items() if r.memory is not None}
        return {
            "mean_k": {
                "sums": dict(self._sums), "counts": dict(self._counts), "y_max": y_max,
                "calls": calls, "memory": memory,
            }
        }  # fmt: skip

    def load(self, extra: dict[str, Any]) -> None:
        saved = extra.get("mean_k") or {}  # (none in a checkpoint of an older version)
        self._sums, self._counts = dict(saved.get("sums", {})), dict(saved.get("counts", {}))
        y_max = saved.get("y_max", {})
        calls, memory = saved.get("calls", {}), saved.get("memory", {})
        for name, module in self._modules:
            if not hasattr(module, "k_record"):
                continue
            if name in y_max:
                module.k_record.y_max = y_max[name]
            module.k_record.calls = calls.get(name, module.k_record.calls)
            if name in memory:
                module.k_record.memory = memory[name]


class BackwardClocks:
    """Seconds of backward, summed into ``totals``: ``linear_backward`` (every Linear and LSTM)
    and ``hidden_backward`` (the layers meProp sparsifies: what its speedup is about)."""

    def __init__(self, totals: dict[str, float], hidden_layers) -> None:
        self.totals, self.hidden_layers = totals, hidden_layers
        self.timer: BackwardTimer | None = None
        self.groups: dict[str, list[int]] = {}  # total's name -> the ids of its modules

    def rebind(self, model: nn.Module) -> None:
        """Hook onto the model's current Parameters (the timer's hooks sit on them): one timer
        over both sets, each module hooked once."""
        self.close()
        groups = {
            "linear_backward": linear_maps(model),
            "hidden_backward": self.hidden_layers(model),
        }
        self.groups = {key: [id(m) for m in mods] for key, mods in groups.items()}
        self.timer = BackwardTimer([m for mods in groups.values() for m in mods])

    def lap(self) -> None:
        """After each backward."""
        self.timer.lap()
        last = self.timer.last
        for key, ids in self.groups.items():
            self.totals[key] += sum(last.get(i, 0.0) for i in ids)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.remove()
