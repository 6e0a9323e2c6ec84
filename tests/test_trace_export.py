"""Traces the standard viewers open: a MemoryTracer run in PyTorch's memory-snapshot format (fed
to torch's own ``torch.cuda._memory_viz``), a step's Chrome/Perfetto trace (checked against the
Trace Event Format by a validator below), and the overlap of communication and compute read
from it, with its figure."""
import base64
import collections
import json
import math
import pickle
import pickletools
import re

import pytest
import torch
import torch.cuda._memory_viz as memory_viz

import labkit
from labkit import plots
from labkit.memory import CATEGORIES, MemoryTracer
from labkit.memory_snapshot import BASE
from labkit.trace import Overlap, StepTrace, merge, overlap, save


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 256))


def traced_steps(**options):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(32, 256)
    with MemoryTracer(model, optimizer, **options) as mem:
        for _ in range(2):
            model(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    return mem


@pytest.fixture(scope="module")
def traced():
    mem = traced_steps(stacks=True)
    return mem, mem.snapshot()


def replay(snapshot):
    """(peak, final) bytes allocated, replaying the device trace from empty."""
    total = peak = 0
    for event in snapshot["device_traces"][0]:
        if event["action"] == "alloc":
            total += event["size"]
        elif event["action"] == "free_completed":
            total -= event["size"]
        peak = max(peak, total)
    return peak, total


def embedded_snapshot(html):
    """The snapshot a trace_plot / segment_plot page carries (base64 of a pickle, NUL-padded)."""
    encoded = json.loads(re.search(r"const local_files = (\[.*?\])\n", html).group(1))[0]
    return pickle.loads(base64.b64decode(encoded["base64"]))


# --- the memory snapshot -----------------------------------------------------------------------

def test_the_snapshot_replays_to_the_tracers_peak_and_final_bytes(traced):
    mem, snapshot = traced
    assert replay(snapshot) == (mem.peak_total, sum(mem.current.values()))
    alive = [b for seg in snapshot["segments"] for b in seg["blocks"]]
    assert sum(b["size"] for b in alive) == sum(mem.current.values())
    assert all(b["state"] == "active_allocated" and b["requested_size"] == b["size"]
               for b in alive)


def test_every_alloc_has_a_category_of_the_tracer_and_a_matching_free(traced):
    _, snapshot = traced
    events = snapshot["device_traces"][0]
    allocs = [e for e in events if e["action"] == "alloc"]
    assert {e["category"] for e in allocs} == {"params", "grads", "optimizer", "activations",
                                              "other"}
    assert all(e["addr"] >= BASE and e["size"] > 0 for e in allocs)
    assert len({e["addr"] for e in allocs}) == len(allocs)          # labels are never reused
    freed = collections.Counter(e["addr"] for e in events if e["action"] == "free_completed")
    alive = {seg["address"] for seg in snapshot["segments"]}
    assert all(freed[e["addr"]] + (e["addr"] in alive) == 1 for e in allocs)
    # the viewer needs each block inside a segment: segment_alloc before alloc, free after free
    order = {(e["action"], e["addr"]): i for i, e in enumerate(events)}
    assert all(order["segment_alloc", e["addr"]] < order["alloc", e["addr"]] for e in allocs)
    assert all(order["free_completed", a] < order["segment_free", a] for a in freed)


def test_torchs_memory_viz_functions_read_the_snapshot(traced):
    mem, snapshot = traced
    # the text reports: segsum checks its own accounting (it raises if the sizes disagree)
    summary = memory_viz.segsum(snapshot)
    assert f"total_allocated: {memory_viz.Bytes(sum(mem.current.values()))}" in summary
    assert f"segments: {len(snapshot['segments'])}" in summary
    text = memory_viz.trace(snapshot)
    assert f"{len(snapshot['device_traces'][0])} entries" in text and "cudaMalloc(" in text
    # memory / segments: flamegraph lines "stream;state;frames size", rooted at the category
    by_category = collections.Counter()
    for line in memory_viz.memory(snapshot, format_flamegraph=lambda lines: lines).splitlines():
        frames, size = line.rsplit(" ", 1)
        by_category[frames.split(";")[2]] += int(size)
    assert by_category == {f"category:0:{c}": n for c, n in mem.current.items() if n}
    assert memory_viz.segments(snapshot, format_flamegraph=lambda lines: lines).count(
        "active_allocated") == len(snapshot["segments"])
    # the pages: they embed the snapshot for MemoryViz.js, whole
    for page in (memory_viz.trace_plot(snapshot), memory_viz.segment_plot(snapshot)):
        assert page.lstrip().startswith("<!DOCTYPE html>")
        assert embedded_snapshot(page) == snapshot


def test_the_pickle_uses_only_opcodes_the_viewers_unpickler_reads(traced, tmp_path):
    # MemoryViz.js (pytorch/pytorch, torch/utils/viz/) unpickles in JavaScript: protocols 2-4,
    # and the opcodes its switch handles; anything else throws "UNKNOWN OPCODE".
    handled = {"PROTO", "FRAME", "STOP", "MARK", "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET",
               "LONG_BINGET", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_LIST",
               "LIST", "APPEND", "APPENDS", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2",
               "TUPLE3", "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2",
               "LONG1", "BINFLOAT", "SHORT_BINUNICODE", "BINUNICODE"}
    mem, snapshot = traced
    path = tmp_path / "sub" / "memory.pickle"
    assert mem.snapshot(path) == snapshot                  # the folder is made
    data = path.read_bytes()
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    assert ops[0] == ("PROTO", 4)
    assert {name for name, _ in ops} <= handled
    assert pickle.loads(data) == snapshot


def test_categories_in_the_legend_include_unknown(traced):
    # MemoryViz.js adds "unknown" to a legend that lacks it, with a typo in some versions
    # ("snapshot.categores.push"), which fails: the snapshot carries "unknown" itself.
    _, snapshot = traced
    categories = {e["category"] for e in snapshot["device_traces"][0] if "category" in e}
    assert "unknown" in categories and categories - {"unknown"} <= set(CATEGORIES)


def test_frames_name_the_op_and_with_stacks_the_python_caller(traced):
    _, snapshot = traced
    allocs = [e for e in snapshot["device_traces"][0] if e["action"] == "alloc"]
    for e in allocs:
        assert e["frames"][0]["filename"] == "labkit.MemoryTracer"
        assert e["frames"][-1] == {"filename": "category", "line": 0, "name": e["category"]}
    names = {e["frames"][0]["name"] for e in allocs}
    assert "forward aten.addmm.default" in names and "enter" in names
    callers = {(f["filename"], f["name"]) for e in allocs for f in e["frames"][1:-1]}
    assert (__file__, "traced_steps") in callers
    assert not any(f.endswith(("labkit/memory.py", "labkit/_torch_private.py"))
                   for f, _ in callers)
    plain = traced_steps().snapshot()       # stacks=False: the op and the category only
    assert all(len(e["frames"]) == 2 for e in plain["device_traces"][0] if "frames" in e
               and e["action"] != "snapshot")


def test_a_resized_storage_is_freed_and_allocated_again():
    buffer = torch.zeros(1000)
    with MemoryTracer() as mem:
        buffer.add_(1)                       # seen: 4000 bytes
        buffer.untyped_storage().resize_(0)  # freed as FSDP frees
        buffer.untyped_storage().resize_(400)
        torch.ones(1).add_(buffer.untyped_storage().nbytes())   # an op: re-read
    sizes = [(e["action"], e["size"]) for e in mem.snapshot()["device_traces"][0]
             if e["action"] in ("alloc", "free_completed") and e["size"] in (4000, 400)]
    assert sizes == [("alloc", 4000), ("free_completed", 4000), ("alloc", 400)]


def test_a_tracer_without_timeline_says_what_the_snapshot_needs():
    with MemoryTracer(timeline=False):
        torch.ones(4).add_(1)
    with pytest.raises(ValueError, match="timeline=True"):
        MemoryTracer(timeline=False).snapshot()


# --- the Chrome / Perfetto trace -----------------------------------------------------------

REQUIRED = {"X": {"name", "ph", "ts", "dur", "pid", "tid"},
            "B": {"name", "ph", "ts", "pid", "tid"}, "E": {"ph", "ts", "pid", "tid"},
            "i": {"name", "ph", "ts", "pid", "tid", "s"}, "M": {"name", "ph", "pid", "tid",
                                                                "args"}}


def validate(trace):
    """Check a trace against the Trace Event Format (Google's document, JSON object form);
    returns the X events by (pid, tid). Raises AssertionError naming the first bad event."""
    assert set(trace) >= {"traceEvents"} and trace.get("displayTimeUnit", "ms") in ("ms", "ns")
    json.loads(json.dumps(trace))                             # plain JSON
    named, used, spans = set(), set(), collections.defaultdict(list)
    for event in trace["traceEvents"]:
        phase = event.get("ph")
        assert phase in REQUIRED, event
        assert REQUIRED[phase] <= set(event), (event, REQUIRED[phase] - set(event))
        assert all(isinstance(event[k], int) and event[k] >= 0 for k in ("pid", "tid")), event
        for key in ("ts", "dur"):
            if key in event:
                assert isinstance(event[key], (int, float)) and math.isfinite(event[key]) \
                       and event[key] >= 0, event
        if "args" in event:
            assert isinstance(event["args"], dict), event
        if phase == "i":
            assert event["s"] in ("g", "p", "t"), event
        if phase == "M":
            assert event["name"] in ("process_name", "thread_name", "process_sort_index",
                                     "thread_sort_index"), event
            key = "name" if event["name"].endswith("_name") else "sort_index"
            assert key in event["args"], event
            if event["name"] == "process_name":
                named.add((event["pid"], None))
            if event["name"] == "thread_name":
                named.add((event["pid"], event["tid"]))
        else:
            used.add((event["pid"], event["tid"]))
        if phase == "X":
            spans[event["pid"], event["tid"]].append(event)
    for pid, tid in used:                                     # every track and rank is named
        assert (pid, None) in named and (pid, tid) in named, (pid, tid)
    for track, events in spans.items():                       # spans on a track nest
        stack = []
        for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
            end = e["ts"] + e["dur"]
            while stack and stack[-1] <= e["ts"] + 1e-6:
                stack.pop()
            assert not stack or end <= stack[-1] + 1e-6, f"partial overlap on {track}: {e}"
            stack.append(end)
    return spans


def test_the_validator_finds_what_it_checks():
    good = {"traceEvents": [
        {"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "rank 0"}},
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "t"}},
        {"name": "a", "ph": "X", "ts": 0, "dur": 10, "pid": 0, "tid": 0},
        {"name": "b", "ph": "X", "ts": 2, "dur": 8, "pid": 0, "tid": 0}]}
    validate(good)
    for bad in ({"name": "c", "ph": "X", "ts": 5, "dur": 10, "pid": 0, "tid": 0},   # overlaps
                {"name": "c", "ph": "X", "ts": 20, "pid": 0, "tid": 0},             # no dur
                {"name": "c", "ph": "X", "ts": "20", "dur": 1, "pid": 0, "tid": 0},
                {"name": "c", "ph": "X", "ts": 20, "dur": 1, "pid": 0, "tid": 5},   # unnamed
                {"name": "c", "ph": "i", "ts": 20, "pid": 0, "tid": 0},             # no scope
                {"name": "c", "ph": "Q", "ts": 20, "pid": 0, "tid": 0}):
        with pytest.raises(AssertionError):
            validate({"traceEvents": good["traceEvents"] + [bad]})


