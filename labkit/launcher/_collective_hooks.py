"""Inside a rank: note every ``torch.distributed`` call in the collective record as it starts.

``install`` replaces the public functions of ``torch.distributed`` (``all_reduce``, ``broadcast``,
``send``, ``recv``, ... in both ``torch.distributed`` and ``torch.distributed.distributed_c10d``,
and ``labkit.compat``'s two) with wrappers that write one entry (``_collective_record``) and call
the function they replaced. It runs before the learner's function is unpickled, so the function's
own ``dist.all_reduce`` is the wrapper. Ordinary tensor ops are not touched: no dispatch mode, no
cost; a collective pays for one small JSON entry copied into a memory-mapped file (a few µs).

What is seen: every call through these Python functions, whoever makes it: your code, labkit's
code, torch's FSDP2 (it calls ``dist.all_gather_single`` and ``dist.reduce_scatter_single``).
What is not: torch's DDP (its reducer issues all-reduces from C++, straight to the process group),
DTensor's functional collectives, and modules that bound a function to a name of their own before
``install`` ran. ``labkit.CommCounter`` sees those; the record is for finding hangs, not for
counting bytes.

A call made inside another (``send`` calls ``isend``, ``all_gather_object`` calls ``all_gather``)
is the outer one's business: only the outer call is recorded. ``batch_isend_irecv`` is not recorded
itself: each of its ops is, as an ``isend`` or ``irecv`` with ``batch: true``. Functions installed
later on top of these (``_staging``'s host-memory send and recv) call them, so they compose in
either order. Recording never changes what a call does: if describing a call fails, the call runs
unrecorded.
"""
import functools
import inspect
import os
import threading

from labkit.launcher._collective_record import JOB_KEY, RecordFile, record_path

# name -> the argument whose tensors are the payload (None: no tensor, or Python objects). Payloads
# follow labkit.comm's ledger: the full buffer of an all-gather (output) and a reduce-scatter (input).
_PAYLOAD = {
    "broadcast": "tensor", "all_reduce": "tensor", "all_reduce_coalesced": "tensors",
    "reduce": "tensor", "all_gather": "tensor_list", "all_gather_single": "output_tensor",
    "all_gather_into_tensor": "output_tensor", "_all_gather_base": "output_tensor",
    "all_gather_coalesced": "output_tensor_lists", "gather": "tensor", "scatter": "tensor",
    "reduce_scatter": "input_list", "reduce_scatter_single": "input",
    "reduce_scatter_tensor": "input", "_reduce_scatter_base": "input",
    "all_to_all_single": "input", "all_to_all": "input_tensor_list",
    "barrier": None, "monitored_barrier": None,
    "send": "tensor", "recv": "tensor", "isend": "tensor", "irecv": "tensor",
    "all_gather_object": None, "gather_object": None, "broadcast_object_list": None,
    "scatter_object_list": None, "send_object_list": None, "recv_object_list": None,
}
# point-to-point: name -> (direction, the global peer's argument, the group peer's argument)
_POINT_TO_POINT = {
    "send": ("send", "dst", "group_dst"), "isend": ("send", "dst", "group_dst"),
    "send_object_list": ("send", "dst", "group_dst"),
    "recv": ("recv", "src", "group_src"), "irecv": ("recv", "src", "group_src"),
    "recv_object_list": ("recv", "src", "group_src"),
}
_ALWAYS_ASYNC = {"isend", "irecv"}
_OBJECTS = {"all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
            "send_object_list", "recv_object_list"}   # pickled Python objects: no bytes to compare
_COMPAT = {"all_gather_into_tensor": "output", "reduce_scatter_tensor": "input"}
_MAX_SHAPES = 4


class _Recorder:
    """This rank's record: the file, the sequence counters, what the current thread is inside."""

    def __init__(self, path: str):
        self.path = path
        self.file = RecordFile(path)
        self.last = None        # the last entry, for this rank's own status line
        self.counters = {}      # ("collective", group) or (direction, group, peer) -> last number
        self.groups = {}        # group name -> its global ranks
        self.local = threading.local()   # .inside: in a recorded call; .batch: in batch_isend_irecv
        self.lock = threading.Lock()     # autograd or user threads may call collectives too
        self.on = True
        import torch
        import torch.distributed as dist
        self.tensor, self.group_member = torch.Tensor, dist.GroupMember
        self.outsider = dist.GroupMember.NON_GROUP_MEMBER

    def enter(self, name: str, arguments, args, kwargs):
        """Write the entry for a call; return its slot, or None when it is not recorded."""
        group = arguments.get(args, kwargs, "group")
        if group is not None and group == self.outsider:
            return None       # torch returns at once for a rank outside the group
        group_name, members = self._group(group)
        payload = arguments.get(args, kwargs, arguments.payload)
        tensors = [payload] if isinstance(payload, self.tensor) else list(_tensors(payload))
        entry = {"n": 0, "op": name, "seq": 0,
                 "bytes": None if name in _OBJECTS else sum(t.numel() * t.element_size()
                                                            for t in tensors),
                 "shapes": [list(t.shape) for t in tensors[:_MAX_SHAPES]],
                 "tensors": len(tensors),
                 "dtype": str(tensors[0].dtype)[6:] if tensors else None,   # "torch.float32"
                 "group": members, "peer": None,
                 "async": name in _ALWAYS_ASYNC or bool(arguments.get(args, kwargs, "async_op")),
                 "batch": bool(getattr(self.local, "batch", False))}
        if name in _POINT_TO_POINT:
            direction, global_arg, group_arg = _POINT_TO_POINT[name]
            entry["peer"] = _peer(group, arguments.get(args, kwargs, global_arg),
                                  arguments.get(args, kwargs, group_arg))
            key = (direction, group_name, entry["peer"])
        else:
            key = ("collective", group_name)
        with self.lock:
            entry["seq"] = self.counters[key] = self.counters.get(key, 0) + 1
            entry["n"] = self.file.count + 1
            self.last = entry
            return self.file.enter(entry)

    def _group(self, group):
        """(a name to count by, what the entry says: "world" or the group's global ranks)."""
        if group is None or group is self.group_member.WORLD:
            return "world", "world"
        name = group.group_name
        if name not in self.groups:
            import torch.distributed as dist
            self.groups[name] = sorted(dist.get_process_group_ranks(group))
        return name, self.groups[name]


