"""Frozen, validated settings for meProp.

A config is a value: it is hashable, printable and checked once, when it is made, so a bad
setting fails where it was written rather than in the middle of a backward pass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "MODES",
    "BACKENDS",
    "SCOPES",
    "RULES",
    "AdaptiveK",
    "MePropConfig",
    "MeSimpConfig",
    "MeActConfig",
    "check_row_config",
]

# per_example: top-k of each row of the output gradient (the original meProp).
# unified:     one set of k columns per call, ranked by the sum of |g| over the rows.
# random:      k columns drawn uniformly per row (the paper's control).
# symmetric:   per row, the k/2 largest positive and the k - k/2 largest negative entries: a
#              per-example selection that keeps the gradient's sign balance (docs/per_example.md)
# per_position: convolutions only (SparseConv2d): at each output position of each example, the
#              k channels with the largest |g|: top-k of each row of the im2col gradient
#              matrix (rows: positions, columns: filters). A linear layer's per_example already
#              selects per row (per position of a (B, T, n) input), so linear layers refuse it.
MODES = ("per_example", "unified", "random", "symmetric", "per_position")

# auto:   the fastest of the implementations below that can run a call, timed on this machine
#         on first use and cached (meprop.kernels.dispatch; MEPROP_AUTOTUNE=0: native, else
#         numba, else torch).
# native: require the C++ kernels; numba: require the numba kernels (error where they do not
#         apply, e.g. float16 or CUDA tensors).
# torch:  PyTorch ops: GEMMs on the gradient compacted to the selected columns.
# dense:  PyTorch ops: the masked gradient through the dense GEMMs.
# triton: Triton kernels on CUDA tensors (meprop.kernels.triton_ops, the "gpu" extra;
#         docs/gpu.md); "auto" runs it on CUDA tensors where Triton is installed. CPU tensors
#         only under Triton's interpreter (TRITON_INTERPRET=1: tests).
# (meAct's kernels: auto, torch, native, numba.)
BACKENDS = ("auto", "native", "numba", "torch", "masked", "triton")
# the "masked" backend's name before 0.2 (still accepted, with a DeprecationWarning)
OLD_BACKEND_NAMES = {"dense": "masked"}
MEACT_BACKENDS = ("auto", "torch", "native", "numba")

# Which rows ``unified`` ranks its columns by under torch.distributed (one process: the same).
# local:  this process's rows (each rank of a DDP job picks its own k columns).
# global: the rows of every rank (column scores summed over the ranks inside backward).
SCOPES = ("local", "global")


# How AdaptiveK chooses each step's k (meprop.adaptive):
# tinyprop: a share of the layer's width that follows the error's size (TinyProp's rule).
# mass:     the fewest entries that hold a given share of the gradient's mass.
RULES = ("tinyprop", "mass")


def _check_type(name: str, value: Any, expected: type) -> None:
    # bool is a subclass of int: k=True must not pass as k=1.
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise TypeError(f"{name} must be {expected.__name__}, got {type(value).__name__} {value!r}")


def _check_number(name: str, value: Any, unit: str = "") -> float:
    """``value`` as a float; TypeError for anything but an int or float (bool included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number{unit}, got {type(value).__name__} {value!r}")
    return float(value)


def _check_share(name: str, value: Any, low: float = 0.0) -> float:
    _check_number(name, value)
    if not low <= value <= 1.0:
        raise ValueError(f"{name} must be in [{low:g}, 1], got {value}")
    return float(value)


@dataclass(frozen=True)
class AdaptiveK:
    """Choose k at every backward instead of fixing it: ``MePropConfig(k=K_MAX, adapt=...)``.

    The config's ``k`` is the upper bound; each step's k lies in ``[min_k, k]``. Per example
    (``per_example`` mode: one k per row of the output gradient) or per batch (``unified``: one
    k per call, and with ``scope="global"`` the same k on every rank, from the global scores).

    Rules (``meprop.adaptive`` has the formulas):

    - ``"tinyprop"`` (TinyProp, Rüb et al. 2023): the share of the layer's ``n`` outputs kept is
      ``(s_min + (s_max - s_min) * Y / Y_max) * damping ** depth``, where ``Y`` is the error's
      size (the L1 norm of the example's output gradient; in ``unified`` the sum over the
      batch's rows, which for a mean loss is the mean example's), ``Y_max`` the largest ``Y`` the layer has seen, and ``depth`` the layer's
      position counted from the network's last converted layer (0) towards the input
      (``sparsify_`` numbers them). Early in training errors are large and more is kept.
    - ``"mass"``: the fewest entries (per example) or columns (unified: by their summed |g|)
      whose ``measure`` (``"abs"``: |g|, ``"square"``: g^2) adds up to at least ``share`` of
      the row's (or scores') total.

    Args:
        min_k: the least k (>= 1, <= the config's k).
        rule: ``"tinyprop"`` or ``"mass"``.
        s_min, s_max: tinyprop's least and largest share of the width, 0 <= s_min <= s_max <= 1.
        damping: tinyprop's factor per layer of depth, in (0, 1].
        share: mass's share of the total, in (0, 1].
        measure: mass's measure, ``"abs"`` or ``"square"``.

    Example:
        >>> AdaptiveK(min_k=4, rule="mass", share=0.9)  # doctest: +NORMALIZE_WHITESPACE
        AdaptiveK(min_k=4, rule='mass', s_min=0.0, s_max=1.0, damping=1.0, share=0.9,
                  measure='abs')
    """

    min_k: int = 1
    rule: str = "tinyprop"
    s_min: float = 0.0
    s_max: float = 1.0
    damping: float = 1.0
    share: float = 0.9
    measure: str = "abs"

    def __post_init__(self) -> None:
        _check_type("min_k", self.min_k, int)
        if self.min_k < 1:
            raise ValueError(f"min_k must be >= 1, got {self.min_k}")
        _check_type("rule", self.rule, str)
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        for name in ("s_min", "s_max"):
            object.__setattr__(self, name, _check_share(name, getattr(self, name)))
        if self.s_min > self.s_max:
            raise ValueError(f"s_min ({self.s_min}) must be <= s_max ({self.s_max})")
        object.__setattr__(self, "damping", _check_share("damping", self.damping))
        if self.damping == 0:
            raise ValueError("damping must be in (0, 1], got 0.0")
        object.__setattr__(self, "share", _check_share("share", self.share))
        if self.share == 0:
            raise ValueError("share must be in (0, 1], got 0.0")
        if self.measure not in ("abs", "square"):
            raise ValueError(f"measure must be 'abs' or 'square', got {self.measure!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for checkpoints and logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class MePropConfig:
    """How a layer sparsifies its backward pass.

    Args:
        k: number of output-gradient entries kept per row (``per_example``, ``random``) or
            columns kept per call (``unified``). Layers narrower than k keep everything, which
            is exactly the dense gradient.
        mode: ``"per_example"``, ``"unified"`` or ``"random"``.
        sparse_bias: compute the bias gradient from the sparsified output gradient. The default
            (False) uses the full gradient, as the authors' code does.
        sparse_grad: give the weight a row-sparse ``.grad`` (a sparse COO tensor holding only
            the touched rows, as ``nn.Embedding(sparse=True)`` does), for optimizers that take
            sparse gradients (SGD, Adagrad, SparseAdam).
        backend: which implementation runs the sparse backward: ``"native"`` (the C++
            kernels), ``"numba"``, ``"torch"`` (GEMMs on the compacted gradient), ``"masked"``
            (mask the gradient, then the dense GEMMs), ``"triton"`` (Triton kernels on CUDA
            tensors; the ``gpu`` extra) or ``"auto"``: on the CPU the fastest of those that
            can run, timed on this machine on first use and cached (see
            ``meprop.kernels.dispatch``); on CUDA tensors ``"triton"`` where Triton is
            installed, else ``"torch"``. All give the same gradients up to the order of
            floating-point sums. ``SparseLSTM`` runs ``"masked"`` as ``"torch"``. (``"dense"``,
            its old name, still works, with a DeprecationWarning.)
        scope: ``"local"`` or ``"global"``, for ``unified`` selection in a torch.distributed
            job: ``"local"`` ranks the columns by this process's rows (each rank picks its
            own k columns); ``"global"`` sums the column scores over all ranks inside backward
            (one all-reduce of ``out_features`` numbers per layer and step), so every rank
            picks the same columns, those of the global batch, as one process would. Every rank
            must then run the same backward. Per-example and random selection are local to
            each example, so scope does not change them. ``SparseLSTM`` supports ``"local"``
            only (its ranks' batches have different numbers of time steps).
        adapt: ``None`` (k fixed), or an ``AdaptiveK``: each backward chooses its k in
            ``[adapt.min_k, k]`` (per example, or per call in ``unified``). Not with
            ``random`` (it has no magnitudes to follow).
        memory: memorized sparse back-propagation (after Zhang et al., "Memorized Sparse
            Backpropagation", 2019), a ratio in ``[0, 1)``; 0 (the default) is off. Each layer
            keeps a vector ``m`` over its outputs: backward selects from ``g + m`` (every row
            gets ``m`` added) and then sets ``m = memory * (what the selection dropped,
            averaged over the rows)``, so a gradient that top-k keeps dropping still arrives,
            a step later and weighed down, instead of being lost. Costs two passes over ``g``.
        warmup: the first ``warmup`` forward passes of each layer that build a graph (training
            steps) run as the dense layer, then top-k starts (0: from the first step). Counted
            per layer, in its ``k_record.calls``.

    Example:
        >>> MePropConfig(k=20, mode="unified")  # doctest: +NORMALIZE_WHITESPACE
        MePropConfig(k=20, mode='unified', sparse_bias=False, sparse_grad=False, backend='auto',
                     scope='local', adapt=None, memory=0.0, warmup=0)
    """

    # metadata: the command line's help and choices (meprop train's flags)
    k: int = field(metadata={"help": "top-k kept per example (unified: per mini-batch)"})
    mode: str = field(
        default="per_example",
        metadata={
            "help": "top-k selection: per example, unified over the mini-batch, random, "
            "symmetric (per example, half the largest positive and half the largest negative "
            "entries), or per_position (convolutions: k channels at each output position)",
            "choices": MODES,
        },
    )
    sparse_bias: bool = False
    sparse_grad: bool = field(
        default=False, metadata={"help": "row-sparse weight gradients (for SGD/Adagrad)"}
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": "implementation of the sparse backward: auto (the fastest here, measured on "
            "first use and cached; see `meprop info`), native (C++), numba, torch, masked "
            "(the masked gradient through the dense products; formerly 'dense'), triton (CUDA)",
            "choices": (*BACKENDS, *OLD_BACKEND_NAMES),
        },
    )
    scope: str = field(
        default="local",
        metadata={
            "help": "unified top-k under torch.distributed: columns ranked by each rank's rows "
            "(local) or by every rank's, as one process would (global)",
            "choices": SCOPES,
        },
    )
    adapt: AdaptiveK | None = None
    memory: float = field(
        default=0.0,
        metadata={
            "help": "memorized sparse back-propagation: the share of the gradient that top-k "
            "dropped carried into the next backward (0: off; MSBP's ratio: 0.8)"
        },
    )
    warmup: int = field(
        default=0,
        metadata={
            "help": "the first N training forward passes of each layer run dense (the full "
            "gradient), then top-k"
        },
    )

    def __post_init__(self) -> None:
        _check_type("k", self.k, int)
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        _check_type("mode", self.mode, str)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        _check_type("sparse_bias", self.sparse_bias, bool)
        _check_type("sparse_grad", self.sparse_grad, bool)
        _check_type("backend", self.backend, str)
        if self.backend in OLD_BACKEND_NAMES:
            new = OLD_BACKEND_NAMES[self.backend]
            warnings.warn(
                f"MePropConfig(backend={self.backend!r}) is now backend={new!r} (the masked "
                "gradient through the dense products); the old name will go",
                DeprecationWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "backend", new)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        _check_type("scope", self.scope, str)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.adapt is not None:
            if not isinstance(self.adapt, AdaptiveK):
                raise TypeError(
                    f"adapt must be an AdaptiveK or None, got {type(self.adapt).__name__}"
                )
            if self.mode not in ("per_example", "unified"):
                raise ValueError(f"adapt needs mode 'per_example' or 'unified', got {self.mode!r}")
            if self.adapt.min_k > self.k:
                raise ValueError(
                    f"adapt.min_k ({self.adapt.min_k}) must be <= k ({self.k}), the upper bound"
                )
        object.__setattr__(self, "memory", _check_number("memory", self.memory))
        if not 0.0 <= self.memory < 1.0:
            raise ValueError(
                f"memory must be in [0, 1) (the share of the dropped gradient carried over; "
                f"0: off, MSBP's 0.8), got {self.memory}"
            )
        _check_type("warmup", self.warmup, int)
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 (dense forward passes first), got {self.warmup}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for checkpoints and logs; ``adapt`` as a dict)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.adapt is not None:
            out["adapt"] = self.adapt.to_dict()
        return out


@dataclass(frozen=True)
class MeSimpConfig:
    """How meSimp shrinks a network from its top-k record.

    Args:
        prune_rate: a unit is removed when it was selected in fewer than
            ``prune_rate * selections`` of the top-k selections since the last pruning
            (the official default is 0.1); a selection counts when the unit's gradient
            entry is non-zero.
        interval: prune every ``interval`` calls of ``Simplifier.step()`` (or every
            ``interval`` examples with ``unit="examples"``, passed as ``step(examples=n)``).
        unit: ``"steps"`` or ``"examples"``.
        min_units: never shrink a layer below this width.
        optimizer: ``"slice"`` keeps the optimizer's state for the kept units (moments, step
            counts, Adagrad sums); ``"reset"`` clears all of it after each pruning.
        cycle: ``None`` (simplify all the time), or ``(simplify_steps, normal_steps)``: training
            alternates a period with simplification and a period of plain meProp training, and
            the optimizer's history is reset at the start of every period (the paper's cycle
            mechanism). Counted in ``step()`` calls.

    Example:
        >>> MeSimpConfig(prune_rate=0.1, interval=600, cycle=(1200, 600)).cycle
        (1200, 600)
    """

    prune_rate: float = 0.1
    interval: int = 100
    unit: str = "steps"
    min_units: int = 1
    optimizer: str = "slice"
    cycle: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prune_rate, bool) or not isinstance(self.prune_rate, int | float):
            raise TypeError(f"prune_rate must be a number, got {self.prune_rate!r}")
        if not 0.0 <= self.prune_rate <= 1.0:
            raise ValueError(f"prune_rate must be in [0, 1], got {self.prune_rate}")
        _check_type("interval", self.interval, int)
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.unit not in ("steps", "examples"):
            raise ValueError(f"unit must be 'steps' or 'examples', got {self.unit!r}")
        _check_type("min_units", self.min_units, int)
        if self.min_units < 1:
            raise ValueError(f"min_units must be >= 1, got {self.min_units}")
        if self.optimizer not in ("slice", "reset"):
            raise ValueError(f"optimizer must be 'slice' or 'reset', got {self.optimizer!r}")
        if self.cycle is not None:
            cycle = tuple(self.cycle)
            ok = len(cycle) == 2 and all(
                isinstance(c, int) and not isinstance(c, bool) for c in cycle
            )
            if not ok or cycle[0] < 1 or cycle[1] < 0:
                raise ValueError(
                    f"cycle must be (simplify_steps >= 1, normal_steps >= 0), got {self.cycle!r}"
                )
            object.__setattr__(self, "cycle", cycle)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for checkpoints and logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class MeActConfig:
    """meAct (minimal effort activation): per example, compute only the neurons that matter.

    Per training example and hidden layer, the absolute gradients of the layer's outputs are
    accumulated over the passes over that example. From epoch ``start_epoch`` on, a neuron is
    *active* for an example when its share of the layer's accumulated total is at least
    ``threshold`` percent and, with ``cap``, it is among the ``cap`` largest shares. Inactive
    neurons output the value they had at the example's last pass and get no gradient.

    Args:
        start_epoch: the first epoch (counting from 0) whose forward passes use active sets;
            the epochs before it are normal training (and accumulate the gradients).
        threshold: the least share, in percent of the layer's total, of an active neuron
            (0: all pass). With 500 neurons an even spread is 0.2% each; on MNIST after 10
            epochs, 0.5% leaves about 60 active neurons per example in each layer.
        cap: at most this many active neurons per example and layer; 0: no cap.
        storage: ``"float16"`` or ``"float32"``: the dtype of the per-example state (the
            shares of the accumulated gradients and the cached outputs). float16 halves the
            memory; shares below ~0.01% lose precision there, far below useful thresholds.
        backend: ``"auto"`` (compiled CPU kernels for float32/float64 on CPU, PyTorch ops
            elsewhere), ``"torch"`` or ``"numba"`` (an error where the kernels do not apply).

    Example:
        >>> MeActConfig(start_epoch=10, threshold=0.5)
        MeActConfig(start_epoch=10, threshold=0.5, cap=0, storage='float16', backend='auto')
    """

    start_epoch: int = 0
    threshold: float = 0.5
    cap: int = 0
    storage: str = "float16"
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check_type("start_epoch", self.start_epoch, int)
        if self.start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {self.start_epoch}")
        threshold = _check_number("threshold", self.threshold, " (percent)")
        if not 0.0 <= threshold <= 100.0:
            raise ValueError(
                f"threshold is a percentage of the layer's total and must be in [0, 100], "
                f"got {self.threshold}"
            )
        object.__setattr__(self, "threshold", threshold)
        _check_type("cap", self.cap, int)
        if self.cap < 0:
            raise ValueError(f"cap must be >= 0 (0: no cap), got {self.cap}")
        if self.storage not in ("float16", "float32"):
            raise ValueError(f"storage must be 'float16' or 'float32', got {self.storage!r}")
        if self.backend not in MEACT_BACKENDS:
            raise ValueError(f"backend must be one of {MEACT_BACKENDS}, got {self.backend!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for checkpoints and logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_row_config(config: MePropConfig, layer: str) -> None:
    """Raise for a mode a layer that selects per row of its (M, n) gradient cannot take:
    ``per_position`` is a convolution's (its per_example already is per row, per position)."""
    if config.mode == "per_position":
        raise ValueError(
            f"{layer}: mode='per_position' is a convolution mode (k channels at each output "
            "position); a linear layer's mode='per_example' already selects per row, i.e. per "
            "position of a (batch, time, features) input: use that (sparsify_ gives a model's "
            "Conv2d and Linear layers their own configs through filter_fn)"
        )
