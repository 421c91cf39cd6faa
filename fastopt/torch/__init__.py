"""PyTorch backend: ``torch.optim.Optimizer`` subclasses running fastopt's fused kernels.

    import fastopt.torch as fot
    opt = fot.AdamW(model.parameters(), lr=schedules.warmup(schedules.cosine(3e-4, 5000), 200))
"""

from .optim import Adadelta, Adagrad, Adam, AdamW, FlatOptimizer

__all__ = ["Adam", "AdamW", "Adagrad", "Adadelta", "FlatOptimizer"]
