"""cpl-kernels: fused kernels and drop-in optimizers for Collaborative Parameter Learning."""
from . import ops, reference  # noqa: F401  (ops loads the native library and registers fakes)
from ._backend import choose as backend_for, native_loaded  # noqa: F401

__version__ = "0.1.0"
