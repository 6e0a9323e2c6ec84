"""Cases for the graders of notebook 01: fresh inputs, the learner's function run on them in
each rank, and what a wrong all-reduce result says about the bug.

Fresh inputs, drawn in the notebook. ``fresh_inputs`` draws every case's [N, S] stack in the
notebook's process, from a generator seeded by the operating system, anew for every check run.
The ranks get the stacks through the launch's arguments; rank r keeps row r and drops the others
before the learner's function runs (``run_cases``), so nothing in a rank (no seed, no rank
number) lets that function compute another rank's data: only communication brings it. The
reference sum is computed in the notebook too, in float64, then rounded to the case's dtype
(``reference_sum``); the all-reduce graders also run torch's own ``dist.all_reduce`` in the
ranks, for its ledger and as a second opinion on the sum.

In each rank, ``run_cases`` moves its rows to the rank's device (``labkit.device()``: the CPU,
or a GPU) and calls the learner's function on a copy of each case under a ``CommCounter`` whose
ledger (op, bytes, peer) comes back with the output. In the notebook, ``wrong_values`` looks at
every rank's input and output at once and recognises the usual bugs: nothing changed, the mean
instead of the sum, each rank holding only its own part (a missing all-gather), sums of only some
ranks (overwriting instead of adding), the right sums in the wrong places.

Tolerance. The reference and the learner's code add the same N float32 values in different
orders. Each order rounds N-1 times, each time by at most 2^-24 of a partial sum no larger than
sum|x|, so two orders differ by at most 2 (N-1) 2^-24 sum|x|. With N <= 4 standard-normal inputs
(|x| < 6, so sum|x| < 24) that is below 9e-6 in the worst case and about 1e-7 typically (float64
cases: far less). ``torch.isclose`` with RTOL = ATOL = 1e-5 allows at least 1e-5, while every bug
recognised here changes values by about 1.
"""
import secrets
from itertools import combinations
from typing import NamedTuple

import torch
import torch.distributed as dist

from labkit.check._core import Failed, call_learner
from labkit.comm import CommCounter
from labkit.placement import device

RTOL = ATOL = 1e-5


class Case(NamedTuple):
    size: int
    dtype: torch.dtype = torch.float32

    @property
    def label(self) -> str:
        """How a hint names the case: "a tensor of 7 elements", "a float64 tensor of 12 ..."."""
        kind = "" if self.dtype == torch.float32 else f"{str(self.dtype).split('.')[-1]} "
        return f"a {kind}tensor of {self.size} element" + ("s" if self.size != 1 else "")


# 12 splits evenly on 2, 3 and 4 ranks; 7 and 1 on none of them (1: fewer elements than ranks).
# Even sizes run first: a function that crashes only on the later ones has a chunking problem.
SIZES = (12, 64, 1000, 7, 1)
FLOAT32 = tuple(Case(size) for size in SIZES)
# Last, a float64 case that every N divides: a receive buffer made without dtype= (float32)
# fails there and only there, so the hint can name the dtype.
RING_CASES = FLOAT32 + (Case(12, torch.float64),)


def close(a, b):
    return torch.isclose(a, b, rtol=RTOL, atol=ATOL)


def fresh_inputs(n: int, cases) -> list:
    """One [n, size] stack per case, random and new at every call (seeded by the OS).

    Every value lies in 1 <= |x| < 2, with one sign per element shared by all ranks: the sum
    over any proper subset of the ranks then misses the full sum by at least 1, so a wrong
    result can never pass as right by chance (with randn, a rank's own value equals the sum
    whenever the others' are near zero, and a hint would report a stray "correct" element).
    """
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    stacks = []
    for case in cases:
        magnitude = 1 + torch.rand(n, case.size, dtype=case.dtype, generator=generator)
        sign = torch.randint(0, 2, (1, case.size), generator=generator).to(case.dtype) * 2 - 1
        stacks.append(magnitude * sign)
    return stacks


