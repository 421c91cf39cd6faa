"""The optimizer registry: one definition per optimizer (see ``_spec.py``), in the order the
public API lists them. Everything that lists optimizers reads ``REGISTRY``."""

from __future__ import annotations

from . import adadelta, adagrad, adam, sgd
from ._spec import FIRST_GRAD, ClassSpec, Definition, Hyper, State, TorchTwin

REGISTRY: dict[str, Definition] = {
    m.DEFINITION.name: m.DEFINITION for m in (adam, adagrad, adadelta, sgd)
}
#: public class name -> (definition, class spec)
CLASSES: dict[str, tuple[Definition, ClassSpec]] = {
    c.name: (d, c) for d in REGISTRY.values() for c in d.classes
}

__all__ = ["REGISTRY", "CLASSES", "Definition", "Hyper", "State", "ClassSpec", "TorchTwin",
           "FIRST_GRAD"]
