"""Notebook 01: the ring's two phases as exercises of their own, reused by the ZeRO notebooks.

``ring_reduce_scatter(tensor) -> None`` and ``ring_all_gather(tensor) -> None`` work in place on
chunks = torch.tensor_split(tensor, N), with send/recv on the ring of ``ring_all_reduce``:
* reduce-scatter: afterwards chunk r of rank r's tensor holds the sum over ranks of chunk r (in
  ZeRO rank r owns shard r); its other chunks may hold anything;
* all-gather: on entry chunk r of rank r's tensor holds rank r's data and its other chunks hold
  random values (the check's, so that a chunk never written shows); afterwards every rank's
  tensor holds every rank's chunk, each in its place.
Composed, ``ring_reduce_scatter(t); ring_all_gather(t)`` is a ring all-reduce: a function doing
that passes ``labkit.check.ring_all_reduce``.

Both run on 2, 3, 4 ranks with fresh inputs (``_allreduce.RING_CASES``, float64 included) and
must be rings of one phase (``_ring.check``): no collective, N-1 sends of one chunk each to
(r + 1) % N and N-1 receives from (r - 1) % N per rank.
"""
from itertools import combinations

import torch

from labkit.check import _ring, _sizes
from labkit.check._allreduce import (RING_CASES, chunk_bounds, close, reference_sum, spans,
                                     tensor_split_spans)
from labkit.check._core import Ranks, exercise
from labkit.check._hints import register

WORLD_SIZES = (2, 3, 4)
QUICK_WORLD_SIZES = (2, 3)   # LABKIT_AUTOGRADE_SIZES=quick under nbgrader (_sizes.py)


def _values(cases, n, right, diagnose):
    """The hint for wrong values on ``n`` ranks, or None; ``right(case, n)`` -> [N, S] bool of
    the elements that must be and are right, ``diagnose(case, n)`` names the bug."""
    wrong = [c for c in cases if not bool(right(c, n).all())]
    if not wrong:
        return None
    if all(c["size"] % n for c in wrong) and any(c["size"] % n == 0 for c in cases
                                                 if c not in wrong):
        case = next((c for c in wrong if c["size"] == 7), wrong[-1])
        bad = ~right(case, n).all(dim=0)
        return (f"correct when {n} divides the size, wrong otherwise: with {case['size']} "
                f"elements on {n} ranks, elements {spans(bad)} are wrong. Check the chunk "
                f"boundaries: torch.tensor_split(tensor, {n}) gives "
                f"{tensor_split_spans(case['size'], n)}")
    case = max(wrong, key=lambda c: c["size"])     # the largest: its pattern says the most
    return f"on {n} ranks with {case['label']}, " + diagnose(case, n)


def _unchanged(case, what):
    if case["returned"] and any(r is not None for r in case["returned"]):
        return (f"you returned a tensor but left `tensor` unchanged: {what} works in place, on "
                "the chunks of `tensor` (torch.tensor_split gives views into it)")
    return (f"`tensor` was not changed: {what} works in place, on the chunks of `tensor` "
            "(views from torch.tensor_split); `tensor = ...` only rebinds a local name")


# --- ring_reduce_scatter --------------------------------------------------------------------------

register("ring_reduce_scatter", [
    "chunks = torch.tensor_split(tensor, N) gives N views (adding into a chunk changes tensor). "
    "In each of N-1 steps every rank sends one chunk to its right neighbour (r + 1) % N and "
    "adds the chunk it receives from its left neighbour (r - 1) % N into its own copy of that "
    "chunk. A chunk collects one more rank's values at every hop; plan the trips so that the "
    "chunk that completes on rank r is chunk r.",
    "Work backwards from the end: at the last step, s = N-2, rank r must add into chunk r. So "
    "at step s rank r receives and adds into chunk (r - s - 2) % N, and sends chunk "
    "(r - s - 1) % N, which is what its right neighbour adds at that step. At step 0 that is "
    "chunk (r - 1) % N, still untouched.",
    "for s in range(N - 1): i, j = (r - s - 1) % N, (r - s - 2) % N; "
    "buf = torch.empty_like(chunks[j]); req = dist.isend(chunks[i], (r + 1) % N); "
    "dist.recv(buf, (r - 1) % N); req.wait(); chunks[j].add_(buf). Add (never copy) what you "
    "receive, into a fresh buffer of the chunk's own size and dtype (torch.empty(k) is float32).",
])


