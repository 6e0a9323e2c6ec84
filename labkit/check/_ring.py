"""The ring, read from the ledger: a ring exercise must BE a ring, not only give the right values.

Each rank's ``CommCounter`` ledger lists its sends and receives with their bytes and the rank at
the other end. A ring on N ranks, with chunks = torch.tensor_split(tensor, N):
* calls no collective, only send/recv (isend, irecv and batch_isend_irecv show as send/recv);
* rank r sends only to its right neighbour (r + 1) % N and receives only from its left one,
  (r - 1) % N: no rank is a hub that everyone talks to (a star), nobody sends to several ranks;
* every message is one chunk: ceil(S/N) or floor(S/N) elements of the tensor's dtype;
* each rank sends and receives ``phases`` × (N-1) messages (2 phases for the all-reduce, 1 for a
  reduce-scatter or an all-gather). Counted where every chunk has elements (S >= N): a solution
  that skips empty chunks on both sides is still a ring.
What a ring may choose freely is not looked at: which chunk travels at which step (rank r may
end the reduce-scatter holding chunk r or chunk r+1), send or isend, recv or irecv, receiving
into a fresh buffer or straight into the chunk, the order of the send and the recv in a step.

``check`` raises ``Failed`` with the first problem, in an order meant to name the cause: the
topology before the values (a wrong neighbour makes wrong values, but the neighbour is the bug),
the values before the message counts (a missing phase is clearest from what each rank holds).

gloo kills a rank that receives a message larger than its buffer, and the launch's ledger dies
with it. That crash is often a consequence (a message from the wrong neighbour, or the wrong
chunk, has the wrong size), so ``grade`` then runs the cases that finished before the crash once
more and names what they show; only if they look right is the crash the hint.
"""
import math
import re

import torch

from labkit import theory
from labkit.check._allreduce import Case, run_fresh, tensor_split_spans
from labkit.check._core import Failed, attempted

# What a ring may call: point to point, and a barrier (it carries no data).
ALLOWED = {"send", "recv", "barrier"}
PHASES = {1: "one phase of N-1 steps", 2: "a reduce-scatter and an all-gather, N-1 steps each"}


def grade(ranks, fn, exercise, phases, wrong_values, world_sizes, cases, prepare=None,
          **run_options) -> dict:
    """Run ``fn`` on each N (``run_fresh``), then ``check`` the ring: {N: cases}.

    ``prepare(case)`` adds what the exercise's ``wrong_values`` needs (e.g. the expected sum).
    """
    prepare = prepare or (lambda case: case)
    runs = {}
    for n in world_sizes:
        try:
            runs[n] = [prepare(c) for c in run_fresh(ranks, fn, (n,), cases, **run_options)[n]]
        except Failed as failure:
            before = _cases_before_a_native_crash(failure.crash, cases)
            if not before:
                raise
            runs[n] = [prepare(c) for c in run_fresh(ranks, fn, (n,), before, **run_options)[n]]
            check(runs, exercise, phases, wrong_values, note=(
                f"; then, with {failure.crash.case}, gloo killed rank {failure.crash.rank}: a "
                "message did not fit its receive buffer"))
            raise
        if wrong_values(runs[n], n) or _collectives(runs[n], exercise):
            # Wrong already: no need to launch more ranks. (Right values go on to larger N,
            # where a star or a wrong neighbour, invisible on 2 ranks, shows.)
            check({n: runs[n]}, exercise, phases, wrong_values)
    check(runs, exercise, phases, wrong_values)
    return runs


def _cases_before_a_native_crash(crash, cases) -> list:
    labels = [case.label for case in cases]
    if crash is None or crash.type != "NativeError" or crash.case not in labels:
        return []
    return list(cases[:labels.index(crash.case)])


