"""cupy.cuda stand-in: one device, streams with graph capture (launches recorded, replayed)."""

from __future__ import annotations

import threading
import time


def is_available() -> bool:
    return True


class Device:
    def __init__(self, device_id: int = 0):
        self.id = device_id
        self.attributes = {"MultiProcessorCount": 4}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def use(self):
        pass

    def synchronize(self):
        pass


class Stream:
    """A stream; between begin_capture() and end_capture() kernel launches and array
    operations (as CuPy's elementwise and reduction kernels are captured) are recorded."""

    def __init__(self, null: bool = False, non_blocking: bool = False, ptr: int = 0):
        self.capturing = False
        self.recorded: list = []
        self.ptr = ptr

    def __enter__(self):
        _current.stack.append(self)
        return self

    def __exit__(self, *exc):
        _current.stack.pop()
        return False

    def use(self):
        _current.stack[:] = [self]
        return self

    def begin_capture(self, mode=None):
        if self.capturing:
            raise RuntimeError("the stream is already capturing")
        self.capturing, self.recorded = True, []

    def end_capture(self) -> Graph:
        if not self.capturing:
            raise RuntimeError("the stream is not capturing")
        self.capturing = False
        return Graph(self.recorded)

    def is_capturing(self) -> bool:
        return self.capturing

    def synchronize(self):
        if self.capturing:
            raise RuntimeError("cudaErrorStreamCaptureUnsupported: synchronize in capture")


class ExternalStream(Stream):
    def __init__(self, ptr: int, device_id: int = -1):
        super().__init__(ptr=ptr)


class Graph:
    """The launches captured on a stream; launch() replays them in order."""

    def __init__(self, recorded: list):
        self.recorded = list(recorded)

    def launch(self, stream=None):
        for kernel, values in self.recorded:
            if kernel is None:  # an array operation recorded in capture: recompute it
                values()
            else:
                kernel.run(values)


class _Current(threading.local):
    def __init__(self):
        self.stack = [Stream(null=True)]


_current = _Current()
Stream.null = _current.stack[0]


def get_current_stream() -> Stream:
    return _current.stack[-1]


class Event:
    def __init__(self, *args, **kwargs):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


def get_elapsed_time(start: Event, stop: Event) -> float:
    """Milliseconds between two recorded events."""
    return (stop.t - start.t) * 1e3


class runtime:  # noqa: N801  (cupy.cuda.runtime)
    @staticmethod
    def getDeviceProperties(device_id: int) -> dict:  # noqa: N802
        return {"name": b"fake CuPy device (Numba kernels on the CPU)"}

    @staticmethod
    def getDeviceCount() -> int:  # noqa: N802
        return 1
