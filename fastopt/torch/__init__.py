"""PyTorch backend: ``torch.optim.Optimizer`` subclasses running fastopt's fused kernels.

    import fastopt.torch as fot
    opt = fot.AdamW(model.parameters(), lr=schedules.warmup(schedules.cosine(3e-4, 5000), 200))
"""

import torch as _torch

from ..schedules import Schedule as _Schedule
from ._backward import step_in_backward
from ._base import FlatOptimizer
from ._groups import muon_param_groups
from ._offload import CPUOffload
from .optim import *  # noqa: F403  (one class per public name, generated)
from .optim import __all__ as _classes

# A schedule in a param group (ZeroRedundancyOptimizer's state_dict, or any dict a user saves
# with one) loads under torch.load's weights_only=True, torch's default: it unpickles through
# its constructor, which checks the table, from floats and a string.
_torch.serialization.add_safe_globals([_Schedule])

__all__ = [*_classes, "CPUOffload", "FlatOptimizer", "muon_param_groups", "step_in_backward"]