def overlapped_step():
    """One rank: a forward, a backward whose gradient hooks start async all-reduces, the wait,
    and a send/recv pair whose completion gloo does not report."""
    import torch.distributed as dist
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(6)])
    handles = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(
            lambda p: handles.append(dist.all_reduce(p.grad, async_op=True)))
    trace, grads = StepTrace(), []

    def gradient_ready(p):
        trace.mark("grad")
        grads.append(p)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(gradient_ready)
    with trace:
        with trace.span("forward"):
            loss = model(torch.randn(16, 128)).sum()
        with trace.span("backward"):
            loss.backward()
        with trace.span("wait", compute=False):
            for handle in handles:
                handle.wait()
        with trace.span("optimizer"):
            with trace.span("inner"):
                pass
        token = torch.zeros(4)
        if dist.get_rank() == 0:
            dist.send(token, 1)
        else:
            dist.recv(token, 0)
    return trace.events(), [(c.op, s, e) for c, s, e in trace.comm.spans()], len(grads)


@pytest.fixture(scope="module")
def two_ranks():
    return labkit.launch(overlapped_step, nprocs=2, quiet=True)


def test_each_ranks_trace_is_valid_and_merges_into_one_process_per_rank(two_ranks, tmp_path):
    trace = merge([events for events, _, _ in two_ranks])
    spans = validate(trace)
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
             if e["name"] == "thread_name"}
    ranks = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e["name"] == "process_name"}
    assert ranks == {0: "rank 0", 1: "rank 1"}
    for rank, (events, calls, grads) in enumerate(two_ranks):
        assert names[rank, 0] == "phases"
        assert [e["name"] for e in sorted(spans[rank, 0], key=lambda e: e["ts"])] == [
            "forward", "backward", "wait", "optimizer", "inner"]
        assert sum(e["name"] == "grad" and e["ph"] == "i" for e in events) == grads == 12
        comm = [e for e in events if e.get("cat") == "comm"]
        assert len(comm) == len(calls) == 13                    # 12 all-reduces, a send/recv
        assert [end is None for _, _, end in calls] == [False] * 12 + [True]   # gloo: no future
        done = [e for e in comm if e["ph"] == "X"]
        assert sorted(e["args"]["index"] for e in done) == list(range(12))
        assert all(names[rank, e["tid"]].startswith("collectives") for e in comm)
        [unseen] = [e for e in comm if e["ph"] == "i"]
        assert unseen["name"] == ("send" if rank == 0 else "recv") + " (end not seen)"
        # spans on the clock of comm.spans(): same order, same lengths
        starts = [e["ts"] for e in sorted(done, key=lambda e: e["args"]["index"])]
        assert starts == sorted(starts)
        assert all(abs(e["dur"] - (end - start) * 1e6) < 1e-2
                   for e, (_, start, end) in zip(sorted(done, key=lambda e: e["args"]["index"]),
                                                 calls))
        # a collective that begins before the last one on a track ended goes on another track
        for track in {e["tid"] for e in done}:
            mine = sorted((e for e in done if e["tid"] == track), key=lambda e: e["ts"])
            assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-6 for a, b in zip(mine, mine[1:]))
    path = save(trace, tmp_path / "traces" / "step.json")
    assert json.loads(path.read_text()) == trace
    with pytest.raises(ValueError, match="both of rank 0"):
        merge([two_ranks[0][0], two_ranks[0][0]])


