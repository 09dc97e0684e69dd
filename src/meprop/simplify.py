"""meSimp: shrink a network during training from its top-k record.

Sun et al., "Training Simplification and Model Simplification for Deep Learning: A Minimal
Effort Back Propagation Method" (TKDE). Each sparsified layer counts how often each of its
units (a convolution's: each filter) is in a top-k selection during back propagation. Every
``interval`` steps, the units selected in fewer than ``prune_rate`` of the selections are
removed, physically: their rows of the producer's weight and bias (a convolution's whole
filters), and their input columns (input channels) in the consumer (the next layer). One
threshold for the whole network, and each layer settles at its own width.

One line in an ordinary loop::

    simp = Simplifier(model, MeSimpConfig(prune_rate=0.1, interval=600), optimizer)
    for x, y in data:
        loss_fn(model(x), y).backward(); simp.optimizer.step(); simp.optimizer.zero_grad()
        simp.step()
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import MeSimpConfig
from .conv import SparseConv2d
from .lstm import SparseLSTM
from .lstm_prune import prune_lstm_cells_
from .nn import Cube, SparseLinear
from .prune import (
    Cut,
    prune_in_,
    prune_norm_,
    prune_out_,
    reset_optimizer_state_,
    units,
    update_optimizer_,
)

__all__ = ["Pair", "find_pairs", "Simplifier"]


def _lstm_group(name: str, key: tuple[int, int]) -> str:
    layer, direction = key
    return f"{name}.l{layer}{'_reverse' if direction else ''}"


# Modules that pass a unit through to the same position of their output.
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Dropout, nn.AlphaDropout, nn.Identity, Cube,
    # (and a feature map's channel c to channel c)
    nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Flatten,
)  # fmt: skip
NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)
PRODUCERS = (SparseLinear, SparseConv2d)  # what find_pairs looks for in a chain


def input_block(producer: nn.Module, consumer: nn.Module) -> int:
    """Inputs of ``consumer`` per unit of ``producer``: H * W columns per channel for a Linear
    reading a convolution's flattened (C, H, W) map (channel-major, as ``nn.Flatten``), else 1."""
    if isinstance(producer, nn.Conv2d) and isinstance(consumer, nn.Linear):
        return consumer.in_features // producer.out_channels
    return 1


@dataclass(frozen=True)
class Pair:
    """A shrinkable producer, the modules that read its outputs, and norms in between.

    All are qualified module names (as ``model.named_modules()`` gives them).
    """

    producer: str
    consumers: tuple[str, ...]
    norms: tuple[str, ...] = ()


def flatten_sequential(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in seq.named_children():
        full = f"{prefix}.{name}" if prefix else name
        out += (
            flatten_sequential(child, full) if isinstance(child, nn.Sequential) else [(full, child)]
        )
    return out


def chain_links(model: nn.Module) -> Iterator[tuple[str, nn.Module, tuple | None, tuple]]:
    """Each module of each outermost ``nn.Sequential`` chain of ``model`` (nested ones flattened
    into it) as ``(name, module, next, norms)``: ``next`` the ``(name, module)`` its outputs
    reach through modules that keep a unit in its place (``ELEMENTWISE``) and norms (``NORMS``),
    None at the chain's end; ``norms`` the names of those norms."""
    seqs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Sequential)}
    inner = {f"{n}.{c}" if n else c for n, m in seqs.items() for c, _ in m.named_children()}
    for seq_name, seq in seqs.items():
        if seq_name in inner:  # flattened into its parent chain
            continue
        chain = flatten_sequential(seq, seq_name)
        for i, (name, module) in enumerate(chain):
            norms, j = [], i + 1
            while j < len(chain) and isinstance(chain[j][1], ELEMENTWISE + NORMS):
                if isinstance(chain[j][1], NORMS):
                    norms.append(chain[j][0])
                j += 1
            yield name, module, (chain[j] if j < len(chain) else None), tuple(norms)


