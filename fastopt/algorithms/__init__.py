"""The optimizer registry: one definition per optimizer (see ``_spec.py``), one module each.

Every module here not starting with ``_`` is a definition (its ``DEFINITION``), found by name:
adding ``<name>.py`` adds the optimizer, with no list to edit. Everything that lists optimizers
reads ``REGISTRY`` (or ``CLASSES``).
"""

from __future__ import annotations

import importlib
import pkgutil

from ._spec import (
    FIRST_GRAD,
    INIT_LR,
    INIT_PARAMS,
    ClassSpec,
    Definition,
    Hyper,
    Modes,
    Scalar,
    State,
    TorchTwin,
)


def _definitions() -> dict[str, Definition]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        definition = importlib.import_module(f"{__name__}.{info.name}").DEFINITION
        if definition.name != info.name:
            raise ValueError(f"fastopt/algorithms/{info.name}.py defines {definition.name!r}")
        found[definition.name] = definition
    return found


REGISTRY: dict[str, Definition] = _definitions()
#: public class name -> (definition, class spec)
CLASSES: dict[str, tuple[Definition, ClassSpec]] = {
    c.name: (d, c) for d in REGISTRY.values() for c in d.classes
}

__all__ = ["REGISTRY", "CLASSES", "Definition", "Hyper", "State", "Scalar", "Modes",
           "ClassSpec", "TorchTwin", "FIRST_GRAD", "INIT_LR", "INIT_PARAMS"]
