"""cpl-kernels: fused kernels and drop-in optimizers for Collaborative Parameter Learning."""
from . import ops, reference  # noqa: F401  (ops loads the native library and registers fakes)
from ._backend import choose as backend_for, native_loaded  # noqa: F401

__version__ = "0.1.0"

from . import optim  # noqa: E402
from .optim import *  # noqa: E402,F401,F403  (every optimizer: a new one is exported from optim/ alone)
from .reference_grad import build_reference  # noqa: E402,F401
from .masks import PackedMask, cpl_masks_once, mean_gradients, random_masks_like  # noqa: E402,F401
from . import analysis  # noqa: E402,F401

__all__ = optim.__all__ + ["PackedMask", "analysis", "backend_for", "build_reference", "cpl_masks_once",
                           "mean_gradients", "native_loaded", "ops", "random_masks_like", "reference"]
