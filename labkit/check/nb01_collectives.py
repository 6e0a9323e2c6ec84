"""Notebook 01: an all-reduce built from send/recv as a ring (and, as a demo, from one
reduce-scatter and one all-gather), checked against a float64 sum and torch's ``dist.all_reduce``.

Every check runs on 2, 3 and 4 ranks (one launch each) with fresh random tensors of 1, 7, 12, 64
and 1000 float32 elements, so that sizes the ranks do not divide, and sizes smaller than the
number of ranks, are always tried; the ring also gets 12 float64 elements. The inputs are drawn in
the notebook for every run; each rank keeps only its own (``_allreduce.py``). A ``CommCounter``
in each rank records what the learner's code sent, how many bytes, to whom; ``_ring.py`` reads
the ring out of it. The ring's two phases, as exercises of their own: ``nb01_ring_phases.py``.
"""
import math

from labkit.check import _ring, _sizes
from labkit.check._allreduce import (FLOAT32, RING_CASES, SIZES, close, correct, ops_used,
                                     run_fresh, spans, tensor_split_spans, with_sum,
                                     wrong_values)
from labkit.check._core import Failed, Ranks, exercise
from labkit.check._hints import register

WORLD_SIZES = (2, 3, 4)
QUICK_WORLD_SIZES = (2, 3)   # LABKIT_AUTOGRADE_SIZES=quick under nbgrader (_sizes.py)
SHOWN = _ring.SHOWN
_DATA_OPS = {"all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all",
             "gather", "scatter"}


def _uneven(cases, n):
    """The case to blame when only sizes that ``n`` does not divide are wrong, else None."""
    wrong = [c for c in cases if not correct(c)]
    if wrong and all(c["size"] % n for c in wrong) and \
            any(c["size"] % n == 0 for c in cases if correct(c)):
        return next((c for c in wrong if c["size"] == 7), wrong[-1])
    return None


def _only_uneven_sizes_wrong(cases, n, advice):
    """The hint for "right when N divides the size, wrong otherwise", or None; ``advice(size)``
    says what to fix in this exercise."""
    uneven = _uneven(cases, n)
    if uneven:
        size = uneven["size"]
        return (f"correct when {n} divides the size, wrong otherwise: with {size} elements "
                f"on {n} ranks, elements {spans(_bad_elements(uneven))} are wrong. " + advice(size))
    return None


def _bad_elements(case):
    return ~close(case["outputs"], case["expected"]).all(dim=0)


# --- ring_all_reduce ----------------------------------------------------------------------------

register("ring_all_reduce", [
    "Split the tensor into N chunks with chunks = torch.tensor_split(tensor, N): N views into "
    "tensor (writing into a chunk writes into tensor), their sizes differing by at most one, "
    "some of them empty when the tensor has fewer than N elements (torch.chunk may give fewer "
    "than N). Then two phases of N-1 steps. Reduce-scatter: at each step every rank passes one "
    "chunk to its right neighbour, which adds it into its own copy; after N-1 steps each rank "
    "holds one chunk summed over all ranks. All-gather: N-1 more steps pass the summed chunks "
    "on around the ring, copied, not added.",
    "The schedule for rank r, with right = (r + 1) % N and left = (r - 1) % N. Reduce-scatter, "
    "step s = 0 ... N-2: send chunks[(r - s) % N] to right; receive from left the chunk "
    "(r - s - 1) % N and add it into chunks[(r - s - 1) % N]. Rank r then holds the complete sum "
    "of chunk (r + 1) % N. All-gather, step s = 0 ... N-2: send chunks[(r + 1 - s) % N] to "
    "right; receive from left into chunks[(r - s) % N].",
    "Each step, without a deadlock: req = dist.isend(chunks[i], right); dist.recv(buf, left); "
    "req.wait(). In the reduce-scatter receive into a fresh buffer the size and dtype of the "
    "chunk that arrives, buf = torch.empty_like(chunks[j]) (torch.empty(k) would be float32 "
    "whatever the tensor is), then chunks[j].add_(buf). In the all-gather receive straight into "
    "the chunk: dist.recv(chunks[j], left). Do not write into a chunk handed to isend before "
    "its wait() returns.",
])

