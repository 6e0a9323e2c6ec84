"""Memory anatomy of one rank: live tensor bytes by category, with the peak and a timeline.

    with labkit.MemoryTracer(model, optimizer) as mem:
        bucket = mem.tag(torch.zeros(n), "comm")   # your own buffers: say what they are
        loss = model(x).sum(); loss.backward(); optimizer.step()
    mem.peak, mem.peak_event, mem.current, mem.timeline
    return mem.report()                            # from a rank: a small plain dict

How it works, in three pieces of plain torch:
1. A ``TorchDispatchMode`` sees every aten op run inside the ``with``. Each tensor going in or out
   is registered by its *storage* (views share their storage, so a buffer is counted once), with a
   weak reference whose callback subtracts the bytes the moment torch frees the storage.
2. ``torch.autograd.graph.saved_tensors_hooks`` marks the storages autograd saves for backward
   (the activations) and unmarks them when autograd lets go of them.
3. The roles come from the objects that own the storages: ``model.parameters()``, ``p.grad``,
   ``optimizer.state``, and the tags the learner puts on their own buffers with ``mem.tag``.

A storage has exactly one category; the first rule that applies wins:
    tag > params > grads > optimizer > activations (saved for backward) > other
A tag wins because it is the learner saying what a buffer is: a parameter that is a view into a
flat buffer tagged "comm" counts as comm, so tag a flat parameter buffer "params".

Not seen: scratch memory inside one op, memory that is no tensor (gloo/NCCL internals, the CUDA
caching allocator's rounding and caches: compare with ``cuda_peak``), sparse tensors, and a tensor
made before the ``with`` that no op, model or optimizer touches. Activation checkpointing installs
its own saved-tensor hooks, so what it keeps counts as "other". Use one tracer at a time.
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

CATEGORIES = ("params", "grads", "optimizer", "activations", "comm", "other")


def _storages(obj):
    """The storages behind the tensors in nested args/outputs. A wrapper subclass (DTensor) gives
    its inner tensors' storages; a sparse tensor has none we can see."""
    stack, found = [obj], []
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if type(item) is not torch.Tensor and is_traceable_wrapper_subclass(item):
                stack.extend(getattr(item, name) for name in item.__tensor_flatten__()[0])
                continue
            try:
                found.append(item.untyped_storage())
            except (RuntimeError, NotImplementedError):
                pass
        elif isinstance(item, torch.UntypedStorage):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


class _Entry:
    """One live storage: its bytes, the weak reference that reports its death, what it is."""
    __slots__ = ("nbytes", "ref", "tag", "role", "saved", "category")


class _Saved:
    """What autograd keeps for a saved tensor; its death means autograd no longer needs it."""
    __slots__ = ("tensor", "version", "entry", "tracer")

    def __del__(self):
        if self.entry is not None:
            self.entry.saved -= 1
            self.tracer._recategorize(self.entry)