def _rs_right(case, n):
    """[N, S]: True where it does not matter or is right (chunk r of rank r holds its sum)."""
    expected = reference_sum(case["inputs"])
    ok = torch.ones_like(case["outputs"], dtype=torch.bool)
    for r, (a, b) in enumerate(chunk_bounds(case["size"], n)):
        ok[r, a:b] = close(case["outputs"][r, a:b], expected[a:b])
    return ok


def _rs_diagnose(case, n):
    inputs, outputs = case["inputs"], case["outputs"]
    expected, bounds = reference_sum(inputs), chunk_bounds(case["size"], n)
    if torch.equal(outputs, inputs):
        return _unchanged(case, "the reduce-scatter")

    def holds_sum(r, j):
        a, b = bounds[j]
        return b > a and bool(close(outputs[r, a:b], expected[a:b]).all())
    bad = [r for r in range(n) if bounds[r][1] > bounds[r][0] and not holds_sum(r, r)]
    r = bad[0]
    shift = next((d for d in range(1, n) if all(holds_sum(q, (q + d) % n) for q in bad)), None)
    if shift is not None:
        return (f"rank {r} holds the complete sum of chunk {(r + shift) % n}, not of chunk {r}: "
                "the reduce-scatter must leave chunk r, summed, on rank r (in ZeRO rank r owns "
                "shard r). Shift your schedule: at step s send chunk (r - s - 1) % N and add "
                "what you receive into chunk (r - s - 2) % N, so that the last chunk you add "
                "into is chunk r")
    a, b = bounds[r]
    mine, x = outputs[r, a:b], inputs[:, a:b]
    if bool(close(mine * n, expected[a:b]).all()):
        return (f"rank {r}'s chunk {r} holds the mean, not the sum (1/{n} of it): do not divide "
                "by the number of ranks")
    for k in range(1, n):
        for subset in combinations(range(n), k):
            if not bool(close(x[list(subset)].sum(dim=0), mine).all()):
                continue
            if subset == (r,):
                return (f"rank {r}'s chunk {r} holds only its own values: nothing was added "
                        "into it. The chunk you add into at the last step must be chunk r")
            if k == 1:
                return (f"rank {r}'s chunk {r} holds the values of rank {subset[0]} alone: each "
                        "received chunk overwrote yours. Add it instead: "
                        "chunks[j].add_(received)")
            return (f"rank {r}'s chunk {r} holds the sum of only {k} of the {n} ranks "
                    f"({', '.join(map(str, subset))}): a step is missing, or a received chunk "
                    "was added into another chunk. In N-1 steps each chunk must pass every "
                    "rank once, collecting its values")
    i = int(torch.nonzero(~close(mine, expected[a:b]))[0])
    return (f"rank {r}'s chunk {r} ([{a}:{b}]) is wrong: element {a + i} is "
            f"{mine[i].item():.6g}, the sum over ranks is {expected[a + i].item():.6g}")


@exercise("ring_reduce_scatter", sizes=True)
def ring_reduce_scatter(fn, *, timeout: float = 10.0):
    """``fn(tensor)`` must reduce-scatter ``tensor`` in place, as a ring of send/recv.

    On 2, 3, 4 ranks, fresh inputs of 1, 7, 12, 64, 1000 float32 and 12 float64 elements:
    * values: on rank r, chunk r of torch.tensor_split(tensor, N) equals the float64 sum over
      ranks of chunk r (the other chunks are not looked at);
    * mechanism (the ledger): no collective; each rank sends only to (r + 1) % N and receives
      only from (r - 1) % N; every message is one chunk (floor or ceil of S/N elements); N-1
      sends and N-1 receives per rank (where S >= N).
    ``timeout``: seconds per launch.
    """
    return _grade_phase("ring_reduce_scatter", fn, timeout, _rs_right, _rs_diagnose,
                        "reduce_scatter", "rank r holds the sum of chunk r")


def _grade_phase(name, fn, timeout, right, diagnose, op, outcome):
    """What the two phases' checks share: the ring in the ledger (``_ring.grade``), the values
    judged by ``right`` and named by ``diagnose``, the summary with the bytes measured."""
    ranks = Ranks(name, timeout=timeout, crash_advice=_ring.crash_advice,
                  hang_advice=_ring.hang_advice)
    runs = _ring.grade(ranks, fn, name, 1,
                       lambda cases, n: _values(cases, n, right, diagnose),
                       _sizes.pick(WORLD_SIZES, QUICK_WORLD_SIZES), RING_CASES)
    figures, measured = _ring.measured(runs, RING_CASES, op, "(N-1)/N·S")
    return (f"{outcome} on {', '.join(map(str, sorted(runs)))} ranks for "
            f"{_ring.cases_tried(RING_CASES)}, as a ring of send/recv (one chunk per message, to "
            f"the right neighbour){measured}", figures)


