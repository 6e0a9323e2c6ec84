"""Checks of the learner's predictions: small formulas written before the measurement runs.

A notebook asks the learner to predict a number (the bytes a ring sends, the time of an
all-reduce) by writing a function, before the cell that measures it. The check calls that
function on a grid of inputs, compares each value with the reference formula from
``labkit.theory`` and, when they differ, names the usual mistake (one phase of the ring instead of
two, N where N-1 belongs, the latency term forgotten) without printing the formula itself. The
measurement cells then print the learner's own prediction beside the measured value.

The references are the ring model of ``labkit.theory`` (its docstring cites the sources): a ring
all-reduce of S bytes on N ranks takes 2(N-1) steps and sends 2(N-1)/N · S bytes per rank;
under the α-β model it takes 2(N-1)·α + 2(N-1)/N · S·β. In DDP (notebook 02) S is the whole
trainable gradient on every rank, whatever N (``theory.ddp_bytes_per_step``).
"""
import math
import numbers

from labkit import theory
from labkit.check._core import Failed, call_here, exercise
from labkit.check._hints import register

RTOL = 1e-6   # the formulas are exact; this only absorbs the order of float operations
# (S, N) pairs: sizes that N divides and sizes it does not, 1 rank, many ranks
_S_N = [(2**20, 4), (1000, 3), (12, 2), (7, 5), (2**30, 8), (1e9, 64), (4096, 1)]
_ALPHA_BETA = [(20e-6, 1 / 5e9), (1e-3, 1e-9), (5e-6, 1 / 100e9)]


def _call(name, fn, *args):
    """The learner's value as a float; the stub means "not implemented", anything else a hint."""
    value = call_here(fn, *args, who=f"{name}{args}")
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise Failed(f"{name}{args} returned {type(value).__name__} {value!r:.40}: return a "
                     "number")
    return float(value)


def _same(a, b):
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-12)


_RING = "go back to the picture of the ring and count again"


def _compare(name, fn, cases, reference, mistakes,
             advice="go back to the picture and count again"):
    """Call ``fn(*case)`` for every case; on the first wrong value, a hint.

    ``mistakes``: [(formula(*case), "what that formula means")]: when every case's value matches
    one of them, the hint names that mistake; otherwise it shows the case and the value, and
    ``advice``. (The printed line already starts with the check's name.)
    """
    got = [_call(name, fn, *case) for case in cases]
    want = [reference(*case) for case in cases]
    if all(map(_same, got, want)):
        return
    for formula, meaning in mistakes:
        if all(_same(g, formula(*case)) for g, case in zip(got, cases)):
            raise Failed(meaning)
    case, value = next((c, g) for c, g, w in zip(cases, got, want) if not _same(g, w))
    raise Failed(f"{name}{case} returned {value:.6g}, which is not what the model gives; "
                 f"{advice}")


register("predicted_sum", [
    "Try it by hand first: on 4 ranks the ranks are 0, 1, 2, 3. What is their sum?",
    "The sum 0 + 1 + ... + (n-1) pairs up: the first and the last add to n-1, and there are n/2 "
    "such pairs.",
])
register("ring_sends_per_rank", [
    "Count one phase first: how many hops does a chunk make before it has visited every rank?",
    "Each phase (reduce-scatter, then all-gather) takes N-1 steps, and in every step each rank "
    "sends exactly one chunk.",
])
register("ring_bytes_per_rank", [
    "How big is one chunk, and how many does a rank send in all (ring_sends_per_rank)?",
    "A chunk is S/N bytes; multiply by the number of sends.",
])
register("all_reduce_time", [
    "Each step costs alpha; each byte a rank sends costs beta. Reuse your two ring functions.",
    "alpha times the number of steps, plus beta times the bytes one rank sends.",
])
register("crossover_size", [
    "Write both terms of all_reduce_time for N ranks and set them equal; solve for S.",
    "2(N-1)·alpha = 2(N-1)/N · S · beta: the factor 2(N-1) cancels.",
])
register("algbw_from_busbw", [
    "busbw = algbw · factor, with the factor for an all-reduce from the nccl-tests text above.",
])


