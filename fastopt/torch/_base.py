"""The machinery of fastopt.torch's optimizers (the classes themselves, one per public name
of each definition, are generated into ``fastopt/torch/optim.py``): torch.optim.Optimizer
subclasses over flat buffers, one fused fastopt kernel per bucket.

At construction each param group's parameters are repacked, per (device, dtype), into one flat
buffer; ``p.data`` becomes a view of it and the state (``exp_avg``, ``sum``, ...) views of flat
state buffers. A gradient is copied into a flat gradient buffer at the step, unless ``p.grad``
is already its view (after ``zero_grad(set_to_none=False)``, when autograd accumulates into
it in place); then ``step()`` gathers nothing: it is one kernel call per bucket. As in torch,
``self.state[p]`` gets an entry when p takes its first step: those views under torch's names,
so ``state_dict()`` is torch's format.
"""

from __future__ import annotations

import functools
import gc
import json
import numbers
import operator
import re
import sys
import threading
import warnings
import weakref
from collections import defaultdict

import numpy as np
import torch

from .. import _bf16, cpu
from .._checks import check_lr, check_master_weights
from .._int8 import (
    ABSMAX_KEY,
    CODES_KEY,
    INT8_BLOCK,
    INT8_CODE_VERSION,
    VERSION_KEY,
    Int8State,
    check_state_dtype,
    memory_report,
    quantize,
)
from .._int8 import blocks as int8_blocks
from ..algorithms import Definition
from ..algorithms._spec import INIT_LR, INIT_PARAMS, MASTER, REMAINDER
from ..engine import Prepared, device_table, run_once
from ..flat import ALIGN_BYTES
from ..schedules import CONSTANT, TABLE_COLUMNS, Schedule, advanced, host_lr
from ..segments import SegmentTable

ALIGN = 16  # elements: each view starts on a 64-byte boundary (float32; int8 state: a block)
#: 16-bit parameter dtypes: updated through a float32 master copy, in the same kernel pass
HALF_FORMATS = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
PARAM_DTYPES = (torch.float32, *HALF_FORMATS)
#: ``state_dtype`` names -> the state buffers' torch dtype (bfloat16: stochastically rounded)
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.uint8}
#: where a state dict's param group keeps the step count of an optimizer whose torch twin
#: keeps no per-param ``step`` (Muon): fastopt's in-kernel schedule resumes from it. torch's
#: optimizer keeps the key through its own load and save without advancing it.
GROUP_STEP = "fastopt_step"


#: why a step cannot be captured in a CUDA graph yet
CAPTURE_NEEDS_WARM_UP = (
    "fastopt.torch: capture step() in a CUDA graph only after eager steps of every param "
    "group on the GPU with the same hyperparameters, schedule and gradient buffers (the step "
    "counter and the kernel's arguments are made then; two steps for state that starts at "
    "the first gradient, as SGD's momentum), as torch's warm-up before capture")
#: why a step that updates params one at a time cannot be captured
CAPTURE_NEEDS_WHOLE_BUCKETS = (
    "fastopt.torch: this step updates params one at a time (some have no gradient, have "
    "taken a different number of steps, or are listed twice), which cannot be captured in a "
    "CUDA graph: capture a step where every param has a gradient and the same step count")

#: flat param buffer's storage address -> the live bucket that owns it (two optimizers over one
#: param would each repack it into their own buffer, detaching it from the other)
_OWNERS: weakref.WeakValueDictionary[int, _Bucket] = weakref.WeakValueDictionary()
#: torch.compile: the kernel call runs outside the graph (Numba cannot be traced)
_no_dynamo = getattr(torch, "_disable_dynamo", lambda fn: fn)


def _hooked_step(step):
    """``step`` with torch.optim's step hooks, as ``Optimizer.profile_hook_step`` wraps every
    optimizer's step: the global and the optimizer's pre-hooks (one may return new
    ``(args, kwargs)``), the step, ``_optimizer_step_code()``, the post-hooks; all inside a
    ``record_function("Optimizer.step#<class>.step")`` only while a profiler records (torch
    enters one at every step: about 10 µs of a 40 µs CPU step, bench/NOTES.md). Marked
    ``hooked`` so that torch does not wrap it again."""
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    profiling = torch._C._autograd._profiler_enabled

    def run(self, args, kwargs):
        for pre_hook in (*_global_optimizer_pre_hooks.values(),
                         *self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"{step} must return None or a tuple of (new_args, "
                                       f"new_kwargs), but got {result}.")
                args, kwargs = result
        out = step(*args, **kwargs)
        self._optimizer_step_code()
        for post_hook in (*self._optimizer_step_post_hooks.values(),
                          *_global_optimizer_post_hooks.values()):
            post_hook(self, args, kwargs)
        return out

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        self = args[0]
        if profiling():
            with torch.autograd.profiler.record_function(
                    f"Optimizer.step#{type(self).__name__}.step"):
                return run(self, args, kwargs)
        return run(self, args, kwargs)

    wrapper.hooked = True
    return _not_traced(wrapper)


def _count_writes(params: list) -> None:
    """Raise the version counters of the params a step writes, as torch's in-place updates
    do: the kernel writes their memory behind autograd's back, and a graph that saved one of
    them (``backward(retain_graph=True)`` before the step) must refuse a second backward
    rather than use the new values (about 40 ns a param, as torch's fused step pays)."""
    if not params:
        return
    try:
        torch._C._increment_version(params)
    except TypeError:  # (torch before 2.5: one tensor a call)
        for p in params:
            torch._C._increment_version(p)


def _not_traced(step):
    """``step`` run eagerly under torch.compile (a graph break), with the reason in the error
    that ``fullgraph=True`` raises instead of one about whatever Dynamo met first."""
    reason = ("a fastopt.torch step is one Numba or CUDA kernel call, which torch.compile "
              "cannot trace: compile it without fullgraph=True (the step then runs eagerly, "
              "as a graph break)")
    try:
        return torch.compiler.disable(step, reason=reason)
    except TypeError:  # (torch before 2.7: no reason)
        return _no_dynamo(step)


def _hashable(value):
    """A group value as a cache key: tensors by their value, sequences as tuples."""
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 else id(value)
    if isinstance(value, (tuple, list)):
        return tuple(_hashable(v) for v in value)
    return value


def _immutable(value) -> bool:
    """Whether a group value cannot change without being replaced (so identity means the
    same value): numbers, strings, None and tuples of them; not tensors or lists."""
    if isinstance(value, tuple):
        return all(map(_immutable, value))
    return value is None or isinstance(value, (bool, int, float, str))


#: the live in-place buckets (multi_tensor=True) by their param's address: a flat-mode
#: optimizer would move such a param into its own buffer, away from where they step it
_IN_PLACE: weakref.WeakValueDictionary[int, _Bucket] = weakref.WeakValueDictionary()


def moved_param_error(p: torch.Tensor, in_place: bool) -> RuntimeError:
    """The error of a step over a param whose storage was replaced since construction (the
    flat mode), or replaced by one of another dtype, device or shape (in place)."""
    if in_place:
        return RuntimeError(
            f"a parameter of shape {tuple(p.shape)} was replaced by a tensor of another dtype, "
            "device or shape, or a non-contiguous one (e.g. by model.to(), .half()) after the "
            "optimizer was built; its state cannot follow: build the optimizer after moving "
            "or casting the model")
    return RuntimeError(
        f"a parameter of shape {tuple(p.shape)} no longer lives in this optimizer's flat "
        "buffer (its .data was replaced, e.g. by model.to(), .half() or "
        "load_state_dict(assign=True) after the optimizer was built, or by a wrapper that "
        "rebinds params, such as ZeroRedundancyOptimizer(parameters_as_bucket_view=True)); "
        "build the optimizer after moving or casting the model, or use multi_tensor=True, "
        "which follows a replaced storage of the same dtype, device and shape")


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one stretch of memory, each once, in some order of its
    dims (contiguous, transposed, channels_last: what torch calls non-overlapping and
    dense)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True)
                               if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _row_major(shape) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape`` (as ``torch.empty(shape)`` has)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def check_hook_last(param: torch.Tensor, handle_id: int) -> None:
    """Raise if a post-accumulate-grad hook was registered on ``param`` after the one with
    ``handle_id`` (a step in backward's, which frees the gradient): it would run after the
    update, on a freed gradient."""
    hooks = getattr(param, "_post_accumulate_grad_hooks", None)  # (torch's, in order)
    if hooks and next(reversed(hooks)) != handle_id:
        raise RuntimeError(
            "a post-accumulate-grad hook was registered on a parameter after the optimizer "
            "started stepping in backward: it would run after the update, on a freed "
            "gradient. Register it before: remove the step in backward (handle.remove(), or "
            "a new CPUOffload), add the hook, then enable it again")


def _group_step(buckets: list) -> int:
    """A group's step count, for its schedule: the most any of its buckets took (a bucket of
    params that get no gradient, frozen or unused, stays behind)."""
    return max(b.step for b in buckets)


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (FSDP2's params; none exist unless torch.distributed.tensor
    was imported, so importing fastopt.torch imports nothing of torch.distributed)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding this process's elements: a DTensor's local shard (a plain tensor
    sharing its storage), any other tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


def _owner(p: torch.Tensor) -> _Bucket | None:
    """The live bucket whose flat buffer ``p``'s data is a view of, if any."""
    ptr = p.untyped_storage().data_ptr()
    return _OWNERS.get(ptr) if ptr else None


def _scalar(value, what: str) -> float:
    """A hyperparameter as a Python float; a tensor gives its own (e.g. float32) value, the
    number torch's math uses."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {what} must be 1-element")
        return float(value)
    return value


def _delayed(schedule: Schedule, n: int) -> Schedule:
    """``schedule`` n steps later: lr(t) = schedule(t - n) for t >= n, schedule(0) before."""
    m = re.fullmatch(r"delayed\((.*), (\d+)\)", repr(schedule), flags=re.DOTALL)
    name, total = (m.group(1), int(m.group(2)) + n) if m else (repr(schedule), n)
    table = schedule.table.copy()
    table[:, 1:3] += n
    first = host_lr(schedule, 0)
    if table[0, 0] == CONSTANT and table[0, 3] == first:  # already a constant head: extend it
        table[0, 1:3] = 0.0  # a constant row's clock is unused
    else:
        head = np.zeros((1, TABLE_COLUMNS))
        head[0, 0], head[0, 3] = CONSTANT, first
        table = np.vstack([head, table])
    return Schedule(table, f"delayed({name}, {total})")


#: whether fastopt.torch steps a group's in-place buckets on a GPU (multi_tensor=True) with
#: multi-tensor launches (a launch per set of buckets alike, fastopt.gpu.launch.bind_multi);
#: False: a launch per bucket (what the tests compare them with)
MULTI_LAUNCH = True
#: how many multi-tensor launches an optimizer keeps bound (one per set of buckets stepped
#: together; a set changes when some params have no gradient)
MULTI_LAUNCHES_KEPT = 16


def _add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` where Python has it (3.11 and newer; 3.10: nothing)."""
    add = getattr(error, "add_note", None)
    if add is not None:
        add(note)


@functools.cache
def _has_cuda() -> bool:
    """torch.cuda.is_available(), asked once (it costs ~0.5 µs a call, twice a step)."""
    return torch.cuda.is_available()


def _memory_span(t: torch.Tensor) -> tuple[int, int, int]:
    """Where a tensor's elements lie: its storage's address and the byte range [first, stop)
    from its first to past its last element (by its strides)."""
    t = local_tensor(t).detach()
    size = t.element_size()
    first = t.storage_offset() * size
    extent = 1 + sum((n - 1) * abs(stride) for n, stride in zip(t.shape, t.stride(),
                                                                   strict=True))
    return t.untyped_storage().data_ptr(), first, first + extent * size


def _listed_once(params) -> list:
    """The constructor's ``params`` as a list whose groups' ``params`` are lists too (torch
    makes them lists; a generator would be spent by a first look)."""
    if isinstance(params, torch.Tensor):
        return params  # (torch's own error for it)
    return [dict(g, params=list(g["params"])) if isinstance(g, dict) and "params" in g
            and not isinstance(g["params"], (torch.Tensor, list, tuple, set)) else g
            for g in params]  # (a set stays one: torch refuses it, naming the reason)


def _listed_tensors(params) -> list:
    """The tensors a constructor's ``params`` list (plain, named pairs, or groups of
    either)."""
    if isinstance(params, torch.Tensor):
        return []
    found = []
    for g in params:
        items = g.get("params", ()) if isinstance(g, dict) else [g]
        items = [items] if isinstance(items, torch.Tensor) else items
        for item in items:
            if isinstance(item, tuple) and len(item) == 2:  # (name, tensor)
                item = item[1]
            if isinstance(item, torch.Tensor):
                found.append(item)
    return found


def _storage_of(t: torch.Tensor) -> int:
    """The address of the storage a (plain) tensor's elements lie in."""
    return t.untyped_storage().data_ptr()


def _index_params(index: dict, params) -> None:
    """Add the plain, non-empty ``params`` to ``index`` (storage address -> params)."""
    for q in params:
        if not is_dtensor(q) and q.numel():
            index.setdefault(_storage_of(q), []).append(q)


def _capturing() -> bool:
    """Whether torch's current CUDA stream is capturing a graph (False without CUDA)."""
    return _has_cuda() and torch.cuda.is_current_stream_capturing()


class _MultiLaunch:
    """A multi-tensor launch over some in-place buckets of a group, bound once: its step
    counter and lr output on the device (as a bucket's own, ``_Bucket.counter``), the count
    the host knows the counter holds, what it was bound for (``refs_of``), the optimizer
    step that last used it,
    the CUDA streams it was bound or launched on, and whether a CUDA graph captured it.
    ``kept`` holds each bound launch a graph captured (the graph reads the device tables it
    owns), and only those; ``failed`` the refs for which binding or launching raised (the
    buckets then take a launch each, without trying again while the refs stay)."""

    __slots__ = ("buckets", "counter", "lr_out", "device_step", "refs", "launch", "captured",
                 "kept", "failed", "used", "streams")

    def __init__(self, buckets: list, device: torch.device):
        self.buckets = buckets
        self.counter = torch.zeros(2, dtype=torch.int64, device=device)
        self.lr_out = torch.zeros(1, dtype=torch.float64, device=device)
        self.device_step: int | None = None
        self.refs: tuple | None = None
        self.launch = None
        self.captured = False
        self.kept: list = []
        self.failed: tuple | None = None
        self.used = -1
        self.streams: set = set()
        for b in buckets:
            b.launches.append(self)

    def unbind(self) -> None:
        """Drop the bound launch and what it holds (views of gradient buffers that may be
        freed: step in backward, a replaced storage); one a graph captured stays in
        ``kept``."""
        self.launch = self.refs = self.failed = None

    @staticmethod
    def refs_of(batch: list[tuple]) -> tuple:
        """What a launch over ``batch`` (``_launch_deferred``'s entries) is bound to: each
        bucket's prepared call, where each gradient array lies (address, length, type: the
        tables hold addresses, and a gradient made anew at the same place, as FSDP2's are
        each step, needs no new tables), the schedule and ``fresh``. The gradient arrays
        themselves are not held, so that their memory can be handed out again."""
        from ..gpu.launch import _address

        _, _, _, schedule, _, fresh = batch[0]
        return (tuple(entry[1] for entry in batch),
                tuple(None if g is None else (_address(g), g.shape[0], g.dtype.str)
                      for g in (entry[2] for entry in batch)),
                schedule, bool(fresh))

    @staticmethod
    def same_refs(refs: tuple, other: tuple | None) -> bool:
        """Whether two ``refs_of`` name the same calls and schedule (the objects), and the
        same gradient places and ``fresh``."""
        return other is not None and len(other[0]) == len(refs[0]) \
            and all(x is y for x, y in zip(other[0], refs[0], strict=True)) \
            and other[1] == refs[1] and other[2] is refs[2] and other[3] == refs[3]


