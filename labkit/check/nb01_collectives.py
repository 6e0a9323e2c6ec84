"""Notebook 01: an all-reduce built two ways, checked against torch's own ``dist.all_reduce``.

Both exercises run on 2, 3 and 4 ranks (one launch each) with tensors of 1, 7, 12, 64 and 1000
float32 elements, so that sizes the ranks do not divide, and sizes smaller than the number of
ranks, are always tried. A ``CommCounter`` in each rank records which collectives the learner's
code used and how many bytes they carried. How wrong values are recognised: ``_allreduce.py``.
"""
import math
import re

from labkit import theory
from labkit.check._allreduce import (SIZES, by_size, close, correct, ops_used, run_cases, spans,
                                     tensor_split_spans, wrong_values)
from labkit.check._core import Failed, Ranks, exercise

WORLD_SIZES = (2, 3, 4)
SHOWN = (4, 1000)   # the run whose bytes the summary line reports: 4 ranks, 1000 elements
_DATA_OPS = {"all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all",
             "gather", "scatter"}


def _size(case_label: str):
    match = re.search(r"(\d+) element", case_label or "")
    return int(match[1]) if match else None


def _uneven(cases, n):
    """The case to blame when only sizes that ``n`` does not divide are wrong, else None."""
    wrong = [c for c in cases if not correct(c)]
    if wrong and all(c["size"] % n for c in wrong) and \
            any(c["size"] % n == 0 for c in cases if correct(c)):
        return next((c for c in wrong if c["size"] == 7), wrong[-1])
    return None


def _fail_if_only_uneven_sizes_are_wrong(cases, n, advice) -> None:
    """Name the bug class "right when N divides the size, wrong otherwise"; ``advice(size)`` says
    what to fix in this exercise."""
    uneven = _uneven(cases, n)
    if uneven:
        size = uneven["size"]
        raise Failed(f"correct when {n} divides the size, wrong otherwise: with {size} elements "
                     f"on {n} ranks, elements {spans(_bad_elements(uneven))} are wrong. "
                     + advice(size))


def _bad_elements(case):
    return ~close(case["outputs"], case["expected"]).all(dim=0)


# --- ring_all_reduce ----------------------------------------------------------------------------

def _ring_crash_advice(crash):
    size, n = _size(crash.case), crash.nprocs
    if "'tuple' object does not support item assignment" in crash.message:
        return ("tensor_split returns a tuple of views into tensor: update a chunk in place "
                "with chunks[i].add_(received) or chunks[i].copy_(received)")
    if size is not None and size < n:
        return (f"With fewer elements than ranks some chunks are empty: torch.tensor_split(tensor, "
                f"{n}) always gives {n} chunks ({tensor_split_spans(size, n)}), torch.chunk may "
                "give fewer")
    if size is not None and size % n:
        return (f"{size} elements do not split evenly over {n} ranks: check the chunk "
                f"boundaries (torch.tensor_split(tensor, {n}) gives {tensor_split_spans(size, n)})")
    return None


def _ring_hang_advice(waits, n):
    if {w.op for w in waits} == {"send"}:
        return ("start each send with req = dist.isend(chunk, (rank + 1) % N), then "
                "dist.recv(buffer, (rank - 1) % N), then req.wait()")
    return ("each send must be matched by a recv on the neighbour: send to (rank + 1) % N and "
            "receive from (rank - 1) % N, every rank taking the same N-1 steps in each phase")


_RING_GATHER = ("the all-gather phase is missing or incomplete: after the N-1 reduce-scatter "
                "steps, pass the reduced chunks around the ring for N-1 more steps, copying "
                "(not adding) what you receive")
_RING_ADD = ("in the reduce-scatter phase add the received chunk to your own "
             "(chunk += received) instead of overwriting it, for all N-1 steps")


def _check_ring(cases, n):
    used = set().union(*(ops_used(c) for c in cases))
    banned = sorted(used & _DATA_OPS)
    if banned:
        raise Failed(f"ring_all_reduce called {', '.join('dist.' + op for op in banned)}: build "
                     "it from send/recv only (dist.send/dist.recv or dist.isend/dist.irecv); "
                     "the point is to see what an all-reduce does inside")
    _fail_if_only_uneven_sizes_are_wrong(cases, n, lambda size: (
        f"Check the chunk boundaries: the {n} chunks must cover all {size} elements, their "
        f"sizes differing by at most one; torch.tensor_split(tensor, {n}) gives "
        f"{tensor_split_spans(size, n)}"))
    wrong = [c for c in cases if not correct(c)]
    if wrong:
        case = max(wrong, key=lambda c: c["size"])   # the largest: its pattern says the most
        raise Failed(f"on {n} ranks with {case['size']} elements, "
                     + wrong_values(case, _RING_GATHER, _RING_ADD))
    for case in sorted(cases, key=lambda c: -c["size"]):
        # A ring sends each rank's chunk (S/N, rounded up) once per step, 2(N-1) steps: more
        # than 2(N-1) * ceil(S/N) elements means whole tensors (or more) went around.
        limit = 2 * (n - 1) * math.ceil(case["size"] / n) * case["input"].element_size()
        for rank, sent in enumerate(_sent(case)):
            if sent > limit:
                s = case["size"] * case["input"].element_size()
                raise Failed(f"correct, but rank {rank} sent {sent:,} B for a tensor of {s:,} B "
                             f"on {n} ranks; a ring sends 2(N-1)/N·S = "
                             f"{theory.wire_bytes('all_reduce', s, n):,.0f} B: send one chunk "
                             "(about S/N) per step, not the whole tensor")