class _Mode(TorchDispatchMode):
    def __init__(self, tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tracer._after_op(func, (args, kwargs, out))
        return out


class MemoryTracer:
    """Live tensor bytes of this process by category, inside a ``with`` block.

    model, optimizer: a module / optimizer, a list of them, or None. Their parameters, grads and
        state count from the start, though they were allocated before the ``with``.
    device: count only storages on this device type ("cpu", "cuda"); None counts all.
    timeline: record (event, total, by category) after each op that changed the total.

    After the ``with``: ``peak`` and ``current`` (bytes by category), ``peak_total``,
    ``peak_event`` (the phase and op that reached the peak), ``timeline``, and on CUDA
    ``cuda_allocated`` / ``cuda_peak`` from torch's allocator (None without CUDA).
    """

    def __init__(self, model=None, optimizer=None, *, device=None, timeline=True):
        self.models, self.optimizers = _as_list(model), _as_list(optimizer)
        self.device, self.record = device, timeline
        self._live, self._bytes, self._total = {}, dict.fromkeys(CATEGORIES, 0), 0
        self._active, self._handles, self._contexts, self._phase = False, [], [], ""
        self.timeline, self.peak, self.peak_total, self.peak_event = [], {}, 0, None
        self.cuda_allocated = self.cuda_peak = self._final = None

    def tag(self, tensor, category="comm"):
        """Put ``category`` on the whole storage behind ``tensor`` (a tensor, a view, a list of
        them or an UntypedStorage); None removes the tag. For flat buffers, buckets, shards."""
        if category is not None and category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES} or None, not {category!r}")
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
        if self._active:
            self._refresh()
        return dict(self._final if self._final is not None else self._bytes)

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
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        for model in self.models:
            self._handles += [model.register_forward_pre_hook(self._hook("forward")),
                              model.register_forward_hook(self._hook("", "after forward"),
                                                          always_call=True)]
        for opt in self.optimizers:
            self._handles += [
                opt.register_step_pre_hook(self._hook("optimizer.step", "before optimizer.step")),
                opt.register_step_post_hook(self._hook("", "after optimizer.step"))]
        for p in self._params():
            if p.requires_grad and p.is_leaf:
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_ready))
        self._refresh()
        self.peak, self.peak_total, self.peak_event = dict(self._bytes), self._total, "enter"
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
        self._refresh()
        self._mark("exit")
        self._active, self._final = False, dict(self._bytes)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda_allocated = torch.cuda.memory_allocated()
            self.cuda_peak = torch.cuda.max_memory_allocated()

    def __repr__(self):
        mib = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in self.peak.items())
        return f"MemoryTracer(peak {self.peak_total / 2**20:.2f} MiB at {self.peak_event}: {mib})"

    # ---- bookkeeping: _move is the one place where the byte counts change ----
    def _move(self, entry, nbytes, category):
        self._bytes[entry.category] -= entry.nbytes
        self._total += nbytes - entry.nbytes
        self._bytes[category] += nbytes
        entry.nbytes, entry.category = nbytes, category

    def _register(self, storage):
        """The entry of a live storage: made on first sight, its size re-read (resize_)."""
        key = id(storage)  # one Python object per live storage, kept as long as the storage
        entry = self._live.get(key)
        if entry is None:
            if storage.device.type == "meta" or self.device not in (None, storage.device.type):
                return None
            entry = self._live[key] = _Entry()
            entry.nbytes, entry.saved, entry.tag, entry.role = 0, 0, None, None
            entry.category = "other"
            entry.ref = weakref.ref(storage, lambda _, key=key: self._drop(key))
        if storage.nbytes() != entry.nbytes:
            self._move(entry, storage.nbytes(), entry.category)
        return entry

    def _entries(self, obj):
        """The entries of the storages behind the tensors (or storages) in ``obj``."""
        return [entry for entry in map(self._register, _storages(obj)) if entry is not None]

    def _drop(self, key):
        entry = self._live.pop(key, None)
        if entry is not None:
            self._move(entry, 0, entry.category)

    def _recategorize(self, entry):
        category = entry.tag or entry.role or ("activations" if entry.saved else "other")
        if category != entry.category and entry.ref() is not None:
            self._move(entry, entry.nbytes, category)

    def _params(self):
        params = {id(p): p for model in self.models for p in model.parameters()}
        params.update((id(p), p) for opt in self.optimizers
                      for group in opt.param_groups for p in group["params"])
        return list(params.values())

    def _refresh(self):
        """Re-read who owns what (parameters, their grads, optimizer state: new in step 1) and
        every size (a learner may free a buffer with ``storage.resize_(0)``, as FSDP does)."""
        params = self._params()
        owners = [("params", params), ("grads", [p.grad for p in params]),
                  ("optimizer", [opt.state for opt in self.optimizers])]
        roles = {}
        for role, objects in owners:
            for entry in self._entries(objects):
                roles.setdefault(entry, role)
        for entry in list(self._live.values()):
            if (storage := entry.ref()) is not None:
                if storage.nbytes() != entry.nbytes:
                    self._move(entry, storage.nbytes(), entry.category)
                entry.role = roles.get(entry)
                self._recategorize(entry)

    def _after_op(self, func, tensors):
        for storage in _storages(tensors):
            self._register(storage)
        if self._total > self.peak_total:
            self._refresh()  # the peak's breakdown must be exact, not a guess made earlier
            if self._total > self.peak_total:
                self.peak, self.peak_total = dict(self._bytes), self._total
                self.peak_event = self._event(func)
        if self.record and (not self.timeline or self.timeline[-1][1] != self._total):
            self._mark(self._event(func))

    def _event(self, func):
        """"forward aten.addmm.default", "backward aten.mm.default", "optimizer.step ..."."""
        phase = self._phase
        if phase != "optimizer.step" and torch._C._current_autograd_node() is not None:
            phase = "backward"
        return f"{phase} {func}".lstrip()

    def _mark(self, event):
        if self.record:
            self.timeline.append((event, self._total, dict(self._bytes)))

    # ---- hooks ----
    def _hook(self, phase, mark=None):
        """A module/optimizer hook: names the phase; at a mark, re-reads roles and records."""
        def hook(*_):
            self._phase = phase
            if mark:
                self._refresh()
                self._mark(mark)
        return hook

    def _grad_ready(self, param):
        """Grads count as grads as soon as autograd writes them, not at the next mark."""
        for entry in self._entries(param.grad):
            entry.role = entry.role or "grads"
            self._recategorize(entry)

    def _pack(self, tensor):
        saved = _Saved()  # keeps a detached alias: the tensor itself (grad_fn) would make a cycle
        saved.tensor, saved.version, saved.tracer = tensor.detach(), tensor._version, self
        entries = self._entries(tensor)
        saved.entry = entries[0] if entries else None
        if saved.entry is not None:
            saved.entry.saved += 1
            self._recategorize(saved.entry)
        return saved

    @staticmethod
    def _unpack(saved):
        if saved.tensor._version != saved.version:  # the check autograd makes without hooks
            raise RuntimeError("one of the variables needed for gradient computation has been "
                               "modified by an inplace operation (seen by labkit.MemoryTracer)")
        return saved.tensor
