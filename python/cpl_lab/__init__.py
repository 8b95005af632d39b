"""cpl_lab: the paper's knowledge-injection experiment end to end, built on cpl_kernels' public API.

`cpl inject --demo` pre-trains a tiny Llama on synthetic facts, splits what it knows (mastered)
from what it does not (injection), injects with several methods on the same budget and measures
what each learns and forgets. See docs/lab.md. Nothing here imports torch at package import time,
so the CLI can set thread/OpenMP environment variables first.
"""

__all__ = ["LabConfig"]


def __getattr__(name):
    if name == "LabConfig":
        from .config import LabConfig
        return LabConfig
    raise AttributeError(name)