class _Bucket:
    """The params of one group on one (device, dtype), packed with their grads and state.

    State is float32 (or bfloat16, stochastically rounded, with ``state_dtype``) whatever the
    params' dtype. 16-bit params keep their float32 values by ``master_weights``: "fp32",
    ``master``, a float32 copy the kernel updates and rounds (to nearest even) into the
    16-bit params; "remainder" (bfloat16), ``remainder``, the master's low 16 bits (int16)
    beside the params; "none", nothing (the kernel rounds the params stochastically).

    A DTensor param (FSDP2's ``fully_shard``) gets an in-place bucket over its local shard:
    sizes and views are the shard's (``tensors``), its gradient is read from the grad's local
    shard at each step, and the state that ``optimizer.state`` shows is DTensors placed as the
    param (``shown``), so that torch.distributed.checkpoint saves and loads it sharded.
    """

    def __init__(self, params: list[torch.nn.Parameter], state_init: dict[str, float],
                 state_dtype: torch.dtype = torch.float32, owner: str = "",
                 scalars: tuple = (), layouts: dict | None = None, signs: dict | None = None,
                 master_weights: str = "fp32", in_place: bool = False,
                 pin_memory: bool = False, keep_layout: bool = False,
                 arena: _Arena | None = None):
        #: whether the param is a DTensor: this process steps its local shard
        self.sharded = is_dtensor(params[0])
        #: the tensors whose elements this bucket steps: the params, or the DTensor param's
        #: local shard (its sizes and shapes are the bucket's)
        self.tensors = [local_tensor(p).detach() for p in params]
        first = self.tensors[0]
        #: the multi-tensor mode: one param whose own storage the kernel updates (not packed
        #: into a flat buffer of this bucket's: a param fastopt does not own)
        self.in_place = in_place
        if (in_place or self.sharded) and (len(params) != 1 or not first.is_contiguous()
                                           or not in_place):
            raise ValueError("an in-place bucket holds one contiguous param (a DTensor param "
                             "needs one)")
        #: int8 state (state_dtype uint8): each state's codes in ``state``, its blocks'
        #: absmax in ``absmax``; every param starts on a block (its own blocks, own scales)
        self.int8 = state_dtype == torch.uint8
        self.absmax: dict[str, torch.Tensor] = {}
        self.signs = signs or {}
        self.align = INT8_BLOCK if self.int8 else ALIGN
        self.owner = owner  # the optimizer class's name, for the two-optimizers error
        #: state name -> its layout (State.layout): a value per element, or factored
        #: moments' per row, per column or per element of the unfactored tensors
        self.layouts = layouts or {}
        self._factors: tuple | None = None  # each param's offsets into factored state
        self._segments: SegmentTable | None = None  # the bucket's layout, made on first use
        self.params = params
        self.state_dtype = state_dtype
        #: per param: the strides its packed views keep (``keep_layout``: a transposed or
        #: channels_last param stays so, its elements in the flat buffers in its memory
        #: order; exactly its strides, also those of its size-1 dims, which torch keeps),
        #: or None (row-major params, and every param without ``keep_layout``)
        self.strides = [t.stride() if keep_layout and not in_place and _dense(t)
                        and t.stride() != _row_major(t.shape) else None for t in self.tensors]
        self.offsets, total = [], 0
        for t in self.tensors:
            self.offsets.append(total)
            total += self.aligned(t.numel())
        if in_place:
            total = first.numel()  # (the param's own storage: no padding)
        kwargs = dict(dtype=first.dtype, device=first.device)
        self.format = HALF_FORMATS.get(first.dtype)  # None for float32 params
        #: where an in-place CPU bucket's own buffers come from (``new_buffer``)
        self.arena = arena if in_place and first.device.type == "cpu" and not pin_memory \
            else None
        # (pin_memory: CPU buffers a GPU copies to and from, fastopt.torch.CPUOffload's)
        self.flat = first.detach().view(-1) if in_place else _buffer(
            total, 0, **kwargs, pinned=pin_memory, huge=True)
        # (a DTensor's gradient is read from its own shard: a buffer only if it must be
        # converted, made then)
        self.grad = None if self.sharded else self.new_buffer(total, 0, first.dtype,
                                                              pin_memory)
        self.state = {}
        #: the definition's per-step scalars, one float64 per param (torch keeps them per
        #: param too, e.g. NAdam's mu_product); a whole-bucket step uses element 0 and copies
        #: it to the others
        self.scalars = {s.name: torch.full((len(params),), s.init, dtype=torch.float64,
                                           device=first.device) for s in scalars}
        self._arrays: dict[tuple, tuple[list, dict]] = {}  # kernel arguments, made once
        self.steps = torch.zeros(len(params), dtype=torch.float32)
        #: ``steps``' version counter after fastopt's own last write (``_adopt_edits``: an
        #: in-place edit of a published ``state[p]['step']`` moves it)
        self.steps_seen = self.steps._version
        #: per param: (its ``self.state`` dict, its values, its keys) as fastopt last published
        #: them, or None (``_adopt_edits``: a dict replaced, emptied or edited since)
        self.published: list = [None] * len(params)
        self.step = 0  # the common step count while every param has taken every step
        self.uniform = True
        self._make_grad_views()
        with torch.no_grad():
            for i, (p, grad) in enumerate(zip(params, self.grad_views, strict=True)):
                if not in_place:
                    view = self.slice(self.flat, i)
                    view.copy_(p)
                    p.data = view
                    self.tensors[i] = view  # (the old storage may go now, not at the end)
                # a param without grad keeps none, as in torch: the step skips it until
                # backward gives it one (a DTensor's grad stays its own: read at each step)
                if p.grad is not None and not self.sharded:
                    grad.copy_(p.grad)
                    p.grad = grad
        self.tensors = [local_tensor(p).detach() for p in params]  # (packed: the views)
        if not in_place:
            first = self.tensors[0]
        # the state once the params and grads left their old storage: a construction's peak
        # is params and grads twice plus the state no more (a review measured 4x the params
        # above the model's for AdamW, torch's first step 3x)
        for name, value in state_init.items():
            self.add_state(name, value)
        half = self.format is not None
        self.master_weights = master_weights if half else "fp32"
        self.master = self.new_buffer(total, 0, torch.float32).copy_(self.flat) \
            if half and master_weights == "fp32" else None
        self.remainder = self.new_buffer(total, 0, torch.int16) \
            if half and master_weights == "remainder" else None
        #: where each param's data must stay: a param whose .data is replaced is detached
        self.addresses = [t.data_ptr() for t in self.tensors]
        #: params with an entry in optimizer.state (torch's: those that took a step or had
        #: state loaded); the flat state exists from the start either way
        self.started = [False] * len(params)
        self.all_started = False
        #: per param: whether its first-gradient state (SGD's momentum_buffer) is still unset,
        #: as torch's None buffer
        self.fresh = [True] * len(params)
        #: (part, state names) -> (hyperparameter values, the fastopt.engine call prepared
        #: for them): one per part, replaced when the values change
        self.prepared: dict[tuple, tuple] = {}
        #: per param: how many times more than once its group lists it (torch updates a
        #: listed-again param once per listing, so does step())
        self.repeats = [0] * len(params)
        #: whether the per-step scalars are equal across the params (as after a whole-bucket
        #: step), known without reading them (a device read would sync, and break capture)
        self.scalars_shared = True
        #: GPU whole-bucket steps: the step counter and lr the kernel keeps on the device
        #: (int64 [count, blocks done] and float64 [lr], made at the first such step), the
        #: count the host knows the counter holds (None: unknown), the launch bound once
        #: (prepared call, grads, schedule, fresh, launch), and whether a step was captured
        #: in a CUDA graph (its replays advance the counter behind the host: the counter is
        #: then the truth, read before the host uses a step count)
        self.counter: torch.Tensor | None = None
        self.lr_out: torch.Tensor | None = None
        self.device_step: int | None = None
        self.launch: tuple | None = None
        self.captured = False
        #: each bound launch a CUDA graph captured (the graph reads the buffers it holds)
        self.kept: list = []
        #: the multi-tensor launches (_MultiLaunch) that step this in-place bucket with others
        #: of its group (each with its own step counter, apart from ``counter``)
        self.launches: list[_MultiLaunch] = []
        ptr = self.flat.untyped_storage().data_ptr()
        if ptr and not in_place:  # (an in-place bucket owns nothing: others may step it too)
            _OWNERS[ptr] = self
        elif in_place and first.numel():
            _IN_PLACE[first.data_ptr()] = self
        #: where the flat param and gradient buffers' data were when the kernel arrays were
        #: made (``follow_moved_buffers``)
        self.buffer_addresses = self.buffers_at()

    def new_buffer(self, size: int, fill, dtype: torch.dtype,
                   pinned: bool = False) -> torch.Tensor:
        """A buffer of this bucket's own (gradient, master, state) on its device: a piece of
        the optimizer's ``_Arena`` for an in-place CPU bucket, else a buffer of its own
        (a flat-mode bucket's madvised for huge pages: ``_buffer``)."""
        if self.arena is not None:
            return self.arena.take(size, fill, dtype)
        return _buffer(size, fill, dtype, self.flat.device, pinned=pinned,
                       huge=not self.in_place)

    def buffers_at(self) -> tuple[int, ...]:
        """Where the flat param and gradient buffers' data start now (0: no buffer); for a
        bucket whose buffers are pieces of an ``_Arena``'s chunks, every piece's too: a
        chunk shares storage with other buckets' pieces, so ``share_memory_()`` on one of
        them (``Module.share_memory()`` on a gradient) moves this bucket's state as well."""
        at = (self.flat.data_ptr(), 0 if self.grad is None else self.grad.data_ptr())
        if self.arena is None:
            return at
        return at + tuple(t.data_ptr() for t in (self.master, self.remainder,
                                                 *self.state.values(), *self.absmax.values())
                          if t is not None)

    def follow_moved_buffers(self) -> None:
        """The flat buffers' storage moved, their views with it: ``Module.share_memory()``
        moves each storage into shared memory in place, the params' and gradients' (all
        views of the flat buffers) included, and frees the old memory. The kernel arrays,
        prepared calls and bound launches hold the old addresses: they are made again. A
        param still at its place in the flat buffer takes its new address; one that left it
        (``.data`` replaced) keeps the old one, so ``check_address`` still sees it."""
        old_flat = self.buffer_addresses[0]
        new_flat = self.flat.data_ptr()
        if new_flat != old_flat and not self.in_place:
            size = self.flat.element_size()
            for i, offset in enumerate(self.offsets):
                moved = new_flat + offset * size
                if self.addresses[i] == old_flat + offset * size \
                        and self.local_address(i) == moved:
                    self.addresses[i] = moved
            for ptr, owner in list(_OWNERS.items()):
                if owner is self:
                    del _OWNERS[ptr]
            ptr = self.flat.untyped_storage().data_ptr()
            if ptr:
                _OWNERS[ptr] = self
        self._arrays.clear()
        self.prepared.clear()
        self.unbind()
        self._make_grad_views()
        self.buffer_addresses = self.buffers_at()

    def aligned(self, n: int) -> int:
        """n elements rounded up to where the next param starts."""
        return -(-n // self.align) * self.align

    def signed(self, name: str) -> bool:
        return self.signs.get(name, "signed") == "signed"

    def absmax_of(self, name: str, index: int) -> torch.Tensor:
        """Param ``index``'s blocks' absmax of int8 state ``name`` (a view)."""
        first = self.offsets[index] // INT8_BLOCK
        return self.absmax[name][first:first + int8_blocks(self.tensors[index].numel())]

    @torch.no_grad()
    def set_state(self, name: str, index: int, value) -> None:
        """Param ``index``'s part of state ``name`` set to ``value`` (a number or a tensor
        like the param's view): int8 state quantised (rounded half up) per block."""
        view = self.view_of(name, index)
        if not self.int8 or name in (MASTER, REMAINDER):
            view.fill_(value) if isinstance(value, numbers.Number) else view.copy_(value)
            return
        values = torch.full(view.shape, float(value), dtype=torch.float32) \
            if isinstance(value, numbers.Number) else value.detach().to("cpu", torch.float32)
        made = quantize(values.reshape(-1).numpy(), self.signed(name))
        view.copy_(torch.from_numpy(made.codes).view(view.shape))
        self.absmax_of(name, index).copy_(torch.from_numpy(made.absmax))

    def counts_loaded(self) -> None:
        """The step counts and scalars were set from outside (a state dict, a backup, an
        edit of ``opt.state``): the bucket's summary of them taken again, the scalars may
        differ across params, and the device counter (if any) takes the count, so that
        replays of a captured step go on from it."""
        self.all_started = all(self.started)
        self.uniform = bool((self.steps == self.steps[0]).all())
        self.step = int(self.steps.max())
        self.steps_seen = self.steps._version
        self.scalars_shared = False
        if self.counter is not None:
            self.counter[0] = self.step
            self.device_step = self.step

    def unbind(self) -> None:
        """Drop the launches bound to this bucket's buffers (its own and the multi-tensor
        ones it is in): they hold views of buffers about to change."""
        self.launch = None
        for launch in self.launches:
            launch.unbind()

    def segment_table(self, part: int | tuple[int, int] | None, n: int) -> SegmentTable:
        """The layout of a kernel call's part (None: the bucket; i: param i alone; (first,
        stop): those params, from param first's offset) over ``n`` elements, for a
        tensor-aware definition. The bucket's is made once."""
        if part is None:
            if self._segments is None:
                self._segments = SegmentTable(self.offsets, [t.shape for t in self.tensors], n)
            return self._segments
        first, stop = (part, part + 1) if isinstance(part, int) else part
        base = self.offsets[first]
        return SegmentTable([o - base for o in self.offsets[first:stop]],
                            [t.shape for t in self.tensors[first:stop]], n)

    def release_grads(self) -> None:
        """Drop the flat gradient buffer (step in backward: each chunk's gradients pass
        through a scratch buffer, and the whole model's never exist at once)."""
        for p in self.params:
            p.grad = None
        self.grad = None
        self._make_grad_views()
        self._arrays.clear()
        self.unbind()  # (the launches hold views of the old gradient buffer)
        self.buffer_addresses = self.buffers_at()

    def restore_grads(self) -> None:
        """A flat gradient buffer again (after step in backward is removed)."""
        self.grad = self.new_buffer(self.flat.shape[0], 0, self.flat.dtype)
        self._make_grad_views()
        self._arrays.clear()
        self.unbind()
        self.buffer_addresses = self.buffers_at()

    def _make_grad_views(self) -> None:
        """Each param's view of the flat gradient buffer (None without one), and where each
        view's data starts (``grad_view``)."""
        self.grad_views = [None if self.grad is None else self.slice(self.grad, i)
                           for i in range(len(self.tensors))]
        self.grad_addresses = [None if v is None else v.data_ptr() for v in self.grad_views]

    def grad_view(self, index: int) -> torch.Tensor:
        """Param ``index``'s gradient view: a new view of the buffer if the old one had its
        ``.data`` replaced (``p.grad.data = x``, as ``Module._apply`` does to existing grads
        in ``model.to()``), which would otherwise leave a stale gradient in the buffer."""
        view = self.grad_views[index]
        if view.data_ptr() != self.grad_addresses[index]:
            view = self.grad_views[index] = self.slice(self.grad, index)
        return view

    def slice(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Param ``index``'s part of a flat buffer, shaped like the param (a DTensor's: like
        its local shard) and laid out as it (``strides``)."""
        t, offset = self.tensors[index], self.offsets[index]
        return self.shaped(flat[offset:offset + t.numel()], index)

    def shaped(self, values: torch.Tensor, index: int) -> torch.Tensor:
        """Param ``index``'s elements in flat-buffer order (its part of a flat buffer, or a
        1-D tensor of values in that order) as a view shaped and laid out like the param."""
        stride = self.strides[index]
        t = self.tensors[index]
        return values.view_as(t) if stride is None else values.as_strided(t.shape, stride)

    def shown(self, index: int, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like param ``index``'s local elements) as torch shows state: a
        DTensor placed as the param when the param is one (sharing ``t``'s storage), else
        ``t`` itself."""
        if not self.sharded:
            return t
        from torch.distributed.tensor import DTensor

        p = self.params[index]
        return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    def local_address(self, index: int) -> int:
        """Where param ``index``'s elements live now (a DTensor's: its local shard's)."""
        p = self.params[index]
        return local_tensor(p).data_ptr() if self.sharded else p.data_ptr()

    def check_address(self, index: int) -> None:
        """Param ``index`` still lives where this bucket steps it. An in-place bucket follows
        a param whose storage was replaced by one of the same shape, dtype and device
        (``load_state_dict(assign=True)``, ``p.data = ...``, FSDP2 re-padding its shards):
        its state stays; a 16-bit param's master (or remainders) is kept if the values are
        the same, else taken from the new values (as after ``refresh_master()``). Anything
        else (a flat-mode bucket, another dtype or device) raises."""
        if self.local_address(index) == self.addresses[index]:
            return
        p, old = self.params[index], self.tensors[index]
        new = local_tensor(p).detach()
        if not self.in_place or new.shape != old.shape or new.dtype != old.dtype \
                or new.device != old.device or not new.is_contiguous():
            raise moved_param_error(p, self.in_place)
        owned = [self.grad, self.master, self.remainder, *self.state.values(),
                 *self.absmax.values()]
        if any(_overlap(new, t) for t in owned if t is not None):
            # (the kernels assume their arrays do not overlap)
            raise RuntimeError(
                f"a parameter of shape {tuple(p.shape)} was replaced by a tensor that shares "
                "memory with this optimizer's own gradient or state buffers (e.g. p.data = "
                "p.grad); give it storage of its own")
        with torch.no_grad():
            same = bool(torch.equal(new, old))  # (the old storage: alive through self.flat)
        if _IN_PLACE.get(self.addresses[index]) is self:
            del _IN_PLACE[self.addresses[index]]
        self.flat, self.tensors[index] = new.view(-1), new
        self.addresses[index] = new.data_ptr()
        if new.numel():
            _IN_PLACE[new.data_ptr()] = self
        self._arrays.clear()
        self.prepared.clear()
        self.unbind()
        self.buffer_addresses = self.buffers_at()
        if not same:
            with torch.no_grad():
                if self.master is not None:
                    self.master.copy_(self.flat)
                if self.remainder is not None:
                    self.remainder.zero_()

    def view_of(self, name: str, index: int) -> torch.Tensor:
        """Param ``index``'s part of a state buffer, shaped as torch keeps it: like the
        param, or for factored moments (..., R, 1) per row and (..., 1, C) per column."""
        layout = self.layouts.get(name, "elements")
        if name in (MASTER, REMAINDER) or layout == "elements":
            return self.slice({MASTER: self.master, REMAINDER: self.remainder}.get(
                name, self.state.get(name)), index)
        shape = tuple(self.tensors[index].shape)
        part = self.state[name][self.state_part(name, index, index + 1, None)]
        if layout == "rows":
            return part.view(*shape[:-1], 1)
        if layout == "cols":
            return part.view(*shape[:-2], 1, shape[-1])
        return part.view(shape)

    def applies(self, name: str, index: int) -> bool:
        """Whether param ``index`` has state ``name`` (factored moments: row and column
        factors for 2 or more dims, a full variance for the others)."""
        layout = self.layouts.get(name, "elements")
        ndim = self.tensors[index].dim()
        return layout == "elements" or (layout == "unfactored") == (ndim < 2)

    def _factor_layout(self) -> tuple:
        if self._factors is None:
            self._factors = self.segment_table(None, self.flat.shape[0]).factored_layout()
        return self._factors

    def state_part(self, name: str, first: int, stop: int, elements: slice | None) -> slice:
        """The part of state buffer ``name`` holding params [first, stop): ``elements`` (the
        params' own range) for a per-element buffer, else their factors."""
        layout = self.layouts.get(name, "elements")
        if layout == "elements":
            return elements
        column = ("rows", "cols", "unfactored").index(layout)
        starts, sizes = self._factor_layout()
        end = starts[stop, column] if stop < len(self.tensors) else sizes[column]
        return slice(int(starts[first, column]), int(end))

    def add_state(self, name: str, value: float = 0.0) -> None:
        if name not in self.state:
            layout = self.layouts.get(name, "elements")
            size = self.flat.shape[0] if layout == "elements" else \
                self._factor_layout()[1][("rows", "cols", "unfactored").index(layout)]
            if self.int8:  # every block the constant: its code and |value| as the scale
                made = quantize(np.full(INT8_BLOCK, value, dtype=np.float32),
                                self.signed(name))
                self.state[name] = self.new_buffer(size, int(made.codes[0]), torch.uint8)
                self.absmax[name] = self.new_buffer(int8_blocks(size), float(made.absmax[0]),
                                                    torch.float32)
                return
            self.state[name] = self.new_buffer(size, value, self.state_dtype)

    def arrays(self, names: tuple[str, ...]) -> tuple[list, dict]:
        """The kernel's arguments as zero-copy numpy/cupy views, made on first use: the array
        list (flat, grad, state[names]...) and the keywords for 16-bit params (master, dtype:
        their buffers travel as uint16 bits, numpy and cupy having no bfloat16)."""
        made = self._arrays.get(names)
        if made is None:
            convert = _as_array if self.format is None else _as_bits
            # (no gradient buffer while the steps run in backward: its chunks bring theirs)
            master = self.master if self.master is not None else self.remainder
            made = [convert(t) if t is not None else None for t in (self.flat, self.grad)], \
                {} if self.format is None else {
                    "master": None if master is None else _as_array(master),
                    "dtype": self.format}
            made[0].extend(_as_bits(self.state[n]) if self.state_dtype == torch.bfloat16
                           else Int8State(_as_array(self.state[n]), _as_array(self.absmax[n]))
                           if self.int8 else _as_array(self.state[n]) for n in names)
            self._arrays[names] = made
        return made

    def param_arrays(self, names: tuple, arrays: list, half: dict, i: int,
                     n: int) -> tuple[list, dict]:
        """The kernel arguments (``arrays``, ``half``) cut to param i's first n elements
        (n = its size for a per-param step, 0 for a call over no element)."""
        sl = slice(self.offsets[i], self.offsets[i] + n)
        return [arrays[0][sl], arrays[1][sl],
                *(a[self.state_part(name, i, i + 1, sl)]
                  for name, a in zip(names, arrays[2:], strict=True))], \
            {key: v[sl] if key == "master" and v is not None else v for key, v in half.items()}

    def master_values(self, part: slice) -> torch.Tensor:
        """The float32 values of the params in ``part`` of the flat buffer: float32 params,
        the master (made from params and remainders with "remainder"), or the 16-bit params'
        own values ("none"). A copy, except for float32 params and the float32 master."""
        if self.master is not None:
            return self.master[part]
        if self.remainder is not None:
            return _torch_array(_bf16.join_remainder(_as_bits(self.flat[part]),
                                                     _as_array(self.remainder[part])),
                                self.flat.device)
        return self.flat[part] if self.format is None else self.flat[part].float()

    @torch.no_grad()
    def set_master_values(self, part: slice, values: torch.Tensor) -> None:
        """Set the float32 values of the params in ``part``: float32 params as given; 16-bit
        ones get the master and its rounding to nearest even ("fp32"), the rounding with
        ties away from zero and the remainders ("remainder"), or the rounding ("none")."""
        if self.remainder is not None:
            bits, remainder = _bf16.split_master(_as_array(values.float().contiguous()),
                                                 _xp_of(self.flat))
            self.flat[part].view(torch.int16).copy_(_torch_array(bits.view("int16"),
                                                                 self.flat.device))
            self.remainder[part].copy_(_torch_array(remainder, self.flat.device))
            return
        if self.master is not None:
            self.master[part].copy_(values)
        self.flat[part].copy_(values)