# --- ring_all_gather ------------------------------------------------------------------------------

register("ring_all_gather", [
    "On entry rank r holds only chunk r of chunks = torch.tensor_split(tensor, N); its other "
    "chunks hold garbage. In each of N-1 steps every rank sends to (r + 1) % N the chunk it got "
    "most recently (its own at step 0) and receives from (r - 1) % N the chunk its left "
    "neighbour got most recently, writing it in place: a copy, not a sum.",
    "for s in range(N - 1): req = dist.isend(chunks[(r - s) % N], (r + 1) % N); "
    "dist.recv(chunks[(r - s - 1) % N], (r - 1) % N); req.wait(). Receiving straight into the "
    "chunk writes into tensor, since the chunks are views.",
])


def _gathered(case, n):
    """What every rank must end with: chunk r from rank r, for every r."""
    full = torch.empty_like(case["inputs"][0])
    for r, (a, b) in enumerate(chunk_bounds(case["size"], n)):
        full[a:b] = case["inputs"][r, a:b]
    return full


def _ag_right(case, n):
    return close(case["outputs"], _gathered(case, n).expand_as(case["outputs"]))


def _ag_diagnose(case, n):
    inputs, outputs = case["inputs"], case["outputs"]
    full, bounds = _gathered(case, n), chunk_bounds(case["size"], n)
    if torch.equal(outputs, inputs):
        if any(r is not None for r in case["returned"]):
            return _unchanged(case, "the all-gather")
        return ("`tensor` was not changed: the chunks of the other ranks were never written into "
                "it (they still hold the random values the check put there). Receive each "
                "straight into its chunk, dist.recv(chunks[i], left): the chunks are views "
                "into tensor")
    r, j = next((r, j) for r in range(n) for j, (a, b) in enumerate(bounds)
                if not bool(close(outputs[r, a:b], full[a:b]).all()))
    a, b = bounds[j]
    got, want, entry = outputs[r, a:b], full[a:b], inputs[r, a:b]
    if j == r:
        return (f"rank {r}'s own chunk {r} changed: it holds rank {r}'s data on entry and must "
                "keep it; send it on, never receive into it")
    if torch.equal(got, entry):
        return (f"chunk {j} on rank {r} was never written: it still holds the random values the "
                "check put there (on entry a rank holds only its own chunk). In N-1 steps every "
                "other chunk must arrive: at step s receive chunk (r - s - 1) % N from "
                "(r - 1) % N straight into chunks[(r - s - 1) % N]")
    if bool(close(got, entry + want).all()):
        return (f"chunk {j} on rank {r} holds what it held on entry plus rank {j}'s chunk: in "
                "the all-gather copy what you receive (dist.recv straight into the chunk, or "
                "chunk.copy_(received)), do not add it")
    for k, (c, d) in enumerate(bounds):
        if k != j and d - c == b - a and bool(close(got, full[c:d]).all()):
            return (f"chunk {j} on rank {r} holds rank {k}'s chunk {k}: the chunks land in the "
                    "wrong places. The chunk that arrives at step s is (r - s - 1) % N: receive "
                    "it into chunks[(r - s - 1) % N]")
    i = int(torch.nonzero(~close(got, want))[0])
    return (f"chunk {j} on rank {r} ([{a}:{b}]) is wrong: element {a + i} is "
            f"{got[i].item():.6g}, rank {j} has {want[i].item():.6g} there")


@exercise("ring_all_gather", sizes=True)
def ring_all_gather(fn, *, timeout: float = 10.0):
    """``fn(tensor)`` must all-gather ``tensor``'s chunks in place, as a ring of send/recv.

    On 2, 3, 4 ranks, fresh inputs of 1, 7, 12, 64, 1000 float32 and 12 float64 elements. On
    entry chunk r of torch.tensor_split(tensor, N) on rank r holds rank r's data, the other
    chunks random values:
    * values: afterwards every rank's tensor holds chunk j of rank j at chunk j, for every j;
    * mechanism (the ledger): no collective; each rank sends only to (r + 1) % N and receives
      only from (r - 1) % N; every message is one chunk (floor or ceil of S/N elements); N-1
      sends and N-1 receives per rank (where S >= N).
    ``timeout``: seconds per launch.
    """
    return _grade_phase("ring_all_gather", fn, timeout, _ag_right, _ag_diagnose, "all_gather",
                        "every rank holds every rank's chunk")
