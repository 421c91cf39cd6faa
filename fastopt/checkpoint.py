"""Checkpoints: ``save(opt, path)`` / ``load(path, params)`` in .npz, no pickle, atomic writes.

A checkpoint holds the params, every state buffer, the step count, the schedule table,
``lr_scale``, ``max_grad_norm`` and the hyperparameters, plus a JSON header (format name,
version, optimizer class, size, dtype) stored as bytes. ``load`` checks all of it before it
touches anything: any damaged, foreign or mismatched file raises ``CheckpointError`` (never
another exception type because of what the file holds), and the member list and every
member's declared size are checked against the params' size before anything is decompressed,
so a small file cannot make ``load`` decompress or allocate more than the params imply.
Arrays must be stored exactly as ``save`` writes them (params float32, or 16-bit params as
uint16 bits; state float32, int8 state raw: ``<name>_codes`` uint8 and ``<name>_absmax``
float32, one per block, with the code's version in the header; the schedule float64).

``save`` writes a short-named temporary file (``.fastopt-<pid>-<random>.tmp``) in the
target's directory, fsyncs it and renames it over the target. An existing file keeps its
mode, a new one gets the umask's; a symlink's target is written (the link stays); and temporary
files of saves whose process died (e.g. killed) are removed by the next save there.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import secrets
import stat
import threading
import zipfile
from pathlib import Path

import numpy as np

from . import optimizers
from ._checks import check_buffer, check_master_weights, dtype_arg, kernel_view, param_dtype
from ._int8 import ABSMAX_KEY, CODES_KEY, INT8_CODE_VERSION, VERSION_KEY
from ._int8 import blocks as int8_blocks
from .algorithms import CLASSES, REGISTRY
from .algorithms._spec import MASTER, MASTER_ALIASES, MASTER_WEIGHTS, REMAINDER, STATE_DTYPES
from .schedules import TABLE_COLUMNS
from .segments import SegmentTable

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

FORMAT = "fastopt-checkpoint"
VERSION = 1
OPTIMIZERS = tuple(CLASSES)  # every public optimizer class, from the registry


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unreadable, corrupted, or not for these params."""


def save(opt, path) -> None:
    """Write ``opt`` (params, state, step, schedule, hyperparameters) to ``path`` atomically.

    Refuses (``ValueError``) what ``load`` would refuse, e.g. an infinite ``lr_scale``.
    """
    path = Path(path)
    if not callable(getattr(opt, "_checkpoint", None)):
        raise TypeError(
            f"fastopt.save writes a fastopt.<Name> optimizer; got {type(opt).__module__}."
            f"{type(opt).__name__}: for a torch optimizer (fastopt.torch's included) save its "
            "state_dict() with torch.save, or with torch.distributed.checkpoint")
    # state, params (16-bit as uint16 bits) and max_grad_norm of one moment between two steps
    d, params = opt._checkpoint()
    meta = {"format": FORMAT, "version": VERSION, "optimizer": d["optimizer"],
            "step": int(d["step"]), "lr_scale": float(d["lr_scale"]),
            "max_grad_norm": d["max_grad_norm"], "size": int(params.size),
            "scalars": {s.name: d[s.name] for s in opt.definition.scalars},
            "dtype": opt.dtype, "state_dtype": opt.state_dtype,
            "master_weights": opt.master_weights,
            "hyperparameters": {k: list(v) if isinstance(v, tuple) else v
                                for k, v in opt.defaults.items()},
            # train/eval modes (Schedule-Free): the mode the saved params are in
            "train_mode": d.get("train_mode"),
            # tensor-aware optimizers (LAMB): the tensors' layout the state belongs to
            "segments": d.get("segments")}
    if opt.state_dtype == "int8":  # the raw codes and scales, and the code's version
        meta["int8_code_version"] = INT8_CODE_VERSION
    arrays = {key: d[key] for name in opt.state for key in _saved_as(opt, name)}
    arrays["schedule"] = d["schedule"]
    arrays["params"] = params
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    _check_meta(path, meta)  # never write a file that load would refuse (e.g. lr_scale=inf)
    _write(path, arrays)


# --------------------------------------------------------------------------- writing