def _xp_of(t: torch.Tensor):
    if t.device.type == "cpu":
        return np
    import cupy

    return cupy


def _torch_array(array, device: torch.device) -> torch.Tensor:
    """A numpy or cupy array as a torch tensor on ``device`` (zero-copy where it can)."""
    if isinstance(array, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)
    return torch.from_dlpack(array)


def _as_bits(t: torch.Tensor):
    """A 16-bit tensor's elements as uint16 bits (numpy and cupy have no bfloat16)."""
    return _as_array(t.view(torch.int16)).view("uint16")


DIFFERENTIABLE_REFUSED = "differentiable=True is not supported by fastopt's fused kernels"

#: fastopt.torch's own CPU buffers of at least this many bytes are madvised for transparent
#: huge pages (``_buffer``)
HUGE_PAGE_MIN_BYTES = 4 << 20
_MADV_HUGEPAGE = 14  # (Linux's value)
_PAGE = 4096


@functools.cache
def _madvise():
    """libc's madvise, or None off Linux or where it cannot be loaded."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


def _allocate(size: int, dtype: torch.dtype, device, pinned: bool = False,
              huge: bool = False) -> torch.Tensor:
    """``size`` uninitialised elements; with ``huge`` a large CPU buffer, not pinned, is
    madvised for transparent huge pages before its first touch (``_buffer``)."""
    t = torch.empty(size, dtype=dtype, device=device, pin_memory=pinned)
    if huge and not pinned and t.device.type == "cpu" and t.numel() * t.element_size() \
            >= HUGE_PAGE_MIN_BYTES and _madvise() is not None:
        start = -(-t.data_ptr() // _PAGE) * _PAGE
        stop = (t.data_ptr() + t.numel() * t.element_size()) // _PAGE * _PAGE
        _madvise()(start, stop - start, _MADV_HUGEPAGE)  # (advice: a failure changes nothing)
    return t


def _buffer(size: int, fill, dtype: torch.dtype, device, pinned: bool = False,
            huge: bool = False) -> torch.Tensor:
    """A new buffer of fastopt.torch's own: ``size`` elements, all ``fill``. With ``huge`` (a
    flat-mode bucket's buffers) a large CPU one, not pinned, is madvised for transparent huge
    pages before its first touch, as numpy does for its large arrays and torch's allocator
    only under THP_MEM_ALLOC_ENABLE=1: on 4 KB pages the flat-mode AdamW step over GPT-2
    small's tensors took 1.06-1.14x the numpy class's, on huge pages 0.97-1.01x. (The
    multi-tensor mode's buffers are pieces of an ``_Arena``'s chunks.) Where the kernel grants
    none (THP "never"), nothing changes."""
    return _allocate(size, dtype, device, pinned, huge).fill_(fill)


#: the bytes of the chunks an ``_Arena`` carves the multi-tensor mode's CPU buffers from:
#: the first, then each twice the last, up to the largest
ARENA_FIRST_CHUNK_BYTES = 1 << 20
ARENA_CHUNK_BYTES = 64 << 20


class _Arena:
    """Where one optimizer's multi-tensor (in-place) CPU buckets take their own buffers
    (gradient, master or remainders, state): consecutive pieces, 64-byte aligned, of chunks
    (from a page boundary; madvised for transparent huge pages from 4 MB) of 1 MB, then
    twice the last one's bytes (or more: room for two of the piece that needs it) up to
    ``ARENA_CHUNK_BYTES``: a small optimizer's pieces are not views of 64 MB (``torch.save``
    of one state tensor writes its whole storage; a review measured 64 MB for a 2-element
    bias); a piece of more than half the largest chunk is a buffer of its own, madvised
    too. Against a torch
    allocation each (4 KB pages) the multi-tensor mode's AdamW step over GPT-2 small's
    tensors went from 0.90-0.92x to 0.92-0.94x the flat mode's speed on a quiet host
    (bench/probes/multitensor_torch.py; bench/NOTES.md, twenty-second session). A chunk
    lives while any piece of it does; its pages untouched by a piece are never faulted
    in."""

    def __init__(self):
        self._chunk: torch.Tensor | None = None  # (uint8)
        self._used = 0
        self._chunk_bytes = ARENA_FIRST_CHUNK_BYTES // 2  # (the last chunk's)

    def take(self, size: int, fill, dtype: torch.dtype) -> torch.Tensor:
        """A CPU buffer of ``size`` elements of ``dtype``, all ``fill``."""
        item = torch.empty((), dtype=dtype).element_size()
        nbytes = size * item
        if 2 * nbytes > ARENA_CHUNK_BYTES:
            return _buffer(size, fill, dtype, "cpu", huge=True)
        if self._chunk is None or self._used + nbytes > self._chunk.numel():
            size = min(2 * self._chunk_bytes, ARENA_CHUNK_BYTES)
            while size < 2 * nbytes and size < ARENA_CHUNK_BYTES:  # (room for two such)
                size *= 2
            self._chunk_bytes = size
            self._chunk = _allocate(size + _PAGE, torch.uint8, "cpu", huge=True)
            self._used = -self._chunk.data_ptr() % _PAGE  # (from its first whole page)
        piece = self._chunk[self._used:self._used + nbytes].view(dtype)
        self._used += -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
        return piece.fill_(fill)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors' memory overlaps."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    start_a, start_b = a.data_ptr(), b.data_ptr()
    return start_a < start_b + b.numel() * b.element_size() \
        and start_b < start_a + a.numel() * a.element_size()


def _as_array(t: torch.Tensor):
    """A zero-copy numpy (CPU) or cupy (CUDA, via DLPack) view of a contiguous 1-D tensor."""
    if t.device.type == "cpu":
        return t.numpy()
    import cupy

    return cupy.from_dlpack(t.detach())


@functools.lru_cache(maxsize=64)
def _cupy_stream(ptr: int, device_index: int):
    """CuPy's handle on a torch CUDA stream, made once per stream (CuPy 14 deprecates
    ExternalStream for Stream.from_external, which older CuPy lacks; the handle is the same)."""
    import cupy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, device_index)


def _locks(opt) -> tuple:
    """(step lock, state lock) of a fastopt.torch optimizer, made at first use (setdefault:
    two threads get the same ones; a copy or an unpickled optimizer makes its own): a step
    takes the first without waiting (a second thread's step is refused) and holds the
    second, which ``state_dict`` and ``load_state_dict`` wait for (re-entrant: a closure or
    a hook of the stepping thread may take a state dict)."""
    found = opt.__dict__.get("_fastopt_locks")
    if found is None:
        found = opt.__dict__.setdefault("_fastopt_locks", (threading.Lock(), threading.RLock()))
    return found


def _holding_state(method):
    """``method`` run holding the optimizer's state lock (``_locks``)."""
    @functools.wraps(method)
    def holding(self, *args, **kwargs):
        with _locks(self)[1]:
            return method(self, *args, **kwargs)
    return holding


class FlatOptimizer(torch.optim.Optimizer):
    """Shared machinery; a subclass sets ``definition`` (its entry in the registry),
    ``fixed`` (hyperparameters the class fixes, e.g. AdamW's decoupled decay) and ``twin``
    (its torch.optim twin's behaviour, or None).

    Every class takes, besides its torch twin's arguments: ``state_dtype`` ('float32',
    'bfloat16', or 'int8' for the elementwise optimizers: stochastically rounded);
    ``master_weights`` for 16-bit params: 'fp32' (a float32 master, 4 B/param),
    'remainder' (bfloat16 params: the master's low 16 bits beside them, 2 B/param, the same
    master bit for bit; the params round it to nearest, ties away from zero) or 'none' (no
    master: the params are rounded stochastically); ``multi_tensor``: step each param in
    its own storage instead of packing the params into flat buffers fastopt owns (on the
    CPU a kernel call per param; on a GPU one multi-tensor launch over a group's params of
    one format, for the optimizers without per-step scalars, else a launch per param)."""

    definition: Definition
    fixed: dict = {}
    twin = None
    #: the step_in_backward handle while the steps run in backward (also after unpickling:
    #: None)
    _in_backward = None
    #: how 16-bit params keep their float32 values (pickles from before it: "fp32")
    master_weights = "fp32"
    #: the multi-tensor mode (pickles from before it: the flat buffers)
    multi_tensor = False
    #: a group's whole-bucket GPU launches of in-place buckets, deferred while it steps
    #: (``_launch_deferred``); None outside a step
    _deferred: list | None = None
    #: a group's CPU kernel calls of in-place buckets, deferred while it steps and then made
    #: back to back (``_call_deferred``); None outside a step
    _deferred_cpu: list | None = None
    #: a count of step() calls: which multi-tensor launches the current step used
    _launch_serial = 0
    #: params and gradients in pinned memory (CPUOffload's host optimizers)
    _pin_memory = False
    #: what the CPU kernels multiply the gradients by (CPUOffload's clipping and grad_scale)
    _grad_mult = 1.0
    #: while the constructor builds its param groups: those sharing memory (__init__)
    _listed_aliased: set | None = None
    #: the step count of the group being stepped (``_group_step``): its lr is the schedule's
    #: at that count for every param, as a torch group's lr is (``_lr_schedule``)
    _group_count: int | None = None
    #: a count the group's is at least (CPUOffload: its group's, over the host optimizers
    #: of its buckets, one group each)
    _group_count_floor: int | None = None
    #: whether a step where no param of a group had a gradient advances the group's
    #: schedule (``_finish_group``; CPUOffload's hosts count by their group instead)
    _advance_idle_groups = True
    _advanced_cache: dict | None = None

    @property
    def group_defaults(self) -> dict:
        """The group keys torch's ``__setstate__`` fills in when a state dict lacks them
        (older torch versions): key -> torch's value."""
        return self.twin.group_defaults if self.twin is not None else {}

    def __init__(self, params, defaults: dict, state_dtype: str = "float32",
                 master_weights: str = "fp32", multi_tensor: bool = False):
        defaults = {**defaults, **self.fixed}  # e.g. AdamW's groups hold decoupled=True
        lr = defaults.get("lr")
        if not isinstance(lr, Schedule):
            check_lr(_scalar(lr, "lr"))
        self._hypers(defaults, construction=True)  # the definition's checks, torch's messages
        betas = defaults.get("betas")
        if self.twin is not None and self.twin.betas_same_kind and not (
                all(isinstance(b, float) for b in betas)
                or all(isinstance(b, torch.Tensor) for b in betas)):
            raise ValueError("betas must be either both floats or both Tensors")
        for h in self.definition.hypers:  # 1-element tensor betas stay tensors, 0-d, as torch's
            value = defaults.get(h.name)
            if isinstance(value, (tuple, list)):
                defaults[h.name] = tuple(v.reshape(()) if isinstance(v, torch.Tensor) else v
                                         for v in value)
        if defaults.get("differentiable"):
            raise ValueError(DIFFERENTIABLE_REFUSED)
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")  # (torch's)
        check_state_dtype(self.definition, state_dtype)
        #: the optimizer state's storage: float32, bfloat16 (stochastically rounded) or int8
        #: (per state: uint8 codes under its name, float32 block scales under
        #: ``<name>_absmax``; state_dict() adds the float32 values: fastopt._int8)
        self.state_dtype = state_dtype
        #: how 16-bit params keep their float32 values: "fp32" (a float32 master, torch
        #: state ``master_param``), "remainder" (bfloat16 params: the master's low 16 bits,
        #: int16 state ``master_remainder``; state dicts give the master they make) or "none"
        #: (no master: the params are rounded stochastically); float32 params need none
        self.master_weights = check_master_weights(master_weights)
        if not isinstance(multi_tensor, bool):
            raise TypeError(f"multi_tensor must be a bool, got {multi_tensor!r}")
        #: the multi-tensor mode: each param stepped where it lives (its own storage, a kernel
        #: call per param), not packed into flat buffers fastopt owns: for params shared with
        #: another optimizer, or whose storage is someone else's
        self.multi_tensor = multi_tensor
        self._buckets: list[list[_Bucket]] = []
        self._arena = _Arena()  # (the multi-tensor mode's CPU buffers)
        #: per group with a schedule: the lr fastopt last wrote to group['lr'] (the schedule's
        #: value for the next step); any other value there was set by someone else and wins
        self._lr_written: list[float | None] = []
        #: ids of the groups whose state was replaced from outside since their last step
        #: (``_reload_param``): their lr is then taken as a load takes it (``_sync_lr``)
        self._reloaded: set[int] = set()
        #: id(group) -> (the group's hyperparameter values, checked hyperparameters)
        self._checked: dict[int, tuple] = {}
        defaults = self._split_schedule(dict(defaults))
        d = self.definition
        if d.modes is not None:  # schedulefree's group keys: train_mode, k, weight_sum, ...
            defaults.setdefault(d.modes.group_key, False)
        if d.group_step is not None:
            defaults.setdefault(d.group_step, 0)
        for key, value in {**d.group_keys, **d.decay_keys}.items():
            defaults.setdefault(key, value)
        for s_ in d.scalars:
            if s_.group:
                defaults.setdefault(s_.name, s_.init)
        params = _listed_once(params)
        #: while the constructor builds its groups: the params of any of them whose memory
        #: overlaps another's (_aliased), found before the first group packs its params
        self._listed_aliased = self._aliased(list(dict.fromkeys(
            p for p in _listed_tensors(params) if not is_dtensor(p))))
        try:
            super().__init__(params, defaults)
        finally:
            self._listed_aliased = None
        if self.twin is not None and self.twin.state_at_construction:
            # as torch's Adagrad: the initial params get their state at construction (later
            # groups get theirs at their first step)
            for group, buckets in zip(self.param_groups, self._buckets, strict=True):
                for b in buckets:
                    for i in range(len(b.params)):
                        self._start(group, b, i)
                    b.all_started = True

    def _split_schedule(self, group: dict) -> dict:
        """A Schedule given as lr moves to group['schedule']; group['lr'] holds its value."""
        lr = group.get("lr")
        if isinstance(lr, Schedule):
            group["schedule"] = self.definition.check_schedule(lr)
            group["lr"] = lr.at(0)
        elif isinstance(lr, torch.Tensor):
            _scalar(lr, "lr")  # kept as a tensor, as torch does; read at every step
        return group

    # ------------------------------------------------------------------ construction
    def _hypers(self, group: dict, construction: bool = False) -> dict:
        """The definition's hyperparameters from a group, checked (tensors -> their value);
        ``construction``: the constructor's arguments (``Definition.check``)."""
        values = {}
        for h in self.definition.hypers:
            value = self.fixed.get(h.name, group.get(h.name, h.default))
            if isinstance(value, (tuple, list)):
                value = tuple(_scalar(v, f"{h.name}[{i}]") for i, v in enumerate(value))
            elif isinstance(value, torch.Tensor):
                value = _scalar(value, h.name)
            values[h.name] = value
        checked = self.definition.check(values, construction)
        if checked.get("weight_decay"):
            for key, implemented in self.definition.decay_keys.items():
                if group.get(key, implemented) != implemented:
                    raise ValueError(
                        f"{type(self).__name__} implements only {key}={implemented!r} (the "
                        f"torch-style implementation's key); this param group has "
                        f"{key}={group[key]!r} with weight_decay="
                        f"{checked['weight_decay']}, a weight decay it does not apply")
        return checked

    def state_init(self, group: dict) -> dict[str, float]:
        """State buffer name -> initial value, for the buffers this group's hyperparameters
        need, in the kernel's order."""
        d, hypers = self.definition, self._hypers(group)
        # a state started from a hyperparameter (Adagrad's sum) takes the constructor's value
        # in every group, as torch's does (a group's own value is kept but never read)
        hypers = {**hypers, **{s.init: self.defaults[s.init] for s in d.state
                               if isinstance(s.init, str) and s.init in hypers
                               and s.init in self.defaults}}
        return {name: d.initial_value(name, hypers) for name in d.active_state(hypers)}

    def add_param_group(self, param_group: dict) -> None:
        if self._in_backward is not None:
            raise RuntimeError("add_param_group while the steps run in backward: remove() the "
                               "step_in_backward handle first, then enable it again")
        param_group = self._split_schedule(dict(param_group))
        if param_group.get("differentiable"):  # (a group's own, as the constructor's)
            raise ValueError(DIFFERENTIABLE_REFUSED)
        if "lr" not in param_group and "schedule" in self.defaults \
                and "schedule" not in param_group:
            param_group["schedule"] = self.defaults["schedule"]
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            buckets = self._make_buckets(group)
        except BaseException:
            self.param_groups.pop()
            raise
        self._buckets.append(buckets)
        self._lr_written.append(group["lr"] if "schedule" in group else None)
        self._index_group(group)

    def _earlier_by_storage(self) -> dict:
        """The params of the groups before the last, by the address of the storage each
        lies in now (a packed one: its flat buffer's), for ``_make_buckets``' comparison of
        a new group with them. Kept from one add_param_group to the next (``_index_group``;
        comparing with every earlier group's params each time made a loop of
        add_param_group quadratic), made again from the groups when they were replaced
        (a load, a copy)."""
        ids = [id(g) for g in self.param_groups[:-1]]
        kept = self.__dict__.get("_storage_index")
        if kept is None or kept[0] != ids:
            index: dict[int, list] = {}
            for g in self.param_groups[:-1]:
                _index_params(index, g["params"])
            kept = self._storage_index = (ids, index)
        return kept[1]

    def _index_group(self, group: dict) -> None:
        """A group just built (its params where its buckets step them) into the index of
        ``_earlier_by_storage``, if that is up to date."""
        kept = self.__dict__.get("_storage_index")
        if kept is not None and kept[0] == [id(g) for g in self.param_groups[:-1]]:
            _index_params(kept[1], group["params"])
            kept[0].append(id(group))

    @staticmethod
    def _aliased(params: list) -> set:
        """The ids of the dense params (distinct; contiguous, or a permutation of contiguous:
        transposed, channels_last) whose memory overlaps another dense one's: views of one
        tensor as separate Parameters (tied weights as w and w.t()). A dense tensor fills its
        byte range, so two that overlap share elements. The flat mode steps them in place
        (as the multi-tensor mode), as torch steps each where it lies, instead of packing
        them apart (a non-contiguous one is refused: ``_make_buckets``). Other strided views
        (whose byte ranges may interleave without a common element) are packed as before."""
        spans = sorted((_memory_span(p), id(p)) for p in params
                       if p.numel() and (p.is_contiguous() or _dense(local_tensor(p))))
        aliased, end = set(), None
        for (ptr, first, stop), ident in spans:
            if end is not None and end[0] == ptr and first < end[1]:
                aliased |= {ident, end[2]}
            if end is None or end[0] != ptr or stop > end[1]:
                end = (ptr, stop, ident)
        return aliased

    #: keywords that hold for the whole optimizer, refused in a param group (where they
    #: would be kept and never read)
    OPTIMIZER_WIDE = ("state_dtype", "master_weights", "multi_tensor")

    def _make_buckets(self, group: dict) -> list[_Bucket]:
        params = group["params"]
        # (the optimizer's own value is accepted: ZeroRedundancyOptimizer passes its
        # keywords in every group it builds)
        wide = [key for key in self.OPTIMIZER_WIDE
                if key in group and group[key] != getattr(self, key)]
        if wide:
            raise ValueError(f"{wide[0]}={group[wide[0]]!r} in a param group: it holds for the "
                             f"whole optimizer ({type(self).__name__}(..., {wide[0]}=...) is "
                             f"{getattr(self, wide[0])!r}); for another, build a second "
                             "optimizer")
        for p in params:
            if p.is_complex():
                raise TypeError("complex parameters are not supported by fastopt's kernels")
            if p.is_sparse or (p.grad is not None and p.grad.is_sparse):
                raise TypeError("sparse parameters or gradients are not supported")
            if p.dtype not in PARAM_DTYPES:
                raise TypeError(f"fastopt.torch supports float32, float16 and bfloat16 "
                                f"parameters, got {p.dtype}")
            if self.definition.matrix is not None and p.ndim != 2:  # (torch's message)
                raise ValueError(self.definition.matrix.only_2d.format(shape=p.size()))
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"one parameter group must live on one device, got {devices}; "
                             "put parameters of each device in their own group")
        if params and params[0].device.type not in ("cpu", "cuda"):
            raise TypeError(f"fastopt.torch steps parameters on the cpu or cuda devices, got "
                            f"{params[0].device}" + (": a meta tensor holds no values to update; "
                                                     "materialise the model first (to_empty())"
                                                     if params[0].device.type == "meta" else ""))
        sharded = [p for p in params if is_dtensor(p)]
        if sharded:
            self._check_sharded()
        loose = [p for p in params if (self.multi_tensor or is_dtensor(p))
                 and not local_tensor(p).is_contiguous()]
        if loose:
            raise ValueError(f"multi_tensor=True and DTensor params are stepped in their own "
                             f"storage, which must be contiguous; a param of shape "
                             f"{tuple(loose[0].shape)} is not (e.g. channels_last: make it "
                             "contiguous first, or use the flat mode)")
        # (the flat mode packs plain params into its buffers; DTensors it steps in place,
        # and params sharing memory with another, in this group or another: packing would
        # part them. In the constructor, its groups' params as they lay before any was
        # packed; in a later add_param_group, the groups before it show theirs where they
        # step them, in their flat buffers or in place)
        ours = {id(p) for p in params}
        if self._listed_aliased is not None:
            aliased = self._listed_aliased & ours
        else:  # (the earlier params in the storages of this group's: _earlier_by_storage)
            mine = [p for p in dict.fromkeys(params) if not is_dtensor(p) and p.numel()]
            index = self._earlier_by_storage()
            earlier = [q for ptr in {_storage_of(p) for p in mine}
                       for q in index.get(ptr, ()) if id(q) not in ours]
            aliased = self._aliased([*mine, *dict.fromkeys(earlier)]) & ours
        strided = [p for p in params if id(p) in aliased and not p.is_contiguous()]
        if strided and not self.multi_tensor:
            raise ValueError(
                f"a param of shape {tuple(strided[0].shape)} with strides "
                f"{strided[0].stride()} shares memory with another param (e.g. tied weights "
                "as w and w.t()): fastopt steps params that share memory where they lie, "
                "which needs contiguous ones; tie them as one Parameter used twice, or make "
                "this one contiguous")
        halves = [p for p in params if id(p) in aliased and p.dtype != torch.float32]
        if halves and self.master_weights == "fp32":
            raise ValueError(
                f"a {halves[0].dtype} param of shape {tuple(halves[0].shape)} shares memory "
                "with another param: with master_weights='fp32' each would keep a float32 "
                "master of its own and write the shared memory from it, undoing the other's "
                "update; use master_weights='remainder' (bfloat16) or 'none'")
        aliased = set() if self.multi_tensor else aliased
        if not self.multi_tensor:  # params in shared memory (model.share_memory(): torch's
            # Hogwild, processes stepping one model) are stepped where they lie too: packing
            # would move them into this process's own memory, away from the others'
            aliased |= {id(p) for p in params if not is_dtensor(p) and p.numel()
                        and p.is_contiguous() and p.is_shared()}
        packed = [] if self.multi_tensor else [p for p in params if not is_dtensor(p)
                                               and id(p) not in aliased]
        stepped = [p for p in packed if _IN_PLACE.get(p.data_ptr()) is not None]
        if stepped:
            raise RuntimeError(
                f"{len(stepped)} of these parameters (e.g. one of shape "
                f"{tuple(stepped[0].shape)}) are stepped in place by a fastopt optimizer with "
                "multi_tensor=True: this one would move them into its flat buffer, away from "
                "where that one steps them. Build this optimizer with multi_tensor=True too, "
                "or first")
        owned = [p for p in packed if _owner(p) is not None]
        if owned:
            gc.collect()  # an optimizer that is gone but not yet collected owns nothing
            owned = [p for p in owned if _owner(p) is not None]
        if owned:
            p = owned[0]
            raise RuntimeError(
                f"{len(owned)} of these parameters (e.g. one of shape {tuple(p.shape)}) already "
                f"belong to another fastopt optimizer ({_owner(p).owner}): their .data is a view "
                "of that optimizer's flat buffer, and a second fastopt optimizer would repack "
                "them into its own and detach them from the first. Use one fastopt optimizer "
                "per parameter (param groups for different hyperparameters); drop the first "
                "before building another (`del opt`, and any LR scheduler holding it: "
                "`opt = AdamW(...)` run again keeps the old one alive until the new one "
                "exists), or build the second with multi_tensor=True, which steps the params "
                "where they lie")
        # a param listed n times in the group (torch warns, and updates it n times a step):
        # packed once, updated n times a step
        unique = list({id(p): p for p in params}.values())
        times = {id(p): 0 for p in unique}
        for p in params:
            times[id(p)] += 1
        if len(unique) != len(params):
            if self.definition.group_step is not None:  # (schedulefree: k once a step)
                raise ValueError(
                    f"{type(self).__name__} counts its steps per param group "
                    f"('{self.definition.group_step}'), once a step, and cannot update a "
                    "parameter listed more than once in a group once per listing: list each "
                    "parameter once")
            self._check_repeats(group.get("schedule"))
        buckets = []
        for dtype in dict.fromkeys(p.dtype for p in unique):  # one bucket per dtype, in order
            check_master_weights(self.master_weights, HALF_FORMATS.get(dtype, "float32"))
        # (the multi-tensor mode, and DTensor params in either mode: a bucket per param, over
        # the param's own storage or local shard)
        flat = [] if self.multi_tensor else [p for p in unique if not is_dtensor(p)
                                             and id(p) not in aliased]
        parts = [[p for p in flat if p.dtype == dtype]
                 for dtype in dict.fromkeys(p.dtype for p in flat)]
        parts += [[p] for p in unique if self.multi_tensor or is_dtensor(p)
                  or id(p) in aliased]
        for part in parts:
            b = _Bucket(part, self.state_init(group),
                        STATE_DTYPES[self.state_dtype], type(self).__name__,
                        self.definition.scalars,
                        {st.name: st.layout for st in self.definition.state},
                        {st.name: st.sign for st in self.definition.state},
                        self.master_weights,
                        in_place=self.multi_tensor or is_dtensor(part[0])
                        or id(part[0]) in aliased,
                        pin_memory=self._pin_memory,
                        keep_layout=not self.definition.segmented
                        and self.state_dtype != "int8",
                        arena=getattr(self, "_arena", None))
            b.repeats = [times[id(p)] - 1 for p in b.params]
            buckets.append(b)
        return buckets

    def _check_sharded(self) -> None:
        """What DTensor params (FSDP2) can have: an elementwise optimizer (each process steps
        its shard alone), state that shards as the param does (not int8's per-block scales)."""
        name = type(self).__name__
        if self.definition.segmented or self.definition.matrix is not None:
            raise ValueError(
                f"{name} is tensor-aware (per-tensor norms, factored moments or a "
                "matrix step) and would need the whole tensor or reductions across shards; it "
                f"does not support DTensor params (FSDP2's fully_shard) yet: use an elementwise "
                f"optimizer, or {name} without FSDP2")
        if self.state_dtype == "int8":
            raise ValueError(
                "state_dtype='int8' keeps a scale per 256-element block of each process's "
                "shard, which torch.distributed.checkpoint cannot save as a DTensor; with "
                "DTensor params (FSDP2) use state_dtype='float32' or 'bfloat16'")

    @staticmethod
    def _check_repeats(schedule) -> None:
        """A param listed twice is updated twice a step at the group's lr; with an in-kernel
        schedule each update would take the lr of its own step count: refused."""
        if schedule is not None and not schedule.is_constant:
            raise ValueError(
                "a parameter listed more than once in a param group is updated once per "
                "listing (as torch does), each at the group's lr; with a schedule evaluated in "
                "the kernel its updates would run ahead on the schedule: list each parameter "
                "once, or give this group a constant lr")

    def _state_views(self, group: dict, bucket: _Bucket, i: int) -> dict:
        views = {"step": bucket.steps[i]} if self.definition.per_param_step else {}
        for name in self.state_init(group):
            if bucket.applies(name, i):
                views[name] = bucket.view_of(name, i)
                if bucket.int8:
                    views[ABSMAX_KEY.format(name)] = bucket.absmax_of(name, i)
        for name, values in bucket.scalars.items():
            if name not in self._group_scalars:
                views[name] = values[i]  # a 0-d view, as torch's per-param scalar tensors
        if bucket.master is not None:
            views[MASTER] = bucket.view_of(MASTER, i)
        if bucket.remainder is not None:
            views[REMAINDER] = bucket.view_of(REMAINDER, i)
        if bucket.sharded:  # the per-element state of a DTensor param: DTensors like it
            views = {k: v if k == "step" or k in bucket.scalars else bucket.shown(i, v)
                     for k, v in views.items()}
        return views

    def _start(self, group: dict, bucket: _Bucket, i: int) -> None:
        """Give param i its entry in self.state (views of the flat state), as torch does at
        the param's first step."""
        self.state[bucket.params[i]].update(self._state_views(group, bucket, i))
        bucket.started[i] = True
        self._published(bucket, i)

    def _published(self, b: _Bucket, i: int) -> None:
        """Remember param i's ``self.state`` entry as fastopt has just published it."""
        st = self.state.get(b.params[i])
        b.published[i] = None if not st else (st, tuple(st.values()), tuple(st))

    def _adopt_edits(self, group: dict, b: _Bucket, which) -> None:
        """Take in what was done to ``self.state`` since fastopt published it, as torch.optim
        reads its state at each step: for each param of ``which`` (indices), a state entry
        deleted or emptied (``del opt.state[p]``, ``opt.state.clear()``, a new
        ``opt.state``) restarts the param's state as at its first step; a tensor put in
        place of a published one (a state buffer, ``step``, the master) is copied into the
        kernel's buffers; state given to a param before its first step is its state. An
        in-place edit of ``state[p]['step']`` (a view of the bucket's counts) sets the
        count. Other edits in place need nothing (the state is views of the buffers)."""
        if b.steps._version != b.steps_seen:  # (the counts were written in place)
            if (int(b.steps.max()), bool((b.steps == b.steps[0]).all())) \
                    != (b.step, b.uniform):
                b.counts_loaded()
            b.steps_seen = b.steps._version
        get, is_ = self.state.get, operator.is_
        for i in which:
            st, shown = get(b.params[i]), b.published[i]
            if shown is None:
                if not st:
                    continue
            elif st is shown[0] and len(st) == len(shown[1]) \
                    and all(map(is_, st.values(), shown[1])):
                continue
            self._reload_param(group, b, i, dict(st or {}))

    def _adopt_group_state(self, index: int, group: dict, buckets: list[_Bucket]) -> None:
        """``_adopt_group_edits``, and after state loaded from outside (a step count put into
        ``opt.state``: ZeroRedundancyOptimizer's ``load_state_dict`` loads its local
        optimizer so, and copies the loaded group values, lr included, into its groups) the
        group's lr is taken as ``load_state_dict`` takes it (``_sync_lr``): the schedule's
        if it equals the schedule's value at the loaded count, else a hold."""
        self._adopt_group_edits(group, buckets)
        if self._reloaded:
            self._sync_reloaded(index, group, buckets)

    def _sync_reloaded(self, index: int, group: dict, buckets: list[_Bucket]) -> None:
        """The lr of a group whose state was loaded from outside, as a load takes it."""
        if id(group) in self._reloaded:
            self._reloaded.discard(id(group))
            if isinstance(group.get("schedule"), Schedule):
                self._sync_lr(index, group, buckets, keep=True)

    def _adopt_group_edits(self, group: dict, buckets: list[_Bucket]) -> None:
        """``_adopt_edits`` for every param of a group, before any of them steps: a param
        whose state restarts takes the group's count and scalars (Schedule-Free's) as they
        were after the last step, not as a bucket stepped before it has moved them. (In a
        CUDA graph capture: at the next eager step.)"""
        for b in buckets:
            if not (b.flat.is_cuda and _capturing()):
                self._adopt_edits(group, b, range(len(b.params)))

    @torch.no_grad()
    def _reload_param(self, group: dict, b: _Bucket, i: int, st: dict) -> None:
        """Param i's state set from ``st`` (its edited ``self.state`` entry) as a load
        would; one holding none of the param's state (deleted, emptied, or only entries of
        the user's) restarts it as before its first step, but for a count and scalars kept
        per group (Schedule-Free's), which go on. Its float32 values (a 16-bit param's
        master) are kept unless ``st`` gives new ones."""
        p = b.params[i]
        for name, value in st.items():  # (checked before anything changes: a bad edit
            if not isinstance(value, torch.Tensor):  # raises, and can be put right)
                continue
            value = local_tensor(value)
            if name in b.state and b.applies(name, i):
                want = tuple(b.view_of(name, i).shape)
            elif name in b.scalars or name == "step":
                want = None if value.numel() == 1 else ()
            else:
                continue
            if want is not None and tuple(value.shape) != want or value.is_complex():
                raise RuntimeError(
                    f"opt.state[p][{name!r}] of a parameter of shape {tuple(b.tensors[i].shape)}"
                    f" was set to a {value.dtype} tensor of shape {tuple(value.shape)}; "
                    f"expected {'one element' if want == () else want} of real values")
        if b.int8 and b.published[i] is not None:
            # new values under a name whose published scales are untouched: the values are
            # quantised, the old scales not read as theirs
            before = dict(zip(b.published[i][2], b.published[i][1], strict=True))
            for name in b.state:
                scale = ABSMAX_KEY.format(name)
                value = st.get(name)
                if value is not before.get(name) and scale in st \
                        and st[scale] is before.get(scale) \
                        and not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8):
                    del st[scale]  # (new codes, though, are read with the scales)
        master = st
        if b.format is not None and MASTER not in st and REMAINDER not in st:
            offset, t = b.offsets[i], b.tensors[i]
            master = {MASTER: b.shaped(b.master_values(slice(offset, offset + t.numel())),
                                       i)}
        given = any(k in st for k in ("step", *b.state, *b.scalars))
        if "step" in st:  # (state loaded from outside, as ZeroRedundancyOptimizer's load puts
            self._reloaded.add(id(group))  # it: the group's lr is then taken as a load would)
        self.state.pop(p, None)
        self._load_param(group, b, i, st if given else {}, {p: st}, master=master,
                         group_counts=True)
        if not given:  # (the user's own entries stay, as torch keeps them)
            kept = {k: v for k, v in st.items() if k not in (MASTER, REMAINDER, VERSION_KEY)}
            if kept:
                self.state[p] = kept
        b.counts_loaded()
        self._published(b, i)

    def _fill_group(self, group: dict) -> None:
        """Fill the keys a loaded group lacks, as torch's ``__setstate__`` does (then from
        this optimizer's defaults)."""
        for key, value in self.group_defaults.items():
            group.setdefault(key, value)
        for key, value in self.defaults.items():
            # (torch's base __setstate__ puts differentiable into the defaults only: a twin
            # whose own __setstate__ does not add it to the groups (Muon) shows none there)
            if key != "schedule" and not (key == "differentiable" and self.twin is not None
                                          and key not in self.group_defaults):
                group.setdefault(key, value)
        group.update(self.fixed)  # as torch's AdamW: decoupled whatever the dict says

    def memory_report(self) -> dict[str, float]:
        """Bytes per parameter (elements of the params, padding excluded) this optimizer keeps,
        by component: ``params`` and ``grads`` (the flat buffers, their padding included),
        ``master_param`` (16-bit params), each state buffer under its name (int8: its codes),
        ``scales`` (int8 state's block absmax values) and ``total``."""
        parts, n = [], 0

        def size(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        for buckets in self._buckets:
            for b in buckets:
                n += sum(t.numel() for t in b.tensors)
                parts.append(("params", size(b.flat), 0))
                if b.grad is not None:
                    parts.append(("grads", size(b.grad), 0))
                if b.master is not None:
                    parts.append((MASTER, size(b.master), 0))
                if b.remainder is not None:
                    parts.append((REMAINDER, size(b.remainder), 0))
                parts += [(name, size(t), size(b.absmax[name]) if name in b.absmax else 0)
                          for name, t in b.state.items()]
        return memory_report(n, parts)

    @torch.no_grad()
    def refresh_master(self) -> None:
        """Copy the 16-bit params into their float32 masters (with "remainder": zero the
        remainders, so the master is the params exactly). Call it after changing 16-bit
        params in place (e.g. ``model.load_state_dict`` after building the optimizer): the
        kernel updates the master and overwrites the params with it, so a stale master would
        undo the change. Float32 params, and 16-bit ones with master_weights="none", have no
        master; nothing to do for them."""
        for buckets in self._buckets:
            for b in buckets:
                if b.master is not None:
                    b.master.copy_(b.flat)
                if b.remainder is not None:
                    b.remainder.zero_()

    # ------------------------------------------------------------------ stepping
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. With set_to_none=True (torch's default) p.grad becomes None as in
        torch; the next step copies new gradients into the flat buffer once (one extra pass).
        set_to_none=False zeroes the flat gradient buffer in place: once every param has had a
        gradient, nothing is ever copied. A param whose grad is None keeps None (as in torch:
        the step skips it)."""
        for buckets in self._buckets:
            for b in buckets:
                if b.sharded and not set_to_none:  # (a DTensor's grad is its own)
                    for p in b.params:
                        if p.grad is not None:
                            p.grad.zero_()
                elif set_to_none or b.grad is None:  # (step in backward: no buffer to zero)
                    for p in b.params:
                        p.grad = None
                else:
                    b.grad.zero_()
                    for i, p in enumerate(b.params):
                        g = p.grad
                        if g is not None and g is not b.grad_view(i):
                            p.grad = b.grad_views[i]

    def _schedule(self, index: int, group: dict) -> tuple[Schedule, bool]:
        """The schedule for the group's next step and whether it is the group's own: a
        group['lr'] other than the object fastopt last wrote there (a torch scheduler's, the
        0 of torch.distributed.checkpoint's dummy step, the user's) is used instead. Told by
        identity, not value: a hold at the value fastopt wrote (0 at a warm-up's start) is a
        hold. Writing back the object read from group['lr'] resumes the schedule, and so does
        putting the schedule back (``group['lr'] = group['schedule']``). A loaded lr equal to
        the schedule's value is relinked by the load (``_sync_lr``)."""
        lr = group["lr"]
        if isinstance(lr, Schedule):  # a schedule put into group['lr'] (e.g. ZeRO's sync of
            # its groups, built from our defaults) becomes the group's schedule
            group["schedule"] = self.definition.check_schedule(lr)
            return lr, True
        schedule = group.get("schedule")
        if schedule is not None and not isinstance(schedule, Schedule):
            schedule = self._take_loaded_schedule(index, group)
            lr = group["lr"]
        if schedule is not None and lr is self._lr_written[index]:
            return schedule, True
        if isinstance(lr, torch.Tensor):
            lr = _scalar(lr, "lr")
        return check_lr(lr), False  # (torch's message and error type, as at construction)

    def _take_loaded_schedule(self, index: int, group: dict) -> Schedule:
        """A group whose ``schedule`` is a state dict's payload was loaded around
        ``load_state_dict`` (ZeroRedundancyOptimizer's load copies the loaded group values
        into its local optimizer's groups and puts the state into ``opt.state``): the
        schedule is taken from it, the loaded state first (the count), and the loaded lr as
        a load takes it (``_sync_lr``: the schedule's if equal to its value, else a hold)."""
        group["schedule"] = schedule = self.definition.check_schedule(
            _schedule_from_payload(group["schedule"]))
        buckets = self._buckets[index]
        self._adopt_group_state(index, group, buckets)
        self._sync_lr(index, group, buckets, keep=True)
        return schedule

    def _patch_step_function(self) -> None:
        """As torch's: the class's step wrapped with the step hooks when an optimizer of it
        is built, unless already wrapped (``_hooked_step`` in place of torch's wrapper), so
        a subclass overriding step() runs the hooks as often as torch's would."""
        self._zero_grad_profile_name = (
            f"Optimizer.zero_grad#{self.__class__.__name__}.zero_grad")
        if not getattr(self.__class__.step, "hooked", None):
            self.__class__.step = _hooked_step(self.__class__.step)

    @torch.no_grad()
    def step(self, closure=None):
        """One fused update per bucket; returns the closure's loss (None without closure).
        A step while another thread steps this optimizer raises RuntimeError (the core
        classes' rule; torch.optim's steps would race, losing steps); ``state_dict()`` and
        ``load_state_dict()`` in another thread wait for the step to end."""
        if self._in_backward is not None:
            raise RuntimeError(
                f"{type(self).__name__} steps inside backward() (fastopt.torch."
                "step_in_backward): do not call step(). Gradient accumulation, clipping "
                "(clip_grad_norm_) and GradScaler need every gradient before the step and do "
                "not work in this mode; call .remove() on the handle to step normally again")
        stepping, state = _locks(self)
        if not stepping.acquire(blocking=False):
            raise RuntimeError(f"{type(self).__name__}.step() is already running, in another "
                               "thread or in this one (a closure or hook that steps again); "
                               "one optimizer must not be stepped concurrently")
        try:
            with state:
                loss = None
                if closure is not None:
                    with torch.enable_grad():
                        loss = closure()
                self._fused_step()
                return loss
        finally:
            stepping.release()

    def _check_groups(self) -> None:
        """The param groups still hold the params the buckets step: a replaced list (as
        DeepSpeed's ZeRO gives a client optimizer its own flat partitions) or a replaced
        ``param_groups`` would otherwise step the old params, silently."""
        known = self.__dict__.setdefault("_group_lists", {})
        if len(self.param_groups) != len(self._buckets):
            raise RuntimeError(
                f"{type(self).__name__}: param_groups was replaced after construction "
                f"({len(self.param_groups)} groups, {len(self._buckets)} built); add params "
                "with add_param_group. (DeepSpeed's ZeRO does this to a client optimizer, "
                "which fastopt.torch cannot be: README, 'Scaling out')")
        for index, (group, buckets) in enumerate(zip(self.param_groups, self._buckets,
                                                     strict=True)):
            params = group["params"]
            if known.get(index) == (id(params), len(params)):
                continue
            if {id(p) for p in params} != {id(p) for b in buckets for p in b.params}:
                raise RuntimeError(
                    f"{type(self).__name__}: the params of param group {index} were replaced "
                    "after construction; this optimizer steps the params it was built over "
                    "(add params with add_param_group). DeepSpeed's ZeRO does this to a "
                    "client optimizer, which fastopt.torch cannot be: README, 'Scaling out'")
            known[index] = (id(params), len(params))

    @_no_dynamo
    def _fused_step(self) -> None:
        self._check_groups()
        modes = self.definition.modes
        if modes is not None and not self.param_groups[0][modes.group_key]:
            raise RuntimeError(f"{type(self).__name__} is in eval mode: call train() before "
                               "step() (and eval() before evaluating or saving the model)")
        for group, buckets in zip(self.param_groups, self._buckets, strict=True):
            if group.get("capturable") and buckets and buckets[0].flat.device.type != "cuda":
                from torch.optim.optimizer import _get_capturable_supported_devices

                xla = self.twin is None or self.twin.capturable_xla
                devices = _get_capturable_supported_devices(xla)
                what = "params and state_steps" if self.twin is None \
                    else self.twin.capturable_what
                raise AssertionError(f"If capturable=True, {what} must be on supported "
                                     f"devices: {devices}.")
        for index, (group, buckets) in enumerate(zip(self.param_groups, self._buckets,
                                                     strict=True)):
            if any(any(b.repeats) for b in buckets):  # (before any group steps)
                self._check_repeats(self._schedule(index, group)[0])
        if _capturing():
            if any(b.launch is None and not b.launches for buckets in self._buckets
                   for b in buckets):
                raise RuntimeError(CAPTURE_NEEDS_WARM_UP)
        else:
            self._take_device_counts()
        self._launch_serial += 1
        # every group's lr and hyperparameters checked before any group steps (a bad value
        # in a later group must not leave the earlier ones stepped); looked up once a group
        plans = []
        for index, (group, buckets) in enumerate(zip(self.param_groups, self._buckets,
                                                     strict=True)):
            if not buckets:
                plans.append(None)
                continue
            self._adopt_group_edits(group, buckets)  # (first: an edited count counts)
            if self._reloaded:
                self._sync_reloaded(index, group, buckets)
            schedule, own = self._schedule(index, group)
            hypers = self._group_hypers(group)
            eps_rule = self._group_format_eps(group, buckets)
            if eps_rule is not None:  # (a group of several dtypes: torch's eps1)
                hypers = {**hypers, **eps_rule}
            plans.append((schedule, own, hypers))
        try:
            for index, (group, buckets, plan) in enumerate(zip(
                    self.param_groups, self._buckets, plans, strict=True)):
                if plan is not None:
                    self._step_group(index, group, buckets, *plan)
        finally:  # (also after an error: the groups stepped before it count their step)
            self._group_count = None
            if not _capturing():
                self._sync_captured_counters()

    def _defers_launches(self, buckets: list[_Bucket]) -> bool:
        """Whether a group's whole-bucket launches wait for the group's end, to be made as
        multi-tensor launches (``_launch_deferred``): in-place buckets on a GPU."""
        return MULTI_LAUNCH and self.definition.multi_launch and any(
            b.in_place and b.flat.is_cuda for b in buckets)

    def _step_group(self, index: int, group: dict, buckets: list[_Bucket], schedule: Schedule,
                    own: bool, hypers: dict) -> None:
        """One group's step: each bucket's kernel call (whole-bucket GPU launches of in-place
        buckets deferred to the group's end, ``_defers_launches``), then the group's lr."""
        before = _group_step(buckets)
        floor = self._group_count_floor
        self._group_count = before if floor is None or floor < before else floor
        if self._defers_launches(buckets):
            self._deferred = []
        if any(b.in_place and b.flat.device.type == "cpu" for b in buckets):
            self._deferred_cpu = []
        try:
            for b in buckets:
                self._step_bucket(group, schedule, b, hypers)
                b.steps_seen = b.steps._version  # (counts fastopt wrote)
        except BaseException as error:
            deferred, self._deferred = self._deferred, None
            calls, self._deferred_cpu = self._deferred_cpu, None
            # (the buckets stepped before the error count the step: launch them, as
            # without deferral; not in a capture, which the error aborts)
            if (deferred or calls) and not _capturing():
                try:
                    self._call_deferred(calls or [])
                    if deferred:
                        self._launch_deferred(deferred)
                except Exception as also:  # (the first error is the one raised)
                    _add_note(error, f"launching the params stepped before it also failed: "
                                     f"{also!r}")
            raise
        calls, self._deferred_cpu = self._deferred_cpu, None
        self._call_deferred(calls or [])
        deferred, self._deferred = self._deferred, None
        if deferred:
            self._launch_deferred(deferred)
        self._finish_group(index, group, buckets, schedule, own, before, hypers)

    def _finish_group(self, index: int, group: dict, buckets: list[_Bucket],
                      schedule: Schedule, own: bool, before: int, hypers: dict) -> None:
        """After a group's step: its group-kept values, and group['lr'] for the next step.
        A step where no param of the group had a gradient moves the group on all the same:
        a group count (schedulefree's ``k``) takes the step, as schedulefree's does
        (``_count_idle_step``); otherwise the lr moves on, as a torch scheduler's would,
        so the group's schedule is advanced by the step."""
        after = _group_step(buckets)
        idle = after == before and self._advance_idle_groups and not _capturing()
        if self.definition.group_step is not None:
            if idle:
                self._count_idle_step(group, buckets, schedule, hypers)
            if not _capturing():
                self._share_group_counts(buckets)
            after = _group_step(buckets)
        self._publish_group(group, buckets)
        if idle and own and after == before:
            group["schedule"] = schedule = advanced(schedule, 1)
        if own:
            group["lr"] = self._lr_written[index] = host_lr(schedule, after)
        elif group.get("schedule") is not None and after > before:  # (None, or deleted:
            # the user dropped it, and group['lr'] rules)
            # steps taken at someone else's lr do not advance the group's schedule, as
            # they would not advance a torch scheduler
            group["schedule"] = _delayed(group["schedule"], after - before)

    def _count_idle_step(self, group: dict, buckets: list[_Bucket], schedule: Schedule,
                         hypers: dict) -> None:
        """A step of a group counted per group (schedulefree's ``k``) where no param had a
        gradient: the count and the per-step scalars (``weight_sum``, ``lr_max``) move on
        as schedulefree's do, the state waits. The kernel runs over no element (an empty
        chunk of the param that took the most steps): its prologue updates the scalars,
        exactly as in a step; ``_share_group_counts`` then gives every param the count."""
        b = max(buckets, key=lambda b: b.step)
        i = int(b.steps.argmax())
        names = self._kernel_state(group, b, hypers)
        arrays, half = b.arrays(names)
        if arrays[1] is None:  # (step in backward: no gradient buffer; none is read)
            arrays = [arrays[0], arrays[0], *arrays[2:]]
        empty, part = b.param_arrays(names, arrays, half, i, 0)
        k = int(b.steps[i]) + 1
        self._run(b, names, hypers, empty, part, k, schedule, False, (i, i))
        b.steps[i] = k
        b.counts_loaded()

    @staticmethod
    def _share_group_counts(buckets: list[_Bucket]) -> None:
        """Where the definition counts steps per group (schedulefree's ``k``, with its
        ``weight_sum`` and ``lr_max``), a param that had no gradient this step (or took
        fewer steps) takes the group's count and scalars, from a param that took the most:
        its state waits, its schedule goes on. Its next update then uses the group's k for
        the warm-up, the weight and the bias correction, as schedulefree's does; and the
        bucket stays uniform, stepped in one call."""
        top = max(buckets, key=lambda b: b.step)
        if all(b.uniform and b.scalars_shared and b.step == top.step for b in buckets):
            return  # (every param took every step: nothing lags)
        source = int(top.steps.argmax())
        values = {name: v[source].clone() for name, v in top.scalars.items()}
        for b in buckets:
            b.steps.fill_(float(top.step))
            for name, v in b.scalars.items():
                v.copy_(values[name].expand_as(v))
            b.counts_loaded()
            b.scalars_shared = True  # (all equal now, known without a device read)

    @functools.cached_property
    def _group_scalars(self) -> frozenset:
        """The per-step scalars torch-style implementations keep in the param group."""
        return frozenset(s.name for s in self.definition.scalars if s.group)

    def _publish_group(self, group: dict, buckets: list[_Bucket]) -> None:
        """The group-wide step count and scalars (schedulefree's ``k``, ``weight_sum``,
        ``lr_max``) where torch-style code reads them; the scalars as live 0-d views of the
        kernel's values (no device sync)."""
        if self.definition.group_step is not None:
            group[self.definition.group_step] = max(b.step for b in buckets)
        if self._group_scalars:  # from the param that took the most steps (one that had a
            b = max(buckets, key=lambda b: b.step)  # gradient every time, if any did)
            i = int(b.steps.argmax())
            for name in self._group_scalars:
                group[name] = b.scalars[name][i]

    @torch.no_grad()
    def _switch_mode(self, train: bool) -> None:
        """p <- lerp(p, state[lerp_to], weight) for the params that have state, in each group
        not yet in that mode (schedulefree's train() and eval())."""
        modes = self.definition.modes
        for group, buckets in zip(self.param_groups, self._buckets, strict=True):
            if bool(group[modes.group_key]) == train:
                continue
            weight = (modes.to_train if train else modes.to_eval)(self._group_hypers(group))
            self._adopt_group_edits(group, buckets)  # (a deleted state: no z to move to)
            for b in buckets:
                if modes.lerp_to not in b.state:
                    continue
                parts = [slice(None)] if b.all_started else [
                    slice(b.offsets[i], b.offsets[i] + t.numel())
                    for i, t in enumerate(b.tensors) if b.started[i]]
                for part in parts:  # (16-bit params: the master moves, they are its rounding)
                    target = b.state[modes.lerp_to][part].float()
                    b.set_master_values(part, b.master_values(part).lerp(target, weight))
            group[modes.group_key] = train

    def _group_format_eps(self, group: dict, buckets: list[_Bucket]) -> dict | None:
        """torch's eps=None rule (Adafactor's eps1) for a group of several dtypes: the first
        param with a gradient fixes finfo(dtype).eps for the whole group in this step. None
        where each bucket's own format gives the same (one dtype), or no value is None."""
        names = [h.name for h in self.definition.hypers if h.format_eps]
        if not names or len(buckets) < 2:
            return None
        first = next((p for p in group["params"] if p.grad is not None), None)
        if first is None:
            return None
        rule = {}
        for name in names:
            value = group.get(name)
            if isinstance(value, (tuple, list)) and value and value[0] is None:
                rule[name] = (float(torch.finfo(first.dtype).eps), *value[1:])
        return rule or None

    def _step_bucket(self, group: dict, schedule: Schedule, b: _Bucket,
                     hypers: dict) -> None:
        if b.buffers_at() != b.buffer_addresses:  # (model.share_memory() after packing)
            b.follow_moved_buffers()
        have_grad, grads = [], None
        views, addresses = b.grad_views, b.grad_addresses
        for i, p in enumerate(b.params):
            b.check_address(i)  # (an in-place bucket follows a replaced storage)
            g = p.grad
            if g is None:
                have_grad.append(False)
                continue
            if b.sharded:  # a DTensor's gradient: its local shard, read where it is
                grads = self._shard_grad(b, local_tensor(g))
            elif g is not views[i] or g.data_ptr() != addresses[i]:  # autograd made a new
                view = b.grad_view(i)  # tensor (after set_to_none), the user assigned one,
                # or its .data was replaced (then the view is made anew): take it in, and
                # leave p.grad as it is (a tensor kept by the user keeps its values, and one
                # refilled in place is read again; zero_grad(set_to_none=False) attaches the
                # views, so that backward accumulates into them)
                if g.is_sparse:
                    raise RuntimeError("fastopt does not support sparse gradients")
                view.copy_(g)
            have_grad.append(True)
        _count_writes(b.params if all(have_grad) else
                      [p for p, has in zip(b.params, have_grad, strict=True) if has])
        names = self._kernel_state(group, b, hypers)
        arrays, half = b.arrays(names)
        if grads is not None:
            arrays = [arrays[0], grads, *arrays[2:]]
        first_grad = bool(self.definition.first_grad_state)  # SGD's momentum_buffer
        if not b.all_started:
            self._init_first_step(b, names, schedule, have_grad)
        if any(b.repeats):  # each param once, then the listed-again ones again, as torch
            fresh = list(b.fresh)  # (torch reads each listing's first-gradient state before
            self._step_params(group, b, names, hypers, arrays, half, schedule, have_grad)
            for again in range(1, max(b.repeats) + 1):  # the step: unset for each at step 1)
                which = [has and r >= again for has, r in zip(have_grad, b.repeats,
                                                              strict=True)]
                b.fresh = [f0 if w else f for f0, f, w in zip(fresh, b.fresh, which,
                                                               strict=True)]
                self._step_params(group, b, names, hypers, arrays, half, schedule, which)
            return
        capturing = b.flat.is_cuda and torch.cuda.is_current_stream_capturing()
        if all(have_grad) and b.uniform and (not first_grad or len(set(b.fresh)) == 1) \
                and ((capturing and b.scalars_shared)  # (a device read would break capture)
                     or all(bool((v == v[0]).all()) for v in b.scalars.values())):
            # the fast path: one kernel over the whole bucket
            k = b.step + 1

            def counted() -> None:  # (after the kernel, which a CPU group may defer)
                b.fresh = [False] * len(b.params)
                b.step = k
                b.steps.fill_(k)
                b.scalars_shared = True
                if not b.all_started:
                    for i, started in enumerate(b.started):
                        if not started:
                            self._start(group, b, i)
                    b.all_started = True

            # (a captured step, not run, is not counted: the replays advance the device's
            # count)
            self._run(b, names, hypers, arrays, half, k, schedule, first_grad and b.fresh[0],
                      None, then=None if capturing else counted)
            return
        self._step_params(group, b, names, hypers, arrays, half, schedule, have_grad)

    @staticmethod
    def _shard_grad(b: _Bucket, g: torch.Tensor):
        """The kernel's gradient array for a DTensor param's gradient's local shard ``g``:
        a view of it where it has the param's dtype and layout, else (another dtype, e.g.
        FSDP2's reduce_dtype) converted into the bucket's buffer (made at first need)."""
        local = b.tensors[0]
        if g.shape != local.shape:
            raise RuntimeError(f"the gradient's local shard has shape {tuple(g.shape)}, the "
                               f"param's {tuple(local.shape)}: the grad is not sharded as "
                               "the param")
        convert = _as_array if b.format is None else _as_bits
        owned = [b.flat, b.master, b.remainder, *b.state.values(), *b.absmax.values()]
        if g.dtype == local.dtype and g.is_contiguous() and g.device == local.device \
                and not any(_overlap(g, t) for t in owned if t is not None):
            return convert(g.detach().reshape(-1))
        # (a gradient sharing memory with the params or the state is copied: the kernels
        # assume their arrays do not overlap)
        if b.grad is None:
            b.grad = b.new_buffer(b.flat.shape[0], 0, b.flat.dtype)
        b.grad.view_as(local).copy_(g)
        return convert(b.grad)

    def _step_params(self, group: dict, b: _Bucket, names: tuple, hypers: dict, arrays: list,
                     half: dict, schedule: Schedule, have_grad: list[bool]) -> None:
        """One kernel call per param that has a gradient (``have_grad``), each at its own
        step count (params that took different numbers of steps, or none)."""
        first_grad = bool(self.definition.first_grad_state)
        for i, has in enumerate(have_grad):  # torch skips params without grad
            if not has:
                continue
            k = int(b.steps[i]) + 1
            sliced, part = b.param_arrays(names, arrays, half, i, b.tensors[i].numel())
            self._run(b, names, hypers, sliced, part, k, schedule, first_grad and b.fresh[i],
                      i)
            b.fresh[i] = False
            b.steps[i] = k
            if not b.started[i]:
                self._start(group, b, i)
        b.all_started = all(b.started)
        b.uniform = bool((b.steps == b.steps[0]).all())
        b.step = int(b.steps.max())

    def _kernel_state(self, group: dict, b: _Bucket, hypers: dict) -> tuple:
        """The kernel's state buffers for these hyperparameters, in order, made where missing
        (e.g. momentum turned on after construction)."""
        names = self._active_state(hypers)
        if not set(names) <= b.state.keys():
            init = self.state_init(group)
            for name in names:
                if name not in b.state:
                    b.add_state(name, init[name])
                    if name in self.definition.first_grad_state:  # torch's None buffer
                        b.fresh = [True] * len(b.params)
                    for i, started in enumerate(b.started):  # the views, as torch adds them
                        if started and b.applies(name, i):
                            self.state[b.params[i]][name] = b.view_of(name, i)
                            if b.int8:
                                self.state[b.params[i]][ABSMAX_KEY.format(name)] = \
                                    b.absmax_of(name, i)
                            self._published(b, i)
        return names

    @torch.no_grad()
    def _init_first_step(self, b: _Bucket, names: tuple, schedule: Schedule,
                         have_grad: list) -> None:
        """State that starts from the params (Schedule-Free's z) or from the lr of the first
        step (Rprop's step_size), for the params about to take their first step."""
        special = [s for s in self.definition.state
                   if s.name in names and s.init in (INIT_LR, INIT_PARAMS)]
        for i, has in enumerate(have_grad):
            if not has or b.started[i]:
                continue
            for s in special:
                if s.init == INIT_PARAMS:
                    offset, t = b.offsets[i], b.tensors[i]
                    b.set_state(s.name, i, b.shaped(b.master_values(
                        slice(offset, offset + t.numel())), i))
                else:
                    count = int(b.steps[i])
                    b.set_state(s.name, i, host_lr(self._lr_schedule(schedule, count), count))

    def _group_hypers(self, group: dict) -> dict:
        """The group's checked hyperparameters, checked again only when they change: when
        every value is the same immutable object as last time (numbers, strings, tuples of
        them) at once, else by value (a tensor's, which can change in place)."""
        raw = tuple(group.get(name) for name in self._hyper_keys)
        cached = self._checked.get(id(group))
        if cached is not None and cached[1] and all(
                a is b for a, b in zip(raw, cached[0], strict=True)):
            return cached[3]
        key = tuple(_hashable(v) for v in raw)
        if cached is None or cached[2] != key:
            hypers = self._hypers(group)
            cached = (raw, all(map(_immutable, raw)), key, hypers)
        else:
            cached = (raw, all(map(_immutable, raw)), key, cached[3])
        self._checked[id(group)] = cached
        return cached[3]

    @functools.cached_property
    def _hyper_keys(self) -> tuple[str, ...]:
        """The group keys whose values ``_hypers`` reads: the hyperparameters, then the
        decay keys (``Definition.decay_keys``)."""
        return (*(h.name for h in self.definition.hypers), *self.definition.decay_keys)

    @functools.cached_property
    def _active_state(self):
        """The state names a hyperparameter dict needs (the definition's ``active_state``),
        kept for the last dict asked about (``_group_hypers`` returns the same dict while the
        values stay)."""
        last: list = [None, None]

        def names(hypers: dict) -> tuple:
            if last[0] is not hypers:
                last[:] = [hypers, self.definition.active_state(hypers)]
            return last[1]

        return names

    def _run(self, b: _Bucket, names: tuple, hypers: dict, arrays: list, half: dict,
             step: int, schedule: Schedule, fresh: bool,
             part: int | tuple[int, int] | None, then=None) -> None:
        """The kernel through fastopt.engine on zero-copy array views (params, grads,
        state...; ``half`` has master and dtype for 16-bit params). ``part``: None (the whole
        bucket), param i, or the params [first, stop) (step in backward's chunks). The
        prepared call is kept per (part, hyperparameters); nothing is re-validated per step.
        ``then``: what follows the kernel (the bucket's counts), called after it, also where
        the call is deferred (``_call_deferred``)."""
        if step >= 2**63:
            raise ValueError(f"a param has taken {step - 1} steps, the most the kernels' signed "
                             "64-bit step number allows")
        if self._group_count is not None and self._group_count >= step:  # (a lagging param)
            schedule = self._lr_schedule(schedule, step - 1)
        earlier, prepared = b.prepared.get((part, names), (None, None))
        index = 0 if part is None else part[0] if isinstance(part, tuple) else part
        values = None if earlier is not None and earlier[0] is hypers else \
            (hypers, tuple(_hashable(v) for v in hypers.values()))
        if values is not None and (earlier is None or earlier[1] != values[1]):
            # new hyperparameters (a scheduler's momentum, say): repack
            on_gpu = b.flat.device.type == "cuda"
            n = arrays[0].shape[0]
            min_size = cpu.parallel_min_size(b.format is None, self.state_dtype)
            prepared = Prepared(
                self.definition, arrays[0], half.get("master"), dict(zip(names, arrays[2:],
                                                                         strict=True)),
                hypers, half.get("dtype", "float32"), on_gpu,
                parallel=not on_gpu and cpu.use_parallel(n, min_size),
                scalars={name: _as_array(v[index:index + 1]) for name, v in b.scalars.items()},
                compiled=None if prepared is None else prepared._compiled,
                segments=b.segment_table(part, n) if self.definition.segmented else None,
                stage="torch")
            b.prepared[(part, names)] = (values, prepared)
        elif values is not None:  # (an equal dict: keep the call, remember this dict)
            b.prepared[(part, names)] = (values, prepared)
        if prepared.on_gpu and part is None:
            if self._deferred is not None and b.in_place:
                self._deferred.append((b, prepared, arrays[1], schedule, step, fresh))
            else:
                self._launch_bucket(b, prepared, arrays[1], schedule, step, fresh)
        elif prepared.on_gpu:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(CAPTURE_NEEDS_WHOLE_BUCKETS)
            stream = torch.cuda.current_stream(b.flat.device)
            with _cupy_stream(stream.cuda_stream, stream.device_index):
                run_once(prepared, arrays[1], schedule, step, 1.0, 1.0, fresh)
        elif self._deferred_cpu is not None and part is None and b.in_place:
            self._deferred_cpu.append(((prepared, arrays[1], schedule, step, 1.0,
                                        self._grad_mult, fresh), (b, then)))
            return
        else:
            run_once(prepared, arrays[1], schedule, step, 1.0, self._grad_mult, fresh)
        self._after_run(b, part, then)

    @staticmethod
    def _after_run(b: _Bucket, part: int | tuple[int, int] | None, then=None) -> None:
        """After a kernel call: the per-step scalars it used, shared as the kernel took
        them, then ``then``."""
        if part is not None:
            b.scalars_shared = False
        if part is None:  # the whole bucket stepped with element 0's scalars: share them
            for per_param in b.scalars.values():  # (a copy: source and target overlap)
                per_param[:] = per_param[0].clone()
        elif isinstance(part, tuple):  # a chunk stepped with its first param's scalars
            for per_param in b.scalars.values():
                per_param[part[0]:part[1]] = per_param[part[0]].clone()
        if then is not None:
            then()

    def _lr_schedule(self, schedule: Schedule, count: int) -> Schedule:
        """The schedule for a param's next step, given the steps it took (``count``): its
        group's lr, evaluated at the group's count, as torch gives every param of a group
        the group's lr. A param that took fewer steps (no gradient on some: a frozen or
        unused layer, an expert without tokens) gets the schedule advanced by the
        difference; its own count still drives its bias corrections, as in torch."""
        lag = 0 if self._group_count is None else self._group_count - count
        if lag <= 0 or schedule.is_constant:
            return schedule
        cache = self._advanced_cache
        if cache is None or len(cache) > 64:
            cache = self._advanced_cache = {}
        key = (schedule, lag)
        if key not in cache:
            cache[key] = advanced(schedule, lag)
        return cache[key]

    @staticmethod
    def _launch_bucket(b: _Bucket, prepared: Prepared, grads, schedule: Schedule, step: int,
                       fresh: bool) -> None:
        """A GPU whole-bucket step on torch's current stream through a launch bound once
        (kernel arguments packed, the step counter kept on the device): no allocation, no
        host sync, so it can be captured in a CUDA graph (``torch.cuda.graph``) once an
        eager step has made the counter and the launch."""
        capturing = torch.cuda.is_current_stream_capturing()
        last = b.launch
        bound = last is not None and last[0] is prepared and last[1] is grads \
            and last[2] is schedule and last[3] == bool(fresh)
        if capturing and not (bound and b.device_step == step - 1):
            raise RuntimeError(CAPTURE_NEEDS_WARM_UP)
        if b.counter is None:
            b.counter = torch.zeros(2, dtype=torch.int64, device=b.flat.device)
            b.lr_out = torch.zeros(1, dtype=torch.float64, device=b.flat.device)
        if b.device_step != step - 1:  # (steps taken another way, a loaded state dict)
            b.counter[0] = step - 1
        stream = torch.cuda.current_stream(b.flat.device)
        with _cupy_stream(stream.cuda_stream, stream.device_index):
            if not bound:
                table = device_table(schedule, b.flat.device.index)
                b.launch = (prepared, grads, schedule, bool(fresh), prepared.gpu_launcher(
                    grads, table, table.shape[0], _as_array(b.counter).view("uint64"),
                    _as_array(b.lr_out), 1.0, 1.0, fresh))
            b.launch[4]()
        if capturing:  # (the device holds step - 1 until a replay runs it)
            b.captured = True
            if not any(launch is b.launch for launch in b.kept):
                b.kept.append(b.launch)
        else:
            b.device_step = step

    def _call_deferred(self, calls: list[tuple]) -> None:
        """A group's deferred CPU kernel calls (``run_once``'s arguments, and the bucket
        and what follows the call: ``_after_run``'s), back to back: the group's Python
        bookkeeping runs before them all rather than between kernels that have just
        streamed megabytes through the caches. On GPT-2 small's 148 tensors the time outside
        the kernels went from 5.0-5.5 to 2.2-3.3 ms a step, the multi-tensor mode from
        0.85-0.87x to 0.90-0.92x the flat mode's speed on a quiet host (bench/NOTES.md,
        twenty-second session). What follows each call runs once the calls before it and it
        have run: a call that fails (or an interrupt) leaves the later buckets uncounted, as
        unstepped."""
        done = 0
        try:
            for args, _ in calls:
                run_once(*args)
                done += 1
        finally:
            for _, (b, then) in calls[:done]:
                self._after_run(b, None, then)
                b.steps_seen = b.steps._version  # (counts fastopt wrote)

    def _launch_deferred(self, entries: list[tuple]) -> None:
        """A group's deferred whole-bucket GPU steps (in-place buckets: ``_run``'s arguments
        of ``_launch_bucket``): those alike in every kernel argument but their buffers
        (format, state format, master mode, hyperparameters, step, schedule, device) as one
        multi-tensor launch each (``_launch_multi``), a lone one as before. Every batch is
        launched (the buckets already count the step) before the first error is raised."""
        batches: dict[tuple, list] = {}
        for entry in entries:
            b, prepared, _, schedule, step, fresh = entry
            key = (prepared.dtype, prepared.states[0].dtype, prepared.master_mode,
                   tuple(prepared.slots), prepared.weight_decay, prepared.decoupled,
                   prepared.maximize, step, bool(fresh), id(schedule), b.flat.device)
            batches.setdefault(key, []).append(entry)
        errors = []  # (every launch made; the first error raised after)
        for batch in batches.values():
            if len(batch) > 1:
                try:  # (False: it could not be made, and the buckets take a launch each;
                    if self._launch_multi(batch):  # an error: in a capture, which it aborts)
                        continue
                except Exception as e:
                    errors.append(e)
                    continue
            for entry in batch:
                try:
                    self._launch_bucket(*entry)
                except Exception as e:
                    errors.append(e)
        if errors:
            for later in errors[1:]:
                _add_note(errors[0], f"another launch of this step also failed: {later!r}")
            raise errors[0]

    def _launch_multi(self, batch: list[tuple]) -> bool:
        """One multi-tensor launch (fastopt.gpu.launch.bind_multi: a block per chunk of each
        param) stepping the in-place buckets of ``batch`` on torch's current stream. Like
        ``_launch_bucket``'s: bound once per set of buckets (the tables copied to the device
        then), its own step counter on the device, no allocation or host sync afterwards, so
        it can be captured in a CUDA graph once an eager step has bound it.

        False where it cannot be made: binding or launching raised (a warning the first
        time, and the same refs are not tried again) and the caller steps the buckets a
        launch each. In a capture the error is raised (a launch each would not be captured
        as warmed up)."""
        from ..gpu import launch as gpu_launch

        buckets = [entry[0] for entry in batch]
        _, first, _, schedule, step, fresh = batch[0]
        refs = _MultiLaunch.refs_of(batch)
        launches = self.__dict__.setdefault("_multi_launches", {})
        ident = tuple(map(id, buckets))
        record = launches.get(ident)
        capturing = torch.cuda.is_current_stream_capturing()
        if record is not None and _MultiLaunch.same_refs(refs, record.failed):
            # (a launch each, as at the warm-up: each checks its own, in a capture too)
            launches[ident] = launches.pop(ident)
            record.used = self._launch_serial
            return False
        bound = record is not None and _MultiLaunch.same_refs(refs, record.refs)
        if capturing and not (bound and record.device_step == step - 1):
            raise RuntimeError(CAPTURE_NEEDS_WARM_UP)
        device = buckets[0].flat.device
        stream = torch.cuda.current_stream(device)
        try:
            if record is None:
                self._evict_multi_launch(launches)
                record = launches[ident] = _MultiLaunch(buckets, device)
            else:  # (most recently used last: evicted last)
                launches[ident] = launches.pop(ident)
            record.used = self._launch_serial
            record.streams.add(stream.cuda_stream)
            if record.device_step != step - 1:  # (a new record, or steps taken another way)
                record.counter[0] = step - 1
            with _cupy_stream(stream.cuda_stream, stream.device_index):
                if not bound:
                    if record.launch is not None and len(record.streams) > 1:
                        torch.cuda.synchronize(device)  # (see _evict_multi_launch)
                    record.unbind()  # (one a graph captured stays in record.kept)
                    table = device_table(schedule, device.index)
                    counter = _as_array(record.counter).view("uint64")
                    lr_out = _as_array(record.lr_out)
                    values = [prepared.kernel_values(grads, table, table.shape[0], counter,
                                                     lr_out, 1.0, 1.0, fresh)
                              for _, prepared, grads, *_ in batch]
                    record.launch = gpu_launch.bind_multi(self.definition.name, first.dtype,
                                                          values)
                    record.refs = refs
                record.launch()
        except Exception as e:
            if capturing:
                raise
            if record is not None:
                record.unbind()
                record.failed = refs
                record.device_step = None  # (the counter unknown: set at the next launch)
            warnings.warn(f"fastopt.torch: a multi-tensor launch failed ({e!r}); stepping "
                          "its params one launch each", RuntimeWarning, stacklevel=5)
            return False
        if capturing:  # (the device holds step - 1 until a replay runs it)
            record.captured = True
            if not any(launch is record.launch for launch in record.kept):
                record.kept.append(record.launch)
        else:
            record.device_step = step
        return True

    def _evict_multi_launch(self, launches: dict) -> None:
        """Room for one more multi-tensor launch: while there are ``MULTI_LAUNCHES_KEPT`` or
        more, the least recently used one dropped, if one is neither captured by a graph nor
        used in this step (the launches of one step are all kept). Its counter and tables go
        back to torch's and CuPy's memory pools, which hand memory out again in the order
        of the stream it was used on, after any kernel queued there that reads it; one used
        on several streams is first waited for."""
        while len(launches) >= MULTI_LAUNCHES_KEPT:
            ident = next((i for i, r in launches.items()  # (least recently used first)
                          if not r.captured and r.used != self._launch_serial), None)
            if ident is None:
                return
            record = launches.pop(ident)
            if len(record.streams) > 1:
                torch.cuda.synchronize(record.counter.device)
            for b in record.buckets:
                b.launches.remove(record)

    def _sync_captured_counters(self) -> None:
        """After eager steps taken another way (a lone launch, another set of params, a
        param at a time) or a load: each captured launch's device counter (a bucket's own,
        or a multi-tensor launch's) takes its params' step count, so that its graph's
        replays go on from it. Where its params' counts differ (some took a step without
        the others) it keeps its count: a replay steps them all at one count (fastopt's
        launches keep one counter, torch's capturable optimizers one per param), documented
        in the README."""
        for buckets in self._buckets:
            for b in buckets:
                if b.captured and b.uniform and b.device_step != b.step:
                    b.counter[0] = b.step
                    b.device_step = b.step
        for record in self.__dict__.get("_multi_launches", {}).values():
            if not record.captured:  # (the others: set at their next launch)
                continue
            counts = {b.step for b in record.buckets}
            if len(counts) == 1:
                count = counts.pop()
                if record.device_step != count:
                    record.counter[0] = count
                    record.device_step = count

    def _take_device_counts(self) -> None:
        """After replays of a captured step: each such bucket's params advanced by the
        replays since the host last knew the device counter (a device read), and the group's
        lr and kept values from them."""
        advanced = set()  # the buckets a replay advanced
        keepers = [(b, [b]) for buckets in self._buckets for b in buckets
                   if b.captured and b.counter is not None]
        keepers += [(r, r.buckets) for r in self.__dict__.get("_multi_launches", {}).values()
                    if r.captured]
        for keeper, stepped in keepers:  # (a bucket's own counter, or a multi-tensor launch's)
            count = int(keeper.counter[0])
            if keeper.device_step is not None and count != keeper.device_step:
                for b in stepped:  # each replay stepped the whole bucket once
                    b.steps += count - keeper.device_step
                    b.step = int(b.steps.max())
                    b.steps_seen = b.steps._version
                    advanced.add(id(b))
            keeper.device_step = count
        for index, (group, buckets) in enumerate(zip(self.param_groups, self._buckets,
                                                     strict=True)):
            changed = any(id(b) in advanced for b in buckets)
            if changed:
                self._publish_group(group, buckets)
                schedule = group.get("schedule")
                if schedule is not None and group["lr"] is self._lr_written[index]:
                    group["lr"] = self._lr_written[index] = host_lr(schedule,
                                                                    _group_step(buckets))

    def sync_step_count(self) -> None:
        """Take the step counts from the device after replaying a step captured in a CUDA
        graph: each replay advances the kernel's counter (and the schedule) on the device
        only, so ``state[p]['step']`` and ``group['lr']`` lag until this is called. Reads
        the device (a sync); ``step()``, ``state_dict()`` and pickling call it themselves."""
        self._take_device_counts()

    # ------------------------------------------------------------------ state dicts
    @_holding_state
    def state_dict(self) -> dict:
        """torch's format (per-param ``step`` and state under torch's names); tensors are
        copies (the optimizer's are views of its flat buffers), other values as they are.
        Post-hooks see the copies. Edits of ``self.state`` not yet taken in are taken in
        first, as the next step would (a new master, new int8 values or codes), so the dict
        holds them."""
        self._take_device_counts()
        for group, buckets in zip(self.param_groups, self._buckets, strict=True):
            self._adopt_group_edits(group, buckets)
        with _hooks_off(self, "_optimizer_state_dict_post_hooks") as post_hooks:
            d = super().state_dict()
        d["state"] = {k: {name: v.clone() if isinstance(v, torch.Tensor) else v
                          for name, v in st.items()}
                      for k, st in d["state"].items()}
        if self.state_dtype == "int8":  # the values under torch's names, the raw form beside
            for st in d["state"].values():
                self._int8_entries(st)
        self._master_entries(d)
        for group, buckets in zip(d["param_groups"], self._buckets, strict=True):
            if isinstance(group.get("schedule"), Schedule):  # (torch.load's weights_only
                group["schedule"] = _schedule_payload(group["schedule"])  # takes strings)
            for name in self._group_scalars:  # group scalars: numbers, as schedulefree's
                if isinstance(group.get(name), torch.Tensor):
                    group[name] = float(group[name])
            if not self.definition.per_param_step:  # (Muon) the count, for the schedule
                group[GROUP_STEP] = max((b.step for b in buckets), default=0)
            if self.definition.saved_group_step is not None:  # (where the oracle reads it)
                group[self.definition.saved_group_step] = max((b.step for b in buckets),
                                                              default=0)
        for hook in post_hooks.values():
            result = hook(self, d)
            if result is not None:
                d = result
        return d

    def _master_entries(self, d: dict) -> None:
        """The state dict's entries of params with remainders: the float32 master they make
        under ``master_param`` (as a float32 master is saved: dicts of the two modes are
        interchangeable) in place of ``master_remainder``."""
        where = {id(p): (b, i) for buckets in self._buckets for b in buckets
                 if b.remainder is not None for i, p in enumerate(b.params)}
        if not where:
            return
        for saved, live in zip(d["param_groups"], self.param_groups, strict=True):
            for index, p in zip(saved["params"], live["params"], strict=True):
                st = d["state"].get(index)
                if st is None or REMAINDER not in st or id(p) not in where:
                    continue
                b, i = where[id(p)]
                offset, t = b.offsets[i], b.tensors[i]
                st[MASTER] = b.shown(i, b.shaped(b.master_values(
                    slice(offset, offset + t.numel())), i).clone())
                del st[REMAINDER]

    def _int8_entries(self, st: dict) -> None:
        """One param's state-dict entry of int8 state: each buffer's float32 values under
        its name, its codes under ``<name>_codes`` and block scales under ``<name>_absmax``,
        and the code's version (``int8_code_version``)."""
        for s_ in self.definition.state:
            codes, absmax = st.get(s_.name), st.get(ABSMAX_KEY.format(s_.name))
            if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 \
                    or absmax is None:
                continue
            raw = Int8State(codes.reshape(-1).cpu().numpy(), absmax.cpu().numpy())
            st[s_.name] = torch.from_numpy(raw.decode(s_.sign == "signed")).view(
                codes.shape).to(codes.device)
            st[CODES_KEY.format(s_.name)] = codes
            st[VERSION_KEY] = INT8_CODE_VERSION

    @_no_dynamo
    @_holding_state
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this class or of the matching torch.optim optimizer.

        Values are copied from the dict as given: torch's loader casts state to the params'
        dtype, which would round the float32 state and master of 16-bit params. A 16-bit
        param without a saved master (a torch.optim state dict) takes its current value.
        Groups lacking keys (state dicts of older torch versions) get torch's defaults.
        Load pre-hooks run first and what they return is what loads; post-hooks run last.
        """
        state_dict = state_dict.copy()  # shallow, as torch's
        self._take_device_counts()  # (replays first: a failed load restores those counts)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        backup = self._backup()
        try:
            post_hooks = self._load_state_dict_unhooked(state_dict)
        except BaseException:  # a bad dict changes nothing
            self._restore(backup)
            raise
        for hook in post_hooks.values():
            hook(self)

    def _load_state_dict_unhooked(self, state_dict: dict) -> dict:
        if isinstance(state_dict, dict) and "param_groups" not in state_dict \
                and isinstance(state_dict.get("optimizer"), str):  # (torch: a bare KeyError)
            raise KeyError(f"this is a state dict of fastopt's numpy/cupy class fastopt."
                           f"{state_dict['optimizer']} (no 'param_groups'): load it into "
                           f"that class, or fastopt.load its checkpoint")
        schedules = [g.get("schedule") for g in self.param_groups]
        with _hooks_off(self, "_optimizer_load_state_dict_pre_hooks",
                        "_optimizer_load_state_dict_post_hooks") as (_, post_hooks):
            super().load_state_dict(state_dict)  # checks the groups, loads hyperparameters
        for group in self.param_groups:  # the definition's checks on the loaded values
            if "schedule" in group:  # (saved as its table: back to a Schedule, checked)
                group["schedule"] = self.definition.check_schedule(
                    _schedule_from_payload(group["schedule"]))
            self._hypers(group)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        saved = {p: state_dict["state"].get(i, {}) for i, p in zip(saved_ids, params,
                                                                     strict=True)}
        cast = self.state  # torch's copies; entries fastopt does not keep come from there
        self.state = defaultdict(dict)
        for index, (group, buckets, schedule) in enumerate(zip(
                self.param_groups, self._buckets, schedules, strict=True)):
            own = "schedule" in group
            if not own and schedule is not None:  # a dict without it (torch's): ours drives
                group["schedule"] = schedule
            for b in buckets:
                self._load_bucket(group, b, saved, cast)
            if not self.definition.per_param_step:
                group.pop(GROUP_STEP, None)  # (read: the live group does not show it)
            if self.definition.saved_group_step is not None:
                group.pop(self.definition.saved_group_step, None)  # (as GROUP_STEP)
            self._sync_lr(index, group, buckets, keep=own)
        for k, v in cast.items():  # state not keyed by a param is kept as is, as by torch
            if not isinstance(k, torch.Tensor):
                self.state[k] = v
        self._sync_captured_counters()
        return post_hooks

    @torch.no_grad()
    def _backup(self) -> dict:
        """What load_state_dict changes, copied (to put back if loading fails)."""
        return {
            "groups": [dict(g) for g in self.param_groups],
            "state": {k: dict(v) for k, v in self.state.items()},
            "lr_written": list(self._lr_written),
            "buckets": [[({**{n: t.clone() for n, t in b.state.items()},
                           **{ABSMAX_KEY.format(n): t.clone() for n, t in b.absmax.items()}},
                          None if b.master is None else b.master.clone(),
                          # (params with remainders or no master: a load writes them too)
                          None if b.master_weights == "fp32" else (
                              b.flat.clone(), None if b.remainder is None
                              else b.remainder.clone()),
                          {n: t.clone() for n, t in b.scalars.items()}, b.steps.clone(),
                          list(b.started), list(b.fresh), b.step, b.uniform, b.all_started)
                         for b in buckets] for buckets in self._buckets],
        }

    @torch.no_grad()
    def _restore(self, backup: dict) -> None:
        for group, saved in zip(self.param_groups, backup["groups"], strict=True):
            group.clear()
            group.update(saved)
        self.state = defaultdict(dict, backup["state"])
        self._lr_written = backup["lr_written"]
        self._checked.clear()
        for buckets, saved in zip(self._buckets, backup["buckets"], strict=True):
            for b, (state, master, half, scalars, steps, started, fresh, step, uniform,
                    all_started) in zip(buckets, saved, strict=True):
                for name in list(b.state):
                    if name not in state:
                        del b.state[name]
                        b.absmax.pop(name, None)
                for name in b.state:
                    b.state[name].copy_(state[name])
                    if name in b.absmax:
                        b.absmax[name].copy_(state[ABSMAX_KEY.format(name)])
                if master is not None:
                    b.master.copy_(master)
                if half is not None:
                    b.flat.copy_(half[0])
                    if half[1] is not None:
                        b.remainder.copy_(half[1])
                for name, t in scalars.items():
                    b.scalars[name].copy_(t)
                b.steps.copy_(steps)
                b.started, b.fresh = started, fresh
                b.step, b.uniform, b.all_started = step, uniform, all_started
                b._arrays.clear()
                b.prepared.clear()
                b.counts_loaded()
                for i in range(len(b.params)):
                    self._published(b, i)
        self._sync_captured_counters()

    def _sync_lr(self, index: int, group: dict, buckets: list[_Bucket], keep: bool) -> None:
        """After loading: the schedule's value for the next step is the lr fastopt wrote; with
        ``keep`` False group['lr'] is set to it, else a saved lr equal to it is the schedule's
        (a dict holds copies: ``_schedule`` tells its own lr by identity) and a different
        one keeps overriding."""
        written = None
        schedule = group.get("schedule")
        if schedule is not None:
            written = host_lr(schedule, _group_step(buckets)) if buckets else group["lr"]
            if not keep or _same_lr(group["lr"], written):
                group["lr"] = written
        self._lr_written[index] = written

    @torch.no_grad()
    def _load_bucket(self, group: dict, b: _Bucket, saved: dict, extra: dict) -> None:
        """Per-param state of ``b`` from ``saved`` (param -> state dict); entries fastopt does
        not hold in flat buffers are taken from ``extra`` (param -> state dict) as they are."""
        init = self.state_init(group)
        for name, value in init.items():
            b.add_state(name, value)
        # (a param without an entry takes the group's count where it is kept per group:
        # schedulefree's k goes on for a param whose state was deleted before the save)
        for i, p in enumerate(b.params):
            self._load_param(group, b, i, saved.get(p) or {}, extra, init, group_counts=True)
        b.counts_loaded()

    def _load_param(self, group: dict, b: _Bucket, i: int, st: dict, extra: dict,
                    init: dict | None = None, master: dict | None = None,
                    group_counts: bool = False) -> None:
        """Param i's state from its saved entry ``st`` (empty: as before its first step);
        ``extra`` as ``_load_bucket``'s; ``master``: the entry its float32 values come from
        (``st``'s by default); ``group_counts``: an empty entry still takes the group's step
        count and scalars, where the definition keeps them per group (a param whose state
        was deleted mid-training: schedulefree's ``k``, ``weight_sum`` and ``lr_max`` go on,
        only its ``z`` and ``exp_avg_sq`` restart)."""
        init = self.state_init(group) if init is None else init
        of_group = bool(st) or (group_counts and self.definition.group_step is not None)
        p = b.params[i]
        master = st if master is None else master
        if b.sharded:  # (DTensor state, e.g. from torch.distributed.checkpoint: its shard)
            st = {k: local_tensor(v) for k, v in st.items()}
            master = {k: local_tensor(v) for k, v in master.items()}
        steps = 0.0  # a dict without a per-param step: the group's (schedulefree's k,
        key = self.definition.group_step  # or a saved count where torch keeps none)
        key = GROUP_STEP if not self.definition.per_param_step else key
        key = self.definition.saved_group_step if key is None else key
        if of_group and key is not None:
            steps = float(_saved_count(group.get(key, 0), key))
        b.steps[i] = float(_saved_count(st["step"], "step", "a parameter's state")
                           if "step" in st else steps)
        for name in b.state:
            if not b.applies(name, i):
                continue
            view = b.view_of(name, i)
            raw = _saved_int8(st, name, b.tensors[i])
            if raw is not None and _stale(raw, st.get(name), b.signed(name)):
                raw = None  # (float values changed since: torch stepped, or an edit)
            if raw is not None:  # int8 codes and scales: as they are, or decoded
                if b.int8:
                    view.copy_(raw.codes.view(view.shape))
                    b.absmax_of(name, i).copy_(raw.absmax)
                else:
                    view.copy_(torch.from_numpy(Int8State(
                        raw.codes.reshape(-1).cpu().numpy(), raw.absmax.cpu().numpy()).decode(
                            b.signed(name))).view(view.shape))
                continue
            value = st.get(name)
            if value is not None and isinstance(value, torch.Tensor) \
                    and tuple(value.shape) != tuple(view.shape):
                raise RuntimeError(f"state_dict: the {name!r} of a parameter of shape "
                                 f"{tuple(b.tensors[i].shape)} has shape "
                                 f"{tuple(value.shape)}, expected {tuple(view.shape)}"
                                 + (" (this process's shard of a DTensor param)"
                                    if b.sharded else ""))
            if value is None and st and b.layouts.get(name, "elements") == "elements" \
                    and name in self.definition.always_kept_state:
                raise KeyError(f"state_dict: a parameter's state has {sorted(st)} but no "
                               f"{name!r}, which {type(self).__name__} always keeps (torch "
                               "would fail at the next step)")
            if value is None and st and b.layouts.get(name, "elements") != "elements":
                raise ValueError(f"state_dict: a parameter of shape "
                                 f"{tuple(b.params[i].shape)} has state but no {name!r} "
                                 "(torch's Adafactor keeps row_var and col_var for 2 or "
                                 "more dims, variance for fewer)")
            if isinstance(value, torch.Tensor) and not b.signed(name) \
                    and bool((value < 0).any()):
                raise ValueError(f"state_dict: the {name!r} of a parameter of shape "
                                 f"{tuple(b.tensors[i].shape)} holds negative values, which "
                                 "it cannot (a second moment or an accumulator: the next "
                                 "step would take their square root)")
            if value is not None:
                b.set_state(name, i, value)
            else:  # absent, or None (torch 1.x SGD saved momentum_buffer=None)
                b.set_state(name, i, init.get(name, 0.0))
        self._load_master(b, i, master)
        b.started[i] = bool(st)
        b.fresh[i] = any(st.get(name) is None for name in self.definition.first_grad_state)
        for s_ in self.definition.scalars:  # per-step scalars (a dict without one: start)
            value = group.get(s_.name) if s_.group and of_group else st.get(s_.name)
            b.scalars[s_.name][i] = s_.init if value is None else float(value)
        if st:
            views = self._state_views(group, b, i)
            known = set(views) | set(b.state) | {MASTER, REMAINDER, VERSION_KEY} \
                | {key.format(n) for n in b.state for key in (CODES_KEY, ABSMAX_KEY)}
            self.state[p] = {k: v for k, v in (extra.get(p) or {}).items()
                             if k not in known}
            self.state[p].update(views)
        self._published(b, i)

    @staticmethod
    def _load_master(b: _Bucket, i: int, st: dict) -> None:
        """Param i's float32 values from its saved entry: the saved master (``master_param``)
        into the master ("fp32"), the params and remainders ("remainder") or the params
        rounded to nearest even ("none"); else a live entry's remainders (a copy of this
        optimizer), else the params' current values (a torch.optim dict, or one whose
        master torch.optim kept as a 16-bit tensor: its loader casts state to the params'
        dtype and its steps do not update it)."""
        if b.format is None:
            return
        p, offset = b.tensors[i], b.offsets[i]
        master = st.get(MASTER)
        if master is not None:
            if not isinstance(master, torch.Tensor) or master.numel() != p.numel() \
                    or not master.is_floating_point():
                raise RuntimeError(f"state_dict: the {MASTER!r} of a parameter of shape "
                                   f"{tuple(p.shape)} must be a float tensor of as many "
                                   f"elements, got {getattr(master, 'dtype', '')} "
                                   f"{getattr(master, 'shape', type(master).__name__)}")
        if master is not None and master.dtype in (torch.float16, torch.bfloat16):
            master = None  # (fastopt saves it in float32: this one went through torch.optim,
            # whose loader cast it to the params' dtype and whose steps left it behind)
        if master is not None:
            if b.master is not None:
                b.view_of(MASTER, i).copy_(master.view_as(p))
                return
            values = torch.empty(p.numel(), dtype=torch.float32, device=b.flat.device)
            b.shaped(values, i).copy_(master.detach().reshape(p.shape))  # (in p's layout)
            b.set_master_values(slice(offset, offset + p.numel()), values)
            return
        if b.master is not None:
            b.view_of(MASTER, i).copy_(p.detach())
        elif b.remainder is not None:
            remainder = st.get(REMAINDER)
            if isinstance(remainder, torch.Tensor) and remainder.dtype == torch.int16 \
                    and remainder.numel() == p.numel():
                b.view_of(REMAINDER, i).copy_(remainder.view_as(p))
            else:
                b.view_of(REMAINDER, i).zero_()

    # ------------------------------------------------------------------ copies
    @_holding_state  # (a copy waits for a step running in another thread)
    def __getstate__(self) -> dict:
        """torch's attributes, with copies of the state: unpickling (and ``copy.deepcopy``)
        repacks the params into new flat buffers and loads the state there."""
        if self._in_backward is not None:
            raise RuntimeError("an optimizer stepping in backward holds hooks on its params: "
                               "remove() the step_in_backward handle before copying or "
                               "pickling it")
        self._take_device_counts()
        return {
            "defaults": self.defaults,
            "state": {p: {k: v.clone() if isinstance(v, torch.Tensor) else v
                          for k, v in st.items()} for p, st in self.state.items()},
            "param_groups": self.param_groups,
            "state_dtype": self.state_dtype,
            "master_weights": self.master_weights,
            "multi_tensor": self.multi_tensor,
            "_fastopt_lr_written": list(self._lr_written),
            # (whether each group's lr is the schedule's: the pickle holds copies of both)
            "_fastopt_lr_own": [g["lr"] is w for g, w in zip(self.param_groups,
                                                             self._lr_written, strict=True)],
            # (each param's step count: in the state above, except where torch keeps none)
            "_fastopt_steps": [[b.steps.clone() for b in buckets] for buckets in self._buckets],
        }

    def __setstate__(self, state: dict) -> None:
        self._reloaded = set()
        if "_fastopt_lr_written" not in state:  # torch's load_state_dict, or an old pickle
            super().__setstate__(state)
            for group in self.param_groups:
                self._fill_group(group)
            return
        state = dict(state)
        written = state.pop("_fastopt_lr_written")
        own = state.pop("_fastopt_lr_own", None) or [True] * len(written)  # (older pickles)
        steps = state.pop("_fastopt_steps", None)
        groups, saved = state.pop("param_groups"), state.pop("state")
        had_differentiable = "differentiable" in state["defaults"]
        super().__setstate__(dict(state, state=defaultdict(dict), param_groups=[]))
        if not had_differentiable:  # (torch's base __setstate__ adds it; the groups had none)
            self.defaults.pop("differentiable", None)
        self._buckets, self._lr_written, self._checked = [], [], {}
        self._arena = _Arena()
        for group in groups:
            self.add_param_group(group)
        for index, (group, buckets) in enumerate(zip(self.param_groups, self._buckets,
                                                     strict=True)):
            for j, b in enumerate(buckets):
                self._load_bucket(group, b, saved, saved)
                if steps is not None:
                    b.steps.copy_(steps[index][j])
                    b.step = int(b.steps.max()) if len(b.steps) else 0
                    b.uniform = bool((b.steps == b.steps[0]).all()) if len(b.steps) else True
                    b.counts_loaded()
        for k, st in saved.items():  # state not keyed by a param, kept as torch keeps it
            if k not in self.state and not any(k is p for g in groups for p in g["params"]):
                self.state[k] = st
        # (a pickle holds copies: a group's lr equal to the one fastopt wrote is its own,
        # ``_schedule`` telling them by identity)
        self._lr_written = [group["lr"] if mine and _same_lr(group["lr"], w) else w
                            for group, w, mine in zip(self.param_groups, written, own,
                                                      strict=True)]


def _same_lr(lr, written) -> bool:
    """Whether a loaded group['lr'] is the value fastopt wrote (a float equal to it)."""
    return written is not None and isinstance(lr, float) and lr == written


def _stale(raw: Int8State, values, signed: bool) -> bool:
    """Whether a saved entry's float32 values (if it has them beside its codes) are not what
    its codes decode to: values stepped by torch.optim after loading our dict, or edited."""
    if not isinstance(values, torch.Tensor) or values.dtype == torch.uint8:
        return False  # (a live optimizer's entry: the codes are the state)
    decoded = Int8State(raw.codes.reshape(-1).cpu().numpy(), raw.absmax.cpu().numpy()).decode(
        signed)
    return not np.array_equal(decoded, values.detach().reshape(-1).cpu().float().numpy(),
                              equal_nan=True)


def _saved_int8(st: dict, name: str, param: torch.Tensor) -> Int8State | None:
    """State ``name`` of one param's saved entry in int8 form (torch tensors), checked: from
    a state dict (``<name>_codes`` and ``<name>_absmax``) or a live optimizer's state
    (uint8 under the name, ``<name>_absmax``); None if it has none."""
    absmax = st.get(ABSMAX_KEY.format(name))
    codes = st.get(CODES_KEY.format(name))
    if codes is None and isinstance(st.get(name), torch.Tensor) \
            and st[name].dtype == torch.uint8:
        codes = st[name]
    if codes is None and absmax is None:
        return None
    version = st.get(VERSION_KEY, INT8_CODE_VERSION)
    if version != INT8_CODE_VERSION:
        raise ValueError(f"state_dict holds int8 state of code version {version!r}; this "
                         f"fastopt reads version {INT8_CODE_VERSION}")
    n = param.numel()
    if isinstance(codes, torch.Tensor) and codes.dtype != torch.uint8 \
            and codes.dtype.is_floating_point:  # (torch's loader casts them to the param's)
        as_codes = codes.to(torch.uint8)
        codes = as_codes if torch.equal(as_codes.to(codes.dtype), codes) else codes
    if isinstance(absmax, torch.Tensor) and absmax.dtype.is_floating_point:
        absmax = absmax.float()
    if codes is None or absmax is None or codes.dtype != torch.uint8 \
            or tuple(codes.shape) != tuple(param.shape) or absmax.dtype != torch.float32 \
            or tuple(absmax.shape) != (int8_blocks(n),):
        raise RuntimeError(
            f"state_dict: the int8 {name!r} of a parameter of shape {tuple(param.shape)} "
            f"needs uint8 codes of that shape ({CODES_KEY.format(name)!r}) and float32 "
            f"scales of shape ({int8_blocks(n)},) ({ABSMAX_KEY.format(name)!r})")
    return Int8State(codes, absmax)


def _schedule_payload(schedule: Schedule) -> dict:
    """A schedule as a state dict keeps it: its float64 table as a JSON string (rows of
    floats, each written exactly) and its description, which ``torch.load(weights_only=
    True)`` (torch's default) reads back. A string, not a tensor or lists: the table's size
    changes with the schedule (a held step prepends a row: the dummy step of DCP's
    ``get_state_dict`` on a fresh optimizer is one), and torch.distributed.checkpoint
    plans a tensor's load by its saved size (a fresh optimizer's table failed to load) and
    merges lists element by element (the loaded table kept the fresh one's extra row); a
    string it replaces whole."""
    return {"table": json.dumps(schedule.table.tolist()), "description": repr(schedule)}


def _schedule_from_payload(value) -> Schedule:
    """A Schedule from what a state dict holds: the payload above (its table as a JSON
    string, or as a tensor in state dicts of earlier fastopt versions; rows given as lists
    are taken too), or a Schedule (earlier still). The table is checked as any schedule's."""
    if isinstance(value, Schedule):
        return value
    if not (isinstance(value, dict) and set(value) == {"table", "description"}
            and isinstance(value["table"], (str, torch.Tensor, list))):
        raise ValueError("param group 'schedule' must be a fastopt Schedule or "
                         "{'table': its rows, 'description': str}, as state_dict() "
                         f"saves it; got {type(value).__name__}")
    table = value["table"]
    try:
        if isinstance(table, str):
            table = json.loads(table)
        elif isinstance(table, torch.Tensor):
            table = table.detach().to("cpu", torch.float64).numpy()
        table = np.array(table, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"param group 'schedule': its table is not rows of numbers ({e})") \
            from None
    return Schedule(table, str(value["description"]))


def _saved_count(value, key: str, where: str = "param group") -> int:
    """A step count a loaded param group holds (schedulefree's ``k``, fastopt's count for
    Muon) or a param's state (``step``): an integer in [0, 2**63) (a whole float or a
    one-element tensor too), else ValueError (a negative one made every param NaN)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not 0 <= value < 2**63:
        raise ValueError(f"{where} {key!r} must be a step count, an integer in "
                         f"[0, 2**63), got {value!r}")
    return int(value)


class _hooks_off:
    """Run torch's base method without the named hook dicts (fastopt runs them itself at
    the right moment); ``as`` gives the hooks, one dict per name (or the dict for one)."""

    def __init__(self, opt: torch.optim.Optimizer, *names: str):
        self.opt, self.names = opt, names

    def __enter__(self):
        self.saved = [getattr(self.opt, n) for n in self.names]
        for n in self.names:
            setattr(self.opt, n, type(getattr(self.opt, n))())
        return self.saved[0] if len(self.saved) == 1 else tuple(self.saved)

    def __exit__(self, *exc):
        for n, hooks in zip(self.names, self.saved, strict=True):
            setattr(self.opt, n, hooks)
        return False


class TrainEvalModes:
    """``train()`` and ``eval()`` for an optimizer whose definition has modes (Schedule-Free),
    as schedulefree's: each moves the params of every group not yet in that mode and sets the
    group's ``train_mode``. It starts in eval mode; ``step()`` in eval mode raises."""

    def train(self) -> None:
        """Move the params to the training point y (a no-op for groups in train mode)."""
        self._switch_mode(True)

    def eval(self) -> None:
        """Move the params to the evaluation point x (a no-op for groups in eval mode)."""
        self._switch_mode(False)