@exercise("predicted_sum")
def predicted_sum(fn):
    """``fn(n)``: what ``sum_of_ranks()`` returns on n ranks, for n = 1 ... 9."""
    cases = [(n,) for n in range(1, 10)]
    _compare("predicted_sum", fn, cases, lambda n: n * (n - 1) / 2, [
        (lambda n: n * (n + 1) / 2, "that counts 1 + 2 + ... + n; ranks are numbered from 0 "
                                    "to n-1"),
        (lambda n: n, "that is the number of ranks; every rank contributes its own rank "
                      "number"),
        (lambda n: n - 1, "that is the largest rank, not the sum of all of them")])
    return "matches the sum 0 + 1 + ... + (n-1) for n = 1 to 9", {}


@exercise("ring_sends_per_rank")
def ring_sends_per_rank(fn):
    """``fn(N)``: sends one rank makes in a ring all-reduce on N ranks."""
    cases = [(n,) for n in (1, 2, 3, 4, 8, 64)]
    _compare("ring_sends_per_rank", fn, cases, lambda n: theory.ring_steps("all_reduce", n), [
        (lambda n: n - 1, "that is one phase; the all-reduce is a reduce-scatter and then an "
                          "all-gather"),
        (lambda n: 2 * n, "one step too many per phase: after N-1 hops a chunk has visited "
                          "every rank"),
        (lambda n: n, "count the steps of both phases")], advice=_RING)
    return "matches the ring's number of steps on 1 to 64 ranks", {}


@exercise("ring_bytes_per_rank")
def ring_bytes_per_rank(fn):
    """``fn(S, N)``: bytes one rank sends in a ring all-reduce of S bytes on N ranks."""
    _compare("ring_bytes_per_rank", fn, _S_N, lambda s, n: theory.wire_bytes("all_reduce", s, n), [
        (lambda s, n: (n - 1) / n * s, "that is one phase (a reduce-scatter or an all-gather); "
                                       "the all-reduce has two"),
        (lambda s, n: 2 * (n - 1) * s, "that sends the whole tensor at every step; a ring step "
                                       "sends one chunk of S/N bytes"),
        (lambda s, n: 2 * s, "close for large N, but not exact: how many steps, "
                             "and how many bytes in each?"),
        (lambda s, n: s, "a rank sends more than its own tensor: count the chunks it passes on")],
        advice=_RING)
    return "matches the ring's bytes per rank for every (S, N) tried", {}


def _all_reduce_time(s, n, alpha, beta):
    return theory.collective_time("all_reduce", s, n, alpha, beta)


@exercise("all_reduce_time")
def all_reduce_time(fn):
    """``fn(S, N, alpha, beta)``: seconds of a ring all-reduce under the α-β model."""
    cases = [(s, n, a, b) for s, n in _S_N for a, b in _ALPHA_BETA]
    steps = lambda n: theory.ring_steps("all_reduce", n)   # noqa: E731
    _compare("all_reduce_time", fn, cases, _all_reduce_time, [
        (lambda s, n, a, b: theory.wire_bytes("all_reduce", s, n) * b,
         "the bandwidth term alone; each of the ring's steps also pays the latency alpha"),
        (lambda s, n, a, b: steps(n) * a, "the latency term alone; the bytes cost beta each"),
        (lambda s, n, a, b: a + theory.wire_bytes("all_reduce", s, n) * b,
         "alpha is paid once per step of the ring, not once per all-reduce"),
        (lambda s, n, a, b: steps(n) * a + s * b,
         "the bytes a rank sends are not S: use your ring_bytes_per_rank")], advice=_RING)
    return "matches the α-β ring model on every case tried", {}


@exercise("crossover_size")
def crossover_size(fn):
    """``fn(N, alpha, beta)``: the message size S at which the ring all-reduce's latency and
    bandwidth terms are equal."""
    cases = [(n, a, b) for n in (2, 3, 4, 8, 64) for a, b in _ALPHA_BETA]
    _compare("crossover_size", fn, cases, lambda n, a, b: n * a / b, [
        (lambda n, a, b: a / b, "that is where alpha = S·beta: write out both terms of the ring "
                                "with their factors in N, then solve for S"),
        (lambda n, a, b: b / a, "upside down: a larger latency alpha must move the crossing to "
                                "larger messages")], advice=_RING)
    return "matches the size where the two terms of the model are equal", {}