def check(runs: dict, exercise: str, phases: int, wrong_values, note: str = "") -> None:
    """Raise ``Failed`` with the first problem found over every N (module docstring).

    ``wrong_values(cases, n)``: the exercise's own reading of wrong results, or None. ``note``
    ends any hint raised.
    """
    def fail(hint):
        if hint:
            raise Failed(hint + note)
    order = sorted(runs)
    for n in order:
        fail(_collectives(runs[n], exercise))
    for n in reversed(order):          # a star is only told from a whole-tensor ring on N > 2
        fail(_topology(runs[n], n))
    for n in order:
        fail(_big_messages(runs[n], n))
    for n in order:
        hint = wrong_values(runs[n], n)
        if hint:
            count = _count_problem(runs[n], n, phases)
            fail(hint + (f" (also: {count})" if count else ""))
    for n in order:
        fail(_count_problem(runs[n], n, phases))
        fail(_small_messages(runs[n], n))


def messages(calls, op: str) -> list:
    """[(payload bytes, peer)] of this rank's sends (op="send") or receives (op="recv")."""
    return [(payload, peer) for name, payload, _, peer in calls if name == op]


def _collectives(cases, exercise):
    used = sorted({op for case in cases for calls in case["calls"] for op, *_ in calls
                   if op not in ALLOWED})
    if used:
        return (f"{exercise} called {', '.join('dist.' + op for op in used)}: build it from "
                "send/recv only (dist.send/dist.recv or dist.isend/dist.irecv); the point is to "
                "see what a collective does inside")
    return None


def _peers(cases, n):
    """Per rank: (ranks it sent to, ranks it received from), over every case."""
    sent = [set() for _ in range(n)]
    received = [set() for _ in range(n)]
    for case in cases:
        for rank, calls in enumerate(case["calls"]):
            sent[rank] |= {peer for _, peer in messages(calls, "send") if peer is not None}
            received[rank] |= {peer for _, peer in messages(calls, "recv") if peer is not None}
    return sent, received


def _ranks(ranks) -> str:
    ranks = sorted(ranks)
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _topology(cases, n):
    sent, received = _peers(cases, n)
    for hub in range(n):
        others = set(range(n)) - {hub}
        if n > 2 and (sent[hub] | received[hub]) == others and \
                all(sent[r] | received[r] <= {hub} for r in others):
            return (f"everything goes through rank {hub}: it received from and sent to "
                    f"{_ranks(others)}, which talked only to rank {hub}. That is a star, not a "
                    f"ring: rank {hub} moves (N-1) whole tensors each way while the others "
                    "wait. In a ring every rank works at every step: it sends one chunk to "
                    "(rank + 1) % N and receives one from (rank - 1) % N")
    for rank in range(n):
        for what, peers, want in (("sent to", sent[rank], (rank + 1) % n),
                                  ("received from", received[rank], (rank - 1) % n)):
            if len(peers) > 1:
                whole = " (whole tensors)" if _whole_tensors(cases, rank, n) else ""
                return (f"on {n} ranks rank {rank} {what} {_ranks(peers)}{whole}: that is not "
                        "a ring. In a ring each rank sends only to its right neighbour "
                        "(rank + 1) % N and receives only from its left neighbour "
                        "(rank - 1) % N; send one chunk (about S/N elements) per step, and "
                        "pass on what you received")
            if peers and peers != {want}:
                (peer,) = peers
                direction = (" (the ring runs the wrong way)" if what == "sent to"
                             and peer == (rank - 1) % n else "")
                return (f"on {n} ranks rank {rank} {what} rank {peer}, not rank {want}"
                        f"{direction}: in this ring rank r sends to its right neighbour "
                        "(r + 1) % N and receives from its left neighbour (r - 1) % N (the "
                        "ZeRO notebooks reuse your code with that convention)")
    return None


def _whole_tensors(cases, rank, n):
    return any(payload > math.ceil(case["size"] / n) * case["element_size"]
               for case in cases for payload, _ in messages(case["calls"][rank], "send"))