#: temporary files: ``.fastopt-<pid>-<random>.tmp`` next to the checkpoint (short, so any
#: valid file name works; the writer's pid lets a later save remove what a killed one left)
_TMP_PREFIX, _TMP_SUFFIX = ".fastopt-", ".tmp"
_TMP_NAME = re.compile(r"\.fastopt-([0-9]{1,10})-[0-9a-f]{8}\.tmp")
_in_flight: set[str] = set()  # names of this process's temp files being written (any thread)
_in_flight_lock = threading.Lock()


def _write(path: Path, arrays: dict) -> None:
    """Write ``arrays`` as an .npz to ``path``: temp file, fsync, atomic rename, fsync dir."""
    if arrays["schedule"].shape[0] > MAX_SCHEDULE_ROWS:  # load would refuse the file
        raise ValueError(f"a checkpoint holds at most {MAX_SCHEDULE_ROWS} schedule rows, "
                         f"this schedule has {arrays['schedule'].shape[0]}")
    target = Path(os.path.realpath(path))  # through a symlink: write its target, keep the link
    if target.is_dir():  # (else the rename would fail naming the temporary file)
        raise IsADirectoryError(f"fastopt.save writes a file: {path} is a directory")
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)  # an existing file keeps its mode
    except FileNotFoundError:
        mode = None  # a new file: 0o666 less the umask, as open() would make it
    _remove_stale_temps(target.parent)
    tmp, fd = _create_temp(target.parent, 0o666 if mode is None else 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            _try_lock(f.fileno())  # held until closed: a live writer's file is never removed
            np.savez(f, **arrays)
            f.flush()
            if mode is not None:
                if hasattr(os, "fchmod"):
                    os.fchmod(f.fileno(), mode)
                else:
                    os.chmod(tmp, mode)
            os.fsync(f.fileno())
            if os.name == "posix":  # rename while still locked (the file stays open)
                os.replace(tmp, target)  # the old checkpoint stays whole until this instant
        if os.name != "posix":
            os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        with _in_flight_lock:
            _in_flight.discard(tmp.name)
    try:  # make the rename durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _create_temp(directory: Path, mode: int) -> tuple[Path, int]:
    """A new, empty temporary file in ``directory``, registered as in flight, and its fd."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    for _ in range(100):
        tmp = directory / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{_TMP_SUFFIX}"
        with _in_flight_lock:
            _in_flight.add(tmp.name)  # before it exists: no cleanup in this process takes it
        try:
            return tmp, os.open(tmp, flags, mode)
        except BaseException as exc:
            with _in_flight_lock:
                _in_flight.discard(tmp.name)
            if not isinstance(exc, FileExistsError):
                raise
    raise FileExistsError(f"no free temporary file name in {directory}")


def _try_lock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting: False if another open file holds one.

    True also where locks are unsupported (no fcntl, or a file system without flock)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def _writer_gone(pid: int, path: Path) -> bool:
    """True if the process that made temp file ``path`` is no longer alive."""
    if pid == os.getpid():  # this process (after a pid reuse): its own files are registered
        with _in_flight_lock:
            return path.name not in _in_flight
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # e.g. PermissionError: alive, another user's
        return False
    return False


def _remove_stale_temps(directory: Path) -> None:
    """Remove temporary files that killed saves left in ``directory``.

    Only files named like ours, of a writer that no longer exists, and that no open file
    holds locked (a live writer in another pid namespace sharing the directory keeps its
    lock). Best effort: anything unexpected leaves the file where it is.
    """
    if os.name != "posix":  # os.kill(pid, 0) is no liveness probe on Windows
        return
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = _TMP_NAME.fullmatch(name)
        if match is None:
            continue
        tmp = directory / name
        if not _writer_gone(int(match.group(1)), tmp):
            continue
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode) and _try_lock(fd):
                tmp.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- reading

#: every member name an .npz checkpoint may hold (``<name>.npy``)
_STATE_MEMBERS = frozenset([MASTER, *MASTER_ALIASES, *(
    key for d in REGISTRY.values() for key in d.state_names)])
#: int8 state's raw members: ``<name>_codes`` (uint8) and ``<name>_absmax`` (float32, a block)
_CODES_MEMBERS = frozenset(CODES_KEY.format(k) for d in REGISTRY.values() for k in d.state_names)
_ABSMAX_MEMBERS = frozenset(ABSMAX_KEY.format(k) for d in REGISTRY.values()
                            for k in d.state_names)
MAX_META_BYTES = 1 << 20  # the JSON header
MAX_SCHEDULE_ROWS = 1 << 16  # schedule table rows (9 float64 each)
_MAX_NPY_HEADER = 4096  # bytes of a member's .npy header (numpy writes 128)
_PARAM_DTYPES = ("float32", "float16", "bfloat16")
_STATE_DTYPES = STATE_DTYPES


def _read(path: Path, n: int, kind: str, expected: str | None) -> tuple[dict, dict]:
    """The checked meta and arrays of the checkpoint at ``path`` for ``n`` params of ``kind``.

    The member list and every member's declared (uncompressed) size are checked against what
    ``n`` implies before anything is decompressed; then the meta is read and checked, then
    the arrays. Any failure to read or parse raises CheckpointError.
    """
    item = 4 if kind == "float32" else 2  # params: float32, or 16-bit as uint16 bits
    limits = {"meta": MAX_META_BYTES, "params": n * item,
              "schedule": MAX_SCHEDULE_ROWS * TABLE_COLUMNS * 8}
    file = open(path, "rb")  # (a missing path, a directory, no permission: the OS's error,
    # as np.load and torch.load raise it, so that `except FileNotFoundError` starts afresh)
    try:
        with file, zipfile.ZipFile(file) as z:
            members = _members(path, z)
            if "meta" not in members:
                raise CheckpointError(f"{path}: not a fastopt checkpoint (no header)")

            def check_declared(key: str, limit: int) -> None:
                """A member's declared (uncompressed) size, before it is decompressed."""
                if members[key].file_size > limit + _MAX_NPY_HEADER:
                    raise CheckpointError(f"{path}: the {key!r} member declares "
                                          f"{members[key].file_size} bytes, more than "
                                          f"{limit + _MAX_NPY_HEADER}")

            check_declared("meta", MAX_META_BYTES)
            text = _read_member(path, z, members["meta"], np.uint8, None)
            meta = _check_meta(path, json.loads(text.tobytes().decode("utf-8")))
            sizes = _state_sizes(path, meta, n)  # (factored state: its layout's length)
            for key in members:
                check_declared(key, limits[key] if key in limits else
                               sizes(key[:-len("_codes")]) if key in _CODES_MEMBERS else
                               4 * int8_blocks(sizes(key[:-len("_absmax")]))
                               if key in _ABSMAX_MEMBERS else 4 * sizes(key))
            name = meta["optimizer"]
            if expected is not None and expected != name:
                raise CheckpointError(f"{path} holds a {name} checkpoint, not {expected}")
            if n != meta["size"] or kind != meta["dtype"]:
                raise CheckpointError(f"{path}: saved for {meta['size']} {meta['dtype']} "
                                      f"params, got {n} {kind}")
            for key in ("params", "schedule"):
                if key not in members:
                    raise CheckpointError(f"{path}: the checkpoint has no {key!r} array")
            wanted = {key: (np.float32, sizes(key)) for key in members
                      if key in _STATE_MEMBERS}
            wanted.update({key: (np.uint8, sizes(key[:-len("_codes")])) for key in members
                           if key in _CODES_MEMBERS})
            wanted.update({key: (np.float32, int8_blocks(sizes(key[:-len("_absmax")])))
                           for key in members if key in _ABSMAX_MEMBERS})
            # (int8 state of an optimizer with no active state buffer has no members)
            int8_members = bool(set(members) & (_CODES_MEMBERS | _ABSMAX_MEMBERS))
            if int8_members and (meta["state_dtype"] != "int8"
                                 or meta["int8_code_version"] != INT8_CODE_VERSION):
                raise CheckpointError(
                    f"{path}: int8 state needs its raw members and code version "
                    f"{INT8_CODE_VERSION} (state_dtype {meta['state_dtype']!r}, version "
                    f"{_short(meta.get('int8_code_version'))})")
            wanted["params"] = (np.float32 if kind == "float32" else np.uint16, n)
            wanted["schedule"] = (np.float64, None)
            arrays = {key: _read_member(path, z, members[key], dtype, size)
                      for key, (dtype, size) in wanted.items()}
            for alias in MASTER_ALIASES:  # files written before the rename
                if alias in arrays:
                    if MASTER in arrays:
                        raise CheckpointError(f"{path}: both {MASTER!r} and {alias!r}")
                    arrays[MASTER] = arrays.pop(alias)
    except CheckpointError:
        raise
    except MemoryError:  # sizes are checked first: this is the machine, not the file
        raise
    except Exception as exc:  # zipfile, zlib, numpy, json: all of them mean a damaged file
        raise CheckpointError(f"{path}: not a readable fastopt checkpoint "
                              f"({type(exc).__name__}: {exc})") from exc
    return meta, arrays


def _state_sizes(path: Path, meta: dict, n: int):
    """A function of a state member's name giving its length: n, or for factored state
    (Adafactor's) what the saved layout of the optimizer's tensors implies."""
    definition = _definition_of(meta["optimizer"])
    layout = meta["segments"]
    if definition is None or definition.factored is None or layout is None:
        return lambda key: n
    try:
        table = SegmentTable(layout["offsets"], layout["shapes"], n)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: inconsistent checkpoint ({exc})") from exc
    return lambda key: (definition.state_size(key, n, table)
                        if key in definition.state_names else n)


def _definition_of(name: str):
    """The definition of public class ``name`` (None for an unknown name: refused later)."""
    from .algorithms import CLASSES

    entry = CLASSES.get(name)
    return None if entry is None else entry[0]


def _members(path: Path, z: zipfile.ZipFile) -> dict:
    """``{key: ZipInfo}`` for the members ``<key>.npy``; a foreign or repeated one raises."""
    members = {}
    for info in z.infolist():
        key = info.filename[:-4] if info.filename.endswith(".npy") else None
        if key not in _STATE_MEMBERS and key not in _CODES_MEMBERS \
                and key not in _ABSMAX_MEMBERS and key not in ("meta", "params", "schedule"):
            raise CheckpointError(f"{path}: unexpected member {info.filename!r}")
        if key in members:
            raise CheckpointError(f"{path}: member {info.filename!r} appears twice")
        members[key] = info
    return members


def _read_member(path: Path, z: zipfile.ZipFile, info: zipfile.ZipInfo, dtype,
                 size: int | None) -> np.ndarray:
    """The array in member ``info``: exactly ``dtype``, shape ``(size,)`` (``size=None``:
    meta, 1-D of at most MAX_META_BYTES; schedule, (1..MAX_SCHEDULE_ROWS, 9)). The .npy header
    is checked before the data is read; reading to the end checks the member's CRC."""
    key = info.filename[:-4]
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, descr = np.lib.format.read_array_header_1_0(
                f, max_header_size=_MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, fortran, descr = np.lib.format.read_array_header_2_0(
                f, max_header_size=_MAX_NPY_HEADER)
        else:
            raise CheckpointError(f"{path}: {key!r} has .npy format version {version}")
        header = f.tell()
    dtype = np.dtype(dtype)
    if descr != dtype or fortran:
        raise CheckpointError(f"{path}: the {key!r} array must be {dtype.name} in C order, "
                              f"got {descr}{' in Fortran order' if fortran else ''}")
    if size is not None:
        ok = shape == (size,)
    elif key == "meta":
        ok = len(shape) == 1 and shape[0] <= MAX_META_BYTES
    else:  # the schedule table
        ok = len(shape) == 2 and 1 <= shape[0] <= MAX_SCHEDULE_ROWS and shape[1] == TABLE_COLUMNS
    if not ok:
        raise CheckpointError(f"{path}: the {key!r} array has the wrong shape {shape}")
    count = int(np.prod(shape, dtype=np.int64))
    if info.file_size != header + count * dtype.itemsize:
        raise CheckpointError(f"{path}: the {key!r} member's size does not match its array")
    with z.open(info) as f:
        array = np.lib.format.read_array(f, allow_pickle=False,
                                         max_header_size=_MAX_NPY_HEADER)
        if f.read(1):  # at the end: the CRC has been checked
            raise CheckpointError(f"{path}: trailing data after the {key!r} array")
    return array


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A finite int (below 2**63 in magnitude) or float; not a bool."""
    if _is_int(value):
        return abs(value) < 2**63
    return isinstance(value, float) and math.isfinite(value)


def _is_scalar(value) -> bool:
    """A hyperparameter's value: None, a bool, a real, or a short name (where the
    hyperparameter takes one: ``_check_meta``)."""
    return value is None or isinstance(value, bool) or _is_real(value) \
        or isinstance(value, str) and len(value) <= 64


def _check_meta(path: Path, meta) -> dict:
    """The JSON header, every field of the expected type and range (else CheckpointError)."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastopt checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('version')!r}, "
                              f"this fastopt reads version {VERSION}")
    if meta.get("optimizer") not in OPTIMIZERS:
        raise CheckpointError(f"{path}: unknown optimizer {meta.get('optimizer')!r}")
    meta = {"max_grad_norm": None, "state_dtype": "float32", "master_weights": "fp32",
            "scalars": {}, "train_mode": None,
            "int8_code_version": None,
            "segments": None, **meta}
    hyper = meta.get("hyperparameters")
    checks = {
        "size": lambda v: _is_int(v) and v >= 0,
        "step": lambda v: _is_int(v) and 0 <= v < 2**63,
        "lr_scale": lambda v: _is_real(v) and v >= 0,
        # None or > 0; +inf (no clipping) is a setting the optimizers take, NaN is not
        "max_grad_norm": lambda v: v is None or isinstance(v, (int, float))
        and not isinstance(v, bool) and v > 0,
        "dtype": lambda v: v in _PARAM_DTYPES,
        "state_dtype": lambda v: v in _STATE_DTYPES,
        "master_weights": lambda v: v in MASTER_WEIGHTS,
        "int8_code_version": lambda v: v is None or _is_int(v),
        "train_mode": lambda v: v is None or isinstance(v, bool),
        "segments": lambda v: v is None or isinstance(v, dict) and set(v) == {
            "offsets", "shapes"} and isinstance(v["offsets"], list)
        and isinstance(v["shapes"], list) and len(v["offsets"]) == len(v["shapes"])
        and all(map(_is_int, v["offsets"])) and all(
            isinstance(s, list) and len(s) <= 64 and all(map(_is_int, s)) for s in v["shapes"]),
        "scalars": lambda v: isinstance(v, dict) and len(v) <= 16 and all(
            isinstance(k, str) and _is_real(x) for k, x in v.items()),
        "hyperparameters": lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and (_is_scalar(x) or isinstance(x, list) and len(x) <= 16
                                    and all(map(_is_scalar, x)))
            for k, x in v.items()),
    }
    for key, ok in checks.items():
        if key not in meta or not ok(meta[key]):
            raise CheckpointError(f"{path}: invalid {key!r} in the checkpoint header: "
                                  f"{_short(meta.get(key))}")
    allowed = _hyperparameter_names(meta["optimizer"])
    unknown = sorted(set(hyper) - allowed)
    if unknown:
        raise CheckpointError(f"{path}: unknown hyperparameters {unknown} for "
                              f"{meta['optimizer']}")
    signature = inspect.signature(getattr(optimizers, meta["optimizer"])).parameters
    named = sorted(k for k, v in hyper.items() if isinstance(v, str)
                   and not isinstance(signature[k].default, (str, type(None))))
    if named:  # (a name only where the default is a name or None: Muon's adjust_lr_fn)
        raise CheckpointError(f"{path}: invalid 'hyperparameters' in the checkpoint header: "
                              f"{named} take no names")
    return meta


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _saved_as(opt, name: str) -> tuple[str, ...]:
    """The checkpoint members of state buffer ``name``: int8 state's raw codes and scales, the
    float32 master that remainders make (as a float32 master is saved: the two modes'
    checkpoints are interchangeable), else the buffer under its name."""
    if name in (MASTER, REMAINDER):
        return (MASTER,)
    if opt.state_dtype == "int8":
        return CODES_KEY.format(name), ABSMAX_KEY.format(name)
    return (name,)


