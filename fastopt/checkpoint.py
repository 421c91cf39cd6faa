"""Checkpoints: ``save(opt, path)`` / ``load(path, params)`` in .npz, no pickle, atomic writes.

A checkpoint holds the params, every state buffer, the step count, the schedule table,
``lr_scale``, ``max_grad_norm`` and the hyperparameters, plus a JSON header (format name,
version, optimizer class, size, dtype) stored as bytes. ``load`` checks all of it before it
touches anything; a truncated, corrupted or mismatched file raises ``CheckpointError``.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from . import optimizers
from ._checks import check_buffer, dtype_arg, kernel_view, param_dtype

FORMAT = "fastopt-checkpoint"
VERSION = 1
OPTIMIZERS = ("Adam", "AdamW", "Adagrad", "Adadelta")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unreadable, corrupted, or not for these params."""


def save(opt, path) -> None:
    """Write ``opt`` (params, state, step, schedule, hyperparameters) to ``path`` atomically."""
    path = Path(path)
    # state, params (16-bit as uint16 bits) and max_grad_norm of one moment between two steps
    d, params, max_grad_norm = opt._checkpoint()
    meta = {"format": FORMAT, "version": VERSION, "optimizer": d["optimizer"],
            "step": int(d["step"]), "lr_scale": float(d["lr_scale"]),
            "max_grad_norm": max_grad_norm, "size": int(params.size),
            "dtype": opt.dtype, "state_dtype": opt.state_dtype,
            "hyperparameters": {k: list(v) if isinstance(v, tuple) else v
                                for k, v in opt.defaults.items()}}
    arrays = {name: d[name] for name in opt.state}
    arrays["schedule"] = d["schedule"]
    arrays["params"] = params
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # the old checkpoint stays whole until this instant
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _read(path: Path) -> tuple[dict, dict]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}  # reading every member checks its CRC
        meta = json.loads(bytes(arrays.pop("meta")).decode())
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) \
            as exc:
        raise CheckpointError(f"{path}: not a readable fastopt checkpoint ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastopt checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('version')}, this "
                              f"fastopt reads version {VERSION}")
    return meta, arrays


def load(path, params, *, optimizer=None, restore_params: bool = True, dtype=None):
    """A new optimizer over ``params`` in the saved state; ``params`` get the saved values.

    ``optimizer``: the expected class or class name (a different one raises). With
    ``restore_params=False`` the params are left as they are (e.g. restored elsewhere).
    ``dtype``: for raw uint16 params, their 16-bit format (as for the optimizers).
    """
    path = Path(path)
    meta, arrays = _read(path)
    name = meta.get("optimizer")
    if name not in OPTIMIZERS:
        raise CheckpointError(f"{path}: unknown optimizer {name!r}")
    expected = getattr(optimizer, "__name__", optimizer)
    if expected is not None and expected != name:
        raise CheckpointError(f"{path} holds a {name} checkpoint, not {expected}")
    params = params.buffer if hasattr(params, "views") else params
    allowed = None if dtype is None else ("uint16", dtype_arg(dtype))
    params = check_buffer("params", params, dtype=allowed)
    kind = param_dtype(params, dtype)
    if params.shape[0] != meta.get("size") or kind != meta.get("dtype"):
        raise CheckpointError(f"{path}: saved for {meta.get('size')} {meta.get('dtype')} params, "
                              f"got {params.shape[0]} {kind}")
    if "schedule" not in arrays:
        raise CheckpointError(f"{path}: the schedule table is missing")
    saved = arrays.get("params")
    if saved is None or saved.shape != params.shape:
        raise CheckpointError(f"{path}: the saved params are missing or of the wrong size")
    cls = getattr(optimizers, name)
    try:
        opt = cls(params, **meta["hyperparameters"], dtype=dtype,
                  state_dtype=meta.get("state_dtype", "float32"))
        state = {**arrays, **meta["hyperparameters"], "optimizer": name, "step": meta["step"],
                 "lr_scale": meta["lr_scale"]}
        opt.load_state_dict(state)
        opt.max_grad_norm = meta.get("max_grad_norm")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: inconsistent checkpoint ({exc})") from exc
    if restore_params:
        kernel_view(opt.params)[...] = opt._xp.asarray(saved)
    return opt
