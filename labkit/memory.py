"""Memory anatomy of one rank: live tensor bytes by category, with the peak and a timeline.

    with labkit.MemoryTracer(model, optimizer) as mem:
        bucket = mem.tag(torch.zeros(n), "comm")   # your own buffers: say what they are
        loss = model(x).sum(); loss.backward(); optimizer.step()
    mem.peak, mem.peak_event, mem.current, mem.timeline
    return mem.report()                            # from a rank: a small plain dict

How it works, in three pieces of plain torch:
1. A ``TorchDispatchMode`` sees every aten op run inside the ``with``. Each tensor going in or out
   is registered by its *storage* (views share their storage, so a buffer is counted once), with a
   weak reference that reports when torch frees the storage.
2. ``torch.autograd.graph.saved_tensors_hooks`` marks the storages autograd saves for backward
   (the activations) and unmarks them when autograd lets go of them.
3. The roles come from the objects that own the storages: ``model.parameters()``, ``p.grad``,
   ``optimizer.state``, and the tags the learner puts on their own buffers with ``mem.tag``.

A storage has exactly one category; the first rule that applies wins:
    tag > params > grads > optimizer > activations (saved for backward) > other
A tag wins because it is the learner saying what a buffer is: a parameter that is a view into a
flat buffer tagged "comm" counts as comm, so tag a flat parameter buffer "params".

Categories are kept current as things happen, so recording a new peak costs a copy of six
numbers: tags when you set them; saves, releases and grads (a post-accumulate-grad hook) by the
next op; parameters, grads and optimizer state you assign yourself when the tracer re-reads the
owners, at each mark (start of the ``with``, end of each forward, start and end of each
``optimizer.step()``, reading ``current``; the end of a forward, which comes every step, re-reads
parameters and grads only, on the modules found at the last other mark). Optimizer state is created inside ``step()``, where no
hook sees it: found when ``step()`` returns, it counts as optimizer state from its creation in the
peak too (the timeline shows what was known at each op).

Not seen: scratch memory inside one op, memory that is no tensor (gloo/NCCL internals, the CUDA
caching allocator's rounding and caches: compare with ``cuda_peak``), sparse tensors, and a tensor
made before the ``with`` that no op, model or optimizer touches. A storage resized behind the ops'
back (``storage.resize_``, as FSDP does) is re-read when an op uses it, at a mark, and, once it
was seen to change size, before every new peak. Activation checkpointing
(``torch.utils.checkpoint``, ``use_reentrant=False``) saves each checkpoint's inputs through
autograd, which counts as "activations"; what it recomputes during backward goes through saved-
tensor hooks of its own and counts as "other". Use one tracer at a time.

PyTorch's memory viewer: ``mem.snapshot("mem.pickle")`` writes the run in the format of
``torch.cuda.memory._snapshot()`` (see ``labkit.memory_snapshot``), which pytorch.org/memory_viz
opens. For that the timeline also logs each storage's changes of size and category, a tuple per
change; ``stacks=True`` adds the Python stack of each op that changed the books (slower).

Threads: autograd, DDP's hooks and gloo's callbacks run on threads of their own, and torch frees a
storage on whichever thread lets go of it last. So the books change only under one lock, and
whatever happens outside an op (a storage freed, a tensor saved for backward or released, a grad
written) is only noted, in a thread-safe queue, and booked in order by the next op, mark or read,
before it looks at the totals. A finaliser can fire on any thread at any allocation (garbage
collection), even inside the locked code: noting never waits, so it cannot deadlock.
"""
import collections
import itertools
import sys
import threading
import weakref

import torch

from labkit import _torch_private
from labkit._torch_private import (DispatchMode, current_autograd_node, detach_unseen,
                                   inner_tensors, is_traceable_wrapper_subclass, tensor_version)

CATEGORIES = ("params", "grads", "optimizer", "activations", "comm", "other")
_TENSOR, _PARAMETER = torch.Tensor, torch.nn.Parameter
_SCALARS = {int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
            torch.memory_format}
