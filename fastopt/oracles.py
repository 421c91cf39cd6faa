"""The implementation each public optimizer is compared with: its torch.optim twin, or, for
the optimizers torch does not have, the package its users know (pinned in the ``test`` and
``bench`` extras). Tests, ``fastopt bench`` and ``examples/train_digits.py`` build them here.

Documented differences from the oracles:

- Lion (lion-pytorch 0.2.5): the same formula. lion-pytorch has no ``maximize`` and asserts
  ``lr > 0``; fastopt takes ``lr >= 0`` (and schedules).
- AdEMAMix (pytorch-optimizer 4.1.0, ``weight_decouple=True``): the same formula and warm-ups.
  ``optax.contrib.ademamix`` has the same update (``sqrt(v_hat + eps_root) + eps``: equal for
  its default eps_root = 0; decay ``p -= lr (update + wd p)``, as here) but no built-in
  warm-up: alpha and b3 are constants or schedules the user supplies, evaluated at optax's
  0-based count, while fastopt and pytorch-optimizer evaluate the paper's warm-ups
  (``t_alpha_beta3``) at the 1-based step. State dicts do not cross between fastopt.torch
  and pytorch-optimizer (it keeps ``step`` in the group, fastopt per param, as torch.optim),
  and a param that gets no gradient for some steps falls behind the group's step count
  there, not here.
- AdamWScheduleFree (schedulefree 1.4.1): the same formula, train/eval switches and group
  keys. A fastopt schedule multiplies schedulefree's own warm-up, as a torch LR scheduler
  changing ``group['lr']`` does there; ``lr_max`` follows the product. In fastopt.torch the
  group's ``k``/``weight_sum``/``lr_max`` follow the params that take steps (schedulefree
  advances them once per group step even for params without a gradient). With
  ``state_dtype="bfloat16"`` fastopt keeps z, a param-sized iterate, in bfloat16 too: the
  eval-mode params then drift about 1e-2 relative from float32 state over 100 steps; keep
  float32 state for Schedule-Free unless the memory matters more.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from .algorithms import CLASSES


@dataclass(frozen=True)
class Oracle:
    """A third-party implementation: its pinned distribution, module, and a constructor from
    fastopt's hyperparameters."""

    requirement: str
    module: str
    build: Callable  # (module, params, lr, hypers: dict, foreach: bool) -> torch optimizer

    def available(self) -> bool:
        try:
            importlib.import_module(self.module)
        except ImportError:
            return False
        return True


def _lion(module, params, lr, h, foreach):
    if h.get("maximize"):
        raise ValueError("lion-pytorch has no maximize")
    return module.Lion(params, lr=lr, betas=h.get("betas", (0.9, 0.99)),
                       weight_decay=h.get("weight_decay", 0.0))


def _ademamix(module, params, lr, h, foreach):
    return module.AdEMAMix(params, lr=lr, weight_decouple=True, foreach=foreach, **h)


def _schedulefree(module, params, lr, h, foreach):
    return module.AdamWScheduleFree(params, lr=lr, foreach=foreach, **h)


ORACLES: dict[str, Oracle] = {
    "Lion": Oracle("lion-pytorch==0.2.5", "lion_pytorch", _lion),
    "AdEMAMix": Oracle("pytorch-optimizer==4.1.0", "pytorch_optimizer", _ademamix),
    "AdamWScheduleFree": Oracle("schedulefree==1.4.1", "schedulefree", _schedulefree),
}


def counterpart_name(cls: str) -> str:
    """What class ``cls`` is compared with: ``torch.optim.X`` or the oracle's package."""
    d, _ = CLASSES[cls]
    twin = d.torch_twin.get(cls)
    return f"torch.optim.{twin.name}" if twin is not None else ORACLES[cls].requirement


def counterpart(cls: str, params, lr: float, *, foreach: bool = False, **hypers):
    """The torch twin (for-loop path unless ``foreach``) or the oracle of public class
    ``cls``, built over ``params`` with these hyperparameters. ImportError if the oracle's
    package is missing."""
    d, _ = CLASSES[cls]
    twin = d.torch_twin.get(cls)
    if twin is not None:
        import torch

        return getattr(torch.optim, twin.name)(params, lr=lr, foreach=foreach, **hypers)
    oracle = ORACLES[cls]
    return oracle.build(importlib.import_module(oracle.module), params, lr, hypers, foreach)