def _big_messages(cases, n):
    """A message larger than a chunk: whole tensors, or receive buffers of the wrong size."""
    for case in sorted(cases, key=lambda c: -c["size"]):
        es, size = case["element_size"], case["size"]
        most = math.ceil(size / n)
        for rank, calls in enumerate(case["calls"]):
            sends = [b for b, _ in messages(calls, "send")]
            if sends and max(sends) > most * es:
                what = ("its whole tensor" if max(sends) == size * es
                        else f"{max(sends) // es} elements")
                return (f"on {n} ranks with {case['label']}, rank {rank} sent {what} in one "
                        f"message ({max(sends):,} B): send one chunk (about S/N: here "
                        f"{_sizes(size, n)} elements) per step, not the whole tensor; "
                        f"torch.tensor_split(tensor, {n}) gives the chunks")
            for payload, _ in messages(calls, "recv"):
                if payload > most * es or payload % es:
                    return (f"on {n} ranks with {case['label']}, rank {rank} received into a "
                            f"buffer of {payload:,} B, but a chunk is {_sizes(size, n)} "
                            f"{_dtype(case)} elements ({es} B each): make each receive buffer "
                            "like the chunk that arrives, torch.empty_like(chunk) (same size, "
                            "same dtype)")
    return None


def _small_messages(cases, n):
    for case in cases:
        if case["size"] < n:
            continue
        es, least = case["element_size"], case["size"] // n
        for rank, calls in enumerate(case["calls"]):
            small = [b for b, _ in messages(calls, "send") if b < least * es]
            if small:
                return (f"on {n} ranks with {case['label']}, rank {rank} sent a message of "
                        f"{min(small) // es} elements, less than a chunk ({_sizes(case['size'], n)}"
                        f" elements): send each chunk of torch.tensor_split(tensor, {n}) whole, "
                        "one per step")
    return None


def _count_problem(cases, n, phases):
    """Sends or receives per rank other than phases × (N-1), where every chunk has elements."""
    want = phases * (n - 1)
    for case in cases:
        if case["size"] < n:
            continue
        for rank, calls in enumerate(case["calls"]):
            got = {op: len(messages(calls, op)) for op in ("send", "recv")}
            if got["send"] != want or got["recv"] != want:
                return (f"on {n} ranks with {case['label']}, rank {rank} made "
                        f"{_count(got['send'], 'send')} and {_count(got['recv'], 'receive')}; "
                        f"this ring takes {_count(want, 'step')} ({PHASES[phases]}), one send "
                        "and one receive of one chunk each")
    return None


def _count(k, what):
    return f"{k} {what}" + ("" if k == 1 else "s")


def _sizes(size, n):
    low, high = size // n, math.ceil(size / n)
    return f"{low}" if low == high else f"{low} or {high}"


def _dtype(case):
    return str(case["dtype"]).split(".")[-1]


# --- crashes and hangs ----------------------------------------------------------------------------

_LABEL = re.compile(r"a (?:(?P<dtype>\w+) )?tensor of (?P<size>\d+) element")
_GLOO_SIZES = re.compile(r"(?P<sent>\d+) vs (?P<room>\d+)")
_SHAPES = re.compile(r"size of tensor a \((\d+)\) must match the size of tensor b \((\d+)\)")


def case_of(label: str):
    """The ``Case`` a hint's label names ("a float64 tensor of 12 elements"), or None."""
    match = _LABEL.search(label or "")
    if not match:
        return None
    return Case(int(match["size"]), getattr(torch, match["dtype"] or "float32"))


def crash_advice(crash):
    """What a crash of a ring exercise most likely means, or None."""
    case, n = case_of(crash.case), crash.nprocs
    gloo = _GLOO_SIZES.search(crash.message) if crash.type == "NativeError" else None
    if gloo and case is not None:
        sent, room = int(gloo["sent"]), int(gloo["room"])
        dtype = str(case.dtype).split(".")[-1]
        if case.dtype.itemsize == 8 and sent == 2 * room:
            return (f"A {dtype} chunk ({sent} B) arrived in a receive buffer of {room} B, half "
                    f"its size: a float32 buffer. torch.empty(k) and torch.zeros(k) are float32 "
                    f"whatever your tensor's dtype is; allocate each receive buffer like its "
                    f"chunk, torch.empty_like(chunk) (or pass dtype=tensor.dtype)")
        return (f"A chunk of {sent} B arrived in a receive buffer of {room} B: each receive "
                f"buffer must have the size of the chunk that arrives. Chunk sizes differ by one "
                f"when N does not divide the size (torch.tensor_split of {case.size} elements "
                f"on {n} ranks gives {tensor_split_spans(case.size, n)}): allocate each buffer "
                "with torch.empty_like(chunks[i]), not with S // N elements, and receive at "
                "each step the chunk your left neighbour sends at that step")
    if "'tuple' object does not support item assignment" in crash.message:
        return ("tensor_split returns a tuple of views into tensor: update a chunk in place "
                "with chunks[i].add_(received) or chunks[i].copy_(received)")
    size = case.size if case else None
    if size is not None and _SHAPES.search(crash.message):
        return ("a received buffer and the chunk it goes into differ in size: chunk sizes differ "
                f"by one when N does not divide the size (torch.tensor_split(tensor, {n}) gives "
                f"{tensor_split_spans(size, n)}); allocate each buffer like the chunk it is for, "
                "torch.empty_like(chunks[i])")
    if size is not None and size < n:
        return (f"With fewer elements than ranks some chunks are empty: torch.tensor_split(tensor, "
                f"{n}) always gives {n} chunks ({tensor_split_spans(size, n)}), torch.chunk may "
                "give fewer")
    if size is not None and size % n:
        return (f"{size} elements do not split evenly over {n} ranks: check the chunk "
                f"boundaries (torch.tensor_split(tensor, {n}) gives {tensor_split_spans(size, n)})")
    return None


