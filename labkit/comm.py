"""The communication ledger: which collectives one rank ran, how many bytes, how long.

    with labkit.CommCounter() as comm:          # or: from labkit.comm import CommCounter
        loss = ddp_model(x).square().mean(); loss.backward()
    comm.summary()   # {"all_reduce": {"calls": 1, "payload_bytes": 4200448,
                     #                 "wire_bytes": 4200448.0, "seconds": 0.004}}
    print(comm.table())

How it sees collectives. Every ``torch.distributed`` collective reaches the dispatcher as a
``c10d`` op (``c10d.allreduce_``, ``c10d._allgather_base_``, ...); the functional collectives that
DTensor uses are ``_c10d_functional`` ops. A ``TorchDispatchMode`` sees each of them, whoever
issued it: your code, torch's DDP reducer (C++, during backward), ``ZeroRedundancyOptimizer``,
FSDP2. A mode is per thread; torch carries it into the autograd threads of a backward started
inside the ``with``. Ops torch names but the course does not are counted under their raw name.

What the numbers mean, per call on this rank (``S`` = payload, ``N`` = ranks in the op's group):

============== ===================================================== ====================
op             payload_bytes                                         wire_bytes
============== ===================================================== ====================
all_reduce     the tensor(s) reduced                                 2(N-1)/N * S
broadcast      the tensor(s) broadcast                               (N-1)/N * S
reduce         the tensor(s) reduced                                 (N-1)/N * S
all_gather     the FULL gathered buffer: the output tensor, or the   (N-1)/N * S
               output list summed (N x this rank's input)
reduce_scatter the FULL buffer reduced: the input tensor, or the     (N-1)/N * S
               input list summed (N x this rank's output)
all_to_all     this rank's input (own chunk included)                (N-1)/N * S
send / recv    the tensor sent / received                            S / 0
gather         this rank's input                                     S (0 on the root)
scatter        this rank's output chunk                              (N-1) * S on the root
barrier        0 (torch's one-element token is not yours)            0
other          every tensor among the op's arguments                 0 (not modelled)
============== ===================================================== ====================

``peer`` (send and recv only, ``None`` for every other op): the GLOBAL rank the tensor goes to
(send, isend) or comes from (recv, irecv), even when the op ran on a subgroup, whose ops name
ranks within the group; ``None`` also for a recv from any source (``dist.recv(t)``), whose sender
the op does not name.

So payload is "the buffer the collective is about": an all-gather and a reduce-scatter of the same
buffer show the same payload as an all-reduce of it, and ZeRO's claim "reduce-scatter + all-gather
move what one all-reduce moves" reads straight off the wire column. ``wire_bytes`` is what this
rank sends under the ring algorithms (``labkit.theory.wire_bytes``): a model, not a measurement.

``seconds`` is wall time from the call until the collective completed on this rank:
- a synchronous call: the ledger waits for it, as torch would a moment later;
- ``async_op=True`` (and everything DDP issues): until the op's future completes, which is
  usually before your ``.wait()`` returns; ``None`` while it is still running;
- send / recv on gloo: ``None``. Their Work has no future and torch does not tell the ledger
  whether you called ``send`` or ``isend``; time them yourself around the call and ``.wait()``;
- functional collectives (DTensor): until ``wait_tensor`` on the result, ``None`` if not seen;
- CUDA tensors (NCCL): GPU time between CUDA events around the op, read when you ask.
Times include waiting for the slowest rank to arrive: a collective finishes for everyone together.

Costs: every op inside the ``with`` passes through one Python call. torch would wrap that call
in ``torch._disable_dynamo``, which imports ``torch._dynamo`` at the first op (2-4 s on a 2-core
machine); labkit's modes keep Dynamo out of their own code without that import (see
``labkit._torch_private``). Threads you start yourself inside the ``with`` are not seen.
"""
import threading
import time
import weakref
from typing import NamedTuple, Optional

import torch

