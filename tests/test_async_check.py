"""labkit.check.all_reduce_while_computing: the overlap pattern passes in its valid forms; each
way of not overlapping (waiting calls, compute first, no wait) fails with its own hint. And the
ledger's ``async_op`` flag, which the check reads."""
import pytest
import torch
import torch.distributed as dist

import labkit
from labkit.check import all_reduce_while_computing


def overlapped(tensors, compute):
    handles = [dist.all_reduce(t, async_op=True) for t in tensors]
    result = compute()
    for handle in handles:
        handle.wait()
    return result


def overlapped_waiting_in_reverse(tensors, compute):
    handles = [dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True) for t in tensors]
    result = compute()
    while handles:
        handles.pop().wait()
    return result


def never_waits(tensors, compute):
    [dist.all_reduce(t, async_op=True) for t in tensors]
    return compute()


def blocking_calls(tensors, compute):
    for t in tensors:
        dist.all_reduce(t)
    return compute()


def computes_first(tensors, compute):
    result = compute()
    overlapped(tensors, lambda: None)
    return result


def waits_after_each(tensors, compute):
    for t in tensors:
        dist.all_reduce(t, async_op=True).wait()
    return compute()


def forgets_the_result(tensors, compute):
    overlapped(tensors, compute)


def computes_twice(tensors, compute):
    compute()
    return overlapped(tensors, compute)


@pytest.mark.parametrize("fn", [overlapped, overlapped_waiting_in_reverse])
def test_overlapping_solutions_pass(fn):
    result = all_reduce_while_computing(fn)
    assert result.passed, result.hint


@pytest.mark.parametrize("fn, hint", [
    (never_waits, "wait()"),
    (blocking_calls, "not asynchronous"),
    (computes_first, "had started 0 of the 3"),
    (waits_after_each, "already finished when compute() ran"),
    (forgets_the_result, "return the value"),
    (computes_twice, "called 2 times"),
])
def test_each_way_of_not_overlapping_gets_its_hint(fn, hint):
    result = all_reduce_while_computing(fn)
    assert not result.passed and hint in result.hint, result.hint


def _flags():
    with labkit.CommCounter() as comm:
        x = torch.ones(2)
        dist.all_reduce(x)
        dist.all_reduce(x, async_op=True).wait()
        dist.broadcast(x, src=0, async_op=True).wait()
    return [(call.op, call.async_op) for call in comm.calls]


def test_the_ledger_records_async_op():
    assert labkit.launch(_flags, 2, quiet=True)[0] == [
        ("all_reduce", False), ("all_reduce", True), ("broadcast", True)]