_EVENTS = {}  # (phase, id(op)) -> (op, "forward aten.addmm.default"): str(op) parses the schema
# A view shares its input's storage, so it changes no bytes and is skipped, except lift_fresh:
# a tensor made from data (torch.tensor(0.0), Adam's step) reaches the dispatcher only as that.
_LIFT_FRESH = torch.ops.aten.lift_fresh.default
_RELEASED, _GRAD = "released", "grad"  # the kinds of notes that are (kind, object) pairs
_OWN_FILES = {__file__, _torch_private.__file__}  # frames left out of the stacks (_python_stack)
_ACTIVE = weakref.WeakSet()  # tracers inside their ``with``: ``%ranks status`` reads them


def active_tracers() -> list:
    """The tracers of this process that are inside their ``with`` now."""
    return list(_ACTIVE)


def _storages(obj):
    """The storages behind the tensors in nested args/outputs. A wrapper subclass (DTensor) gives
    its inner tensors' storages; a sparse tensor has none we can see."""
    stack, found = [obj], []
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is _TENSOR or kind is _PARAMETER or (
                isinstance(item, _TENSOR) and not is_traceable_wrapper_subclass(item)):
            try:
                found.append(item.untyped_storage())
            except (RuntimeError, NotImplementedError):
                pass
        elif kind in _SCALARS:
            continue
        elif isinstance(item, _TENSOR):
            stack.extend(inner_tensors(item))
        elif isinstance(item, torch.UntypedStorage):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def _op_storages(args, kwargs, out):
    """``_storages((args, kwargs, out))`` for one op, about twice as fast: it runs for every op,
    and most arguments are plain tensors or numbers (``isinstance`` with Tensor is slow)."""
    try:
        found = []
        for item in args:
            kind = type(item)
            if kind is _TENSOR or kind is _PARAMETER:
                found.append(item.untyped_storage())
            elif kind not in _SCALARS:
                found += _storages(item)
        if kwargs:
            found += _storages(kwargs)
        if type(out) is _TENSOR:
            found.append(out.untyped_storage())
        else:
            found += _storages(out)
        return found
    except (RuntimeError, NotImplementedError):  # a sparse tensor: the slow path skips it
        return _storages((args, kwargs, out))


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _python_stack():
    """[(filename, line, function), ...] of the Python frames here, innermost first, less the
    tracer's own: where the op that is being booked was called from."""
    stack, frame = [], sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_filename not in _OWN_FILES:
            stack.append((code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    return stack


class _Entry(weakref.ref):
    """One live storage, and the weak reference to it (``entry()`` is the storage, or None once
    torch freed it): its bytes, what it is, and when it was made and last changed (counts of
    changes to the books, see ``_move``). One object per storage: there are many."""
    __slots__ = ("key", "nbytes", "tag", "role", "saved", "category", "born", "since", "serial")
    __hash__, __eq__ = object.__hash__, object.__eq__  # an entry is itself, not its storage


class _Saved:
    """What autograd keeps for a saved tensor; its death means autograd no longer needs it."""
    __slots__ = ("tensor", "version", "entry", "notes", "__weakref__")

    def __del__(self):
        if self.entry is not None:  # set when the save was booked
            self.notes.append((_RELEASED, self.entry))  # booked later, under the lock (_settle)


class _SavedRef(weakref.ref):
    """The note of a save: weak, so that a note waiting to be booked keeps no memory alive."""
    __slots__ = ()


class _Mode(DispatchMode):
    def __init__(self, tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is _LIFT_FRESH or not getattr(func, "is_view", False):
            self.tracer._after_op(func, _op_storages(args, kwargs, out))
        return out


class MemoryTracer:
    """Live tensor bytes of this process by category, inside a ``with`` block.

    model, optimizer: a module / optimizer, a list of them, or None. Their parameters, grads and
        state count from the start, though they were allocated before the ``with``.
    device: count only storages on this device type ("cpu", "cuda"); None counts all.
    timeline: record (event, total, by category) after each op that changed the total, and
        each storage's changes, for ``snapshot()``.
    stacks: with the timeline, note the Python stack of every op that changed a storage, for
        ``snapshot()`` (costs a walk up the stack per such op: off by default).
    fake: count storages on the meta device too. A meta tensor holds no memory, so they are
        skipped, but a fake tensor's storage (``FakeTensorMode``) is one: ``labkit.simulate``
        measures fake tensors with ``fake=True``.

    After the ``with``: ``peak`` and ``current`` (bytes by category), ``peak_total``,
    ``peak_event`` (the phase and op that reached the peak), ``timeline``, and on CUDA
    ``cuda_allocated`` / ``cuda_peak`` from torch's allocator (None without CUDA).
    """

    def __init__(self, model=None, optimizer=None, *, device=None, timeline=True, fake=False,
                 stacks=False):
        self.models, self.optimizers = _as_list(model), _as_list(optimizer)
        self.device, self.record, self.fake, self.stacks = device, timeline, fake, stacks
        self._log = self._storage_log = None  # storage changes, for snapshot(): _start_log
        self._logged = 0                      # len(self._log) when the last op was named
        self._serials = itertools.count()     # a number per entry, never reused: the log's key
        self._live, self._bytes, self._total = {}, dict.fromkeys(CATEGORIES, 0), 0
        self._resizable = set()            # entries seen to change size behind the ops' back
        self._lock = threading.RLock()     # around every change to the books
        self._notes = collections.deque()  # what happened outside ops, to book (see _settle)
        self._note = self._notes.append     # what an entry's weak reference calls as it dies
        self._seq = self._peak_seq = 0     # changes to the books so far; that count at the peak
        self._step_seq = None              # that count when the current optimizer.step began
        self._active, self._handles, self._contexts, self._phase = False, [], [], ""
        self.timeline, self.peak, self.peak_total, self.peak_event = [], {}, 0, None
        self.cuda_allocated = self.cuda_peak = self._final = None
        self._param_dicts = None           # the models' modules' parameter dicts (_params)

    def tag(self, tensor, category="comm"):
        """Put ``category`` on the whole storage behind ``tensor`` (a tensor, a view, a list of
        them or an UntypedStorage); None removes the tag. For flat buffers, buckets, shards."""
        if category is not None and category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES} or None, not {category!r}")
        with self._lock:
            self._settle()
            for entry in self._entries(tensor):
                entry.tag = category
                self._recategorize(entry)
        return tensor

    def tag_ddp_buckets(self, ddp_model, category="comm"):
        """Tag torch DDP's gradient buckets: by default a second copy of the grads (4Ψ in fp32).

        DDP shows its buckets only to a communication hook, so this installs one that tags the
        bucket, then all-reduces it as DDP does by default. A model takes one hook: if you have
        your own, call ``mem.tag(bucket.buffer(), "comm")`` in it instead. The tags start with
        the first backward. With ``gradient_as_bucket_view=True`` the buckets *are* the grads,
        and they are tagged "grads" (they stay allocated after ``zero_grad``)."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        as_grads = ddp_model.gradient_as_bucket_view

        def tag_then_allreduce(process_group, bucket):
            self.tag(bucket.buffer(), "grads" if as_grads else category)
            return allreduce_hook(process_group, bucket)
        ddp_model.register_comm_hook(ddp_model.process_group, tag_then_allreduce)

    @property
    def current(self):
        """Bytes by category now (after the ``with``: at its end)."""
        with self._lock:
            self._settle()
            if self._active:
                self._refresh()
            return dict(self._final if self._final is not None else self._bytes)

    def snapshot(self, path=None) -> dict:
        """The run in the format of ``torch.cuda.memory._snapshot()``: the storages alive at the
        end (``"segments"``) and every allocation and free in order (``"device_traces"``), each
        with its category and the op that made or freed it. ``path``: also write it as a pickle.

        Open the file at https://pytorch.org/memory_viz ("Active Memory Timeline"), or make a
        page offline with ``torch.cuda._memory_viz.trace_plot(mem.snapshot())``. The format and
        what differs on a CPU: ``labkit.memory_snapshot``. Needs ``timeline=True`` (the default).
        """
        from labkit import memory_snapshot
        with self._lock:
            if self._log is None and self._storage_log is None:
                raise ValueError("snapshot() needs the storage log that MemoryTracer(..., "
                                 "timeline=True) keeps (the default); this tracer has "
                                 "timeline=False, or was never entered")
            log = list(self._log if self._log is not None else self._storage_log)
        snapshot = memory_snapshot.from_log(log)
        if path is not None:
            memory_snapshot.save(snapshot, path)
        return snapshot

    def report(self, timeline=False):
        """A plain dict (ints and strings) to return from a rank and gather in the notebook."""
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        out = {"rank": rank, "peak": dict(self.peak), "peak_total": self.peak_total,
               "peak_event": self.peak_event, "current": self.current,
               "cuda_allocated": self.cuda_allocated, "cuda_peak": self.cuda_peak}
        return dict(out, timeline=list(self.timeline)) if timeline else out

    def __enter__(self):
        if self._active:
            raise RuntimeError("this MemoryTracer is already active")
        self._active, self.timeline, self._final = True, [], None
        _ACTIVE.add(self)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        for model in self.models:
            self._handles += [model.register_forward_pre_hook(self._forward_starts),
                              model.register_forward_hook(self._forward_ends, always_call=True)]
        for opt in self.optimizers:
            self._handles += [opt.register_step_pre_hook(self._step_starts),
                              opt.register_step_post_hook(self._step_ends)]
        for p in self._params():
            if p.requires_grad and p.is_leaf:
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_ready))
        with self._lock:
            self._settle()
            self._start_log()
            self._refresh()
            self.peak, self.peak_total, self.peak_event = dict(self._bytes), self._total, "enter"
            self._peak_seq = self._seq
            self._mark("enter")
        self._contexts = [torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack),
                          _Mode(self)]
        for context in self._contexts:
            context.__enter__()
        return self

    def __exit__(self, *exc):
        for context in reversed(self._contexts):
            context.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles, self._contexts = [], []
        with self._lock:
            self._settle()
            self._refresh()
            self._mark("exit")
            self._active, self._final = False, dict(self._bytes)
            self._storage_log, self._log = self._log, None
        _ACTIVE.discard(self)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda_allocated = torch.cuda.memory_allocated()
            self.cuda_peak = torch.cuda.max_memory_allocated()

    def __repr__(self):
        mib = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in self.peak.items())
        return f"MemoryTracer(peak {self.peak_total / 2**20:.2f} MiB at {self.peak_event}: {mib})"

    # ---- the books: changed only under self._lock; _move is the one place bytes change ----
    def _move(self, entry, nbytes, category):
        self._bytes[entry.category] -= entry.nbytes
        self._total += nbytes - entry.nbytes
        self._bytes[category] += nbytes
        entry.nbytes, entry.category = nbytes, category
        self._seq += 1
        entry.since = self._seq
        if self._log is not None:   # numbers and strings: it keeps no entry alive, nor the GC busy
            self._log.append((entry.serial, nbytes, category))

    def _register(self, storage):
        """The entry of a live storage: made on first sight, its size re-read (resize_)."""
        key = id(storage)  # one Python object per live storage, kept as long as the storage
        entry = self._live.get(key)
        if entry is not None and entry() is not storage:  # a dead storage's id, reused
            self._drop(entry)
            entry = None
        new = entry is None
        if new:
            if self.device is not None or (not self.fake and not storage.data_ptr()):  # meta: 0
                device = storage.device.type  # (slower than the rest of this function together)
                if (device == "meta" and not self.fake) or self.device not in (None, device):
                    return None
            entry = self._live[key] = _Entry(storage, self._note)  # its death: a note
            entry.key, entry.nbytes, entry.saved, entry.tag, entry.role = key, 0, 0, None, None
            entry.category, entry.born, entry.since = "other", self._seq + 1, self._seq
            entry.serial = next(self._serials)
        nbytes = storage.nbytes()
        if nbytes != entry.nbytes:
            if not new:
                self._resizable.add(entry)
            self._move(entry, nbytes, entry.category)
        return entry

    def _entries(self, obj):
        """The entries of the storages behind the tensors (or storages) in ``obj``."""
        return [entry for entry in map(self._register, _storages(obj)) if entry is not None]

    def _tensor_entries(self, tensors):
        """``_entries`` of a flat list of tensors (or None), faster: marks read every parameter
        and grad, and a plain tensor already booked at its size costs a lookup."""
        live, found = self._live, []
        for tensor in tensors:
            kind = type(tensor)
            if kind is _TENSOR or kind is _PARAMETER:
                try:
                    storage = tensor.untyped_storage()
                except (RuntimeError, NotImplementedError):  # sparse: no storage we can see
                    continue
                entry = live.get(id(storage))
                if entry is None or entry() is not storage or entry.nbytes != storage.nbytes():
                    entry = self._register(storage)
                if entry is not None:
                    found.append(entry)
            elif tensor is not None:
                found += self._entries(tensor)
        return found

    def _drop(self, entry):
        """Book the death of an entry's storage, once."""
        if self._live.get(entry.key) is entry:
            del self._live[entry.key]
            self._resizable.discard(entry)
            self._move(entry, 0, entry.category)

    def _settle(self):
        """Book, in the order they happened, the notes left outside ops (module docstring)."""
        notes = self._notes
        while notes:
            note = notes.popleft()
            if type(note) is _Entry:  # its weak reference's callback: the storage died
                self._drop(note)
            elif type(note) is _SavedRef:  # autograd saved a tensor for backward
                self._book_save(note())
            elif note[0] is _RELEASED:  # autograd let go of a saved tensor
                self._book_release(note[1])
            else:  # (_GRAD, parameter): autograd wrote its grad
                self._book_grad(note[1])

    def _book_save(self, saved):
        if saved is None:  # released before it was booked, nothing to do
            return
        for entry in self._tensor_entries((saved.tensor,))[:1]:
            saved.entry, entry.saved = entry, entry.saved + 1
            self._recategorize(entry)

    def _book_release(self, entry):
        entry.saved -= 1
        self._recategorize(entry)

    def _book_grad(self, param):
        for entry in self._tensor_entries((param.grad,)):
            entry.role = entry.role or "grads"
            self._recategorize(entry)

    def _recategorize(self, entry):
        category = entry.tag or entry.role or ("activations" if entry.saved else "other")
        if category != entry.category and entry() is not None:
            self._move(entry, entry.nbytes, category)

    def _params(self, rescan=True):
        """Every parameter of the models and optimizers. ``rescan=False`` reuses the modules
        found at the last scan (walking a deep model's tree is most of the cost of a mark); a
        parameter set on one of them later, even a new one, is still found."""
        if rescan or self._param_dicts is None:
            self._param_dicts = [module._parameters for model in self.models
                                 for module in model.modules()]
        params = {id(p): p for owned in self._param_dicts for p in owned.values()
                  if p is not None}
        params.update((id(p), p) for opt in self.optimizers
                      for group in opt.param_groups for p in group["params"])
        return list(params.values())

    def _roles(self, full=True):
        """{entry: role}, read from the owners: parameters, their grads, optimizer state
        (``full=False``: parameters and grads only, from the last scan's modules)."""
        params = self._params(rescan=full)
        roles = {}
        for role, entries in (("params", self._tensor_entries(params)),
                              ("grads", self._tensor_entries([p.grad for p in params]))):
            for entry in entries:
                roles.setdefault(entry, role)
        if full:
            for entry in self._entries([opt.state for opt in self.optimizers]):
                roles.setdefault(entry, "optimizer")
        return roles

    def _refresh(self, full=True):
        """Re-read who owns what (parameters, their grads, optimizer state: new in step 1) and
        every size (a learner may free a buffer with ``storage.resize_(0)``, as FSDP does).
        ``full=False`` (the end of a forward, on every step) keeps the optimizer roles, which
        change only in ``step()``, and the modules of the last scan (see ``_params``)."""
        roles = self._roles(full)
        for entry in list(self._live.values()):
            if (storage := entry()) is not None:
                if storage.nbytes() != entry.nbytes:
                    self._resizable.add(entry)
                    self._move(entry, storage.nbytes(), entry.category)
                role = roles.get(entry)
                if role is None and not full and entry.role == "optimizer":
                    continue
                if role != entry.role:
                    entry.role = role
                    self._backdate(entry)
                    self._recategorize(entry)

    def _backdate(self, entry):
        """Optimizer state found as ``step()`` returns counts as such in a peak reached during
        that step, if it was made in the step before the peak and has not changed since."""
        category = entry.tag or entry.role
        if (entry.role == "optimizer" and category != entry.category
                and self._step_seq is not None and self._step_seq < entry.born
                and entry.since <= self._peak_seq):
            self.peak[entry.category] -= entry.nbytes
            self.peak[category] += entry.nbytes

    def _after_op(self, func, storages):
        """Book what one op touched; a new peak is a copy of six numbers. The hot path: a
        storage already booked at its current size costs a lookup."""
        live = self._live
        with self._lock:
            if self._notes:
                self._settle()
            for storage in storages:
                entry = live.get(id(storage))
                if entry is None or entry.nbytes != storage.nbytes() or entry() is not storage:
                    self._register(storage)
            event = None
            if self._total > self.peak_total:
                if self._resizable:
                    self._reread_resizable()
                if self._total > self.peak_total:
                    event = self._event(func)
                    self.peak, self.peak_total = dict(self._bytes), self._total
                    self._peak_seq, self.peak_event = self._seq, event
            if self.record and self.timeline[-1][1] != self._total:
                event = event or self._event(func)
                self.timeline.append((event, self._total, dict(self._bytes)))
            if self._log is not None and len(self._log) != self._logged:
                self._name_changes(event or self._event(func))

    def _reread_resizable(self):
        """Sizes that may have changed without an op (FSDP frees with ``storage.resize_(0)``)."""
        for entry in list(self._resizable):
            if (storage := entry()) is not None and storage.nbytes() != entry.nbytes:
                self._move(entry, storage.nbytes(), entry.category)

    def _event(self, func):
        """"forward aten.addmm.default", "backward aten.mm.default", "optimizer.step ..."."""
        phase = self._phase
        if phase != "optimizer.step" and current_autograd_node() is not None:
            phase = "backward"
        known = _EVENTS.get((phase, id(func)))  # by id: an op's own hash is Python code
        if known is None or known[0] is not func:
            known = _EVENTS[phase, id(func)] = (func, f"{phase} {func}".lstrip())
        return known[1]

    def _mark(self, event):
        if self.record:
            self.timeline.append((event, self._total, dict(self._bytes)))
        if self._log is not None and len(self._log) != self._logged:
            self._name_changes(event)

    # ---- the storage log, for snapshot(): (serial, nbytes, category) per change of the books,
    # then (event, stack) naming the op or mark that made the changes before it ----
    def _start_log(self):
        """Start the log with the storages already booked (a tracer entered a second time)."""
        self._log, self._logged = ([] if self.record else None), 0
        if self._log is not None:
            self._log += [(entry.serial, entry.nbytes, entry.category)
                          for entry in self._live.values() if entry.nbytes]

    def _name_changes(self, event):
        self._log.append((event, _python_stack() if self.stacks else None))
        self._logged = len(self._log)

    # ---- hooks: they name the phase; at a mark they re-read the owners and record ----
    def _forward_starts(self, *_):
        self._phase = "forward"

    def _forward_ends(self, *_):
        self._phase = ""
        self._marked("after forward", full=False)

    def _step_starts(self, *_):
        self._phase = "optimizer.step"
        with self._lock:
            self._marked("before optimizer.step")
            self._step_seq = self._seq

    def _step_ends(self, *_):
        self._phase = ""
        with self._lock:
            self._marked("after optimizer.step")  # finds new state, backdates it (_backdate)
            self._step_seq = None

    def _marked(self, event, full=True):
        with self._lock:
            self._settle()
            self._refresh(full)
            self._mark(event)

    def _grad_ready(self, param):
        """Autograd wrote ``param.grad``: it counts as grads from the next op on, not from the
        next mark. Noted only: this runs on autograd's thread (see _settle)."""
        self._notes.append((_GRAD, param))

    def _pack(self, tensor):
        """Autograd saves ``tensor`` for backward: noted, booked as activations by the next op
        (see _settle), which is before any op could reach a peak."""
        saved = _Saved()
        saved.entry, saved.notes, saved.version = None, self._notes, tensor_version(tensor)
        # A tensor made by autograd (grad_fn) may be the output of the node that saves it: keep
        # a detached alias, or node and tensor would hold each other (a cycle, freed late).
        saved.tensor = tensor if tensor.grad_fn is None else detach_unseen(tensor)
        self._notes.append(_SavedRef(saved))
        return saved

    @staticmethod
    def _unpack(saved):
        if tensor_version(saved.tensor) != saved.version:  # the check autograd makes without hooks
            raise RuntimeError("one of the variables needed for gradient computation has been "
                               "modified by an inplace operation (seen by labkit.MemoryTracer)")
        return saved.tensor
