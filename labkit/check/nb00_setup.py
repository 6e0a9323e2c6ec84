"""Notebook 00: ``sum_of_ranks() -> float``, the first collective.

Every rank holds its rank r; after a SUM all-reduce every rank holds 0 + 1 + ... + (N-1),
which is N(N-1)/2: the reference is that formula, exact for these small integers. The value alone
can be had without communicating (from dist.get_world_size()), so the ledger must also show a
collective that carried data: all_reduce, or any other that sums (all_gather, then a sum).
"""
import numbers

import torch

from labkit.check import _sizes
from labkit.check._core import Failed, Ranks, attempted, call_learner, exercise
from labkit.check._hints import register
from labkit.comm import CommCounter

WORLD_SIZES = (2, 3, 4)
QUICK_WORLD_SIZES = (2, 3)   # LABKIT_AUTOGRADE_SIZES=quick under nbgrader (_sizes.py)
# Ops that carry data between ranks but are not collectives, and one that carries none.
_NOT_COLLECTIVES = {"send", "recv", "barrier"}

register("sum_of_ranks", [
    "Each rank puts its own rank, dist.get_rank(), into a tensor. One collective then adds the "
    "tensors of all ranks together and leaves the sum on every rank: which one?",
    "t = torch.tensor([float(dist.get_rank())], device=labkit.device()); dist.all_reduce(t) "
    "(op=SUM is the default); return t.item(). all_reduce works in place: afterwards t holds "
    "the sum, on every rank.",
])


def _run(fn):
    """In each rank: (the learner's value as a float, or a description of what came back;
    the ops of the collectives it ran that carried data)."""
    with CommCounter() as comm:
        value = call_learner(fn, case="no arguments")
    ops = sorted({c.op for c in comm.calls if c.payload_bytes > 0})
    return _describe(value), ops


def _describe(value):
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return float(value.item())
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return "None" if value is None else f"a {type(value).__name__} ({value!r:.40})"


def _no_collective(ops_per_rank: list, n: int):
    """A hint when the right values came without a collective that carried data, or None."""
    ops = set().union(*map(set, ops_per_rank))
    if ops - _NOT_COLLECTIVES:
        return None
    how = (f"with only {', '.join(sorted(ops))}." if ops else "without communicating (no "
           "collective in the ledger): computed from dist.get_world_size()?")
    return (f"on {n} ranks every rank returned {n * (n - 1) // 2} = N(N-1)/2, but {how} This "
            "exercise is about a collective: put the rank in a tensor, dist.all_reduce(t) it, "
            "return t.item()")


def _diagnose(values: list, n: int):
    """A hint naming the likely bug, or None when every rank returned N(N-1)/2."""
    want = n * (n - 1) / 2
    if values == [want] * n:
        return None
    odd = next((v for v in values if isinstance(v, str)), None)
    if odd == "None":
        return ("sum_of_ranks returned None: return the sum as a number, "
                "e.g. `return t.item()` after the all_reduce")
    if odd:
        return f"sum_of_ranks returned {odd}: return one number (a float, or t.item())"
    if values == [float(r) for r in range(n)]:
        return (f"on {n} ranks each rank returned its own rank {values}: the all_reduce is "
                "missing. Put the rank in a tensor, dist.all_reduce(t) it, return t.item()")
    if values == [float(n - 1)] * n:
        return (f"on {n} ranks every rank returned {n - 1}, the largest rank: that is op=MAX. "
                "Sum with op=dist.ReduceOp.SUM (the default)")
    if values == [0.0] * n:
        return (f"on {n} ranks every rank returned 0: the smallest rank (op=MIN?), or a tensor "
                f"that never held the rank; expected {want:g}")
    if values == [n * (n + 1) / 2] * n:
        return (f"on {n} ranks every rank returned {n * (n + 1) // 2} = 1 + ... + {n}: ranks are "
                f"numbered 0 to {n - 1}, so contribute dist.get_rank(), not rank + 1")
    if values == [float(n)] * n:
        return (f"on {n} ranks every rank returned {n}, the number of ranks: each rank must "
                "contribute its rank, not 1")
    if values[0] == want:
        return (f"on {n} ranks only rank 0 has the sum {want:g} (the others returned "
                f"{values[1:]}): that is dist.reduce, which delivers the sum to one rank; use "
                "dist.all_reduce so that every rank gets it")
    return f"on {n} ranks the ranks returned {values}, expected {want:g} on every rank"


@exercise("sum_of_ranks", sizes=True)
def sum_of_ranks(fn, *, timeout: float = 10.0):
    """Run ``fn()`` on 2, 3 and 4 ranks (2 and 3 under quick sizes, ``_sizes``); every rank
    must return N(N-1)/2, and its ledger must show a collective that carried data (all_reduce;
    all_gather and a sum also do).

    A one-element tensor counts as its number. The sums show in the summary once the learner
    has made the ``predicted_sum`` prediction. ``timeout``: seconds per launch.
    """
    ranks = Ranks("sum_of_ranks", timeout=timeout)
    got, figures = {}, {}
    world_sizes = _sizes.pick(WORLD_SIZES, QUICK_WORLD_SIZES)
    for n in world_sizes:
        values, ops = zip(*ranks.run(_run, n, fn))
        hint = _diagnose(list(values), n) or _no_collective(list(ops), n)
        if hint:
            raise Failed(hint, figures=figures)
        got[n] = values[0]
        figures[f"{n} ranks"] = values[0]
    used = sorted(set().union(*map(set, ops)) - _NOT_COLLECTIVES)
    if not attempted("predicted_sum"):
        return (f"every rank returned the sum of the ranks on {_sizes.listed(world_sizes)} "
                f"ranks, through {', '.join(used)}"), figures
    shown = ", ".join(f"{v:g} on {n} ranks" for n, v in got.items())
    return f"every rank returned N(N-1)/2: {shown}, through {', '.join(used)}", figures