def test_overlap_of_the_measured_step_counts_only_compute_spans(two_ranks):
    trace = merge([events for events, _, _ in two_ranks])
    for o in overlap(trace):
        assert o.collectives == 12 and o.unseen == 1
        assert 0 < o.comm_s and 0 <= o.hidden_s <= o.comm_s and o.share == o.hidden_s / o.comm_s
    # a wait span is not compute: called compute, it would hide at least as much
    relabelled = [dict(e, cat="compute") if e.get("name") == "wait" else e
                  for e in trace["traceEvents"]]
    assert all(b.hidden_s >= a.hidden_s for a, b in zip(overlap(trace), overlap(relabelled)))


def span(name, ts, dur, cat, pid=0, tid=0):
    return {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur, "pid": pid, "tid": tid}


def test_overlap_is_the_union_of_communication_under_the_union_of_compute():
    events = [span("forward", 0, 10e6, "compute"), span("inner", 5e6, 3e6, "compute"),
              span("backward", 20e6, 10e6, "compute"), span("wait", 30e6, 10e6, "other"),
              span("all_reduce", 8e6, 4e6, "comm", tid=1),        # 2 s of 4 under compute
              span("all_reduce", 9e6, 2e6, "comm", tid=2),        # inside the one above
              span("all_gather", 25e6, 15e6, "comm", tid=1),      # 5 s of 15 under compute
              {"name": "send (end not seen)", "cat": "comm", "ph": "i", "s": "t", "ts": 1,
               "pid": 0, "tid": 1},
              span("all_reduce", 0, 1e6, "comm", pid=1, tid=1)]   # rank 1: no compute
    rank0, rank1 = overlap({"traceEvents": events})
    assert rank0 == Overlap(0, 19.0, 7.0, 7 / 19, 3, 1)
    assert rank1 == Overlap(1, 1.0, 0.0, 0.0, 1, 0)
    assert overlap(events, ops=["all_gather"])[0] == Overlap(0, 15.0, 5.0, 1 / 3, 1, 0)
    assert overlap([span("forward", 0, 1, "compute")])[0].share is None   # nothing to hide


