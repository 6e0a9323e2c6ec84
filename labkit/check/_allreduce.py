"""Grading an in-place SUM all-reduce written by a learner: run it, then name what went wrong.

Used by the checks of notebook 01 (``ring_all_reduce``, ``all_reduce_via_rs_ag``). In each rank,
``run_cases`` computes torch's own ``dist.all_reduce`` of every input first, then calls the
learner's function on a copy of each input under a ``CommCounter``. In the notebook,
``wrong_values`` looks at every rank's input and output at once and recognises the usual bugs:
nothing changed, the mean instead of the sum, each rank holding only its own part (a missing
all-gather), sums of only some ranks (overwriting instead of adding), the right sums in the wrong
places.

Tolerance. torch's all-reduce and the learner's code add the same N float32 values in different
orders. Each order rounds N-1 times, each time by at most 2^-24 of a partial sum no larger than
sum|x|, so two orders differ by at most 2 (N-1) 2^-24 sum|x|. With N <= 4 standard-normal inputs
(|x| < 6, so sum|x| < 24) that is below 9e-6 in the worst case and about 1e-7 typically.
``torch.isclose`` with RTOL = ATOL = 1e-5 allows at least 1e-5, while every bug recognised here
changes values by about 1.
"""
from itertools import combinations

import torch
import torch.distributed as dist

from labkit.check._core import Failed, call_learner
from labkit.comm import CommCounter

RTOL = ATOL = 1e-5
# 12 splits evenly on 2, 3 and 4 ranks; 7 and 1 on none of them (1: fewer elements than ranks).
# Even sizes run first: a function that crashes only on the last ones has a chunking problem.
SIZES = (12, 64, 1000, 7, 1)
SEED = 20240501


def close(a, b):
    return torch.isclose(a, b, rtol=RTOL, atol=ATOL)


def random_input(size: int, rank: int) -> torch.Tensor:
    """A float32 vector, different on each rank and for each size, the same on every run."""
    generator = torch.Generator().manual_seed(SEED + 7919 * rank + size)
    return torch.randn(size, generator=generator)


def run_cases(fn, sizes=SIZES) -> list:
    """In one rank: torch's all-reduce of each input, then the learner's function on a copy.

    The reference sums come first, so that no collective of ours sits between the learner's
    sends and receives (a rank that finishes early would otherwise wait in our all-reduce).
    """
    rank = dist.get_rank()
    inputs = [random_input(size, rank) for size in sizes]
    references = []
    for x in inputs:
        expected = x.clone()
        with CommCounter() as reference:
            dist.all_reduce(expected)
        references.append((expected, reference.calls[0]))
    cases = []
    for x, (expected, reference) in zip(inputs, references):
        tensor = x.clone()
        with CommCounter() as comm:
            returned = call_learner(fn, tensor, case=f"a tensor of {x.numel()} element"
                                    + ("s" if x.numel() != 1 else ""))
        returned_the_sum = (isinstance(returned, torch.Tensor) and returned is not tensor
                            and returned.shape == x.shape and bool(close(returned, expected).all()))
        cases.append({"size": x.numel(), "input": x, "output": tensor, "expected": expected,
                      "returned_the_sum": returned_the_sum,
                      "calls": [(c.op, c.payload_bytes, c.wire_bytes) for c in comm.calls],
                      "reference": (reference.payload_bytes, reference.wire_bytes)})
    return cases


def by_size(per_rank: list) -> list:
    """Rank-major results of ``run_cases`` -> one dict per size with [N, S] stacks."""
    cases = []
    for i, first in enumerate(per_rank[0]):
        ranks = [cases_of_rank[i] for cases_of_rank in per_rank]
        for rank, case in enumerate(ranks):
            x, out = case["input"], case["output"]
            if out.shape != x.shape or out.dtype != x.dtype:
                raise Failed(f"with {x.numel()} elements on {len(ranks)} ranks, rank {rank}'s "
                             f"tensor changed from {tuple(x.shape)} {x.dtype} to "
                             f"{tuple(out.shape)} {out.dtype}: write the sum into the tensor you "
                             "were given, keeping its shape and dtype")
        cases.append(dict(first, inputs=torch.stack([c["input"] for c in ranks]),
                          outputs=torch.stack([c["output"] for c in ranks]),
                          calls=[c["calls"] for c in ranks],
                          returned_the_sum=any(c["returned_the_sum"] for c in ranks)))
    return cases


def correct(case) -> bool:
    return bool(close(case["outputs"], case["expected"]).all())


def ops_used(case) -> dict:
    """{op: calls} over every rank (counted per rank, then the most any rank made)."""
    counts = {}
    for calls in case["calls"]:
        mine = {}
        for op, _, _ in calls:
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


def tensor_split_spans(size: int, n: int) -> str:
    bounds = [len(c) for c in torch.arange(size).tensor_split(n)]
    edges = [sum(bounds[:i]) for i in range(n + 1)]
    return " ".join(f"[{a}:{b}]" for a, b in zip(edges, edges[1:]))


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
