"""PyTorch backend: ``torch.optim.Optimizer`` subclasses running fastopt's fused kernels.

    import fastopt.torch as fot
    opt = fot.AdamW(model.parameters(), lr=schedules.warmup(schedules.cosine(3e-4, 5000), 200))
"""

from ._backward import step_in_backward
from ._base import FlatOptimizer
from ._groups import muon_param_groups
from ._offload import CPUOffload
from .optim import *  # noqa: F403  (one class per public name, generated)
from .optim import __all__ as _classes

__all__ = [*_classes, "CPUOffload", "FlatOptimizer", "muon_param_groups", "step_in_backward"]
