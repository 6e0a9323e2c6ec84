"""Notebook 01: ``all_reduce_while_computing(tensors, compute)``, communication that overlaps.

The exercise: start a SUM all-reduce of every tensor with ``async_op=True`` (each returns a
handle at once), call ``compute()`` while they run, then ``wait()`` on every handle. Overlapped
DDP (notebook 03) is this pattern: buckets of gradients are all-reduced while backward goes on.

What the check asserts, on 2 and 3 ranks, with fresh random tensors from the notebook process
(a reference sum computed there, in float64):
* when ``compute()`` is called, every all-reduce has been started, each with ``async_op=True``
  (the ``CommCounter`` ledger records the flag): issuing them after compute, or one by one with
  a wait in between, leaves nothing to overlap;
* ``compute()`` is called exactly once, and its value is returned;
* compute() runs while the all-reduces are still open: rank 0 calls the function only once
  every other rank has reached compute() (or after a few seconds), so on the other ranks no
  all-reduce can have finished by then. A rank whose compute() comes after rank 0 started has
  waited for its all-reduces before computing;
* every tensor holds the sum when the function returns; a rank that does not wait returns
  before rank 0 has even started, so its sums cannot exist yet: that is seen too.

The ranks tell each other where they are through empty files in a folder the check makes (not
through torch.distributed, whose calls would land in the learner's ledger or wait behind it).
"""
import secrets
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from labkit.check._core import Failed, Ranks, call_learner, exercise
from labkit.check._hints import register
from labkit.comm import CommCounter
from labkit.placement import device

WORLD_SIZES = (2, 3)
SIZES = (5, 1000, 1)
RANK0_WAITS_S = 3.0  # at most this long for the other ranks to reach compute()
RTOL = ATOL = 1e-5   # float32 sums of N <= 3 standard normals in any order: see _allreduce.py


register("all_reduce_while_computing", [
    "Every collective takes async_op=True; it then returns a handle at once instead of waiting, "
    "and the backend works in the background. Keep the handles.",
    "Three steps, in this order: handles = [dist.all_reduce(t, async_op=True) for t in "
    "tensors]; result = compute(); then handle.wait() for every handle, and return result.",
])


def fresh_inputs(n, sizes):
    """[n, size] float32 stacks, rank r's tensors in row r, new at every check run: drawn here
    and passed to the ranks, so no rank can know another's values without communicating."""
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    return [torch.randn(n, size, generator=generator) for size in sizes]


def _run(fn, inputs, folder):
    """In one rank: the learner's function on this rank's tensors, under a ledger."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tensors = [stack[rank].clone().to(device()) for stack in inputs]   # drawn on the CPU
    folder = Path(folder)
    if rank == 0:
        deadline = time.monotonic() + RANK0_WAITS_S
        while time.monotonic() < deadline and not all(
                (folder / f"compute-{r}").exists() for r in range(1, world)):
            time.sleep(0.005)
        (folder / "rank0-started").touch()
    seen, overlapped = [], []

    def compute():
        seen.append([(call.op, call.async_op) for call in counter.calls])
        if rank != 0:
            overlapped.append(not (folder / "rank0-started").exists())
            (folder / f"compute-{rank}").touch()
        return ("computed on rank", rank)

    with CommCounter() as counter:
        returned = call_learner(fn, tensors, compute,
                                case=f"{len(tensors)} tensors of {', '.join(map(str, SIZES))} "
                                     "elements")
    outputs = [t.clone() for t in tensors]   # at once: a missing wait shows here
    return {"outputs": outputs, "seen": seen, "overlapped": all(overlapped),
            "returned": returned == ("computed on rank", rank),
            "calls": [(call.op, call.async_op) for call in counter.calls]}


def _diagnose(results, inputs, n):
    """A hint, or None when every rank did it right."""
    want = [stack.double().sum(dim=0).float() for stack in inputs]
    for rank, result in enumerate(results):
        seen, calls = result["seen"], result["calls"]
        reduces = [async_op for op, async_op in calls if op == "all_reduce"]
        others = sorted({op for op, _ in calls} - {"all_reduce"})
        if others:
            return (f"rank {rank} used {', '.join(others)}: one dist.all_reduce per tensor is "
                    "all this needs")
        if len(seen) != 1:
            return (f"compute() was called {len(seen)} times on rank {rank}: call it exactly "
                    "once, after starting the all-reduces and before waiting for them")
        if len(reduces) != len(SIZES):
            return (f"rank {rank} made {len(reduces)} all-reduces for {len(SIZES)} tensors: one "
                    "per tensor")
        issued = seen[0]
        if len(issued) < len(SIZES):
            return (f"when compute() ran, rank {rank} had started {len(issued)} of the "
                    f"{len(SIZES)} all-reduces: start all of them first (async_op=True), then "
                    "compute, then wait; otherwise nothing overlaps")
        if not all(async_op for _, async_op in issued):
            return ("the all-reduces were not asynchronous: dist.all_reduce(t) waits until it "
                    "is done; dist.all_reduce(t, async_op=True) returns a handle at once, and "
                    "handle.wait() waits later")
        if not result["overlapped"]:
            return ("every all-reduce had already finished when compute() ran: waiting for "
                    "each one right after starting it leaves nothing to overlap. Start them "
                    "all, call compute(), and only then wait for each handle")
        if not result["returned"]:
            return "return the value that compute() returned"
        for got, expected in zip(result["outputs"], want):
            if not torch.allclose(got, expected, rtol=RTOL, atol=ATOL):
                return (f"rank {rank} returned before its tensors held the sums: call .wait() "
                        "on every handle before returning (an async all-reduce is finished "
                        "only once its wait() returns)")
    return None


@exercise("all_reduce_while_computing")
def all_reduce_while_computing(fn, *, timeout: float = 10.0):
    """``fn(tensors, compute)``: async all-reduce every tensor, compute, wait, return compute's
    value. On 2 and 3 ranks (module docstring). ``timeout``: seconds per launch."""
    ranks = Ranks("all_reduce_while_computing", timeout=timeout)
    for n in WORLD_SIZES:
        inputs = fresh_inputs(n, SIZES)
        with tempfile.TemporaryDirectory(prefix="labkit-check-") as folder:
            results = ranks.run(_run, n, fn, inputs, folder)
        hint = _diagnose(results, inputs, n)
        if hint:
            raise Failed(f"on {n} ranks, {hint}")
    return (f"on 2 and 3 ranks, all {len(SIZES)} all-reduces were started with async_op=True "
            "before compute() ran, and every tensor held the sum on return"), {}