def _hyperparameter_names(name: str) -> frozenset:
    """The constructor's keyword arguments of optimizer ``name`` that a checkpoint sets."""
    signature = inspect.signature(getattr(optimizers, name))
    return frozenset(signature.parameters) - {"params", "lr", "dtype", "state_dtype",
                                              "master_weights", "segments"}


def _expected_class(optimizer) -> str | None:
    """The class name ``load``'s ``optimizer=`` asks for: a fastopt.<Name> class or its name
    (None: any), else TypeError or ValueError before the file is read."""
    if optimizer is None:
        return None
    names = optimizers.__all__
    if isinstance(optimizer, type):
        if getattr(optimizers, optimizer.__name__, None) is not optimizer:
            raise TypeError(f"optimizer= takes a fastopt.<Name> class or its name, got "
                            f"{optimizer.__module__}.{optimizer.__qualname__}: fastopt.load "
                            "makes a core (numpy/cupy) optimizer")
        return optimizer.__name__
    if isinstance(optimizer, str):
        if optimizer not in names:
            close = [n for n in names if n.lower() == optimizer.lower()]
            raise ValueError(f"optimizer={optimizer!r} is not a fastopt optimizer"
                             + (f": did you mean {close[0]!r}?" if close else
                                f" (one of {', '.join(names)})"))
        return optimizer
    raise TypeError(f"optimizer= takes a fastopt.<Name> class or its name, got "
                    f"{type(optimizer).__name__} {optimizer!r}" +
                    (f" (load makes the optimizer itself: optimizer=fastopt."
                     f"{type(optimizer).__name__})" if type(optimizer).__name__ in names else ""))


