"""Which advice a hang gets: send/recv deadlocks are told apart from mismatched collectives.

The launcher reads each stuck rank's stack (``labkit.launcher.errors.timeout_hint``); the
checks read them through ``labkit.check._core.where_waiting`` and ``describe_hang``.
"""
import pytest
import torch
import torch.distributed as dist

import labkit
from labkit.check import _core
from labkit.launcher import errors

TORCH = "/venv/lib/python3.11/site-packages/torch/distributed"


def stack(*frames):
    """A readable_stack-style dump, newest frame first: (file, line's function, source)."""
    lines = ["Current thread 0x00007f (most recent call first):"]
    for file, name, source in frames:
        lines += [f'  File "{file}", line 7 in {name}', f"      {source}"]
    return "\n".join(lines)


IN_SEND = stack((f"{TORCH}/distributed_c10d.py", "send", "work.wait()"),
                (f"{TORCH}/c10d_logger.py", "wrapper", "return func(*args, **kwargs)"),
                ("/tmp/ipykernel_1/3.py", "exchange", "dist.send(chunk, right)"))
IN_RECV = stack((f"{TORCH}/distributed_c10d.py", "recv", "work.wait()"),
                ("/tmp/ipykernel_1/3.py", "exchange", "dist.recv(buffer, left)"))
IN_WAIT = stack(("/tmp/ipykernel_1/3.py", "exchange", "request.wait()"))
IN_ALL_REDUCE = stack((f"{TORCH}/distributed_c10d.py", "all_reduce", "work.wait()"),
                      ("/tmp/ipykernel_1/3.py", "step", "dist.all_reduce(grad)"))


def test_a_ranks_stack_is_read_into_the_op_it_waits_in():
    assert errors.waiting_in(IN_SEND) == "send"          # not "wait": torch's own work.wait()
    assert errors.waiting_in(IN_RECV) == "recv"
    assert errors.waiting_in(IN_WAIT) == "wait"
    assert errors.waiting_in(IN_ALL_REDUCE) == "all_reduce"
    assert errors.waiting_in(stack(("/tmp/x.py", "work", "time.sleep(60)"))) is None
    assert errors.waiting_in("") is None


@pytest.mark.parametrize("stacks, hint", [
    ({0: IN_SEND, 1: IN_SEND}, errors.POINT_TO_POINT_TIMEOUT_HINT),
    ({0: IN_RECV, 1: IN_RECV, 2: IN_RECV}, errors.POINT_TO_POINT_TIMEOUT_HINT),
    ({0: IN_SEND, 1: IN_WAIT}, errors.POINT_TO_POINT_TIMEOUT_HINT),
    ({1: IN_RECV}, errors.POINT_TO_POINT_TIMEOUT_HINT),        # rank 0 returned without sending
    ({0: IN_WAIT, 1: IN_WAIT}, errors.REQUEST_TIMEOUT_HINT),   # isend's or an async collective's
    ({0: IN_ALL_REDUCE, 1: IN_RECV}, errors.COLLECTIVE_TIMEOUT_HINT),
    ({0: IN_ALL_REDUCE, 2: IN_ALL_REDUCE}, errors.COLLECTIVE_TIMEOUT_HINT),
    ({0: IN_SEND, 1: ""}, errors.COLLECTIVE_TIMEOUT_HINT),      # a rank that did not answer
    ({}, errors.COLLECTIVE_TIMEOUT_HINT),                       # no stacks at all
])
def test_the_timeout_hint_follows_what_the_ranks_wait_in(stacks, hint):
    assert errors.timeout_hint(stacks) == hint


def test_the_hints_say_what_to_do():
    point_to_point = errors.POINT_TO_POINT_TIMEOUT_HINT
    assert "needs a matching recv(buffer, src) on rank dst" in point_to_point
    assert "req = dist.isend(...), then the recvs, then req.wait()" in point_to_point
    assert "On gloo a send of any size may wait until the receiver has posted its recv" \
        in point_to_point
    assert "do not modify a tensor handed to isend before its wait() returns" in point_to_point
    assert "debug=True" not in point_to_point      # it compares collectives, not sends
    assert "debug=True" in errors.COLLECTIVE_TIMEOUT_HINT
    both = errors.REQUEST_TIMEOUT_HINT
    assert "before its wait() returns" in both and "debug=True" in both


def test_ranks_that_all_send_first_get_the_point_to_point_advice(no_leftovers):
    def sends_first():    # defined here, it travels by value: ranks need not import this file
        other = 1 - dist.get_rank()
        dist.send(torch.ones(4), other)        # both ranks send before either receives
        dist.recv(torch.empty(4), other)

    labkit.warm_up()      # the 2 s are for the ranks, not for the fork server to import torch
    with pytest.raises(labkit.LaunchTimeout) as info:
        labkit.launch(sends_first, 2, timeout=2, quiet=True)
    message = str(info.value)
    assert all("in send" in info.value.stacks[rank] for rank in (0, 1))
    assert message.endswith(errors.POINT_TO_POINT_TIMEOUT_HINT)
    assert "same collectives" not in message and "debug=True" not in message


def test_describe_hang_states_the_send_rule_as_gloos_behaviour():
    waits = [_core.Wait(0, "send", None), _core.Wait(1, "send", None)]
    hint = _core.describe_hang(waits, 2, 5)
    assert hint.startswith("deadlock on 2 ranks: every rank is waiting to send")
    assert "on gloo, send may not return until the receiver has posted its recv" in hint
    assert "only returns once" not in hint
