"""Triton kernels for the cpl:: ops, with the reference functions' names and positional args.

The step engine (cpl::cpl_step_) is step.py + directions.py, called by cpl_kernels/engine.py.

cpl_kernels.ops imports this package lazily (only when the Triton backend serves a call), so a
missing triton raises ImportError here and never breaks `import cpl_kernels`.
On CPU the kernels run under TRITON_INTERPRET=1 (the tests do this with small shapes).
"""
from .masked import cpl_mask_words, masked_adamw_step_
from .pack import pack_signs_
from .stats import contribution_stats, contribution_stats_codes

__all__ = ["pack_signs_", "contribution_stats", "contribution_stats_codes", "masked_adamw_step_",
           "cpl_mask_words"]