def test_spans_must_nest_and_times_must_run_forward():
    trace = StepTrace()
    trace.add_span("a", 1.0, 3.0)
    trace.add_span("b", 2.0, 4.0)
    with pytest.raises(ValueError, match="'a' and 'b' overlap"):
        trace.events(rank=0)
    with pytest.raises(ValueError, match="ends"):
        trace.add_span("c", 2.0, 1.0)


def test_collectives_timed_elsewhere_join_the_ledgers_in_time_order():
    from labkit.comm import CommCall
    trace = StepTrace()
    trace.origin = 0.0
    trace.add_span("compute", 0.0, 2.0)
    trace.add_collective(CommCall("all_gather", 64, 32.0, 1.0, 2, None, True), 1.5, 2.5)
    trace.add_collective(CommCall("reduce_scatter", 64, 32.0, None, 2, None, True), 0.5)
    with pytest.raises(ValueError, match="all_gather ends"):
        trace.add_collective(CommCall("all_gather", 64, 32.0, 1.0, 2, None, True), 3.0, 2.0)
    events = trace.events(rank=0)
    validate(merge([events]))
    comm = [e for e in events if e.get("cat") == "comm"]
    assert [(e["name"], e["ph"], e["ts"], e["args"]["index"]) for e in comm] == [
        ("reduce_scatter (end not seen)", "i", 0.5e6, 0), ("all_gather", "X", 1.5e6, 1)]
    assert overlap(merge([events]))[0].share == 0.5           # 0.5 s of 1 s under compute