def find_pairs(model: nn.Module) -> list[Pair]:
    """Producer -> consumer pairs of every ``SparseLinear`` and ``SparseConv2d`` in ``model``.

    A model may declare them with a ``simplify_pairs()`` method returning ``Pair`` objects.
    Otherwise they are read off ``nn.Sequential`` chains: a SparseLinear or SparseConv2d, then
    any modules that keep a unit (channel) in its place (activations, dropout, pooling,
    ``nn.Flatten``) and LayerNorm/BatchNorm1d/BatchNorm2d, then the consuming Linear (or, after
    a convolution, Conv2d). A producer whose consumer cannot be determined is an error, never
    a guess. (A residual block's convolutions are not in one chain: declare their pairs.)
    """
    if hasattr(model, "simplify_pairs"):
        return [p if isinstance(p, Pair) else Pair(*p) for p in model.simplify_pairs()]
    pairs, placed = [], set()
    for name, module, nxt, norms in chain_links(model):
        if not isinstance(module, PRODUCERS):
            continue
        placed.add(name)
        if nxt is None:
            raise ValueError(
                f"{type(module).__name__} {name!r} ends its nn.Sequential, so nothing consumes "
                "its units: keep output layers dense (sparsify_(..., filter_fn=hidden_layers("
                "model))) or declare pairs (Simplifier(..., pairs=[Pair(...)]))"
            )
        nxt_name, nxt_module = nxt
        if not isinstance(nxt_module, nn.Linear | nn.Conv2d):
            raise TypeError(
                f"cannot shrink {name!r}: its output goes through {nxt_name!r} "
                f"({type(nxt_module).__name__}), which meSimp does not know how to slice; "
                "declare the pairs with model.simplify_pairs() or pairs=[...]"
            )
        pairs.append(Pair(name, (nxt_name,), norms))
    stray = [n for n, m in model.named_modules() if isinstance(m, PRODUCERS) and n not in placed]
    if stray:
        raise ValueError(
            f"cannot tell which modules consume {stray} (not in an nn.Sequential chain): "
            "define model.simplify_pairs() or pass pairs=[Pair(producer, consumers)]"
        )
    if not pairs:
        raise ValueError(
            "no SparseLinear or SparseConv2d layer to simplify: call sparsify_(model, ...) first"
        )
    return pairs


def _check_pair(pair: Pair, modules: dict[str, nn.Module]) -> None:
    """A pair meSimp can shrink: a sparsified producer (only they keep a top-k record), whose
    consumers read its units as inputs it can slice."""
    producer = modules[pair.producer]
    if not isinstance(producer, SparseLinear | SparseConv2d | SparseLSTM):
        raise TypeError(
            f"producer {pair.producer!r} is {type(producer).__name__}, not a SparseLinear, "
            "SparseConv2d or SparseLSTM: only sparsified layers have a top-k record"
        )
    conv = isinstance(producer, nn.Conv2d)
    if conv and producer.groups != 1:
        raise ValueError(
            f"cannot shrink {pair.producer!r}: a convolution with groups={producer.groups} "
            "ties its filters to its input channels group by group; only groups=1 is shrunk"
        )
    for name in pair.consumers:
        consumer = modules[name]
        kinds = nn.Linear | nn.Conv2d if conv else nn.Linear
        if not isinstance(consumer, kinds):
            raise TypeError(
                f"consumer {name!r} is {type(consumer).__name__}, not a "
                f"{'Linear or Conv2d' if conv else 'Linear'}: cannot slice its inputs"
            )
        if isinstance(consumer, nn.Conv2d) and consumer.groups != 1:
            raise ValueError(
                f"cannot slice the input channels of {name!r} (groups={consumer.groups}): "
                "only groups=1 convolutions are shrunk"
            )
        if conv and isinstance(consumer, nn.Linear) and consumer.in_features % units(producer):
            raise ValueError(
                f"consumer {name!r} has {consumer.in_features} inputs, not a multiple of "
                f"{pair.producer!r}'s {units(producer)} channels: it must read the flattened "
                "(C, H, W) map of that convolution"
            )


