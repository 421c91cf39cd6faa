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
- LAMB (optax 0.2.8 ``optax.lamb``, with jax on the CPU): the same formula (eps outside the
  square root, optax's ``eps_root`` = 0; the trust ratio 1 where a norm is 0). optax has no
  ``maximize``. It is driven here as a torch optimizer (``OptaxOptimizer``): each step one
  jitted update of the group's params as a list, ``group['lr']`` passed as its learning rate.
  apex's ``FusedLAMB`` differs from both: it clips the gradients to a global norm
  (``max_grad_norm=1.0``) first, and unless ``use_nvlamb=True`` it gives tensors without
  weight decay a trust ratio of 1. pytorch-optimizer's ``Lamb`` (the CPU bench's torch
  comparison, ``BENCH_EXTRAS``) runs with its defaults, which differ (it clips the gradients
  to ``max_grad_norm=1.0`` and averages them, ``grad_averaging=True``): its numbers are not
  optax's, its work per element is comparable.
"""

from __future__ import annotations

import functools
import importlib
import inspect
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
    #: for an oracle outside torch (optax): (module, values, grads, lr, steps, hypers) ->
    #: (step closure, () -> the params as numpy arrays), its own loop as its users run it
    native: Callable | None = None
    #: the bench's column name where it is not "oracle" (a second comparison)
    label: str = "oracle"

    def run_native(self, values, grads, lr, steps, hypers):
        return self.native(importlib.import_module(self.module), values, grads, lr, steps,
                           hypers)

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


def _optax_lamb(module, params, lr, h, foreach):
    if h.get("maximize"):
        raise ValueError("optax.lamb has no maximize")
    betas = h.get("betas", (0.9, 0.999))

    def make(learning_rate):
        return module.lamb(learning_rate, b1=betas[0], b2=betas[1], eps=h.get("eps", 1e-6),
                           weight_decay=h.get("weight_decay", 0.0))

    return optax_optimizer()(params, lr, make)


def _optax_lamb_native(module, values, grads, lr, steps, h):
    """optax.lamb as its users run it: one jitted update + apply over the param list, the
    params and the state donated (updated in place), a cosine schedule evaluated inside."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    betas = h.get("betas", (0.9, 0.999))
    tx = module.lamb(module.cosine_decay_schedule(lr, steps), b1=betas[0], b2=betas[1],
                     eps=h.get("eps", 1e-6), weight_decay=h.get("weight_decay", 0.0))
    params = [jnp.asarray(v) for v in values]
    g = [jnp.asarray(x) for x in grads]
    box = {"params": params, "state": tx.init(params)}

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return module.apply_updates(params, updates), state

    def step():
        box["params"], box["state"] = update(box["params"], box["state"], g)
        jax.block_until_ready(box["params"])

    return step, lambda: [np.asarray(p) for p in box["params"]]


def _pto_lamb(module, params, lr, h, foreach):
    """pytorch-optimizer's Lamb (the CPU bench's torch-side comparison): its defaults, with
    these betas, eps and weight decay."""
    return module.Lamb(params, lr=lr, betas=h.get("betas", (0.9, 0.999)),
                       eps=h.get("eps", 1e-6), weight_decay=h.get("weight_decay", 0.0))


def optax_optimizer():
    """``OptaxOptimizer``: an optax transformation driven as a torch optimizer over CPU
    float32 tensors (made on first use: importing this module imports neither torch nor
    jax)."""
    global _OptaxOptimizer
    if _OptaxOptimizer is not None:
        return _OptaxOptimizer
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch

    class OptaxOptimizer(torch.optim.Optimizer):
        """``make(learning_rate)`` -> an optax GradientTransformation, with the learning rate
        injected as a hyperparameter: each ``step()`` runs one jitted update over each
        group's params (a list pytree) with ``group['lr']``, so torch LR schedulers work."""

        def __init__(self, params, lr, make):
            super().__init__(params, {"lr": lr})
            tx = optax.inject_hyperparams(make)(learning_rate=lr)

            def update(grads, state, params, learning_rate):
                state.hyperparams["learning_rate"] = learning_rate
                updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state

            self._update = jax.jit(update)
            self._states = [tx.init(self._arrays(g, "data")) for g in self.param_groups]

        @staticmethod
        def _arrays(group, what):
            out = []
            for p in group["params"]:
                t = p.detach() if what == "data" else p.grad
                out.append(jnp.asarray((torch.zeros_like(p) if t is None else t).numpy()))
            return out

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for i, group in enumerate(self.param_groups):
                new, self._states[i] = self._update(
                    self._arrays(group, "grad"), self._states[i], self._arrays(group, "data"),
                    jnp.float32(group["lr"]))
                for p, value in zip(group["params"], new, strict=True):
                    p.copy_(torch.from_numpy(np.array(value)))
            return loss

    _OptaxOptimizer = OptaxOptimizer
    return OptaxOptimizer


_OptaxOptimizer = None


ORACLES: dict[str, Oracle] = {
    "Lion": Oracle("lion-pytorch==0.2.5", "lion_pytorch", _lion),
    "AdEMAMix": Oracle("pytorch-optimizer==4.1.0", "pytorch_optimizer", _ademamix),
    "AdamWScheduleFree": Oracle("schedulefree==1.4.1", "schedulefree", _schedulefree),
    "LAMB": Oracle("optax==0.2.8", "optax", _optax_lamb, native=_optax_lamb_native),
}

#: further comparisons ``fastopt bench`` times (not numerically equal: other defaults)
BENCH_EXTRAS: dict[str, Oracle] = {
    "LAMB": Oracle("pytorch-optimizer==4.1.0", "pytorch_optimizer", _pto_lamb,
                   label="pytorch-optimizer"),
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

        twin_cls = getattr(torch.optim, twin.name)
        if "foreach" in inspect.signature(twin_cls).parameters:  # (Muon has none)
            hypers["foreach"] = foreach
        return twin_cls(params, lr=lr, **hypers)
    oracle = ORACLES[cls]
    return oracle.build(importlib.import_module(oracle.module), params, lr, hypers, foreach)