_RING_GATHER = ("the all-gather phase is missing or incomplete: after the N-1 reduce-scatter "
                "steps, pass the reduced chunks around the ring for N-1 more steps, copying "
                "(not adding) what you receive")
_RING_ADD = ("in the reduce-scatter phase add the received chunk to your own "
             "(chunk += received) instead of overwriting it, for all N-1 steps")


def _ring_values(cases, n):
    """The hint for a ring all-reduce's wrong values on ``n`` ranks, or None."""
    hint = _only_uneven_sizes_wrong(cases, n, lambda size: (
        f"Check the chunk boundaries: the {n} chunks must cover all {size} elements, their "
        f"sizes differing by at most one; torch.tensor_split(tensor, {n}) gives "
        f"{tensor_split_spans(size, n)}"))
    if hint:
        return hint
    wrong = [c for c in cases if not correct(c)]
    if wrong:
        case = max(wrong, key=lambda c: c["size"])   # the largest: its pattern says the most
        return (f"on {n} ranks with {case['label']}, "
                + wrong_values(case, _RING_GATHER, _RING_ADD))
    return None


@exercise("ring_all_reduce", sizes=True)
def ring_all_reduce(fn, *, timeout: float = 10.0):
    """``fn(tensor)`` must SUM-all-reduce ``tensor`` in place, as a ring of send/recv.

    On 2, 3, 4 ranks, fresh inputs of 1, 7, 12, 64, 1000 float32 and 12 float64 elements:
    * values: every rank's tensor equals the float64 sum over ranks (also torch's all_reduce);
    * mechanism (the ledger): no collective; each rank sends only to (r + 1) % N and receives
      only from (r - 1) % N; every message is one chunk of torch.tensor_split(tensor, N)
      (floor or ceil of S/N elements); 2(N-1) sends and 2(N-1) receives per rank (where S >= N).
    Free: the chunk schedule, send or isend, irecv, batch_isend_irecv, receiving into the chunk.
    ``fn`` may be ring_reduce_scatter followed by ring_all_gather: that is a ring all-reduce too.
    ``timeout``: seconds per launch.
    """
    ranks = Ranks("ring_all_reduce", timeout=timeout, crash_advice=_ring.crash_advice,
                  hang_advice=_ring.hang_advice)
    runs = _ring.grade(ranks, fn, "ring_all_reduce", 2, _ring_values,
                       _sizes.pick(WORLD_SIZES, QUICK_WORLD_SIZES), RING_CASES,
                       prepare=with_sum, all_reduce_too=True)
    figures, measured = _ring.measured(runs, RING_CASES, "all_reduce", "2(N-1)/N·S")
    return (f"matches dist.all_reduce on {', '.join(map(str, sorted(runs)))} ranks for "
            f"{_ring.cases_tried(RING_CASES)}, as a ring of send/recv (one chunk per message, to "
            f"the right neighbour){measured}", figures)


# --- all_reduce_via_rs_ag -----------------------------------------------------------------------

def _padding(size, n):
    return f"{math.ceil(size / n) * n}"


def _elements(size):
    return f"{size} element" + ("s" if size != 1 else "")


def _rs_ag_crash_advice(crash):
    case, n = _ring.case_of(crash.case), crash.nprocs
    if case is not None and case.size % n:
        size = case.size
        return (f"{size} is not a multiple of {n}: pad the tensor with zeros to a multiple of N "
                f"({_padding(size, n)} here) before the reduce-scatter, and copy back only the "
                f"first {_elements(size)} after the all-gather")
    return None