def hang_advice(waits, n):
    if {w.op for w in waits} == {"send"}:
        return ("on gloo a send may not return until the receiver has posted its recv: start "
                "each send with req = dist.isend(chunk, (rank + 1) % N), then "
                "dist.recv(buffer, (rank - 1) % N), then req.wait(), and leave chunk unchanged "
                "until that wait() returns (gloo sends from its memory)")
    return ("each send must be matched by a recv on the neighbour: send to (rank + 1) % N and "
            "receive from (rank - 1) % N, every rank taking the same N-1 steps in each phase")


# --- what a passing check says --------------------------------------------------------------------

SHOWN = (4, 1000)   # the run whose bytes the summary reports: 4 ranks, 1000 float32 elements
#                   (the most ranks tried: 3 under quick sizes, _sizes.py)
# A summary shows the measured sends and bytes only once the learner has predicted them.
PREDICTIONS = ("ring_sends_per_rank", "ring_bytes_per_rank")


def cases_tried(cases) -> str:
    """"1, 7, 12, 64, 1000 float32 and 12 float64 elements"."""
    by_dtype = {}
    for case in cases:
        by_dtype.setdefault(str(case.dtype).split(".")[-1], []).append(case.size)
    return " and ".join(f"{', '.join(map(str, sorted(sizes)))} {dtype}"
                        for dtype, sizes in by_dtype.items()) + " elements"


def measured(runs, cases, op: str, formula_text: str):
    """(figures, the end of the summary line) for the SHOWN run: bytes and sends per rank.

    ``op``: the collective whose ring formula (``labkit.theory.wire_bytes``) the bytes match.
    """
    n, size = min(SHOWN[0], max(runs)), SHOWN[1]
    case = next(c for c in runs[n] if c["size"] == size and c["element_size"] == 4)
    s = size * case["element_size"]
    sent = [sum(b for b, _ in messages(calls, "send")) for calls in case["calls"]]
    sends = [len(messages(calls, "send")) for calls in case["calls"]]
    formula = theory.wire_bytes(op, s, n)
    figures = {"world_sizes": sorted(runs), "sizes": sorted({c.size for c in cases}),
               "dtypes": sorted({str(c.dtype).split(".")[-1] for c in cases}), "ranks": n,
               "elements": size, "tensor_bytes": s, "bytes_sent_per_rank": sent,
               "sends_per_rank": sends, "ring_formula_bytes": formula}
    if not attempted(*PREDICTIONS):
        return figures, ("; the sends and bytes per rank show here once you have predicted them "
                         f"({', '.join(PREDICTIONS)})")
    each = f"{sent[0]:,} B" if len(set(sent)) == 1 else f"{min(sent):,} to {max(sent):,} B"
    count = f"{sends[0]}" if len(set(sends)) == 1 else f"{min(sends)} to {max(sends)}"
    return figures, (f"; {n} ranks × {size} floats: each rank sent {each} in {count} sends, "
                     f"ring formula {formula_text} = {formula:,.0f} B")
