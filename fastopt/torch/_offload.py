"""``fastopt.torch.CPUOffload``: the optimizer step of CUDA params on the CPU (ZeRO-Offload's
idea), with fastopt's CPU kernels.

The params are split into buckets of consecutive params (``bucket_elements``). Each bucket has
a host optimizer, a fastopt.torch optimizer over CPU copies of its params: its flat param and
gradient buffers are in pinned memory, and its master (16-bit params) and state in ordinary
memory, in every ``state_dtype`` and ``master_weights`` mode. The flow of one step:

1. backward: a post-accumulate-grad hook counts each bucket's gradients; when all of a bucket's
   params have theirs, its gradients are copied device->host on a side stream (``d2h``),
   while backward goes on with the rest;
2. ``step()``: a bucket whose device gradients changed since that copy (``clip_grad_norm_``,
   GradScaler's ``unscale_``, another backward: torch's version counter tells) or that was
   never copied is copied now. With ``max_grad_norm`` or ``skip_if_nonfinite`` the global norm
   is taken first, on the device (one read of the gradients there, ``torch._foreach_norm``),
   and the host kernels take the clip coefficient as their gradient multiplier;
3. a worker thread takes the buckets in the order their copies were issued: it waits for a
   bucket's copy, runs the fastopt CPU kernel on it (the kernels release the GIL; one bucket at
   a time, each kernel parallel over the cores) and issues the copy of its updated params
   host->device on another side stream (``h2d``); 16-bit params are rounded from the master
   inside the kernel (the host buffer is already the model's dtype);
4. ``step()`` returns when every bucket's kernel has run; the current stream waits for the
   host->device copies (a wait on the device, not on the host), so the next forward runs after
   them and nothing else waits.

With ``step_in_backward=True`` the hook of step 1 also hands the bucket to the worker at once
(step 3 overlaps the rest of backward) and ``step()`` only waits; the global norm that
clipping and skipping need first is then not available, so those are refused.

The device's memory keeps the params and gradients only; the host keeps the params (pinned),
gradients (pinned), master and state. ``Transfers`` is the device interface the steps use;
tests drive the same code with CPU "device" tensors and deferred fake streams.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import torch

from .._checks import check_max_grad_norm, grad_mult
from ..schedules import advanced, host_lr
from . import optim as _optim
from ._base import FlatOptimizer, _group_step, check_hook_last, is_dtensor, moved_param_error

#: the default bucket size in elements (16 MiB of float32 gradients per copy)
BUCKET_ELEMENTS = 1 << 22


class Transfers:
    """The device side of CPUOffload: two side streams (device->host gradients, host->device
    params), their events, and the current stream's waits. CUDA's."""

    def __init__(self, device: torch.device):
        self.device = device
        self.d2h = torch.cuda.Stream(device)
        self.h2d = torch.cuda.Stream(device)

    def pinned(self) -> bool:
        return True

    def after_current(self, stream) -> None:
        """``stream``'s next work waits for what the current stream issued so far."""
        stream.wait_stream(torch.cuda.current_stream(self.device))

    def copy(self, stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        if src.is_cuda:  # (the source's memory must not be reused before the copy ran)
            src.record_stream(stream)

    def record(self, stream):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def synchronize(self, event) -> None:
        event.synchronize()

    def current_waits(self, event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)


def _resolve(optimizer) -> type[FlatOptimizer]:
    if isinstance(optimizer, str):
        if optimizer not in _optim.__all__:
            raise ValueError(f"unknown optimizer {optimizer!r}: one of "
                             f"{', '.join(_optim.__all__)}")
        cls = getattr(_optim, optimizer)
    elif isinstance(optimizer, type) and issubclass(optimizer, FlatOptimizer):
        cls = optimizer
    else:
        raise TypeError("optimizer must be a fastopt.torch optimizer class or its name, got "
                        f"{optimizer!r}")
    if cls.definition.modes is not None:
        raise ValueError(f"CPUOffload does not run {cls.__name__} (its train()/eval() modes "
                         "move the params on the host); use an optimizer without modes")
    return cls


_PINNED: dict[type, type] = {}


def _pinned_class(cls: type[FlatOptimizer]) -> type[FlatOptimizer]:
    """``cls`` with its flat param and gradient buffers in pinned memory."""
    if cls not in _PINNED:
        _PINNED[cls] = type(cls.__name__, (cls,), {"_pin_memory": True,
                                                   "__module__": __name__})
    return _PINNED[cls]


class _Bucket:
    """Consecutive params of one group: their host optimizer and copies in flight."""

    def __init__(self, params: list[torch.Tensor], host: FlatOptimizer):
        self.params = params
        self.host = host
        self.host_params = host.param_groups[0]["params"]
        views = {id(p): view for hb in host._buckets[0]
                 for p, view in zip(hb.params, hb.grad_views, strict=True)}
        #: where each param's gradient is copied to: its view of the host's flat gradients
        self.grad_views = [views[id(hp)] for hp in self.host_params]
        #: gradients of this backward so far (hooks), and how many complete the bucket:
        #: its params that require one, counted at the first (requires_grad may change
        #: between steps: a layer frozen or unfrozen)
        self.arrived = self.expected = 0
        #: the gradients the last device->host copy took: (tensor, version) per param
        self.copied: list | None = None
        self.copy_done = None  # the event after that copy
        self.h2d_done = None  # the event after the last host->device copy of the params
        #: the device params' versions when the host last had their values: a param changed
        #: in place since (model.load_state_dict, an init) is copied to the host first
        self.versions = [p._version for p in params]
        #: where each device param's data lives, and its storage (a weak reference: torch
        #: keeps one Python object per storage while it lives): one whose storage is
        #: replaced is followed (same dtype, device and shape) or refused
        #: (``check_addresses``), also where the new storage lies at the old address (the
        #: old one freed first: ``model.to(torch.bfloat16).to(torch.float32)``)
        self.addresses = [p.data_ptr() for p in params]
        self.storages = [weakref.ref(p.untyped_storage()) for p in params]
        #: step in backward: each param's gradient and its version when its hook ran, so
        #: that a change after backward to a bucket not yet stepped is refused at step()
        self.hooked: dict[int, tuple] = {}
        self.device = params[0].device

    def remember_versions(self) -> None:
        self.versions = [p._version for p in self.params]

    def check_addresses(self) -> None:
        """Device params whose storage was replaced (``p.data = ...``, swap_tensors) by one of
        the same dtype, device and shape are followed: their values go to the host if they
        changed (as a change in place would); another dtype, device or shape raises."""
        moved = []
        for i, (p, hp) in enumerate(zip(self.params, self.host_params, strict=True)):
            if p.data_ptr() == self.addresses[i] \
                    and p.untyped_storage() is self.storages[i]():
                continue
            if p.dtype != hp.dtype or p.shape != hp.shape or p.device != self.device:
                raise moved_param_error(p, True)
            self.addresses[i] = p.data_ptr()
            self.storages[i] = weakref.ref(p.untyped_storage())
            with torch.no_grad():
                if not torch.equal(p.detach().to("cpu"), hp.detach()):
                    moved.append(i)
        if moved:
            self.take_device_params(moved)

    def changed_on_device(self) -> list[int]:
        """The params changed in place on the device since the host had their values."""
        return [i for i, (p, v) in enumerate(zip(self.params, self.versions, strict=True))
                if p._version != v]

    @torch.no_grad()
    def take_device_params(self, which: list[int] | None = None,
                           keep_equal: bool = False) -> None:
        """The host params ``which`` (default all) from the device params as they are now,
        their masters (16-bit params) from those values; the others' masters stay. With
        ``keep_equal`` a param whose device values equal the host's keeps its master (or
        remainders), as a param's replaced storage with the same values does: the usual
        resume loads the optimizer's state dict (a float32 master) and then the model's,
        whose params are that master's rounding."""
        where = {id(p): (hb, j) for hb in self.host._buckets[0]
                 for j, p in enumerate(hb.params)}
        for i in range(len(self.params)) if which is None else which:
            hp = self.host_params[i]
            if keep_equal:
                values = self.params[i].detach().to(hp.device)
                if torch.equal(values, hp.detach()):
                    continue
                hp.copy_(values)
            else:
                hp.copy_(self.params[i])
            hb, j = where[id(hp)]
            part = slice(hb.offsets[j], hb.offsets[j] + hp.numel())
            if hb.master is not None:
                hb.master[part].copy_(hb.flat[part])
            if hb.remainder is not None:
                hb.remainder[part].zero_()
        self.remember_versions()

    def changed_since_hooks(self) -> bool:
        """Step in backward, a bucket not complete in backward (its gradients stay on the
        device until step()): whether a gradient its hook saw was replaced or changed in
        place since (``clip_grad_norm_`` clipping it alone, say)."""
        for p in self.params:
            seen = self.hooked.get(id(p))
            if seen is not None and (p.grad is not seen[0] or p.grad._version != seen[1]):
                return True
        return False

    def stale(self) -> bool:
        """Whether the host gradients differ from the device's (changed or never copied)."""
        if self.copied is None:
            return True
        return any((p.grad is not None) != (g is not None)
                   or (g is not None and (p.grad is not g or g._version != v))
                   for p, (g, v) in zip(self.params, self.copied, strict=True))


class CPUOffload(torch.optim.Optimizer):
    """The optimizer step of CUDA params on the CPU, overlapped with backward and transfers.

        opt = fastopt.torch.CPUOffload(model.parameters(), "AdamW", lr=schedule,
                                       weight_decay=0.1, state_dtype="bfloat16")
        loss.backward(); opt.step(); opt.zero_grad()

    ``optimizer``: a fastopt.torch class or its name; the other keywords are its arguments
    (``state_dtype``, ``master_weights``: every mode). ``bucket_elements``: the size of each
    copy and CPU step. ``max_grad_norm``: clip the gradients to this global norm (taken on
    the device first: torch's ``clip_grad_norm_`` coefficient, applied in the CPU kernels).
    ``skip_if_nonfinite``: a step whose gradients hold inf or NaN changes nothing
    (``last_step_skipped``). ``step(grad_scale=s)``: the gradients are s times the true ones
    (a loss scale), divided in the kernels. ``torch.nn.utils.clip_grad_norm_`` and
    GradScaler work too: gradients changed after backward are copied again at ``step()``
    (slower than the two options above, whose copies overlap backward).
    ``step_in_backward=True``: each bucket's CPU step starts in backward as soon as its
    gradients are copied, and ``step()`` only waits for them (call it after each backward);
    what needs every gradient first (clipping, GradScaler, accumulation) is refused.

    The device keeps only params and gradients; the host keeps the float32 master, state and
    pinned copies of params and gradients. ``state_dict()`` is the format of the
    ``optimizer`` class (a dict of one loads into the other). The schedule (a fastopt
    schedule as lr, or torch LR schedulers on this optimizer's param groups) works as in
    the ``optimizer`` class.
    """

    def __init__(self, params, optimizer="AdamW", *, bucket_elements: int = BUCKET_ELEMENTS,
                 max_grad_norm: float | None = None, skip_if_nonfinite: bool = False,
                 step_in_backward: bool = False, _transfers: Transfers | None = None,
                 **kwargs):
        self.optimizer_class = _resolve(optimizer)
        if not isinstance(step_in_backward, bool):
            raise TypeError(f"step_in_backward must be a bool, got {step_in_backward!r}")
        if step_in_backward and (max_grad_norm is not None or skip_if_nonfinite):
            raise ValueError("step_in_backward=True steps each bucket as soon as its "
                             "gradients exist; max_grad_norm and skip_if_nonfinite need the "
                             "global norm of all of them first: use one or the other")
        #: each bucket's CPU step starts in backward, as soon as its gradients are copied
        self.step_in_backward = step_in_backward
        self._inflight: list = []  # (step in backward: the buckets' steps submitted)
        self._second_backward = False  # (step in backward: one ran before step())
        if isinstance(bucket_elements, bool) or not isinstance(bucket_elements, int) \
                or bucket_elements < 1:
            raise ValueError(f"bucket_elements must be an int >= 1, got {bucket_elements!r}")
        self.bucket_elements = bucket_elements
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        if not isinstance(skip_if_nonfinite, bool):
            raise TypeError(f"skip_if_nonfinite must be a bool, got {skip_if_nonfinite!r}")
        self.skip_if_nonfinite = skip_if_nonfinite
        self._kwargs = kwargs
        self._transfers = _transfers
        self._buckets: list[list[_Bucket]] = []
        self._hooks = []
        self._hook_ids: dict[int, int] = {}  # id(param) -> its hook's handle id
        self._order: list[_Bucket] = []  # buckets whose copy was issued, in that order
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="fastopt-offload")
        #: whether the last step() was skipped (skip_if_nonfinite and a non-finite gradient)
        self.last_step_skipped = False
        # (the host class's group defaults, checked by it: kwargs it does not take raise)
        probe = torch.nn.Parameter(torch.zeros(2, 2))
        defaults = dict(self.optimizer_class([probe], **kwargs).param_groups[0])
        del defaults["params"]
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ construction
    def add_param_group(self, param_group: dict) -> None:
        given = {k: v for k, v in param_group.items() if k not in _NOT_HYPERS} \
            if isinstance(param_group, dict) else {}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        params = group["params"]
        if len({id(p) for p in params}) != len(params):  # (torch refuses one in two groups)
            self.param_groups.pop()
            raise ValueError("CPUOffload takes each param once (torch steps a param listed "
                             "twice once per listing; its host copies would each step from "
                             "the same value): list each param once")
        if any(is_dtensor(p) for p in params):
            self.param_groups.pop()
            raise ValueError("CPUOffload does not take DTensor params (FSDP2): step them with "
                             "fastopt.torch's classes directly (FSDP2's own CPUOffloadPolicy "
                             "puts the shards on the CPU, where those classes step them)")
        devices = {p.device for p in params}
        if self._transfers is not None and devices and \
                getattr(self._transfers, "device", None) not in (None, *devices):
            devices.add(self._transfers.device)
        if len(devices) > 1:
            self.param_groups.pop()
            raise ValueError(f"CPUOffload's params must live on one device, got {devices}")
        device = next(iter(devices)) if devices else torch.device("cuda")
        if self._transfers is None:
            if device.type != "cuda":
                self.param_groups.pop()
                raise ValueError(f"CPUOffload offloads the step of CUDA params; these are on "
                                 f"{device}: use fastopt.torch.{self.optimizer_class.__name__}"
                                 " directly")
            self._transfers = Transfers(device)
        cls = _pinned_class(self.optimizer_class) if self._transfers.pinned() \
            else self.optimizer_class
        buckets, part, size = [], [], 0
        for p in params:
            if part and size + p.numel() > self.bucket_elements:
                buckets.append(part)
                part, size = [], 0
            part.append(p)
            size += p.numel()
        if part:
            buckets.append(part)
        made = []
        for part in buckets:
            host_params = [torch.nn.Parameter(p.detach().to("cpu", copy=True),
                                              requires_grad=p.requires_grad) for p in part]
            try:
                host = cls([{"params": host_params, **given}], **self._kwargs)
            except BaseException:
                self.param_groups.pop()
                raise
            host._advance_idle_groups = False  # (the group's count: _check_hosts)
            made.append(_Bucket(part, host))
        self._buckets.append(made)
        if made:  # (the group shows the host's values: lr a number, the schedule apart)
            group.update({k: v for k, v in made[0].host.param_groups[0].items()
                          if k not in _NOT_HYPERS})
        self._add_hooks(len(self._buckets) - 1)

    def _add_hooks(self, where: int) -> None:
        """A post-accumulate-grad hook on each param of group ``where`` that requires a
        gradient and has none yet (torch hooks only those: a param unfrozen later gets
        its hook at the step after, ``_reset``)."""
        me = weakref.ref(self)  # (the hooks must not keep the optimizer alive)
        for j, b in enumerate(self._buckets[where]):
            for p in b.params:
                if p.requires_grad and id(p) not in self._hook_ids:
                    self._hooks.append(p.register_post_accumulate_grad_hook(
                        lambda p, j=j: _on_grad(me, where, j, p)))
                    self._hook_ids[id(p)] = self._hooks[-1].id

    # ------------------------------------------------------------------ copies
    def _copy_grads(self, b: _Bucket, release: bool = False) -> None:
        """Issue the device->host copy of ``b``'s gradients (after the current stream's work
        so far: the backward that made them). ``release`` (step in backward): the device
        gradients are dropped once the copy is issued (their memory is reused only after it
        ran: record_stream), so the whole model's gradients never exist at once."""
        t = self._transfers
        t.after_current(t.d2h)
        for p, hp, view in zip(b.params, b.host_params, b.grad_views, strict=True):
            if p.grad is None:
                hp.grad = None
                continue
            if p.grad.is_sparse:
                raise RuntimeError("CPUOffload does not support sparse gradients")
            t.copy(t.d2h, view, p.grad.detach())
            hp.grad = view
        b.copy_done = t.record(t.d2h)
        if release:
            for p in b.params:
                p.grad = None
        b.copied = [(p.grad, p.grad._version if p.grad is not None else 0) for p in b.params]
        b.arrived = 0
        with self._lock:
            if b in self._order:
                self._order.remove(b)
            self._order.append(b)

    # ------------------------------------------------------------------ the step
    def _device_norm(self) -> float:
        grads = [p.grad.detach() for buckets in self._buckets for b in buckets
                 for p in b.params if p.grad is not None]
        if not grads:
            return 0.0
        # (in float32: the norm of 16-bit gradients scaled by a loss scale overflows
        # float16's 65504 where the true norm is small)
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        return float(torch.linalg.vector_norm(torch.stack(norms), 2.0))

    def _push_groups(self) -> None:
        """The param groups' values (a torch scheduler's lr, a changed weight decay) into
        the host optimizers' groups."""
        for group, buckets in zip(self.param_groups, self._buckets, strict=True):
            values = {k: v for k, v in group.items() if k not in _NOT_HYPERS}
            # the group shows the first host's lr: while it is that (no one changed it), each
            # host keeps the lr it wrote itself (hosts tell their own by identity)
            ours = bool(buckets) and values.get("lr") is buckets[0].host._lr_written[0]
            for b in buckets:
                b.host.param_groups[0].update(values)
                if ours and b.host._lr_written[0] is not None:
                    b.host.param_groups[0]["lr"] = b.host._lr_written[0]

    def _pull_groups(self) -> None:
        """The host optimizers' group values after a step (the schedule's next lr). A host
        whose bucket is behind its group (its params had no gradient on some steps, so it
        did not step) is given the group's next lr of its own schedule, as its group shows,
        so that every host keeps its schedule (``_check_hosts`` then advances a lagging
        one's, ``FlatOptimizer._lr_schedule``)."""
        for group, buckets in zip(self.param_groups, self._buckets, strict=True):
            count = max((_group_step(b.host._buckets[0]) for b in buckets), default=0)
            for b in buckets:
                host, values = b.host, b.host.param_groups[0]
                schedule, own = host._schedule(0, values)
                if own and _group_step(host._buckets[0]) < count:
                    values["lr"] = host._lr_written[0] = host_lr(schedule, count)
            if buckets:
                group.update({k: v for k, v in buckets[0].host.param_groups[0].items()
                              if k not in _NOT_HYPERS})
        self.state = defaultdict(dict, {
            p: b.host.state[hp] for buckets in self._buckets for b in buckets
            for p, hp in zip(b.params, b.host_params, strict=True) if hp in b.host.state})

    def _advance_idle_groups(self, stepped: list[_Bucket]) -> None:
        """A step that did not raise a group's step count (the most any of its params
        took: none had a gradient, or only params behind the others) moves the group's lr
        on, as a torch scheduler's would (``FlatOptimizer._finish_group``: a group stepped
        n times has its lr at its schedule's n-th step): each of its hosts' own schedule is
        advanced by the step, and its lr is the group's next one."""
        before = getattr(self, "_counts_before", None)
        for where, buckets in enumerate(self._buckets):
            if not buckets:
                continue
            count = max(_group_step(b.host._buckets[0]) for b in buckets)
            if before is not None and where < len(before):
                if count > before[where]:
                    continue
            elif any(b in stepped and any(hp.grad is not None for hp in b.host_params)
                     for b in buckets):
                continue  # (no count from before this step: a gradient means it stepped)
            for b in buckets:
                values = b.host.param_groups[0]
                schedule, own = b.host._schedule(0, values)
                if own:
                    values["schedule"] = schedule = advanced(schedule, 1)
                    values["lr"] = b.host._lr_written[0] = host_lr(schedule, count)

    def _host_step(self, b: _Bucket, mult: float):
        """The worker's part of a bucket: its gradients on the host, the CPU kernel, the
        copy of its params to the device issued. Returns the event after that copy."""
        t = self._transfers
        t.synchronize(b.copy_done)
        if b.h2d_done is not None:  # (the last copy out read the host params)
            t.synchronize(b.h2d_done)
        b.host._grad_mult = mult
        try:
            b.host.step()
        finally:
            b.host._grad_mult = 1.0
        for p, hp in zip(b.params, b.host_params, strict=True):
            if hp.grad is not None:
                t.copy(t.h2d, p.detach(), hp.detach())
        b.h2d_done = t.record(t.h2d)
        return b.h2d_done

    def _step_now(self, b: _Bucket) -> None:
        """Step in backward: submit ``b``'s CPU step now (its gradients' copy is issued).
        The first bucket of a backward brings the groups' values to the host optimizers
        and checks them (an error then stops backward, before anything stepped)."""
        if not self._inflight:
            self._push_groups()
            self._check_hosts()
        b.check_addresses()  # (the device params changed since the last step, as step()
        changed = b.changed_on_device()  # takes them: model.load_state_dict between steps)
        if changed:
            b.take_device_params(changed, keep_equal=True)
        t = self._transfers
        t.after_current(t.h2d)  # (the params' copy after backward's last use of them)
        with self._lock:
            self._order.remove(b)
        self._inflight.append((b, self._worker.submit(self._host_step, b, 1.0)))

    def _refuse_second_backward(self, b: _Bucket) -> None:
        if any(x is b for x, _ in self._inflight):
            self._second_backward = True  # (step() raises too: the steps are not complete)
            raise RuntimeError(
                "CPUOffload(step_in_backward=True): a second backward before step(); each "
                "backward steps the buckets (gradient accumulation needs "
                "step_in_backward=False): call step() after every backward")

    def _check_hosts(self, counts: bool = True) -> None:
        """Before a step's buckets step: each host's lr and hyperparameters checked (a bad
        one raises here, before any bucket steps), and (``counts``: before any bucket of
        this step stepped) each host told its group's step count (the most any of the
        group's buckets took): a bucket whose params had no gradient on some steps takes the
        group's lr, as in torch."""
        before = []
        for buckets in self._buckets:
            count = max((_group_step(b.host._buckets[0]) for b in buckets), default=0)
            before.append(count)
            for b in buckets:
                b.host._schedule(0, b.host.param_groups[0])
                b.host._group_hypers(b.host.param_groups[0])
                if counts:
                    b.host._group_count_floor = count
        if counts:
            self._counts_before = before  # (``_advance_idle_groups`` compares with them)

    def _reset(self) -> None:
        """The next backward copies afresh."""
        for where, buckets in enumerate(self._buckets):
            for b in buckets:
                b.copied, b.arrived = None, 0
                b.hooked.clear()
            self._add_hooks(where)

    #: torch.amp.GradScaler hands this optimizer its scale and inf flag (``grad_scale``,
    #: ``found_inf`` attributes) instead of unscaling the gradients in place, which torch's
    #: version counter would not show (the copies made in backward would be stale)
    _step_supports_amp_scaling = True

    def _amp_scaling(self) -> tuple[float, bool]:
        """(gradient multiplier, skip) from GradScaler's attributes, if it set them. A
        scaler whose ``unscale_`` already ran (for clipping) changed the device gradients
        without a version bump: all are copied again."""
        if "found_inf" not in self.__dict__:
            return 1.0, False
        if float(self.found_inf) != 0.0:
            return 1.0, True
        scale = self.__dict__.get("grad_scale")
        if scale is None:  # (unscale_ ran: the device gradients are unscaled in place)
            for buckets in self._buckets:
                for b in buckets:
                    b.copied = None
            return 1.0, False
        return 1.0 / float(scale), False

    def step(self, closure=None, *, grad_scale: float | None = None):
        """Finish the gradients' copies, run the CPU steps and issue the params' copies; the
        current stream waits for those. Returns the closure's loss (None without one);
        ``last_step_skipped`` says whether ``skip_if_nonfinite`` (or GradScaler) skipped it.
        With step_in_backward, waits for the steps that backward started."""
        try:
            return self._step(closure, grad_scale)
        except BaseException:  # (GradScaler removes its attributes only after a step that
            self.__dict__.pop("grad_scale", None)  # returns: a later step must not read them)
            self.__dict__.pop("found_inf", None)
            raise

    @torch.no_grad()
    def _step(self, closure, grad_scale):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if isinstance(grad_scale, torch.Tensor) and grad_scale.numel() == 1:
            grad_scale = float(grad_scale)
        mult = 1.0 if grad_scale is None else grad_mult(grad_scale)
        everything = [b for buckets in self._buckets for b in buckets]
        for b in everything:
            b.check_addresses()
        stepped_in_backward = bool(self._inflight)
        stepped = [b for b, _ in self._inflight]
        if self._inflight:  # (step in backward: the buckets stepped there)
            self._finish_inflight(grad_scale)
        amp_mult, found_inf = self._amp_scaling()
        self.last_step_skipped = found_inf
        if found_inf:  # (GradScaler skips the step; its update() lowers the scale)
            self._reset()
            return loss
        mult *= amp_mult
        if self.max_grad_norm is not None or self.skip_if_nonfinite:
            norm = self._device_norm() * mult
            if self.skip_if_nonfinite and not math.isfinite(norm):
                self.last_step_skipped = True
                self._reset()
                return loss
            if self.max_grad_norm is not None:
                coef = self.max_grad_norm / (norm + 1e-6)  # torch's coefficient, at most 1
                if not coef >= 1.0:
                    mult *= coef
        for b in everything:
            changed = b.changed_on_device()
            if changed:
                b.take_device_params(changed, keep_equal=True)
        for b in reversed(everything):  # (backward's order: the last params first)
            if b.stale():
                self._copy_grads(b)
        self._push_groups()
        self._check_hosts(counts=not stepped_in_backward)  # (counted as backward began)
        with self._lock:
            order, self._order = self._order, []
        t = self._transfers
        t.after_current(t.h2d)  # (the params' copies after the backward that read them)
        done = [self._worker.submit(self._host_step, b, mult) for b in order]
        failed = None
        for future in done:  # (every bucket that stepped has its copy waited for, even
            try:  # when another failed: the device must not keep stale params)
                t.current_waits(future.result())
            except BaseException as e:
                failed = failed or e
        self._reset()
        self._advance_idle_groups(stepped + order)
        self._pull_groups()
        for b in order:  # (the params' copies to the device are issued)
            b.remember_versions()
        if failed is not None:
            raise failed
        return loss

    def _finish_inflight(self, grad_scale) -> None:
        """Step in backward: wait for the steps submitted there (the current stream waits
        for their params' copies); refuse what needed the gradients before them."""
        t = self._transfers
        inflight, self._inflight = self._inflight, []
        failed = None
        for b, future in inflight:
            try:
                t.current_waits(future.result())
            except BaseException as e:
                failed = failed or e
            b.remember_versions()
        if failed is not None:
            self._reset()
            raise failed
        changed = [b for b, _ in inflight if b.stale()]
        stepped = {id(b) for b, _ in inflight}
        changed += [b for buckets in self._buckets for b in buckets  # (not complete in
                    if id(b) not in stepped and b.changed_since_hooks()]  # backward)
        second, self._second_backward = self._second_backward, False
        if second:
            self._reset()
            raise RuntimeError("CPUOffload(step_in_backward=True): a second backward ran "
                               "before this step() (it raised then); the first one's steps "
                               "are done, the second's gradients are dropped")
        if changed or grad_scale is not None or "found_inf" in self.__dict__:
            self._reset()
            raise RuntimeError(
                "CPUOffload(step_in_backward=True) stepped the buckets in backward, with the "
                "gradients backward made; they were changed after it (clip_grad_norm_, "
                "GradScaler, gradient accumulation) or a loss scale was given: those need "
                "step_in_backward=False (max_grad_norm= then clips on the device)")
        self._pull_groups()

    def memory_report(self) -> dict[str, dict[str, float]]:
        """Bytes per parameter by component: ``device`` (the model's params and gradients,
        where the step no longer keeps anything) and ``host`` (the host optimizers'
        ``memory_report``: pinned params and gradients, master, state, scales), each with
        its ``total``."""
        n = sum(p.numel() for g in self.param_groups for p in g["params"])
        device = {"params": sum(p.numel() * p.element_size()
                                for g in self.param_groups for p in g["params"]) / max(n, 1)}
        device["grads"] = device["params"]  # (as backward makes them)
        device["total"] = device["params"] + device["grads"]
        host: dict[str, float] = {}
        for buckets in self._buckets:
            for b in buckets:
                size = sum(p.numel() for p in b.params)
                for name, value in b.host.memory_report().items():
                    host[name] = host.get(name, 0.0) + value * size / max(n, 1)
        return {"device": device, "host": host}

    def refresh_master(self) -> None:
        """Copy the device params to the host now. ``step()`` does it itself for params
        changed in place since the last step (torch's version counter: ``copy_``,
        ``model.load_state_dict``, ``torch.nn.init``); a change it cannot see (through
        ``p.data``) needs this call, or the next step overwrites it."""
        self._refuse_mid_step("refresh_master()")
        for buckets in self._buckets:
            for b in buckets:
                b.take_device_params()

    def _refuse_mid_step(self, what: str) -> None:
        """Step in backward: between a backward and its step() some buckets have stepped
        and others not, and their copies may still run: ``what`` would see or make a
        mix."""
        if self._inflight:
            raise RuntimeError(f"CPUOffload(step_in_backward=True): call step() after "
                               f"backward before {what} (the buckets stepped in backward "
                               "and the rest are not consistent until then)")

    # ------------------------------------------------------------------ state dicts
    def _host_indices(self):
        """(bucket, global index of each of its params) in order."""
        index = 0
        for buckets in self._buckets:
            for b in buckets:
                yield b, list(range(index, index + len(b.params)))
                index += len(b.params)

    def state_dict(self) -> dict:
        """The ``optimizer`` class's format over this optimizer's params."""
        self._refuse_mid_step("state_dict()")
        self._push_groups()  # (changes since the last step: a scheduler's lr)
        state = {}
        groups = [{**{k: v for k, v in group.items() if k not in _NOT_HYPERS}, "params": [],
                   **({"param_names": group["param_names"]} if "param_names" in group else {})}
                  for group in self.param_groups]
        where = {id(b): i for i, buckets in enumerate(self._buckets) for b in buckets}
        for b, indices in self._host_indices():
            d = b.host.state_dict()
            for local, index in enumerate(indices):
                if local in d["state"]:
                    state[index] = d["state"][local]
            group = groups[where[id(b)]]
            if not group["params"]:  # (the host's group values: its schedule saved as such)
                group.update({k: v for k, v in d["param_groups"][0].items() if k != "params"})
            group["params"].extend(indices)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """A dict of this class or of the ``optimizer`` class (the same params, in order).
        The device params are left as they are (with remainders they are written from the
        loaded master, as without offload); the host first takes those changed on the device
        since its last step (a model loaded before the optimizer)."""
        self._refuse_mid_step("load_state_dict()")
        for buckets in self._buckets:  # (the host params are read by copies in flight)
            for b in buckets:
                if b.h2d_done is not None:
                    self._transfers.synchronize(b.h2d_done)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't "
                                 "match the size of optimizer's group")
        ids = [i for g in saved_groups for i in g["params"]]
        where = {id(b): i for i, buckets in enumerate(self._buckets) for b in buckets}
        for buckets in self._buckets:  # (the model's params loaded first, as a resume does:
            for b in buckets:  # the host takes their values before its state is loaded)
                changed = b.changed_on_device()
                if changed:
                    b.take_device_params(changed, keep_equal=True)
        backups = []  # (a failed load puts back the buckets already loaded)
        try:
            for b, indices in self._host_indices():
                saved = saved_groups[where[id(b)]]
                part = {"state": {local: state_dict["state"][ids[index]]
                                  for local, index in enumerate(indices)
                                  if ids[index] in state_dict["state"]},
                        "param_groups": [{**{k: v for k, v in saved.items()
                                             if k not in _NOT_HYPERS},
                                          "params": list(range(len(indices)))}]}
                backup = (b, b.host.state_dict(), [hp.detach().clone()
                                                   for hp in b.host_params])
                b.host.load_state_dict(part)
                backups.append(backup)
        except BaseException:
            with torch.no_grad():
                for b, d, values in backups:  # (the params first: a saved master, if
                    for hp, v in zip(b.host_params, values, strict=True):  # any, then
                        hp.copy_(v)  # writes them exactly, remainders included)
                    b.host.load_state_dict(d)
            raise
        with torch.no_grad():
            for buckets in self._buckets:
                for b in buckets:
                    # with remainders the loaded master writes the params, as without
                    # offload; otherwise the load leaves the device's params as they are,
                    # and a float32 master's host params become its rounding, what its
                    # next step would write: a model loaded after the optimizer (with the
                    # params saved with that master) then keeps the master (``keep_equal``)
                    for hb in b.host._buckets[0]:
                        if hb.master is not None:
                            hb.flat.copy_(hb.master)
                    if any(hb.remainder is not None for hb in b.host._buckets[0]):
                        for p, hp in zip(b.params, b.host_params, strict=True):
                            p.copy_(hp)
                    b.remember_versions()
        self._pull_groups()

    def __getstate__(self):
        raise TypeError("CPUOffload cannot be copied or pickled (hooks on the model's params, "
                        "a worker thread, pinned host buffers): save and load its "
                        "state_dict() instead")

    def __del__(self):
        for hook in getattr(self, "_hooks", ()):
            hook.remove()
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.shutdown(wait=False)


#: a param group's keys that are not hyperparameters
_NOT_HYPERS = ("params", "param_names")


def _on_grad(ref: weakref.ref, group: int, index: int, param: torch.Tensor) -> None:
    """``param`` of bucket ``index`` of ``group`` has its gradient of this backward: copy the
    bucket's gradients once all its params have theirs (and with step_in_backward, submit
    its CPU step, which frees them: no hook may come after this one)."""
    opt = ref()
    if opt is None:
        return
    if opt.step_in_backward:
        check_hook_last(param, opt._hook_ids[id(param)])
    b = opt._buckets[group][index]
    if b.arrived == 0:
        b.expected = sum(p.requires_grad for p in b.params)
    b.arrived += 1
    if opt.step_in_backward:  # (what backward left, for a bucket that completes at step();
        b.hooked[id(param)] = (param.grad, param.grad._version)  # cleared when it does,
    if b.arrived >= b.expected:  # so that the released gradients are freed)
        if opt.step_in_backward:  # (refused before its gradients are copied over the ones
            b.hooked.clear()  # its running step reads)
            opt._refuse_second_backward(b)
            opt._copy_grads(b, release=True)
            opt._step_now(b)
        else:
            opt._copy_grads(b)
