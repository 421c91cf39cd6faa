"""Step in backward: the fused update of a chunk of params runs as soon as backward() has
produced all their gradients, and their gradients are freed right after, so the gradients of
the whole model never exist at once.

A bucket's params are cut into chunks of consecutive params (about ``chunk_elements``
elements each, at least one param). Each param gets a post-accumulate-grad hook; when every
param of a chunk has its gradient, the gradients are copied into a scratch buffer (one per
device and dtype, the size of the largest chunk) laid out like the chunk's part of the flat
buffer, one kernel call updates the chunk, and the params' ``.grad`` become None. At the end of
each backward a callback steps what is left: chunks some of whose params got no gradient
(those params are skipped, as torch's step skips params without grad), then advances each
group's lr as ``step()`` does. ``step()`` raises in this mode: gradient accumulation, clipping
and GradScaler need every gradient before the step.
"""

from __future__ import annotations

import functools
import weakref

import torch

from ._base import (
    FlatOptimizer,
    _as_array,
    _as_bits,
    _Bucket,
    _count_writes,
    _group_step,
    check_hook_last,
)


class _Chunk:
    """The params [first, stop) of one bucket of group ``group``: elements [lo, hi)."""

    __slots__ = ("group", "bucket", "first", "stop", "lo", "hi", "ready", "frozen")

    def __init__(self, group: int, bucket: _Bucket, first: int, stop: int):
        self.group, self.bucket, self.first, self.stop = group, bucket, first, stop
        self.lo = bucket.offsets[first]
        self.hi = bucket.offsets[stop - 1] + bucket.aligned(bucket.params[stop - 1].numel())
        self.ready = [False] * (stop - first)
        self.frozen = [False] * (stop - first)  # params without requires_grad

    def complete(self) -> bool:
        return all(r or f for r, f in zip(self.ready, self.frozen, strict=True))


