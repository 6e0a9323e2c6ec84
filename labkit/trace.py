"""A training step as a trace that Perfetto and ``chrome://tracing`` open, and the overlap in it.

    def step():                                  # on each rank, in labkit.launch
        trace = StepTrace()                      # a CommCounter inside: every collective
        with trace:
            with trace.span("forward"):
                loss = model(x).sum()
            with trace.span("backward"):
                loss.backward()
            with trace.span("finish_gradient_sync", compute=False):   # waiting, not computing
                ddp.finish_gradient_sync()
            with trace.span("optimizer"):
                optimizer.step()
        return trace.events()                    # plain dicts: launch brings them back

    trace = merge(labkit.launch(step, nprocs=2))  # one JSON trace, a process per rank
    save(trace, "traces/step.json")              # https://ui.perfetto.dev: "Open trace file"
    overlap(trace)                               # per rank: communication hidden behind compute

The file is in the Trace Event Format (Google's "Trace Event Format" document, which Perfetto
and chrome://tracing read): ``{"traceEvents": [...], "displayTimeUnit": "ms"}``, each event a
dict with ``name``, ``ph`` (its phase: "X" a complete span with ``dur``, "i" an instant, "M"
metadata), ``ts`` in microseconds, ``pid`` and ``tid``. Here a rank is a process (pid = rank,
named "rank r"), and its threads are tracks: "phases" holds your spans, which nest, and
"collectives" each collective from its call to its completion on this rank (``comm.spans()``);
collectives overlap one another, so one that starts before the last has ended goes on a further
track ("collectives 2", ...). A collective whose completion the ledger did not see (gloo's
send / recv, an asynchronous op without a future) is an instant at its call. Times are each
rank's own, from when its ``StepTrace`` was made (``time.perf_counter()``). On a GPU a span times
the host, which only queues the kernels: call ``torch.cuda.synchronize()`` before a span ends to
time the GPU's work in it.
"""
import contextlib
import json
import time
from pathlib import Path
from typing import NamedTuple, Optional

US = 1e6   # microseconds per second: the format's unit


class StepTrace:
    """Spans you time on this rank, and the collectives a ``CommCounter`` sees, as trace events.

    ``with trace:`` counts collectives (``trace.comm`` is the ledger); ``trace.span(name)``
    times a block, ``compute=False`` for one that is not computing (waiting for communication):
    it is drawn, and ``overlap`` does not count it as compute. ``add_span`` and ``mark`` take
    times you measured yourself with ``time.perf_counter()``, e.g. in a hook.
    """

    def __init__(self):
        from labkit.comm import CommCounter
        self.comm = CommCounter()
        self.origin = time.perf_counter()
        self._spans, self._marks = [], []   # (name, start, end, compute), (name, at)
        self._collectives = []               # (call, start, end) measured elsewhere

    def __enter__(self):
        self.comm.__enter__()
        return self

    def __exit__(self, *exc):
        return self.comm.__exit__(*exc)

    @contextlib.contextmanager
    def span(self, name: str, compute: bool = True):
        start = time.perf_counter()
        try:
            yield self
        finally:
            self.add_span(name, start, time.perf_counter(), compute)

    def add_span(self, name: str, start: float, end: float, compute: bool = True):
        if end < start:
            raise ValueError(f"span {name!r} ends ({end}) before it starts ({start})")
        self._spans.append((name, start, end, compute))

    def add_collective(self, call, start: float, end: Optional[float] = None):
        """A collective timed elsewhere (a ``CommCall`` of another ledger, its call and end
        times; ``end`` None when its completion was not seen), drawn beside the ledger's own."""
        if end is not None and end < start:
            raise ValueError(f"{call.op} ends ({end}) before it starts ({start})")
        self._collectives.append((call, start, end))

    def mark(self, name: str, at: Optional[float] = None):
        """An instant on the phases track (now, or at ``time.perf_counter()`` value ``at``)."""
        self._marks.append((name, time.perf_counter() if at is None else at))

    def events(self, rank: Optional[int] = None) -> list:
        """This rank's trace events, plain dicts (``rank``: default, the process group's)."""
        if rank is None:
            import torch.distributed as dist
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

        def us(t):
            return round((t - self.origin) * US, 3)

        spans = sorted(self._spans, key=lambda s: (s[1], -s[2]))   # a parent before its child
        _check_nesting([(name, start, end) for name, start, end, _ in spans])
        def dur(start, end):   # from the rounded ends, so that a child ends inside its parent
            return round(us(end) - us(start), 3)

        out = [{"name": name, "cat": "compute" if compute else "other", "ph": "X",
                "ts": us(start), "dur": dur(start, end), "pid": rank, "tid": 0, "args": {}}
               for name, start, end, compute in spans]
        out += [{"name": name, "cat": "mark", "ph": "i", "s": "t", "ts": us(at), "pid": rank,
                 "tid": 0, "args": {}} for name, at in self._marks]
        lane_ends = []                       # per collectives track, when its last span ends
        collectives = sorted(self.comm.spans() + self._collectives, key=lambda c: c[1])
        for index, (call, start, end) in enumerate(collectives):
            args = {"index": index, "payload_bytes": call.payload_bytes,
                    "wire_bytes": call.wire_bytes, "world_size": call.world_size,
                    "async_op": call.async_op, "peer": call.peer}
            if end is None:
                out.append({"name": f"{call.op} (end not seen)", "cat": "comm", "ph": "i",
                            "s": "t", "ts": us(start), "pid": rank, "tid": 1, "args": args})
                continue
            lane = next((i for i, free in enumerate(lane_ends) if free <= start), None)
            if lane is None:
                lane = len(lane_ends)
                lane_ends.append(end)
            lane_ends[lane] = end
            out.append({"name": call.op, "cat": "comm", "ph": "X", "ts": us(start),
                        "dur": dur(start, end), "pid": rank, "tid": 1 + lane,
                        "args": args})
        names = ["phases"] + [f"collectives{'' if i == 0 else f' {i + 1}'}"
                              for i in range(max(1, len(lane_ends)))]
        meta = [_meta("process_name", rank, 0, {"name": f"rank {rank}"}),
                _meta("process_sort_index", rank, 0, {"sort_index": rank})]
        for tid, name in enumerate(names):
            meta += [_meta("thread_name", rank, tid, {"name": name}),
                     _meta("thread_sort_index", rank, tid, {"sort_index": tid})]
        return meta + sorted(out, key=lambda e: (e["tid"], e["ts"]))