def _check_rs_ag(cases, n):
    for case in cases:
        used = ops_used(case)
        if "all_reduce" in used:
            raise Failed("all_reduce_via_rs_ag called dist.all_reduce: build it from one "
                         "reduce-scatter and one all-gather (labkit.compat."
                         "reduce_scatter_tensor and all_gather_into_tensor)")
        others = sorted(set(used) & (_DATA_OPS | {"send", "recv"}) - {"reduce_scatter",
                                                                       "all_gather"})
        if others:
            raise Failed(f"all_reduce_via_rs_ag used {', '.join(others)}: build it from exactly "
                         "one reduce-scatter and one all-gather, nothing else")
        for op, name in (("reduce_scatter", "reduce-scatter"), ("all_gather", "all-gather")):
            if used.get(op, 0) == 0:
                raise Failed(f"no {name}: " + (_missing_gather(cases, n) if op == "all_gather"
                                               else "reduce-scatter the padded tensor first: "
                                               "each rank gets the sum of its own shard"))
            if used[op] > 1:
                raise Failed(f"called {name} {used[op]} times for one tensor: one {name} of the "
                             "whole padded tensor is enough")
    hint = _only_uneven_sizes_wrong(cases, n, lambda size: (
        f"Pad the tensor with zeros to a multiple of N ({_padding(size, n)} here) before the "
        f"reduce-scatter, and copy back the first {_elements(size)} of the gathered buffer"))
    if hint:
        raise Failed(hint)
    wrong = [c for c in cases if not correct(c)]
    if wrong:
        case = max(wrong, key=lambda c: c["size"])
        raise Failed(f"on {n} ranks with {case['size']} elements, " + wrong_values(
            case, "all-gather every rank's reduced shard, in rank order, into the padded buffer",
            "reduce-scatter with op=SUM over the whole padded tensor"))


def _missing_gather(cases, n):
    big = max(cases, key=lambda c: c["size"])
    right = spans(close(big["outputs"][0], big["expected"]))
    return ("after the reduce-scatter each rank holds only its own reduced shard (with "
            f"{big['size']} elements on {n} ranks, rank 0 is right on {right} only): all-gather "
            "the shards into the padded buffer and copy it back into tensor")


@exercise("all_reduce_via_rs_ag", sizes=True)
def all_reduce_via_rs_ag(fn, *, timeout: float = 10.0):
    """``fn(tensor)`` must SUM-all-reduce ``tensor`` in place with one reduce-scatter and one
    all-gather (padding to a multiple of N). A demo in notebook 01 now, no longer an exercise
    there: ``ring_reduce_scatter`` and ``ring_all_gather`` replace it.

    Checked against the float64 sum and ``dist.all_reduce`` on 2, 3, 4 ranks, fresh float32
    inputs of 1, 7, 12, 64, 1000 elements; the ledger must show one reduce_scatter, one
    all_gather, nothing else. The summary shows that the two carry what one all-reduce carries
    (ZeRO §7.1). ``timeout``: seconds per launch.
    """
    ranks = Ranks("all_reduce_via_rs_ag", timeout=timeout, crash_advice=_rs_ag_crash_advice)
    world_sizes = _sizes.pick(WORLD_SIZES, QUICK_WORLD_SIZES)
    shown_ranks = min(SHOWN[0], max(world_sizes))
    for n in world_sizes:
        cases = [with_sum(c) for c in run_fresh(ranks, fn, (n,), FLOAT32,
                                                all_reduce_too=True)[n]]
        _check_rs_ag(cases, n)
        if n == shown_ranks:
            shown = next(c for c in cases if c["size"] == SHOWN[1])
    ledger = {op: (payload, wire) for op, payload, wire, _ in shown["calls"][0]}
    (rs, rs_wire), (ag, ag_wire) = ledger["reduce_scatter"], ledger["all_gather"]
    _, ar, ar_wire, _ = shown["torch_sums"][0][1]
    figures = {"world_sizes": list(world_sizes), "sizes": sorted(SIZES), "ranks": shown_ranks,
               "elements": SHOWN[1], "reduce_scatter_payload_bytes": rs,
               "all_gather_payload_bytes": ag, "all_reduce_payload_bytes": ar,
               "reduce_scatter_wire_bytes": rs_wire, "all_gather_wire_bytes": ag_wire,
               "all_reduce_wire_bytes": ar_wire}
    carry = f"each carry {rs:,} B" if rs == ag else f"carry {rs:,} B and {ag:,} B"
    return (f"matches dist.all_reduce on {', '.join(map(str, world_sizes))} ranks for "
            f"{_ring.cases_tried(FLOAT32)} with one reduce-scatter + one all-gather; "
            f"{shown_ranks} ranks × {SHOWN[1]} floats: they "
            f"{carry}, like the all-reduce ({ar:,} B), and on a ring each rank sends "
            f"{rs_wire:,.0f} + {ag_wire:,.0f} = {rs_wire + ag_wire:,.0f} B, what one all-reduce "
            f"sends ({ar_wire:,.0f} B)", figures)