class StepInBackward:
    """What ``step_in_backward`` returns: ``remove()`` goes back to ``step()``."""

    def __init__(self, opt: FlatOptimizer, chunk_elements: int):
        opt._take_device_counts()  # (replays of a captured step first)
        if any(any(b.repeats) for buckets in opt._buckets for b in buckets):
            raise ValueError("step_in_backward: a parameter is listed more than once in a "
                             "param group (updated once per listing by step()); a hook runs "
                             "once per gradient: list each parameter once")
        self.opt = opt
        self.chunks: list[_Chunk] = []
        for index, buckets in enumerate(opt._buckets):
            for b in buckets:
                first = 0
                while first < len(b.params):
                    stop, size = first + 1, b.params[first].numel()
                    while stop < len(b.params) and \
                            size + b.params[stop].numel() <= chunk_elements:
                        size += b.params[stop].numel()
                        stop += 1
                    self.chunks.append(_Chunk(index, b, first, stop))
                    first = stop
        self.scratch: dict[tuple, torch.Tensor] = {}
        for c in self.chunks:
            key = (c.bucket.flat.device, c.bucket.flat.dtype)
            if key not in self.scratch or self.scratch[key].numel() < c.hi - c.lo:
                self.scratch[key] = torch.zeros(c.hi - c.lo, dtype=key[1], device=key[0])
        #: per group touched in this backward: (schedule, own, step before)
        self._round: dict[int, tuple] | None = None
        self._task = None  # the autograd graph task the round belongs to
        self.hooks = []
        self._hook_ids: dict[int, int] = {}  # id(param) -> its hook's handle id
        try:  # (a frozen param gets no hook until it requires a gradient: ``_finish``)
            for index, c in enumerate(self.chunks):
                for i in range(c.first, c.stop):
                    if c.bucket.params[i].requires_grad:
                        self._hook(index, i)
                    else:
                        c.frozen[i - c.first] = True
        except BaseException:
            for hook in self.hooks:
                hook.remove()
            raise
        for buckets in opt._buckets:
            for b in buckets:
                b.release_grads()

    def _hook(self, index: int, i: int) -> None:
        """Param i of chunk number ``index``'s post-accumulate-grad hook (``_ready``),
        holding this handle through a weak reference and the chunk by its index: the params
        hold their hooks, and torch's tensors do not show them to the garbage collector, so
        a hook holding the handle or a chunk (its bucket, its params) would keep the
        optimizer and the params alive for good once the model is dropped without
        ``remove()``."""
        c = self.chunks[index]
        p = c.bucket.params[i]
        self.hooks.append(p.register_post_accumulate_grad_hook(functools.partial(
            _ready, weakref.ref(self), index, i - c.first)))
        self._hook_ids[id(p)] = self.hooks[-1].id  # (it must run last: check_hook_last)

    def _take_unfrozen(self) -> None:
        """Params frozen (no ``requires_grad``) when this began, or at an earlier backward's
        end, that require a gradient now get their hook; one that got a gradient in this
        backward (no hook saw it) is marked ready, so ``_finish`` steps it, as ``step()``
        would have."""
        for index, c in enumerate(self.chunks):
            if not any(c.frozen):
                continue
            for k, frozen in enumerate(c.frozen):
                p = c.bucket.params[c.first + k]
                if frozen and p.requires_grad:
                    self._hook(index, c.first + k)
                    c.frozen[k] = False
                    c.ready[k] = p.grad is not None

    def remove(self) -> None:
        """Stop stepping in backward: hooks removed, flat gradient buffers back."""
        if self.opt._in_backward is not self:  # removed already
            return
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        for buckets in self.opt._buckets:
            for b in buckets:
                b.restore_grads()
        self.opt._in_backward = None

    # ------------------------------------------------------------------ during backward
    @torch.no_grad()
    def _ready(self, chunk: _Chunk, k: int, param: torch.Tensor) -> None:
        check_hook_last(param, self._hook_ids[id(param)])
        task = torch._C._current_graph_task_id()
        if self._round is not None and task != self._task:
            # an earlier backward raised before its end-of-backward callback: what it
            # stepped stays stepped (as after an exception inside step()); start afresh
            self._round = None
            for c in self.chunks:
                c.ready = [False] * (c.stop - c.first)
        if self._round is None:  # the first gradient of this backward
            modes = self.opt.definition.modes
            if modes is not None and not self.opt.param_groups[0][modes.group_key]:
                raise RuntimeError(f"{type(self.opt).__name__} is in eval mode: call train() "
                                   "before training")
            self._round, self._task = {}, task
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        if param.grad.is_sparse:
            raise RuntimeError("fastopt does not support sparse gradients")
        chunk.ready[k] = True
        if chunk.complete():
            self._step(chunk, [chunk.first + j for j, r in enumerate(chunk.ready) if r])

    @torch.no_grad()
    def _finish(self) -> None:
        """End of backward: chunks with params that got no gradient step the others; then
        every group moves on, as after step() (a group none of whose params got a
        gradient too, ``_finish_group``)."""
        if torch._C._current_autograd_node() is not None:
            # the end of a backward run inside another's node: reentrant activation
            # checkpointing (torch.utils.checkpoint with use_reentrant=True), whose inner
            # backward is a graph task of its own; this round's end cannot be told apart
            self._round = None
            for c in self.chunks:
                c.ready = [False] * (c.stop - c.first)
            raise RuntimeError(
                "step_in_backward: a backward ran inside another (reentrant activation "
                "checkpointing, torch.utils.checkpoint(..., use_reentrant=True)), which this "
                "mode does not support; use use_reentrant=False, or backward(); step()")
        if self._round is None:  # (ended already: an error reset it)
            return
        try:
            self._take_unfrozen()
            for c in self.chunks:
                if any(c.ready):
                    self._step(c, [c.first + k for k, r in enumerate(c.ready) if r])
            opt = self.opt
            for index, (group, buckets) in enumerate(zip(opt.param_groups, opt._buckets,
                                                         strict=True)):
                if buckets and index not in self._round:  # (no gradient in this group:
                    opt._adopt_group_state(index, group, buckets)  # it moves on anyway)
                    self._round[index] = (*opt._schedule(index, group), _group_step(buckets))
            for index, (schedule, own, before) in self._round.items():
                group = opt.param_groups[index]
                opt._finish_group(index, group, opt._buckets[index], schedule, own, before,
                                  opt._group_hypers(group))
            opt._sync_captured_counters()
        finally:
            self._round = None

    def _step(self, c: _Chunk, which: list[int]) -> None:
        opt, b = self.opt, c.bucket
        group = opt.param_groups[c.group]
        if b.buffers_at() != b.buffer_addresses:  # (model.share_memory() after packing)
            b.follow_moved_buffers()
        for i in which:
            b.check_address(i)
        if c.group not in self._round:  # (the group's first chunk this backward)
            opt._adopt_group_state(c.group, group, opt._buckets[c.group])
            schedule, own = opt._schedule(c.group, group)
            self._round[c.group] = (schedule, own, _group_step(opt._buckets[c.group]))
        schedule = self._round[c.group][0]
        opt._group_count = self._round[c.group][2]  # (the group's lr for lagging params)
        try:
            self._step_chunk(c, which, group, schedule)
        finally:
            opt._group_count = None
        for i in which:
            b.params[i].grad = None
        c.ready = [False] * (c.stop - c.first)

    def _step_chunk(self, c: _Chunk, which: list[int], group: dict, schedule) -> None:
        """The kernel calls of a chunk's params ``which``, at the group's lr."""
        opt, b = self.opt, c.bucket
        hypers = opt._group_hypers(group)
        names = opt._kernel_state(group, b, hypers)
        arrays, half = b.arrays(names)
        if not b.all_started:
            have = [False] * len(b.params)
            for i in which:
                have[i] = True
            opt._init_first_step(b, names, schedule, have)
        first_grad = bool(opt.definition.first_grad_state)
        steps = {int(b.steps[i]) for i in which}
        whole = which == list(range(c.first, c.stop)) and len(steps) == 1 and \
            (not first_grad or len({b.fresh[i] for i in which}) == 1) and \
            all(bool((v[c.first:c.stop] == v[c.first]).all()) for v in b.scalars.values())
        convert = _as_array if b.format is None else _as_bits
        parts = [(c.first, c.stop)] if whole else [(i, i + 1) for i in which]
        _count_writes([b.params[i] for i in which])  # (as step() and torch's update do)
        scratch = self.scratch[(b.flat.device, b.flat.dtype)]
        for first, stop in parts:
            lo = b.offsets[first]
            hi = b.offsets[stop - 1] + (b.aligned(b.params[stop - 1].numel()) if whole
                                        else b.params[stop - 1].numel())
            grads = scratch[:hi - lo]
            grads.zero_()  # (alignment gaps between params: no gradient)
            for i in range(first, stop):
                start = b.offsets[i] - lo
                b.shaped(grads[start:start + b.params[i].numel()], i).copy_(b.params[i].grad)
            k = int(b.steps[first]) + 1
            part = {key: v[lo:hi] if key == "master" and v is not None else v
                    for key, v in half.items()}
            sliced = [arrays[0][lo:hi], convert(grads),
                      *(a[b.state_part(name, first, stop, slice(lo, hi))]
                        for name, a in zip(names, arrays[2:], strict=True))]
            opt._run(b, names, hypers, sliced, part, k, schedule,
                     first_grad and b.fresh[first], (first, stop) if whole else first)
            for i in range(first, stop):
                b.fresh[i] = False
                b.steps[i] = k
                if not b.started[i]:
                    opt._start(group, b, i)
        b.all_started = all(b.started)
        b.uniform = bool((b.steps == b.steps[0]).all())
        b.step = int(b.steps.max())
        b.steps_seen = b.steps._version  # (counts fastopt wrote)