def _sent(case) -> list:
    """Bytes each rank passed to send/isend for this case."""
    return [sum(b for op, b, _ in calls if op == "send") for calls in case["calls"]]


@exercise("ring_all_reduce")
def ring_all_reduce(fn, *, timeout: float = 10.0):
    """``fn(tensor)`` must SUM-all-reduce ``tensor`` in place with send/recv only.

    Checked against ``dist.all_reduce`` on 2, 3, 4 ranks and sizes 1, 7, 12, 64, 1000; no
    collective may be used; no rank may send more than a ring does (2(N-1) chunks of at most
    ceil(S/N) elements). ``timeout``: seconds per launch.
    """
    ranks = Ranks("ring_all_reduce", timeout=timeout, crash_advice=_ring_crash_advice,
                  hang_advice=_ring_hang_advice)
    for n in WORLD_SIZES:
        cases = by_size(ranks.run(run_cases, n, fn))
        _check_ring(cases, n)
        if n == SHOWN[0]:
            shown = next(c for c in cases if c["size"] == SHOWN[1])
    s = shown["size"] * shown["input"].element_size()
    sent = _sent(shown)
    sends = [sum(op == "send" for op, _, _ in calls) for calls in shown["calls"]]
    formula = theory.wire_bytes("all_reduce", s, SHOWN[0])
    figures = {"world_sizes": list(WORLD_SIZES), "sizes": sorted(SIZES), "ranks": SHOWN[0],
               "elements": SHOWN[1], "tensor_bytes": s, "bytes_sent_per_rank": sent,
               "sends_per_rank": sends, "ring_formula_bytes": formula}
    each = f"{sent[0]:,} B" if len(set(sent)) == 1 else f"{min(sent):,} to {max(sent):,} B"
    calls = f"{sends[0]}" if len(set(sends)) == 1 else f"{min(sends)} to {max(sends)}"
    return (f"matches dist.all_reduce on 2, 3, 4 ranks for {_sizes()} elements, with send/recv "
            f"only; {SHOWN[0]} ranks × {SHOWN[1]} floats: each rank sent {each} in {calls} sends, "
            f"ring formula 2(N-1)/N·S = {formula:,.0f} B", figures)


# --- all_reduce_via_rs_ag -----------------------------------------------------------------------

def _padding(size, n):
    return f"{math.ceil(size / n) * n}"


def _elements(size):
    return f"{size} element" + ("s" if size != 1 else "")


def _rs_ag_crash_advice(crash):
    size, n = _size(crash.case), crash.nprocs
    if size is not None and size % n:
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
    _fail_if_only_uneven_sizes_are_wrong(cases, n, lambda size: (
        f"Pad the tensor with zeros to a multiple of N ({_padding(size, n)} here) before the "
        f"reduce-scatter, and copy back the first {_elements(size)} of the gathered buffer"))
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


@exercise("all_reduce_via_rs_ag")
def all_reduce_via_rs_ag(fn, *, timeout: float = 10.0):
    """``fn(tensor)`` must SUM-all-reduce ``tensor`` in place with one reduce-scatter and one
    all-gather (padding to a multiple of N).

    Checked against ``dist.all_reduce`` on 2, 3, 4 ranks and sizes 1, 7, 12, 64, 1000; the
    ledger must show one reduce_scatter, one all_gather, no all_reduce. The summary shows that
    the two carry what one all-reduce carries (ZeRO §7.1). ``timeout``: seconds per launch.
    """
    ranks = Ranks("all_reduce_via_rs_ag", timeout=timeout, crash_advice=_rs_ag_crash_advice)
    for n in WORLD_SIZES:
        cases = by_size(ranks.run(run_cases, n, fn))
        _check_rs_ag(cases, n)
        if n == SHOWN[0]:
            shown = next(c for c in cases if c["size"] == SHOWN[1])
    ledger = {op: (payload, wire) for op, payload, wire in shown["calls"][0]}
    (rs, rs_wire), (ag, ag_wire) = ledger["reduce_scatter"], ledger["all_gather"]
    ar, ar_wire = shown["reference"]
    figures = {"world_sizes": list(WORLD_SIZES), "sizes": sorted(SIZES), "ranks": SHOWN[0],
               "elements": SHOWN[1], "reduce_scatter_payload_bytes": rs,
               "all_gather_payload_bytes": ag, "all_reduce_payload_bytes": ar,
               "reduce_scatter_wire_bytes": rs_wire, "all_gather_wire_bytes": ag_wire,
               "all_reduce_wire_bytes": ar_wire}
    carry = f"each carry {rs:,} B" if rs == ag else f"carry {rs:,} B and {ag:,} B"
    return (f"matches dist.all_reduce on 2, 3, 4 ranks for {_sizes()} elements with one "
            f"reduce-scatter + one all-gather; {SHOWN[0]} ranks × {SHOWN[1]} floats: they "
            f"{carry}, like the all-reduce ({ar:,} B), and on a ring each rank sends "
            f"{rs_wire:,.0f} + {ag_wire:,.0f} = {rs_wire + ag_wire:,.0f} B, what one all-reduce "
            f"sends ({ar_wire:,.0f} B)", figures)


def _sizes():
    return ", ".join(map(str, sorted(SIZES)))