def reference_sum(stack: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (rows) in float64, rounded once to the stack's dtype."""
    return stack.double().sum(dim=0).to(stack.dtype)


def run_cases(fn, entries: list, labels: list, all_reduce_too: bool = False) -> list:
    """In one rank: the learner's function on a copy of this rank's row of each [N, S] stack.

    With ``all_reduce_too``, torch's ``dist.all_reduce`` of each row runs first, under its own
    ledger (all of them before the learner's code, so that no collective of ours sits between
    the learner's sends and receives, where a rank that finished early would wait in it).
    """
    rank = dist.get_rank()
    # drawn on the CPU in the notebook; the learner's code and the collectives get them on this
    # rank's device (the rows come back to the notebook as CPU tensors)
    mine = [stack[rank].clone().to(device()) for stack in entries]
    entries.clear()      # the other ranks' rows, gone from the launch's arguments in this rank
    torch_sums = []
    if all_reduce_too:
        for x in mine:
            total = x.clone()
            with CommCounter() as comm:
                dist.all_reduce(total)
            torch_sums.append((total, _ledger(comm)[0]))
    results = []
    for i, (x, label) in enumerate(zip(mine, labels)):
        tensor = x.clone()
        with CommCounter() as comm:
            returned = call_learner(fn, tensor, case=label)
        if not (isinstance(returned, torch.Tensor) and returned is not tensor
                and returned.shape == x.shape):
            returned = None
        results.append({"output": tensor, "returned": returned, "calls": _ledger(comm),
                        "torch_sum": torch_sums[i] if torch_sums else None})
    return results


def run_fresh(ranks, fn, world_sizes, cases, all_reduce_too=False) -> dict:
    """Launch ``fn`` on each N with fresh inputs: {N: ``by_case`` results}. A crash or hang
    stops here (``Ranks`` turns it into ``Failed``)."""
    runs, labels = {}, [case.label for case in cases]
    for n in world_sizes:
        inputs = fresh_inputs(n, cases)
        runs[n] = by_case(ranks.run(run_cases, n, fn, inputs, labels, all_reduce_too),
                          inputs, cases)
    return runs


def _ledger(comm) -> list:
    """(op, payload bytes, wire bytes, peer) per call: what the graders read."""
    return [(c.op, c.payload_bytes, c.wire_bytes, c.peer) for c in comm.calls]


def by_case(per_rank: list, entries: list, cases) -> list:
    """Rank-major results of ``run_cases`` -> one dict per case with [N, S] stacks.

    Keys: size, dtype, label, element_size, inputs (what each rank held on entry), outputs,
    returned (per rank: a tensor of the input's shape the function returned, or None), calls
    (per rank: the ledger), torch_sums (per rank, when run). A rank whose tensor changed shape
    or dtype fails the check here.
    """
    out = []
    for i, case in enumerate(cases):
        ranks = [results[i] for results in per_rank]
        x = entries[i]
        for rank, result in enumerate(ranks):
            y = result["output"]
            if y.shape != x[rank].shape or y.dtype != x.dtype:
                raise Failed(f"with {case.label} on {len(ranks)} ranks, rank {rank}'s "
                             f"tensor changed from {tuple(x[rank].shape)} {x.dtype} to "
                             f"{tuple(y.shape)} {y.dtype}: write the result into the tensor you "
                             "were given, keeping its shape and dtype")
        out.append({"size": case.size, "dtype": case.dtype, "label": case.label,
                    "element_size": x.element_size(), "inputs": x,
                    "outputs": torch.stack([r["output"] for r in ranks]),
                    "returned": [r["returned"] for r in ranks],
                    "calls": [r["calls"] for r in ranks],
                    "torch_sums": [r["torch_sum"] for r in ranks]})
    return out


def with_sum(case) -> dict:
    """An all-reduce case: ``expected`` (the float64 reference) and whether a rank returned it.

    torch's own all-reduce, when it ran, must agree with the reference: if not, the check, not
    the learner, is wrong, and it says so rather than blame the learner.
    """
    expected = reference_sum(case["inputs"])
    for total in case["torch_sums"]:
        if total is not None and not bool(close(total[0], expected).all()):
            raise RuntimeError("torch's dist.all_reduce and the float64 reference disagree")
    returned_the_sum = any(r is not None and bool(close(r, expected).all())
                           for r in case["returned"])
    return dict(case, expected=expected, returned_the_sum=returned_the_sum)


def correct(case) -> bool:
    return bool(close(case["outputs"], case["expected"]).all())


def ops_used(case) -> dict:
    """{op: calls} over every rank (counted per rank, then the most any rank made)."""
    counts = {}
    for calls in case["calls"]:
        mine = {}
        for op, *_ in calls:
            mine[op] = mine.get(op, 0) + 1
        for op, n in mine.items():
            counts[op] = max(counts.get(op, 0), n)
    return counts


def spans(mask) -> str:
    """Element ranges where ``mask`` is true, as slices: "[4:7]", "[0:2], [5:6]"."""
    idx = torch.nonzero(mask).flatten().tolist()
    if not idx:
        return "none"
    runs, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            runs.append(f"[{start}:{a + 1}]")
            start = b
    return ", ".join(runs[:3]) + (", ..." if len(runs) > 3 else "")


def chunk_bounds(size: int, n: int) -> list:
    """[(start, end)] of the n chunks of torch.tensor_split on ``size`` elements."""
    lengths = [len(c) for c in torch.arange(size).tensor_split(n)]
    edges = [sum(lengths[:i]) for i in range(n + 1)]
    return list(zip(edges, edges[1:]))


def tensor_split_spans(size: int, n: int) -> str:
    return " ".join(f"[{a}:{b}]" for a, b in chunk_bounds(size, n))


def wrong_values(case, gather_advice: str, add_advice: str) -> str:
    """Name the bug behind a wrong all-reduce result, from every rank's input and output.

    ``gather_advice`` is said when each rank holds only its own part of the sum,
    ``add_advice`` when elements hold the sum of only some ranks' values.
    """
    inputs, outputs, expected = case["inputs"], case["outputs"], case["expected"]
    n, size = inputs.shape
    ok = close(outputs, expected)
    if torch.equal(outputs, inputs):
        if case["returned_the_sum"]:
            return ("you returned the sum but left `tensor` unchanged: the all-reduce is in "
                    "place, so write the result into it (tensor.copy_(result))")
        return ("`tensor` was not changed: write the sum into it in place (tensor[a:b] += buf, "
                "tensor.copy_(...), or recv into a slice of it); `tensor = ...` only rebinds "
                "a local name")
    if bool(close(outputs * n, expected.expand(n, size)).all()):
        return (f"the result is the mean, not the sum (every element is 1/{n} of the sum): "
                "do not divide by the number of ranks")
    if bool(ok.any(dim=0).all()) and not bool(ok.all(dim=1).any()):
        parts = ", ".join(f"rank {r}: {spans(ok[r])}" for r in range(min(n, 3)))
        return (f"each rank holds only its own part of the sum ({parts} of {size} elements "
                f"correct): {gather_advice}")
    partial = _partial_sum(inputs, outputs, ok)
    if partial:
        return f"{partial}: {add_advice}"
    moved = _moved_sum(outputs, expected, ok)
    if moved:
        return moved
    r = int(torch.nonzero(~ok.all(dim=1)).flatten()[0])
    i = int(torch.nonzero(~ok[r]).flatten()[0])
    return (f"wrong values on rank {r}: {int((~ok[r]).sum())} of {size} elements "
            f"(element {i}: got {outputs[r, i].item():.6g}, expected {expected[i].item():.6g}; "
            f"wrong elements {spans(~ok[r])})")


def _partial_sum(inputs, outputs, ok):
    """'element i on rank r is the value of ranks {a, b} alone', when every wrong element is the
    sum over a proper subset of the ranks (N <= 4: at most 14 subsets to try)."""
    n = inputs.shape[0]
    subsets = [s for k in range(1, n) for s in combinations(range(n), k)]
    sums = torch.stack([inputs[list(s)].sum(dim=0) for s in subsets])        # [subsets, S]
    matches = close(sums[:, None, :], outputs[None, :, :])                    # [subsets, N, S]
    if not bool(matches.any(dim=0)[~ok].all()):
        return None
    r, i = torch.nonzero(~ok)[0].tolist()
    subset = subsets[int(torch.nonzero(matches[:, r, i])[0])]
    who = "rank " + str(subset[0]) if len(subset) == 1 else "ranks " + ", ".join(map(str, subset))
    return (f"some elements hold the values of only some ranks (element {i} on rank {r} is the "
            f"value of {who} alone, not the sum over all {n} ranks)")


def _moved_sum(outputs, expected, ok):
    """'the right sums in the wrong places', when >= 90 % of the wrong elements are sums that
    belong elsewhere (padding zeros moved in account for the rest)."""
    wrong = torch.nonzero(~ok)                                                # [W, 2]
    matches = close(outputs[wrong[:, 0], wrong[:, 1]][:, None], expected[None, :])   # [W, S]
    found = matches.any(dim=1)
    if not bool(found.any()) or int(found.sum()) < 0.9 * len(wrong):
        return None
    k = int(torch.nonzero(found)[0])
    (r, i), j = wrong[k].tolist(), int(torch.nonzero(matches[k])[0])
    return (f"the right sums are in the wrong places (element {i} on rank {r} holds the sum "
            f"that belongs at element {j}): check the order and the offsets at which the "
            "reduced pieces are put back together")
