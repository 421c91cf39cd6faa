"""What Numba's threading layer makes safe, and what fastopt does about the rest.

A kernel's ``prange`` loop runs on Numba's threading layer; its serial twin
(``<name>_serial``, ``fastopt.engine.cpu_kernel(..., parallel=False)``), a plain ``range``
loop, runs on the calling thread alone and never touches the layer (the kernels' trailing
``parallel`` argument, kept for their uniform signature, picks nothing: the function called
does; Adafactor's one kernel still reads it). Numba picks
the layer, not fastopt (``NUMBA_THREADING_LAYER``; by default TBB, else OpenMP, else
workqueue), and two of the three have a hazard:

* ``workqueue`` (Numba's own pool, used when neither TBB nor OpenMP loads) is not thread-safe:
  two parallel launches from two Python threads at once abort the process. fastopt's parallel
  launches therefore take one process-wide lock under this layer; serial launches take none.
* ``omp`` with GNU OpenMP (libgomp, what Numba's Linux wheels use) cannot run a parallel
  region in a child forked after the parent started the runtime: Numba prints "Terminating:
  fork() called from a process already using GNU OpenMP" and kills the child. So in such a
  child (a DataLoader worker, a ``multiprocessing`` fork-pool worker) fastopt runs its kernels'
  serial loop. Only Intel OpenMP is taken as fork-safe; an unknown vendor is treated as GNU.
* ``tbb`` is thread- and fork-safe: nothing to do.

Starting the ``omp`` layer sets the calling thread's OpenMP thread count to Numba's, and torch
(whose CPU ops run on the same GNU OpenMP runtime when torch is imported first) reads that
count: ``torch.set_num_threads(1)`` came back as 2 on a 2-core host after the first parallel
step. fastopt starts the layer itself (``num_threads``) and puts the count back, both torch's
and the runtime's (for a torch imported later, or ``OMP_NUM_THREADS``); Numba's own loops
keep Numba's count, which they pass to each parallel region.

Launch sites ask ``parallel_ok(requested)`` which function to call and hold
``kernel_guard(parallel)`` around the call: 0.1-0.2 µs per launch together (measured on a
shared 2-core box, where a step at 1e3 parameters takes ~5 µs).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading

import numba

#: layers whose parallel launches must not overlap (from two Python threads)
NOT_THREAD_SAFE = frozenset({"workqueue"})
#: OpenMP runtimes that survive fork() (Numba: GNU OpenMP does not)
FORK_SAFE_OPENMP = frozenset({"Intel"})


class _NoGuard:
    """A no-op context manager that costs less than ``contextlib.nullcontext`` (a ``with`` on
    it calls no Python function): ``"".format`` is a C method that ignores its arguments and
    returns "", which as ``__exit__``'s result lets exceptions through."""

    __slots__ = ()
    __enter__ = __exit__ = "".format


_NO_GUARD = _NoGuard()
_launch_lock = threading.Lock()  # serialises parallel launches under a non-thread-safe layer
_guard = None  # what kernel_guard(True) returns once the layer is known
_serial_only = False  # forked from a process whose (fork-unsafe) OpenMP runtime was started
_layer_started = False  # set once fastopt has started Numba's layer (and kept the OpenMP count)


def num_threads() -> int:
    """Numba's thread count, starting its threading layer first if it has not started, with
    the OpenMP thread count of the calling thread kept as it was (see the module's notes)."""
    if not _layer_started:
        _start_layer()
    return numba.get_num_threads()


def active_layer() -> str:
    """The threading layer Numba uses in this process (starting it if it has not started)."""
    num_threads()
    return numba.threading_layer()


def _openmp_library():
    """A handle whose ``omp_*`` symbols are those Numba's OpenMP pool links (its own library's
    dependencies), or None where that pool cannot be Numba's layer or does not load."""
    if numba.config.THREADING_LAYER in ("tbb", "workqueue"):
        return None
    try:
        spec = importlib.util.find_spec("numba.np.ufunc.omppool")
        library = ctypes.CDLL(spec.origin) if spec is not None and spec.origin else None
        if library is not None:  # (both symbols resolve, or the restore is skipped)
            library.omp_get_max_threads, library.omp_set_num_threads  # noqa: B018
        return library
    except (ImportError, OSError, AttributeError):
        return None


def _start_layer() -> None:
    global _layer_started
    torch = sys.modules.get("torch")
    torch_before = torch.get_num_threads() if torch is not None else None
    omp = _openmp_library()
    omp_before = omp.omp_get_max_threads() if omp is not None else None
    numba.get_num_threads()  # loads the layer and starts its threads
    if numba.threading_layer() == "omp":
        if omp_before is not None:
            omp.omp_set_num_threads(omp_before)
        if torch_before is not None and torch.get_num_threads() != torch_before:
            torch.set_num_threads(torch_before)
    _layer_started = True


def parallel_ok(requested: bool) -> bool:
    """The ``parallel`` flag to pass a kernel: ``requested``, unless this process may not enter
    the threading layer (a child forked after the parent started GNU OpenMP)."""
    return requested and not _serial_only


def kernel_guard(parallel: bool):
    """A context manager to hold around a kernel launch with this ``parallel`` flag: the
    process-wide launch lock for a parallel launch under a layer that is not thread-safe,
    else a no-op (use it without ``as``). The requested and the ``parallel_ok`` flag give the
    same guard: they differ only under OpenMP, which needs no lock."""
    if not parallel:
        return _NO_GUARD
    guard = _guard
    return guard if guard is not None else _resolve_guard()


def _resolve_guard():
    global _guard
    _guard = _launch_lock if active_layer() in NOT_THREAD_SAFE else _NO_GUARD
    return _guard


def _started_layer() -> str | None:
    """The layer if this process (or the parent it was forked from) started it, else None."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def _openmp_vendor() -> str | None:
    module = sys.modules.get("numba.np.ufunc.omppool")
    return getattr(module, "openmp_vendor", None)


def fork_safe(layer: str | None) -> bool:
    """Whether a child forked after the parent started this layer may run parallel loops."""
    return layer != "omp" or _openmp_vendor() in FORK_SAFE_OPENMP


def _after_fork_in_child() -> None:
    global _launch_lock, _guard, _serial_only
    # another parent thread may have held the lock at fork(): no thread of it lives here
    fresh = threading.Lock()
    if _guard is _launch_lock:
        _guard = fresh
    _launch_lock = fresh
    if not fork_safe(_started_layer()):
        _serial_only = True


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
