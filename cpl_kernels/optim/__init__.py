"""Drop-in torch.optim optimizers with the CPL rule, and compact-state MaskedAdamW."""
from ._base import state_bytes  # noqa: F401
from .adam import CPLAdam  # noqa: F401
from .adamw import CPLAdamW  # noqa: F401
from .adam8bit import CPLAdam8bit, CPLAdamW8bit  # noqa: F401
from .in_backward import InBackward, in_backward  # noqa: F401
from .lion import CPLLion  # noqa: F401
from .masked_adamw import MaskedAdamW  # noqa: F401
from .mofo import MoFOAdamW  # noqa: F401
from .sgd import CPLSGD  # noqa: F401

__all__ = ["CPLAdam", "CPLAdam8bit", "CPLAdamW", "CPLAdamW8bit", "CPLLion", "CPLSGD", "InBackward",
           "MaskedAdamW", "MoFOAdamW", "in_backward", "state_bytes"]