def test_a_trace_outside_a_process_group_is_rank_0_and_valid():
    trace = StepTrace()
    with trace:
        with trace.span("forward"):
            torch.ones(3).sum()
    events = trace.events()
    validate(merge([events]))
    assert {e["pid"] for e in events} == {0} and not any(e.get("cat") == "comm" for e in events)


def test_overlap_bars_draw_communication_and_its_hidden_part_per_rank():
    import matplotlib
    matplotlib.use("Agg")
    per_rank = [Overlap(0, 0.004, 0.001, 0.25, 3, 0), Overlap(1, 0.002, 0.0015, 0.75, 3, 0)]
    ax = plots.overlap_bars(per_rank, title="t")
    bars = [round(p.get_height(), 6) for p in ax.containers[0]], \
           [round(p.get_height(), 6) for p in ax.containers[1]]
    assert bars == ([4.0, 2.0], [1.0, 1.5])                   # ms in flight, ms hidden
    assert [t.get_text() for t in ax.get_xticklabels()] == ["rank 0", "rank 1"]
    assert [t.get_text() for t in ax.texts] == ["25%", "75%"] and ax.get_title() == "t"
    no_comm = plots.overlap_bars([Overlap(0, 0.0, 0.0, None, 0, 0)])
    assert [t.get_text() for t in no_comm.texts] == ["no communication"]
