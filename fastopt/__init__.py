"""fastopt: fused optimizer kernels over flat buffers, schedules evaluated inside the kernel."""

from . import functional, schedules
from ._bf16 import join_remainder, split_master
from ._checks import ArrayArgumentError
from ._int8 import Int8State
from .checkpoint import CheckpointError, load, save
from .flat import FlatBuffer
from .optimizers import *  # noqa: F403  (one class per public optimizer name, generated)
from .optimizers import __all__ as _optimizers
from .schedules import ReduceOnPlateau, Schedule

__version__ = "0.1.0"

__all__ = [
    *_optimizers,
    "ArrayArgumentError",
    "CheckpointError",
    "FlatBuffer",
    "Int8State",
    "ReduceOnPlateau",
    "Schedule",
    "functional",
    "join_remainder",
    "load",
    "save",
    "schedules",
    "split_master",
    "__version__",
]
