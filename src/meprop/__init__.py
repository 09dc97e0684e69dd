"""meprop: minimal effort back propagation (meProp, meSimp, meAct) for PyTorch.

Sun et al., "meProp: Sparsified Back Propagation for Accelerated Deep Learning with Reduced
Overfitting" (ICML 2017) and "Training Simplification and Model Simplification for Deep
Learning: A Minimal Effort Back Propagation Method" (TKDE).
"""

from .analysis import UpdateMonitor
from .checkpoint import load, save
from .config import AdaptiveK, MeActConfig, MePropConfig, MeSimpConfig
from .convert import converted, densify_, hidden_layers, sparsify_
from .grads import clip_grad_norm_
from .lstm import SparseLSTM
from .meact import MeAct
from .nn import SparseLinear
from .ops import sparse_linear
from .simplify import Pair, Simplifier

__version__ = "0.1.0"

__all__ = [
    "MePropConfig",
    "AdaptiveK",
    "SparseLinear",
    "SparseLSTM",
    "sparsify_",
    "densify_",
    "converted",
    "hidden_layers",
    "sparse_linear",
    "clip_grad_norm_",
    "MeSimpConfig",
    "Simplifier",
    "Pair",
    "MeActConfig",
    "MeAct",
    "UpdateMonitor",
    "save",
    "load",
]