from labkit import theory
from labkit._torch_private import (DispatchMode, op_argument_default, op_argument_names,
                                   op_name, unbox)


class CommCall(NamedTuple):
    """One collective on this rank (a plain tuple: it pickles, so a rank can return it).

    ``peer``: for send / recv the global rank at the other end, else None (module docstring).
    ``async_op``: True for a collective called with ``async_op=True`` (it returned a handle at
    once), False for one that waited, None where the op does not say (send and recv: torch does
    not tell ``send`` from ``isend``; functional collectives; DDP's own buckets, which are async).
    Both come last, with defaults, so that code unpacking the first five fields still works.
    """
    op: str
    payload_bytes: int
    wire_bytes: float
    seconds: Optional[float]
    world_size: int
    peer: Optional[int] = None
    async_op: Optional[bool] = None


# raw op name -> (course name, the argument whose tensors are the payload). "<result>": the op's
# return value. Names checked on torch 2.13 by running each collective under a dispatch mode.
_C10D_OPS = {
    "allreduce_": ("all_reduce", "tensors"),
    "allreduce_coalesced_": ("all_reduce", "tensors"),
    "broadcast_": ("broadcast", "tensors"),
    "reduce_": ("reduce", "tensors"),
    "allgather_": ("all_gather", "output_tensors"),              # list form: dist.all_gather
    "_allgather_base_": ("all_gather", "output_tensor"),         # tensor form: all_gather_single
    "allgather_coalesced_": ("all_gather", "output_lists"),
    "allgather_into_tensor_coalesced_": ("all_gather", "outputs"),
    "reduce_scatter_": ("reduce_scatter", "input_tensors"),      # list form: dist.reduce_scatter
    "_reduce_scatter_base_": ("reduce_scatter", "input_tensor"),  # tensor: reduce_scatter_single
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "inputs"),
    "alltoall_": ("all_to_all", "input_tensors"),
    "alltoall_base_": ("all_to_all", "input"),
    "send": ("send", "tensors"),
    "recv_": ("recv", "tensors"),
    "recv_any_source_": ("recv", "tensors"),
    "gather_": ("gather", "input_tensors"),
    "scatter_": ("scatter", "output_tensors"),
    "barrier": ("barrier", None),
    "monitored_barrier_": ("barrier", None),
}
_FUNCTIONAL_OPS = {
    "all_reduce": ("all_reduce", "input"),
    "all_reduce_": ("all_reduce", "input"),
    "all_reduce_coalesced": ("all_reduce", "inputs"),
    "all_reduce_coalesced_": ("all_reduce", "inputs"),
    "broadcast": ("broadcast", "input"),
    "broadcast_": ("broadcast", "input"),
    "all_gather_into_tensor": ("all_gather", "<result>"),
    "all_gather_into_tensor_out": ("all_gather", "out"),
    "all_gather_into_tensor_coalesced": ("all_gather", "<result>"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "reduce_scatter_tensor_out": ("reduce_scatter", "input"),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", "inputs"),
    "all_to_all_single": ("all_to_all", "input"),
    "isend": ("send", "tensor"),
    "irecv": ("recv", "tensor"),
}
_NAMESPACES = {"c10d": _C10D_OPS, "_c10d_functional": _FUNCTIONAL_OPS}
_NOT_COMMUNICATION = {"check_for_nan", "wait_tensor", "_wrap_tensor_autograd"}
_RING_OPS = {"all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "all_to_all",
             "send", "recv", "barrier"}


class CommCounter(DispatchMode):
    """Counts the collectives run inside ``with CommCounter() as comm:`` on this rank.

    Read it with ``comm.summary()``, ``comm.calls``, ``comm.total_payload_bytes()``,
    ``comm.total_wire_bytes()``, ``print(comm.table())``, ``comm.sequence_numbers`` (each call's
    number on its process group), and ``comm.spans()`` for when each
    call started and ended (a timeline: ``labkit.trace``). Entering the same counter again
    later adds to it. Counters may be nested (each counts what runs inside it); entering one
    counter inside itself raises, because it would count every op twice.
    """

    def __init__(self):
        super().__init__()
        self._calls = []        # CommCall per collective, in the order they were issued
        self._clocks = {}       # index in _calls -> _Clock of a call whose time is not read yet
        self._issued = []       # time.perf_counter() at each call, index as in _calls
        self._numbers = []      # the sequence number of each call, index as in _calls
        self._last_number = {}  # (group,) or (send/recv, group, peer) -> its last number
        self._unwaited = {}     # id(result of a functional collective) -> (weakref, index)
        self._lock = threading.Lock()   # autograd threads may issue collectives too
        self._active = False

    def __enter__(self):
        if self._active:
            raise RuntimeError("this CommCounter is already counting; nest a new CommCounter() "
                               "instead (entering it twice would count every op twice)")
        self._active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self._active = False
        return super().__exit__(*exc)

    # --- reading the ledger -------------------------------------------------------------------

    @property
    def calls(self):
        """Every collective so far, a list of ``CommCall(op, payload_bytes, wire_bytes, seconds,
        world_size, peer, async_op)``."""
        with self._lock:
            for index, clock in list(self._clocks.items()):
                seconds = clock.read()
                if seconds is not None:
                    self._calls[index] = self._calls[index]._replace(seconds=seconds)
                    del self._clocks[index]
            return list(self._calls)

    def spans(self):
        """When each collective ran on this rank: ``[(call, start, end), ...]`` in issue order,
        ``start`` the ``time.perf_counter()`` at the call and ``end`` = start + ``call.seconds``
        (None while unknown). The clock of ``time.perf_counter()``, so spans you time yourself
        line up with these (``labkit.trace.StepTrace`` draws both). On CUDA ``seconds`` is GPU
        time, placed at the call: an approximation of when the op ran."""
        calls = self.calls
        return [(call, start, None if call.seconds is None else start + call.seconds)
                for call, start in zip(calls, self._issued)]

    @property
    def sequence_numbers(self):
        """The sequence number of each call in ``calls`` (same index): collectives are numbered
        per process group (#1, #2, ... on the world, another count on each subgroup), sends and
        recvs per group and peer ("send #3 to rank 1"), counting the calls this counter saw. The
        launcher's hang doctor numbers a rank's calls the same way from the start of the launch
        (docs/launcher.md, "When ranks hang"); it does not see DDP's, which this counter does."""
        with self._lock:
            return list(self._numbers)

    def _next_number(self, op, named):
        pg, world = _process_group(named), torch.distributed.GroupMember.WORLD
        group = getattr(pg, "group_name", None)
        if pg is None or group == getattr(world, "group_name", None):
            group = "world"
        key = (op, group, _peer(op, named)) if op in ("send", "recv") else (group,)
        self._last_number[key] = self._last_number.get(key, 0) + 1
        return self._last_number[key]

    def summary(self):
        """``{op: {"calls", "payload_bytes", "wire_bytes", "seconds"}}`` in order of first use.

        "seconds" adds up the calls whose time is known (see the module's docstring).
        """
        out = {}
        for call in self.calls:
            row = out.setdefault(call.op, {"calls": 0, "payload_bytes": 0, "wire_bytes": 0.0,
                                           "seconds": 0.0})
            row["calls"] += 1
            row["payload_bytes"] += call.payload_bytes
            row["wire_bytes"] += call.wire_bytes
            row["seconds"] += call.seconds or 0.0
        return out

    def total_payload_bytes(self):
        return sum(call.payload_bytes for call in self._calls)

    def total_wire_bytes(self):
        return sum(call.wire_bytes for call in self._calls)

    def table(self):
        """The summary as a fixed-width table, bytes written out in full, for a notebook cell."""
        lines = [f"{'op':<16}{'calls':>7}{'payload bytes':>17}{'wire bytes':>17}{'seconds':>10}"]
        rows = self.summary()
        total = {"calls": 0, "payload_bytes": 0, "wire_bytes": 0.0, "seconds": 0.0}
        for op, row in rows.items():
            lines.append(f"{op:<16}{row['calls']:>7}{row['payload_bytes']:>17,}"
                         f"{row['wire_bytes']:>17,.0f}{row['seconds']:>10.4f}")
            total = {key: total[key] + row[key] for key in total}
        if len(rows) != 1:
            lines.append(f"{'total':<16}{total['calls']:>7}{total['payload_bytes']:>17,}"
                         f"{total['wire_bytes']:>17,.0f}{total['seconds']:>10.4f}")
        return "\n".join(lines)

    def __repr__(self):
        return (f"CommCounter({len(self._calls)} calls, "
                f"{self.total_payload_bytes():,} payload bytes)")

    # --- counting -----------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _desugars_into_collectives(types):
            # Let DTensor turn this op into plain ops and functional collectives first; those
            # come back through this mode and are counted (torch's CommDebugMode does the same).
            return NotImplemented
        ops = _NAMESPACES.get(getattr(func, "namespace", None))
        if ops is None:
            return func(*args, **kwargs)
        name = op_name(func)
        if name == "wait_tensor":
            return self._wait_tensor(func, args, kwargs)
        if name in _NOT_COMMUNICATION:
            return func(*args, **kwargs)

        named = dict(zip(op_argument_names(func), args), **kwargs)
        op, payload_arg = ops.get(name, (f"{func.namespace}.{name}", "*"))
        clock = _Clock(_first_tensor(named))
        result = func(*args, **kwargs)

        world_size, rank = _group_size_and_rank(named)
        if payload_arg is None:
            payload = 0
        elif payload_arg == "*":
            payload = _nbytes(list(named.values()))
        else:
            payload = _nbytes(result if payload_arg == "<result>" else named[payload_arg])
        wire = _wire_bytes(op, payload, world_size, rank, named.get("root_rank"))

        with self._lock:
            index = len(self._calls)
            self._calls.append(CommCall(op, payload, wire, None, world_size,
                                        _peer(op, named), _async_op(func, op, named)))
            self._issued.append(clock.t0)
            self._numbers.append(self._next_number(op, named))
            self._clocks[index] = clock
        if func.namespace == "_c10d_functional":   # done when someone waits on the result
            if isinstance(result, torch.Tensor):
                self._unwaited[id(result)] = (weakref.ref(result), index)
        else:
            clock.stop_when_done(_work_of(result),
                                 synchronous=_async_op(func, op, named) is False)
        return result

    def _wait_tensor(self, func, args, kwargs):
        out = func(*args, **kwargs)
        ref, index = self._unwaited.pop(id(args[0]), (None, None))
        if ref is not None and ref() is args[0] and index in self._clocks:
            self._clocks[index].stop()
        return out


class _Clock:
    """Times one collective from its call to its completion on this rank.

    CPU: wall time. CUDA: a pair of CUDA events, because an NCCL op "returns" once it is queued
    on the GPU; the end event goes on the stream that the op's future hands to its callbacks,
    which waits for the op, so the pair brackets the op itself.
    """

    def __init__(self, tensor):
        self.t0 = time.perf_counter()
        self.seconds = None
        self.future = None     # the op's future while we wait for its callback
        self.device = tensor.device if tensor is not None else torch.device("cpu")
        self.start = self.end = None
        if self.device.type == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record(torch.cuda.current_stream(self.device))

    def stop(self):
        if self.start is not None:
            if self.end is None:
                self.end = torch.cuda.Event(enable_timing=True)
                self.end.record(torch.cuda.current_stream(self.device))
        elif self.seconds is None:
            self.seconds = time.perf_counter() - self.t0
        # The future holds the op's output tensors: let them go, so that a ledger kept open
        # does not keep alive what the learner's code freed (MemoryTracer would count it).
        self.future = None

    def stop_when_done(self, work, synchronous):
        """Stop now for a synchronous call (after waiting, as torch is about to), else when the
        op's future completes. Without a future to watch (gloo's send and recv) the completion
        cannot be seen, so the time stays unknown (None) rather than wrong."""
        if work is None:
            return self.stop()
        if synchronous:
            work.wait()
            return self.stop()
        try:
            future = work.get_future()
        except RuntimeError:   # "Work::getFuture not implemented"
            return
        self.future = future
        future.add_done_callback(lambda _: self.stop())

    def read(self):
        """Seconds, or None while the op runs."""
        if self.seconds is None and self.end is None and self.future is not None \
                and self.future.done():
            # Done, but the callback (on gloo's thread, waiting for the GIL) may not have run
            # yet: whoever waited on the future can be a step ahead of it. Let it run.
            deadline = time.perf_counter() + 0.1
            while self.seconds is None and time.perf_counter() < deadline:
                time.sleep(0.0005)
            self.stop()
        if self.seconds is None and self.end is not None:
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        return self.seconds


def _desugars_into_collectives(types):
    """True for tensor subclasses that turn one op into plain ops plus collectives."""
    return any(klass.__name__ in ("DTensor", "AsyncCollectiveTensor")
               and klass.__module__.startswith("torch.distributed")
               for t in types for klass in t.__mro__)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _nbytes(value):
    """Bytes of the tensors in ``value`` (views count their own elements, not their storage)."""
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _first_tensor(named):
    return next(_tensors(list(named.values())), None)


def _process_group(named):
    """The ProcessGroup an op runs on: c10d ops carry it boxed, functional ones by name."""
    group = named.get("process_group", named.get("group_name"))
    if group is None or not isinstance(group, str):
        return None if group is None else unbox(group, "ProcessGroup")
    from labkit._torch_private import resolve_process_group
    return resolve_process_group(group)


def _group_size_and_rank(named):
    """(ranks in the op's group, this rank's index in it): subgroups count their own size."""
    if "process_group" not in named and "group_size" in named:   # functional gather / scatter
        return int(named["group_size"]), None
    pg = _process_group(named)
    if pg is None:                              # an op we do not know: assume the whole world
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return pg.size(), pg.rank()


def _async_op(func, op, named):
    """The ``async_op`` flag of a c10d collective (left out of the call when it has its
    default, True); None for send and recv, and for ops that carry no such flag."""
    flag = named.get("async_op", op_argument_default(func, "async_op"))
    return None if op in ("send", "recv") or not isinstance(flag, bool) else flag


def _peer(op, named):
    """The global rank at the other end of a send / recv, None for other ops or any source.

    Both c10d's ``dst``/``src`` and the functional ops' reach the backend as ranks within the
    op's group (checked on torch 2.13), so a subgroup's are translated to global ranks.
    """
    if op not in ("send", "recv"):
        return None
    rank = named.get("dst", named.get("src"))
    pg = _process_group(named)
    if rank is None or pg is None:
        return None
    try:
        return torch.distributed.get_global_rank(pg, int(rank))
    except (ValueError, RuntimeError):          # a group torch did not register: unknown
        return None


def _work_of(result):
    """The Work handle among a c10d op's outputs (None if the backend returned none)."""
    for item in result if isinstance(result, (tuple, list)) else (result,):
        if isinstance(item, torch.ScriptObject) or isinstance(item, torch.distributed.Work):
            return unbox(item, "Work")
    return None


def _wire_bytes(op, payload, world_size, rank, root):
    """Bytes this rank sends, from ``labkit.theory.wire_bytes`` (module docstring's table)."""
    if op in _RING_OPS:
        return float(theory.wire_bytes(op, payload, world_size))
    if op == "gather":     # every rank but the root sends its piece straight to the root
        return 0.0 if rank == root else float(theory.wire_bytes("send", payload, world_size))
    if op == "scatter":    # the root sends every other rank its piece
        return float(theory.wire_bytes("send", payload, world_size)) * (world_size - 1) \
            if rank == root else 0.0
    return 0.0