def load(path, params, *, optimizer=None, restore_params: bool = True, dtype=None,
         master_weights=None):
    """A new optimizer over ``params`` in the saved state; ``params`` get the saved values.

    ``optimizer``: the expected class or class name (a different one raises). With
    ``restore_params=False`` the params are left as they are (e.g. restored elsewhere),
    except with master_weights='remainder': the params then hold half of the saved master,
    so they are always restored from it. ``dtype``: for raw uint16 params, their 16-bit
    format (as for the optimizers). ``master_weights``: how 16-bit params keep their float32
    values in the new optimizer (None: as saved; a float32 master and remainders are saved
    alike, as the float32 master, so either loads into either).

    Any damaged, foreign or mismatched file raises ``CheckpointError`` and changes nothing.
    """
    path = Path(path)
    expected = _expected_class(optimizer)
    given_layout = SegmentTable.of(params) if hasattr(params, "views") else None
    params = params.buffer if hasattr(params, "views") else params
    allowed = None if dtype is None else ("uint16", dtype_arg(dtype))
    params = check_buffer("params", params, dtype=allowed)
    kind = param_dtype(params, dtype)
    if master_weights is not None:  # (the caller's argument: a ValueError, not the file's)
        check_master_weights(master_weights, kind)
    meta, arrays = _read(path, params.shape[0], kind, expected)
    name = meta["optimizer"]
    saved = arrays["params"]
    cls = getattr(optimizers, name)
    try:
        layout = meta["segments"]
        if (layout is None) != (not cls.definition.segmented):
            raise CheckpointError(f"{path}: 'segments' is {_short(layout)} for {name}")
        segments = {} if layout is None else {"segments": SegmentTable(
            layout["offsets"], layout["shapes"], params.shape[0])}
        if segments and given_layout is not None and given_layout != segments["segments"]:
            raise CheckpointError(f"{path}: saved for tensors of shapes "
                                  f"{_short(layout['shapes'])} at other offsets than this "
                                  "FlatBuffer's")
        opt = cls(params, **meta["hyperparameters"], dtype=dtype,
                  state_dtype=meta["state_dtype"], **segments,
                  master_weights=meta["master_weights"] if master_weights is None
                  else master_weights)
        expected_members = {key for name in opt.state for key in _saved_as(opt, name)}
        if opt.dtype != "float32":  # (a saved master loads into every mode: "none" rounds it)
            expected_members.add(MASTER)
        extra = sorted(set(arrays) - {"params", "schedule"} - expected_members)
        if extra:
            raise CheckpointError(f"{path}: unexpected state {extra} for these hyperparameters")
        unknown = sorted(set(meta["scalars"]) - set(opt.definition.scalar_names))
        if unknown:
            raise CheckpointError(f"{path}: unexpected scalars {unknown} for {name}")
        if opt.state_dtype == "int8":
            arrays[VERSION_KEY] = meta["int8_code_version"]
        state = {**arrays, **meta["hyperparameters"], **meta["scalars"], "optimizer": name,
                 "step": meta["step"], "lr_scale": meta["lr_scale"]}
        if (meta["train_mode"] is None) != (opt.definition.modes is None):
            raise CheckpointError(f"{path}: 'train_mode' is {meta['train_mode']!r} for {name}")
        if meta["train_mode"] is not None:
            state["train_mode"] = meta["train_mode"]
        before = None
        if restore_params:  # first: a state without a master takes it from the params
            view = kernel_view(opt.params)
            before = opt._host_copy(view)
            view[...] = opt._xp.asarray(saved)
        try:
            opt.load_state_dict(state)
        except BaseException:
            if before is not None:  # (a refused file changes nothing)
                view[...] = opt._xp.asarray(before)
            raise
        opt.max_grad_norm = meta["max_grad_norm"]
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: inconsistent checkpoint ({exc})") from exc
    return opt