def _meta(kind, pid, tid, args):
    """A metadata event: the name or the place in the list of a process (rank) or a track."""
    return {"name": kind, "ph": "M", "pid": pid, "tid": tid, "args": args}


def _check_nesting(spans):
    """Spans on one track must nest: each inside the one before it, or after it."""
    open_spans = []
    for name, start, end in spans:
        while open_spans and open_spans[-1][2] <= start:
            open_spans.pop()
        if open_spans and end > open_spans[-1][2]:
            raise ValueError(f"spans {open_spans[-1][0]!r} and {name!r} overlap without one "
                             f"containing the other: a track shows nested spans only")
        open_spans.append((name, start, end))


def merge(per_rank) -> dict:
    """One trace from each rank's ``events()`` (what ``labkit.launch`` returned, by rank)."""
    seen, events = {}, []
    for index, rank_events in enumerate(per_rank):
        for pid in {event["pid"] for event in rank_events}:
            if pid in seen:
                raise ValueError(f"traces {seen[pid]} and {index} are both of rank {pid}: "
                                 f"pass one trace per rank")
            seen[pid] = index
        events += rank_events
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def save(trace, path) -> Path:
    """Write a trace (``merge``'s, or one rank's ``events()``) as JSON, making its folder."""
    if isinstance(trace, list):
        trace = {"traceEvents": trace, "displayTimeUnit": "ms"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace))
    return path


class Overlap(NamedTuple):
    """One rank's communication against its compute, in seconds."""
    rank: int
    comm_s: float            # time with at least one collective in flight
    hidden_s: float          # of which, time under a compute span
    share: Optional[float]   # hidden_s / comm_s; None without communication
    collectives: int         # collectives with a span
    unseen: int              # collectives whose completion was not seen (not counted)


def overlap(trace, ops=None) -> list:
    """Per rank (by pid), the share of communication time hidden behind compute: the time with
    a collective in flight that lies under a compute span, over all the time with one in flight
    (unions of intervals, so overlapping collectives or nested spans count once). ``ops``:
    count only these collectives (e.g. ``["all_gather"]``)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ranks = sorted({e["pid"] for e in events if e["ph"] != "M"})
    out = []
    for rank in ranks:
        mine = [e for e in events if e["pid"] == rank and e["ph"] in ("X", "i")]
        comm = [e for e in mine if e.get("cat") == "comm" and (
            ops is None or e["name"].split(" ")[0] in ops)]
        busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in mine
                       if e["ph"] == "X" and e.get("cat") == "compute"])
        flight = _union([(e["ts"], e["ts"] + e["dur"]) for e in comm if e["ph"] == "X"])
        comm_s, hidden_s = _length(flight) / US, _common(flight, busy) / US
        out.append(Overlap(rank, comm_s, hidden_s, hidden_s / comm_s if comm_s else None,
                           sum(e["ph"] == "X" for e in comm), sum(e["ph"] == "i" for e in comm)))
    return out


def _union(intervals):
    """Sorted, disjoint intervals covering the same time as ``intervals``."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _length(union):
    return sum(end - start for start, end in union)


def _common(a, b):
    """The time two unions share."""
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)