class _Arguments:
    """Finds a call's argument by name, positional or keyword, from the function's signature."""

    def __init__(self, function, payload):
        parameters = inspect.signature(function).parameters
        self.position = {name: i for i, name in enumerate(parameters)}
        self.default = {name: p.default for name, p in parameters.items()
                        if p.default is not inspect.Parameter.empty}
        self.payload = payload

    def get(self, args, kwargs, name):
        if name is None:
            return None
        i = self.position.get(name)
        if i is not None and i < len(args):
            return args[i]
        return kwargs.get(name, self.default.get(name))


def _tensors(value):
    from torch import Tensor
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _peer(group, global_rank, group_rank):
    """The global rank at the other end, or None (a recv from any source)."""
    if global_rank is not None:
        return int(global_rank)
    if group_rank is None:
        return None
    import torch.distributed as dist
    return dist.get_global_rank(group or dist.GroupMember.WORLD, int(group_rank))


_recorder = None
_wrappers = set()   # the functions install() made, so that installing twice wraps nothing twice


def _recorded(name, original, arguments):
    @functools.wraps(original)
    def recorded(*args, **kwargs):
        recorder = _recorder
        if recorder is None or not recorder.on or getattr(recorder.local, "inside", False):
            return original(*args, **kwargs)
        try:
            slot = recorder.enter(name, arguments, args, kwargs)
        except Exception:  # noqa: BLE001 - describing a call must never change what it does
            slot = None
        recorder.local.inside = True
        try:
            return original(*args, **kwargs)
        finally:
            recorder.local.inside = False
            if slot is not None:
                recorder.file.returned(slot)
    _wrappers.add(recorded)
    return recorded


def _batched(original):
    @functools.wraps(original)
    def batch_isend_irecv(*args, **kwargs):
        recorder = _recorder
        if recorder is None:
            return original(*args, **kwargs)
        recorder.local.batch = True
        try:
            return original(*args, **kwargs)
        finally:
            recorder.local.batch = False
    _wrappers.add(batch_isend_irecv)
    return batch_isend_irecv


def _wrapped(name, original, payload):
    if original in _wrappers:
        return original
    if name == "batch_isend_irecv":
        return _batched(original)
    return _recorded(name, original, _Arguments(original, payload))


def install(path: str) -> None:
    """Record this process's collectives in the record file ``path`` (created here)."""
    global _recorder
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    import labkit.compat as compat
    try:
        os.unlink(path)   # a file left by an earlier rank of this folder (persistent ranks)
    except FileNotFoundError:
        pass
    _recorder = _Recorder(path)
    for name, payload in list(_PAYLOAD.items()) + [("batch_isend_irecv", None)]:
        # c10d's names first: torch's own functions call each other (and P2POp checks its op)
        # through them; dist's are the same objects unless someone replaced one of them alone
        original = getattr(c10d, name, None)
        if original is None:
            continue
        setattr(c10d, name, _wrapped(name, original, payload))
        mine = getattr(dist, name, None)
        if mine is original:
            setattr(dist, name, getattr(c10d, name))
        elif mine is not None:
            setattr(dist, name, _wrapped(name, mine, payload))
    for name, payload in _COMPAT.items():
        setattr(compat, name, _wrapped(name, getattr(compat, name), payload))


def install_from_job(job: dict) -> None:
    """A rank's start: record into the launch's folder when the job names one (``JOB_KEY``)."""
    folder = job.get(JOB_KEY)
    if folder:
        try:
            install(record_path(folder, int(os.environ["RANK"])))
        except OSError:
            pass   # the launch is already over (its folder is gone): nothing to record for


def stop() -> None:
    """Record no more (the learner's function returned: labkit's own tear-down is not theirs)."""
    if _recorder is not None:
        _recorder.on = False


def entries_written() -> int:
    """How many calls this rank has recorded (0 without a record)."""
    return _recorder.file.count if _recorder is not None else 0


def record_file() -> str | None:
    """This rank's record file, None without one."""
    return _recorder.path if _recorder is not None else None


def last_entered() -> str | None:
    """This rank's last call in words ("all_reduce #7 (16 B, float32), still inside"), from the
    rank itself (``%ranks status``); None when nothing records them."""
    if _recorder is None:
        return None
    from labkit.launcher._hang_doctor import last_entered as in_words
    last = _recorder.last
    if last is None:
        return in_words([])
    slot = (last["n"] - 1) % _recorder.file.slots
    return in_words([dict(last, returned=_recorder.file.is_returned(slot))])
