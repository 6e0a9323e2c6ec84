"""A ``MemoryTracer`` run in the snapshot format of PyTorch's memory viewer.

    with labkit.MemoryTracer(model, optimizer) as mem:
        train_step()
    mem.snapshot("traces/memory.pickle")   # drop it on https://pytorch.org/memory_viz

On a GPU, ``torch.cuda.memory._snapshot()`` (torch 2.13: ``torch/cuda/memory.py``, whose
docstring spells out the format) describes the CUDA caching allocator: ``"segments"``, the memory
it got from ``cudaMalloc``, each cut into ``"blocks"`` (a tensor's storage, or free space), and,
once ``torch.cuda.memory._record_memory_history()`` is on, ``"device_traces"``: every ``alloc``,
``free_requested``, ``free_completed``, ``segment_alloc`` and ``segment_free`` in order. The
viewer at pytorch.org/memory_viz and ``torch.cuda._memory_viz`` (``trace_plot``, ``segment_plot``,
``segsum``, ``trace``, ``memory``, ``segments``) read that dictionary. This module writes a
tracer's run in it, so a CPU run opens in the viewer learners meet on GPUs.

What differs from a GPU snapshot, because the CPU has no caching allocator:
- each storage is a segment of its own, allocated with it and freed with it: "reserved" equals
  "allocated", and there is no fragmentation to see;
- addresses are labels, one per storage and never reused, not ``data_ptr()``; a storage resized
  (``resize_``) is freed and allocated again under a new label;
- an allocation's ``category`` (the colours and legend of "Active Memory Timeline") is the first
  category other than "other" the tracer gave its storage (an activation stays "activations"
  after backward released it); its frames are, innermost first, the op or mark that allocated
  (or freed) it, the Python stack when the tracer had ``stacks=True``, and a last frame that
  names the category, so ``torch.cuda._memory_viz.memory`` groups by category first. The blocks
  alive at the end name the category they have at the end, as the tracer's ``current`` does;
- sizes are the storages' bytes, not rounded up to the allocator's 512-byte blocks.
"""
import pickle
from pathlib import Path

BASE, ALIGN = 2**32, 512   # labels start here and step by each size rounded up to ALIGN
MiB = 2**20


def from_log(log, device: int = 0) -> dict:
    """The snapshot of a tracer's storage log (``MemoryTracer._log``, in order):
    ``(storage, nbytes, category)`` for each change of a storage's size or category (storage: a
    number the tracer gave it, never reused), and
    ``(event, stack)`` after the changes that op or mark made (stack: None, or
    ``[(filename, line, function), ...]`` innermost first)."""
    first_role, last = {}, {}
    for item in log:
        if len(item) == 3:
            last[item[0]] = item[2]
            if item[2] != "other":
                first_role.setdefault(item[0], item[2])
    trace, live, pending, next_addr = [], {}, [], BASE

    def frames(event, stack, category):
        return ([{"filename": "labkit.MemoryTracer", "line": 0, "name": event}]
                + [{"filename": f, "line": n, "name": name} for f, n, name in stack or ()]
                + [{"filename": "category", "line": 0, "name": category}])

    def book(changes, event, stack):
        nonlocal next_addr
        for storage, nbytes, _ in changes:
            block = live.get(storage)
            if block is not None and block["size"] == nbytes:
                continue                                  # its category changed, not its size
            role = first_role.get(storage, "other")
            if block is not None:                         # freed, or resized: freed first
                del live[storage]
                where = frames(event, stack, role)
                trace.extend(_event(action, block["addr"], block["size"], where)
                             for action in ("free_requested", "free_completed", "segment_free"))
            if nbytes:
                block = live[storage] = {"addr": next_addr, "size": nbytes, "storage": storage,
                                       "event": event, "stack": stack}
                next_addr += -(-nbytes // ALIGN) * ALIGN
                made = frames(event, stack, role)
                trace.append(_event("segment_alloc", block["addr"], nbytes, made))
                trace.append(dict(_event("alloc", block["addr"], nbytes, made), category=role))

    for item in log:
        if len(item) == 3:
            pending.append(item)
        else:
            book(pending, *item)
            pending = []
    book(pending, "now", None)
    # The snapshot itself, as torch's allocator notes one. Its "unknown" category keeps older
    # viewers working: MemoryViz.js adds "unknown" to the legend when it is missing, and a typo
    # there ("snapshot.categores") made that step fail in some versions.
    trace.append(dict(_event("snapshot", 0, 0, []), category="unknown"))
    # What is alive at the end, by the category it has at the end (the tracer's ``current``).
    segments = [_segment(b["addr"], b["size"], frames(b["event"], b["stack"], last[b["storage"]]),
                         device) for b in sorted(live.values(), key=lambda b: b["addr"])]
    return {"segments": segments, "device_traces": [trace]}


def _event(action, addr, size, frames) -> dict:
    return {"action": action, "addr": addr, "size": size, "stream": 0, "frames": frames}


def _segment(addr, size, frames, device) -> dict:
    """A live storage as torch describes a segment holding one allocated block."""
    return {"device": device, "address": addr, "total_size": size, "allocated_size": size,
            "active_size": size, "stream": 0,
            "segment_type": "large" if size > MiB else "small", "segment_pool_id": (0, 0),
            "is_expandable": False, "frames": frames,
            "blocks": [{"address": addr, "size": size, "requested_size": size,
                        "state": "active_allocated", "frames": frames}]}


def save(snapshot, path) -> Path:
    """Write the snapshot as a pickle, as ``torch.cuda.memory._dump_snapshot`` does. Protocol 4:
    the viewer's own unpickler (MemoryViz.js) reads protocols 2 to 4 only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(snapshot, f, protocol=4)
    return path