def _ready(ref: weakref.ref, chunk: int, k: int, param: torch.Tensor) -> None:
    """A param's hook: ``StepInBackward._ready`` for param k of chunk number ``chunk``."""
    handle = ref()
    if handle is not None:
        handle._ready(handle.chunks[chunk], k, param)


def step_in_backward(params, optimizer: FlatOptimizer, *,
                     chunk_elements: int = 1 << 22) -> StepInBackward:
    """Run ``optimizer``'s fused update inside ``loss.backward()``: each chunk of about
    ``chunk_elements`` elements of consecutive params is updated as soon as all its
    gradients exist, and those gradients are freed at once, so the whole model's gradients
    never exist together (peak memory: the params' gradients minus about all but one
    chunk's). ``params``: the model (or the optimizer's params, all of them). The numbers
    equal ``backward(); step()`` with the same schedule.

    Then call only ``loss.backward()`` (and ``zero_grad()`` if you like): ``step()`` raises.
    What needs every gradient before the update cannot work, since the update happens in
    backward: gradient accumulation (each backward is a step; ``step()`` raises),
    ``clip_grad_norm_`` (it then sees no gradients) and ``GradScaler`` (the update would
    use the scaled gradients; its ``step()`` fails). A param that gets no gradient in a
    backward, or has ``requires_grad=False``, is skipped, as by ``step()`` (one frozen
    when this is called and unfrozen later steps from the backward that gives it a gradient:
    its hook is added at the end of that backward, which steps it). A backward that
    raises leaves what it already stepped stepped (as an exception inside ``step()``).
    With ``state_dtype="bfloat16"`` or ``"int8"``, or ``master_weights="none"``, a chunk
    draws other stochastic-rounding bits than a whole-bucket step: the same distribution,
    not the same bits. Use a fastopt schedule as the lr (evaluated in the kernel): torch LR
    schedulers expect ``step()`` calls. Returns a handle; ``handle.remove()`` goes back to
    normal stepping.
    """
    if not isinstance(optimizer, FlatOptimizer):
        raise TypeError("step_in_backward needs a fastopt.torch optimizer, got "
                        f"{type(optimizer).__name__}")
    if optimizer._in_backward is not None:
        raise RuntimeError("this optimizer already steps in backward")
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) \
            or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be an int >= 1, got {chunk_elements!r}")
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    given = [p[1] if isinstance(p, tuple) else p for p in params]
    ours = [p for g in optimizer.param_groups for p in g["params"]]
    if {id(p) for p in given} != {id(p) for p in ours}:
        raise ValueError("step_in_backward takes the model (or the params) the optimizer "
                         f"was built over: {len(given)} params given, the optimizer has "
                         f"{len(ours)}, not the same ones")
    if any(b.sharded for buckets in optimizer._buckets for b in buckets):
        raise ValueError("step_in_backward does not support DTensor params (FSDP2's "
                         "fully_shard reduces their gradients after the hooks it would step "
                         "in): call step() after backward")
    optimizer._in_backward = StepInBackward(optimizer, chunk_elements)
    return optimizer._in_backward