@exercise("algbw_from_busbw")
def algbw_from_busbw(fn):
    """``fn(busbw, N)``: the algbw a benchmark shows for an all-reduce at this busbw."""
    cases = [(b, n) for b in (1e9, 37.5e9) for n in (2, 3, 4, 8, 64)]
    _compare("algbw_from_busbw", fn, cases,
             lambda b, n: b / theory.busbw_factor("all_reduce", n), [
                 (lambda b, n: b * theory.busbw_factor("all_reduce", n),
                  "the factor goes the other way: busbw = algbw · 2(n-1)/n"),
                 (lambda b, n: b, "on 2 ranks they are equal, but not on more")])
    return "matches busbw / (2(n-1)/n)", {}


# --- notebook 02: what DDP moves per step ---------------------------------------------------------

# (num_params, N, bytes per gradient element): the payload does not depend on N; 1 rank included.
_P_N_B = [(1_000_000, 2, 4), (1000, 3, 4), (12, 4, 8), (7, 5, 2), (10**9, 64, 2), (4096, 1, 4)]

register("ddp_payload_bytes", [
    "What does ONE rank hand to its all-reduce after backward: its own gradients, or a share of "
    "them? How many elements, and how many bytes each?",
    "Every rank all-reduces every trainable gradient, whole: num_params elements of "
    "bytes_per_grad bytes each. The number of ranks does not change what one rank holds.",
])
register("ddp_bytes_per_step", [
    "Start from ddp_payload_bytes: that is S, the tensor being all-reduced. Notebook 01: how many "
    "bytes does one rank send in a ring all-reduce of S bytes?",
    "ring_bytes_per_rank(S, N) from notebook 01, with S = ddp_payload_bytes(...).",
])


@exercise("ddp_payload_bytes")
def ddp_payload_bytes(fn):
    """``fn(num_params, N, bytes_per_grad)``: bytes one rank all-reduces per step in DDP (the
    ledger's payload) for num_params trainable parameters."""
    _compare("ddp_payload_bytes", fn, _P_N_B, lambda p, n, b: p * b, [
        (lambda p, n, b: p * b / n, "that would be a 1/N share of the gradients: DDP does not "
                                    "shard, every rank holds the whole model and all-reduces "
                                    "all of its gradient (ZeRO is what shards)"),
        (lambda p, n, b: p * b * n, "the payload is this rank's own gradient buffer; the "
                                    "all-reduce does not make it N times larger"),
        (lambda p, n, b: p, "that counts elements; the payload is in bytes"),
        (lambda p, n, b: theory.wire_bytes("all_reduce", p * b, n),
         "that is what a ring sends per rank (next prediction); the payload is the buffer "
         "itself")])
    return "matches the whole gradient's bytes, whatever N", {}


@exercise("ddp_bytes_per_step")
def ddp_bytes_per_step(fn):
    """``fn(num_params, N, bytes_per_grad)``: bytes one rank sends per DDP step, ring model."""
    _compare("ddp_bytes_per_step", fn, _P_N_B, theory.ddp_bytes_per_step, [
        (lambda p, n, b: p * b, "that is the payload; a ring all-reduce sends a different "
                                "amount per rank (and nothing at all on 1 rank)"),
        (lambda p, n, b: (n - 1) / n * p * b, "that is one phase of the ring; the all-reduce "
                                              "has two"),
        (lambda p, n, b: 2 * p * b, "close for large N, but not exact: the ring sends "
                                    "2(N-1) chunks of S/N"),
        (lambda p, n, b: 2 * (n - 1) / n * p, "that counts elements; multiply by the bytes "
                                              "per gradient"),
        (lambda p, n, b: 2 * (n - 1) / n * p * b / n,
         "every rank all-reduces its whole gradient, not a 1/N share (DDP replicates)")])
    return "matches labkit.theory.ddp_bytes_per_step for every case tried", {}
