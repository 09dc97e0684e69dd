"""meprop: minimal effort back propagation (meProp, meSimp, meAct) for PyTorch.

Sun et al., "meProp: Sparsified Back Propagation for Accelerated Deep Learning with Reduced
Overfitting" (ICML 2017) and "Training Simplification and Model Simplification for Deep
Learning: A Minimal Effort Back Propagation Method" (TKDE).
"""

import sys as _sys

_previous_hook = _sys.excepthook


def _interrupted(kind, value, tb):
    """Ctrl-C while torch and the kernels load (the command line's first seconds): one line."""
    if issubclass(kind, KeyboardInterrupt):
        print("meprop: interrupted while starting", file=_sys.stderr)
    else:
        _previous_hook(kind, value, tb)


_sys.excepthook = _interrupted  # (until the imports below are done)

from .checkpoint import load, save  # noqa: E402
from .config import AdaptiveK, MeActConfig, MePropConfig, MeSimpConfig  # noqa: E402
from .conv import SparseConv2d  # noqa: E402
from .convert import converted, densify_, hidden_layers, sparsify_  # noqa: E402
from .grads import clip_grad_norm_  # noqa: E402
from .lstm import SparseLSTM  # noqa: E402
from .meact import MeAct  # noqa: E402
from .nn import SparseLinear  # noqa: E402
from .ops import sparse_linear  # noqa: E402
from .optim import LazyAdam  # noqa: E402
from .simplify import Pair, Simplifier  # noqa: E402
from .update_monitor import UpdateMonitor  # noqa: E402

_sys.excepthook = _previous_hook

__version__ = "0.1.0"

__all__ = [
    "MePropConfig",
    "AdaptiveK",
    "SparseLinear",
    "SparseLSTM",
    "SparseConv2d",
    "sparsify_",
    "densify_",
    "converted",
    "hidden_layers",
    "sparse_linear",
    "clip_grad_norm_",
    "LazyAdam",
    "MeSimpConfig",
    "Simplifier",
    "Pair",
    "MeActConfig",
    "MeAct",
    "UpdateMonitor",
    "save",
    "load",
]