class Simplifier:
    """Records top-k usage and shrinks the model every ``interval`` steps.

    Args:
        model: a model whose layers to shrink are ``SparseLinear``, ``SparseConv2d`` or
            ``SparseLSTM`` (see ``sparsify_``).
        config: a ``MeSimpConfig``.
        optimizer: the optimizer over ``model.parameters()``. Shrinking gives the layers new
            Parameter objects; the optimizer is updated to hold exactly the model's parameters,
            with its state sliced or reset per ``config.optimizer``. Anything else that holds
            Parameters (a DDP wrapper, hooks) must be rebuilt when ``step()`` returns True.
        pairs: producer -> consumer ``Pair``s; found with ``find_pairs`` when omitted.

    Example:
        >>> from meprop import MePropConfig, sparsify_, hidden_layers
        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        >>> _ = sparsify_(model, MePropConfig(k=4), filter_fn=hidden_layers(model))
        >>> simp = Simplifier(model, MeSimpConfig(interval=10))
        >>> simp.sizes()
        {'0': 32}
    """

    def __init__(
        self,
        model: nn.Module,
        config: MeSimpConfig,
        optimizer: torch.optim.Optimizer | None = None,
        pairs: Iterable[Pair] | None = None,
    ) -> None:
        if not isinstance(config, MeSimpConfig):
            raise TypeError(f"config must be a MeSimpConfig, got {type(config).__name__}")
        self._refuse_several_ranks()
        self.model, self.config, self.optimizer = model, config, optimizer
        self.pairs = list(pairs) if pairs is not None else find_pairs(model)
        modules = dict(model.named_modules())
        for pair in self.pairs:
            for name in (pair.producer, *pair.consumers, *pair.norms):
                if name not in modules:
                    raise ValueError(f"no module named {name!r} in the model")
            _check_pair(pair, modules)
        self._modules = modules
        self.steps = 0  # Simplifier.step() calls so far
        self.since = 0  # steps or examples since the last pruning
        self.history: list[tuple[int, dict[str, int]]] = [(0, self.sizes())]
        self._recording = False
        self._record(True)

    # -- the usage record ------------------------------------------------------------------

    def _layer(self, name: str) -> SparseLinear | SparseConv2d | SparseLSTM:
        return self._modules[name]

    def _groups(self, name: str) -> dict[str, int]:
        """The unit groups of a producer and their widths: a Linear's outputs, a Conv2d's
        filters, or each (layer, direction) of an LSTM's memory cells (``name.l0``,
        ``name.l0_reverse``, ...)."""
        layer = self._layer(name)
        if isinstance(layer, SparseLSTM):
            return {_lstm_group(name, key): h for key, h in layer.sizes().items()}
        return {name: units(layer)}

    def _usage(self, name: str) -> dict[str, tuple[Tensor, Tensor]]:
        """The usage record of a producer, by unit group."""
        layer = self._layer(name)
        if isinstance(layer, SparseLSTM):
            return {_lstm_group(name, key): u for key, u in layer.usage.items()}
        return {name: layer.usage}

    def _record(self, on: bool) -> None:
        """Attach fresh zeroed counters to every producer (on), or detach them (off)."""
        for pair in self.pairs:
            layer = self._layer(pair.producer)
            if not on:
                layer.usage = None
                continue
            dev = next(layer.parameters()).device

            def zeros(width, dev=dev):
                return (
                    torch.zeros(width, dtype=torch.int64, device=dev),
                    torch.zeros(1, dtype=torch.int64, device=dev),
                )

            if isinstance(layer, SparseLSTM):
                layer.usage = {key: zeros(h) for key, h in layer.sizes().items()}
            else:
                layer.usage = zeros(units(layer))
        self._recording = on

    def sizes(self) -> dict[str, int]:
        """Current width of every shrinkable unit group (a layer, or an LSTM direction)."""
        return {g: w for p in self.pairs for g, w in self._groups(p.producer).items()}

    # -- the schedule ----------------------------------------------------------------------

    def simplifying(self, step: int | None = None) -> bool:
        """Whether step number ``step`` (0-based; default: the next one) is in a simplify period."""
        step = self.steps if step is None else step
        if self.config.cycle is None:
            return True
        a, b = self.config.cycle
        return step % (a + b) < a

    def step(self, examples: int | None = None) -> bool:
        """Advance by one optimizer step (``examples``: its batch size, for ``unit="examples"``).

        Returns True when the model was shrunk.
        """
        if self.config.unit == "examples" and examples is None:
            raise ValueError("MeSimpConfig(unit='examples') needs step(examples=batch_size)")
        shrunk = False
        was_simplifying = self.simplifying(self.steps)
        self.steps += 1
        if was_simplifying:
            self.since += examples if self.config.unit == "examples" else 1
            if self.since >= self.config.interval:
                shrunk = self.prune()
        if self.config.cycle is not None:
            now, before = self.simplifying(), self.simplifying(self.steps - 1)
            a, b = self.config.cycle
            if now != before or (b == 0 and self.steps % a == 0):  # a new period starts
                self.since = 0
                self._record(now)
                if self.optimizer is not None:
                    reset_optimizer_state_(self.optimizer)
        return shrunk

    # -- pruning ---------------------------------------------------------------------------

    def keep_indices(self, group: str) -> Tensor:
        """Units of a group (see ``sizes()``) to keep: selected in at least prune_rate of the
        selections; never fewer than ``min_units`` (the most selected ones)."""
        producer = group.rsplit(".l", 1)[0] if group not in self._modules else group
        counts, selections = self._usage(producer)[group]
        threshold = self.config.prune_rate * selections.double()
        keep = (counts.double() >= threshold).nonzero().flatten()
        floor = min(self.config.min_units, counts.numel())
        if keep.numel() < floor:  # the floor: the most-selected units survive
            keep = counts.topk(floor).indices.sort().values
        return keep

    #: Whether this class makes every rank prune the same units (``DistributedSimplifier``).
    agrees_over_ranks = False

    def _refuse_several_ranks(self) -> None:
        """Each rank's record holds its own examples only, so under DDP plain ``Simplifier``s
        would prune different units on different ranks (and the next DDP wrap would fail on
        mismatched shapes): refuse, naming the class that sums the record over the ranks."""
        if self.agrees_over_ranks or not torch.distributed.is_available():
            return
        dist = torch.distributed
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                f"Simplifier under torch.distributed with {dist.get_world_size()} ranks: each "
                "rank would prune other units (its record counts its own examples only); use "
                "meprop.distributed.DistributedSimplifier, which sums the record over the ranks"
            )

    def prune(self) -> bool:
        """Remove the seldom-selected units now, then clear the counts. True if any was removed."""
        self._refuse_several_ranks()
        self.since = 0
        cuts: list[Cut] = []
        for pair in self.pairs:
            layer = self._layer(pair.producer)
            consumers = [self._modules[name] for name in pair.consumers]
            if isinstance(layer, SparseLSTM):
                # keeps first (pruning one direction re-indexes the record of none other)
                keeps = {
                    key: self.keep_indices(_lstm_group(pair.producer, key)) for key in layer.sizes()
                }
                for (lay, d), keep in keeps.items():
                    if keep.numel() < layer.sizes()[(lay, d)]:
                        last = lay == layer.num_layers - 1
                        cuts += prune_lstm_cells_(layer, lay, d, keep, consumers if last else ())
                continue
            keep = self.keep_indices(pair.producer)
            if keep.numel() == units(layer):
                continue
            blocks = [input_block(layer, c) for c in consumers]  # (before the producer shrinks)
            cuts += prune_out_(layer, keep)
            for name in pair.norms:
                cuts += prune_norm_(self._modules[name], keep)
            for consumer, block in zip(consumers, blocks, strict=True):
                cuts += prune_in_(consumer, keep, block)
        if cuts and self.optimizer is not None:
            update_optimizer_(self.optimizer, cuts, slice_state=self.config.optimizer == "slice")
        self._record(self._recording)
        if cuts:
            self.history.append((self.steps, self.sizes()))
        return bool(cuts)

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        usage = {}
        if self._recording:
            for p in self.pairs:
                for group, u in self._usage(p.producer).items():
                    usage[group] = [t.clone() for t in u]
        return {
            "config": self.config.to_dict(),
            "steps": self.steps,
            "since": self.since,
            "recording": self._recording,
            "history": [(s, dict(w)) for s, w in self.history],
            "usage": usage,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore counters and schedule position (after the model has its saved widths)."""
        self.steps, self.since = state["steps"], state["since"]
        self.history = [(s, dict(w)) for s, w in state["history"]]
        self._record(state["recording"])
        sizes = self.sizes()
        for p in self.pairs:
            live = self._usage(p.producer) if self._recording else {}
            for group, (counts, selections) in live.items():
                saved = state["usage"][group]
                if saved[0].shape != (sizes[group],):
                    raise ValueError(
                        f"saved usage of {group!r} has {saved[0].shape[0]} units but the layer "
                        f"has {sizes[group]}: load the model's weights first"
                    )
                counts.copy_(saved[0])
                selections.copy_(saved[1])
