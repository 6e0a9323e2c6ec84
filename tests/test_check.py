"""labkit.check: the graders of notebooks 00 and 01, run on correct and on deliberately buggy code.

Every planted bug must fail with a hint that names it (a distinctive phrase per bug); a correct
solution, and every valid alternative to it, must pass; nothing may raise, hang or leave a
process behind. The learner functions below are what a learner might write in the notebook:
the graders check the mechanism (the ledger of sends and collectives), not only the values.
"""
import contextlib
import io
import json
import sys
import threading

import cloudpickle
import pytest
import torch
import torch.distributed as dist

from labkit import check
from labkit.check import _allreduce, _core, _hints
from labkit.compat import all_gather_into_tensor, reduce_scatter_tensor

# Ship this file's functions to the ranks by value, as a notebook's are, rather than have every
# rank import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

HANG = 3.0   # seconds per launch for the planted deadlocks: a correct launch takes ~0.1 s


# --- notebook 00: sum_of_ranks ------------------------------------------------------------------

def sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def sum_of_ranks_as_int_tensor():
    t = torch.tensor(dist.get_rank())
    dist.all_reduce(t)
    return t                     # a one-element tensor counts as its number


def sum_of_ranks_by_all_gather():    # a valid alternative: gather every rank, then add
    mine = torch.tensor([float(dist.get_rank())])
    everyone = [torch.empty(1) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return torch.cat(everyone).sum().item()


def sum_of_ranks_from_world_size():  # the right number without communicating
    n = dist.get_world_size()
    return n * (n - 1) / 2


def own_rank():
    return float(dist.get_rank())


def with_max():
    t = torch.tensor(float(dist.get_rank()))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def a_vector():
    t = torch.tensor([float(dist.get_rank())] * 2)
    dist.all_reduce(t)
    return t


def returns_nothing():
    t = torch.tensor(float(dist.get_rank()))
    dist.all_reduce(t)


def only_rank_0_reduces():
    t = torch.tensor(float(dist.get_rank()))
    if dist.get_rank() == 0:
        dist.all_reduce(t)
    return t.item()


def stub(*args):
    # YOUR CODE HERE
    raise NotImplementedError()


@pytest.fixture
def no_predictions(monkeypatch):
    """As in a fresh kernel: no prediction made yet, so summaries keep the measured answers."""
    monkeypatch.setattr(_core, "_ATTEMPTED", set())


def test_a_correct_sum_of_ranks_passes_and_shows_the_sums_once_predicted(no_predictions, capsys):
    result = check.sum_of_ranks(sum_of_ranks)
    assert result.passed and result.status == "passed" and result.hint is None
    assert result.figures == {"2 ranks": 1.0, "3 ranks": 3.0, "4 ranks": 6.0}
    assert capsys.readouterr().out == (      # predicted_sum not made yet: no sums, no formula
        "✓ sum_of_ranks: every rank returned the sum of the ranks on 2, 3 and 4 ranks, "
        "through all_reduce\n")
    _core._ATTEMPTED.add("predicted_sum")
    result = check.sum_of_ranks(sum_of_ranks_by_all_gather)       # all_gather + sum is valid
    assert capsys.readouterr().out == (
        "✓ sum_of_ranks: every rank returned N(N-1)/2: "
        "1 on 2 ranks, 3 on 3 ranks, 6 on 4 ranks, through all_gather\n")
    assert check.sum_of_ranks(sum_of_ranks_as_int_tensor).passed


@pytest.mark.parametrize("fn, phrase", [
    (own_rank, "the all_reduce is missing"),
    (with_max, "that is op=MAX"),
    (a_vector, "return one number"),
    (returns_nothing, "returned None"),
    (sum_of_ranks_from_world_size, "without communicating (no collective in the ledger): "
                                   "computed from dist.get_world_size()? This exercise is about "
                                   "a collective"),
])
def test_sum_of_ranks_names_the_bug(fn, phrase, capsys):
    result = check.sum_of_ranks(fn)
    assert not result.passed and result.status == "failed"
    assert phrase in result.hint
    assert capsys.readouterr().out == f"✗ sum_of_ranks: {result.hint}\n"


def test_a_collective_on_one_rank_only_is_stopped_and_explained(no_leftovers):
    result = check.sum_of_ranks(only_rank_0_reduces, timeout=HANG)
    assert result.status == "failed"
    assert "rank 0 in all_reduce" in result.hint and "had already returned" in result.hint
    assert "dist.all_reduce(t)" in result.hint          # the learner's own line
    assert "TIMEOUT" in result.details                  # the launcher's full report


# --- notebook 01: ring_all_reduce ----------------------------------------------------------------

def ring_all_reduce(tensor):
    """The reference solution: a ring reduce-scatter, then a ring all-gather."""
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = tensor.tensor_split(n)          # N views, sizes differ by at most one
    right, left = (rank + 1) % n, (rank - 1) % n
    for step in range(n - 1):                # reduce-scatter: add what the left neighbour sends
        received = torch.empty_like(chunks[(rank - step - 1) % n])
        request = dist.isend(chunks[(rank - step) % n], right)
        dist.recv(received, left)
        request.wait()
        chunks[(rank - step - 1) % n].add_(received)
    for step in range(n - 1):                # all-gather: pass the reduced chunks on
        request = dist.isend(chunks[(rank + 1 - step) % n], right)
        dist.recv(chunks[(rank - step) % n], left)
        request.wait()


def isend_recv(send, receive_into):
    rank, n = dist.get_rank(), dist.get_world_size()
    request = dist.isend(send, (rank + 1) % n)
    dist.recv(receive_into, (rank - 1) % n)
    request.wait()


def by_parity(send, receive_into):       # blocking send/recv: even ranks send first
    rank, n = dist.get_rank(), dist.get_world_size()
    if rank % 2 == 0:
        dist.send(send, (rank + 1) % n)
        dist.recv(receive_into, (rank - 1) % n)
    else:
        dist.recv(receive_into, (rank - 1) % n)
        dist.send(send, (rank + 1) % n)


def irecv_isend(send, receive_into):
    rank, n = dist.get_rank(), dist.get_world_size()
    requests = [dist.irecv(receive_into, (rank - 1) % n), dist.isend(send, (rank + 1) % n)]
    for request in requests:
        request.wait()


def batched(send, receive_into):         # batch_isend_irecv: the ledger sees its isend/irecv
    rank, n = dist.get_rank(), dist.get_world_size()
    ops = [dist.P2POp(dist.isend, send, (rank + 1) % n),
           dist.P2POp(dist.irecv, receive_into, (rank - 1) % n)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()


def to_the_left(send, receive_into):     # the mirror ring: send left, receive from the right
    rank, n = dist.get_rank(), dist.get_world_size()
    request = dist.isend(send, (rank - 1) % n)
    dist.recv(receive_into, (rank + 1) % n)
    request.wait()


def empty_like(chunk, tensor, n):
    return torch.empty_like(chunk)


def _ring(tensor, split=None, add=True, gather_steps=None, exchange=isend_recv,
          buffer=empty_like):
    """The reference ring with one thing changed, to plant a bug (or a valid variation)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = split(tensor, n) if split else tensor.tensor_split(n)
    for step in range(n - 1):
        received = buffer(chunks[(rank - step - 1) % n], tensor, n)
        exchange(chunks[(rank - step) % n].clone(), received)
        if add:
            chunks[(rank - step - 1) % n].add_(received)
        else:
            chunks[(rank - step - 1) % n].copy_(received)
    for step in range(n - 1 if gather_steps is None else gather_steps(n)):
        exchange(chunks[(rank + 1 - step) % n].clone(), chunks[(rank - step) % n])


def ring_by_parity(tensor):
    _ring(tensor, exchange=by_parity)


def ring_with_irecv(tensor):
    _ring(tensor, exchange=irecv_isend)


def ring_batched(tensor):
    _ring(tensor, exchange=batched)


def ring_rs_then_ag(tensor):
    """Composed from the two exercises below; rank r ends the reduce-scatter with chunk r, not
    chunk r + 1: another schedule, the same ring."""
    ring_reduce_scatter(tensor)
    ring_all_gather(tensor)


def ring_receiving_first(tensor):
    def recv_then_send(send, receive_into):
        rank, n = dist.get_rank(), dist.get_world_size()
        dist.recv(receive_into, (rank - 1) % n)
        dist.send(send, (rank + 1) % n)
    _ring(tensor, exchange=recv_then_send)


def ring_blocking_to_the_left(tensor):
    def send_left_recv_left(send, receive_into):
        rank, n = dist.get_rank(), dist.get_world_size()
        dist.send(send, (rank - 1) % n)
        dist.recv(receive_into, (rank - 1) % n)
    _ring(tensor, exchange=send_left_recv_left)


def ring_floor_chunks(tensor):
    def floor_split(t, n):       # drops the last size % n elements
        c = t.numel() // n
        return [t[i * c:(i + 1) * c] for i in range(n)]
    _ring(tensor, split=floor_split)


def ring_torch_chunk(tensor):    # torch.chunk gives fewer than N chunks when size < N
    _ring(tensor, split=lambda t, n: t.chunk(n))


def ring_overwrite(tensor):
    _ring(tensor, add=False)


def ring_without_all_gather(tensor):
    _ring(tensor, gather_steps=lambda n: 0)


def ring_one_step_too_many(tensor):   # right values, but an all-gather of N steps
    _ring(tensor, gather_steps=lambda n: n)


def ring_the_wrong_way(tensor):
    _ring(tensor, exchange=to_the_left)


def ring_float32_buffers(tensor):     # torch.empty(k) is float32 whatever the tensor is
    _ring(tensor, buffer=lambda chunk, t, n: torch.empty(chunk.numel()))


def ring_floor_sized_buffers(tensor):   # S // N elements: too small for the larger chunks
    _ring(tensor, buffer=lambda chunk, t, n: torch.empty(t.numel() // n, dtype=t.dtype))


def ring_ceil_sized_buffers(tensor):    # ceil(S / N) elements: too big for the smaller chunks
    _ring(tensor, buffer=lambda chunk, t, n: torch.empty(-(-t.numel() // n), dtype=t.dtype))


def ring_with_all_reduce(tensor):
    dist.all_reduce(tensor)


def ring_whole_tensors(tensor):
    """Correct sums, but every rank sends its whole tensor to every other rank: not a ring."""
    rank, n = dist.get_rank(), dist.get_world_size()
    total = tensor.clone()
    for step in range(1, n):
        received = torch.empty_like(tensor)
        request = dist.isend(tensor.clone(), (rank + step) % n)
        dist.recv(received, (rank - step) % n)
        request.wait()
        total += received
    tensor.copy_(total)


def all_reduce_through_rank_0(tensor):
    """Correct sums: every rank sends its tensor to rank 0, which sends back the sum. A star."""
    rank, n = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        for source in range(1, n):
            received = torch.empty_like(tensor)
            dist.recv(received, source)
            tensor += received
        for destination in range(1, n):
            dist.send(tensor, destination)
    else:
        dist.send(tensor, 0)
        dist.recv(tensor, 0)


def ring_from_the_old_seed(tensor):
    """No communication: rebuilds every rank's input from the seed the old check used."""
    n, size = dist.get_world_size(), tensor.numel()
    tensor.copy_(sum(torch.randn(size, generator=torch.Generator().manual_seed(
        20240501 + 7919 * rank + size)) for rank in range(n)))


def ring_returning_a_copy(tensor):
    result = tensor.clone()
    ring_all_reduce(result)
    return result


def ring_shrinking_the_tensor(tensor):
    tensor.resize_(1)


def ring_with_a_typo(tensor):
    chunks = tensor.tensor_split(dist.get_world_size())
    return chunks[dist.get_world_size()]


def ring_assigning_into_the_tuple(tensor):
    chunks = tensor.tensor_split(dist.get_world_size())
    chunks[0] += 1


def test_a_correct_ring_passes_and_sends_what_the_ring_formula_says(monkeypatch, capsys):
    monkeypatch.setattr(_core, "_ATTEMPTED", {"ring_sends_per_rank", "ring_bytes_per_rank"})
    result = check.ring_all_reduce(ring_all_reduce)
    assert result.passed, result.hint
    figures = result.figures
    assert (figures["ranks"], figures["elements"], figures["tensor_bytes"]) == (4, 1000, 4000)
    assert figures["bytes_sent_per_rank"] == [6000] * 4         # 2(N-1)/N·S, chunks of 250
    assert figures["sends_per_rank"] == [6] * 4                  # 2(N-1) steps
    assert figures["ring_formula_bytes"] == 6000.0
    line = capsys.readouterr().out
    assert line.startswith("✓ ring_all_reduce: matches dist.all_reduce on 2, 3, 4 ranks for "
                           "1, 7, 12, 64, 1000 float32 and 12 float64 elements, as a ring")
    assert "each rank sent 6,000 B in 6 sends" in line and line.count("\n") == 1


@pytest.mark.parametrize("fn", [ring_by_parity, ring_with_irecv, ring_batched, ring_rs_then_ag])
def test_other_rings_pass_too(fn, no_predictions, capsys):
    result = check.ring_all_reduce(fn)
    assert result.passed, result.hint
    assert result.figures["sends_per_rank"] == [6] * 4
    line = capsys.readouterr().out       # the predictions are not made: no counts in the line
    assert "6,000" not in line and " 6 sends" not in line and "2(N-1)" not in line
    assert "show here once you have predicted them" in line


@pytest.mark.parametrize("fn, phrases", [
    (ring_floor_chunks, ["chunk boundaries", "with 7 elements on 2 ranks, elements [6:7] are "
                         "wrong", "gives [0:4] [4:7]"]),
    (ring_torch_chunk, ["torch.tensor_split(tensor, 2) always gives 2 chunks"]),
    (ring_overwrite, ["add the received chunk to your own"]),
    (ring_without_all_gather, ["the all-gather phase is missing", "rank 0: [500:1000], rank 1: "
                               "[0:500] of 1000 elements correct", "rank 0 made 1 send and 1 "
                               "receive; this ring takes 2 steps"]),
    (ring_one_step_too_many, ["rank 0 made 3 sends and 3 receives; this ring takes 2 steps"]),
    (ring_the_wrong_way, ["on 3 ranks rank 0 sent to rank 2, not rank 1 (the ring runs the "
                          "wrong way)", "then, with a tensor of 64 elements, gloo killed rank"]),
    (ring_with_all_reduce, ["called dist.all_reduce: build it from send/recv"]),
    (ring_whole_tensors, ["rank 0 sent to ranks 1, 2, 3 (whole tensors): that is not a ring",
                          "send one chunk"]),
    (all_reduce_through_rank_0, ["everything goes through rank 0", "a star, not a ring"]),
    (ring_from_the_old_seed, ["wrong values on rank 0", "rank 0 made 0 sends"]),
    (ring_float32_buffers, ["crashed rank", "with a float64 tensor of 12 elements",
                            "a float32 buffer", "torch.empty_like(chunk)"]),
    (ring_floor_sized_buffers, ["with a tensor of 7 elements", "A chunk of 16 B arrived in a "
                                "receive buffer of 12 B", "gives [0:4] [4:7]", "not with S // N"]),
    (ring_ceil_sized_buffers, ["differ in size", "gives [0:4] [4:7]"]),
    (ring_returning_a_copy, ["returned the sum but left `tensor` unchanged"]),
    (ring_with_a_typo, ["ring_all_reduce raised IndexError on rank ", " of 2 with a tensor of "
                        "12 elements", "`return chunks[dist.get_world_size()]`"]),
    (ring_assigning_into_the_tuple, ["update a chunk in place with chunks[i].add_(received)"]),
    (ring_shrinking_the_tensor, ["changed from (12,) torch.float32 to (1,) torch.float32"]),
])
def test_ring_all_reduce_names_the_bug(fn, phrases):
    result = check.ring_all_reduce(fn)
    assert result.status == "failed"
    for phrase in phrases:
        assert phrase in result.hint


@pytest.mark.parametrize("fn, phrase", [
    (ring_receiving_first, "every rank is waiting to receive"),
    (ring_blocking_to_the_left, "every rank is waiting to send"),
])
def test_a_deadlocked_ring_is_stopped_and_explained(fn, phrase, no_leftovers):
    result = check.ring_all_reduce(fn, timeout=HANG)
    assert result.status == "failed"
    assert phrase in result.hint and "deadlock on 2 ranks" in result.hint
    assert "dist.recv(receive_into, (rank - 1) % n)" in result.hint or \
        "dist.send(send, (rank - 1) % n)" in result.hint     # where the ranks waited
    if fn is ring_receiving_first:
        assert ("each send must be matched by a recv on the neighbour: send to (rank + 1) % N and "
                "receive from (rank - 1) % N") in result.hint
    else:
        assert "dist.isend" in result.hint


def test_inputs_are_fresh_at_every_run_and_the_reference_is_independent():
    cases = _allreduce.RING_CASES
    first, second = _allreduce.fresh_inputs(3, cases), _allreduce.fresh_inputs(3, cases)
    assert [x.shape for x in first] == [(3, c.size) for c in cases]
    assert [x.dtype for x in first][-1] == torch.float64
    assert not any(torch.equal(a, b) for a, b in zip(first, second))
    stack = torch.tensor([[1.0, 2.0], [1e8, 3.0], [-1e8, 4.0]])
    assert _allreduce.reference_sum(stack).tolist() == [1.0, 9.0]   # float64: 1 survives 1e8


# --- notebook 01: the ring's two phases -----------------------------------------------------------

def ring_reduce_scatter(tensor):
    """The reference solution: rank r ends with the sum of chunk r."""
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = tensor.tensor_split(n)
    for step in range(n - 1):
        into = chunks[(rank - step - 2) % n]
        received = torch.empty_like(into)
        request = dist.isend(chunks[(rank - step - 1) % n], (rank + 1) % n)
        dist.recv(received, (rank - 1) % n)
        request.wait()
        into.add_(received)


def ring_all_gather(tensor):
    """The reference solution: on entry rank r holds chunk r; pass on what came last."""
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = tensor.tensor_split(n)
    for step in range(n - 1):
        request = dist.isend(chunks[(rank - step) % n], (rank + 1) % n)
        dist.recv(chunks[(rank - step - 1) % n], (rank - 1) % n)
        request.wait()


def _rs(tensor, shift=1, add=True, steps=None, exchange=isend_recv, buffer=empty_like,
        whole=False):
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = tensor.tensor_split(n)
    for step in range(n - 1 if steps is None else steps(n)):
        send, into = chunks[(rank - step - shift) % n], chunks[(rank - step - shift - 1) % n]
        received = buffer(tensor if whole else into, tensor, n)
        exchange(tensor.clone() if whole else send.clone(), received)
        if whole:
            received = received.tensor_split(n)[(rank - step - shift - 1) % n]
        into.add_(received) if add else into.copy_(received)


def _ag(tensor, offset=1, steps=None, exchange=isend_recv, write="recv"):
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = tensor.tensor_split(n)
    for step in range(n - 1 if steps is None else steps(n)):
        into = chunks[(rank - step - offset) % n]
        received = into if write == "recv" else torch.empty_like(into)
        exchange(chunks[(rank - step) % n].clone(), received)
        if write == "add":
            into.add_(received)


def rs_by_parity(tensor):
    _rs(tensor, exchange=by_parity)


def rs_ending_on_the_next_chunk(tensor):   # the all-reduce's schedule: rank r holds chunk r + 1
    _rs(tensor, shift=0)


def rs_overwrite(tensor):
    _rs(tensor, add=False)


def rs_one_step_short(tensor):
    _rs(tensor, steps=lambda n: n - 2)


def rs_the_wrong_way(tensor):
    _rs(tensor, exchange=to_the_left)


def rs_whole_tensors(tensor):
    _rs(tensor, whole=True)


def rs_float32_buffers(tensor):
    _rs(tensor, buffer=lambda chunk, t, n: torch.zeros(chunk.numel()))


def rs_floor_chunks(tensor):
    rank, n = dist.get_rank(), dist.get_world_size()
    c = tensor.numel() // n
    chunks = [tensor[i * c:(i + 1) * c] for i in range(n)]
    for step in range(n - 1):
        into = chunks[(rank - step - 2) % n]
        received = torch.empty_like(into)
        isend_recv(chunks[(rank - step - 1) % n].clone(), received)
        into.add_(received)


def ag_with_irecv(tensor):
    _ag(tensor, exchange=irecv_isend)


def ag_into_a_buffer_only(tensor):    # receives, but never writes into the chunk
    _ag(tensor, write="buffer")


def ag_adding(tensor):
    _ag(tensor, write="add")


def ag_one_step_short(tensor):
    _ag(tensor, steps=lambda n: n - 2)


def ag_into_the_chunk_it_sends(tensor):
    _ag(tensor, offset=0)


def ag_the_wrong_way(tensor):
    _ag(tensor, exchange=to_the_left)


@pytest.mark.parametrize("grader, fn, predicted", [
    (check.ring_reduce_scatter, ring_reduce_scatter, True),
    (check.ring_reduce_scatter, rs_by_parity, False),
    (check.ring_all_gather, ring_all_gather, True),
    (check.ring_all_gather, ag_with_irecv, False),
])
def test_correct_ring_phases_pass(grader, fn, predicted, monkeypatch, capsys):
    made = {"ring_sends_per_rank", "ring_bytes_per_rank"} if predicted else set()
    monkeypatch.setattr(_core, "_ATTEMPTED", made)
    result = grader(fn)
    assert result.passed, result.hint
    assert result.figures["sends_per_rank"] == [3] * 4              # N-1 steps
    assert result.figures["bytes_sent_per_rank"] == [3000] * 4      # (N-1)/N·S, chunks of 250
    line = capsys.readouterr().out
    assert "on 2, 3, 4 ranks for 1, 7, 12, 64, 1000 float32 and 12 float64 elements" in line
    assert line.count("\n") == 1
    assert ("each rank sent 3,000 B in 3 sends, ring formula (N-1)/N·S = 3,000 B" in line) \
        == predicted


@pytest.mark.parametrize("fn, phrases", [
    (rs_ending_on_the_next_chunk, ["rank 0 holds the complete sum of chunk 1, not of chunk 0",
                                   "chunk (r - s - 1) % N"]),
    (rs_overwrite, ["holds the values of rank 1 alone", "chunks[j].add_(received)"]),
    (rs_one_step_short, ["`tensor` was not changed", "rank 0 made 0 sends and 0 receives; "
                         "this ring takes 1 step (one phase of N-1 steps)"]),
    (rs_the_wrong_way, ["on 3 ranks rank 0 sent to rank 2, not rank 1 (the ring runs the "
                        "wrong way)"]),
    (rs_whole_tensors, ["rank 0 sent its whole tensor in one message", "send one chunk"]),
    (rs_float32_buffers, ["with a float64 tensor of 12 elements", "a float32 buffer"]),
    (rs_floor_chunks, ["correct when 2 divides the size", "chunk boundaries", "[0:4] [4:7]"]),
    (ring_with_all_reduce, ["ring_reduce_scatter called dist.all_reduce"]),
])
def test_ring_reduce_scatter_names_the_bug(fn, phrases):
    result = check.ring_reduce_scatter(fn)
    assert result.status == "failed"
    for phrase in phrases:
        assert phrase in result.hint


@pytest.mark.parametrize("fn, phrases", [
    (ag_into_a_buffer_only, ["the chunks of the other ranks were never written",
                             "random values", "dist.recv(chunks[i], left)"]),
    (ag_adding, ["plus rank 1's chunk", "do not add it"]),
    (ag_one_step_short, ["never written", "made 0 sends and 0 receives; this ring takes "
                         "1 step"]),
    (ag_into_the_chunk_it_sends, ["rank 0's own chunk 0 changed", "; then, with a tensor of "
                                  "7 elements, gloo killed rank"]),
    (ag_the_wrong_way, ["not rank 1 (the ring runs the wrong way)"]),
])
def test_ring_all_gather_names_the_bug(fn, phrases):
    result = check.ring_all_gather(fn)
    assert result.status == "failed"
    for phrase in phrases:
        assert phrase in result.hint


STACK = """Current thread 0x00007f (most recent call first):
  File "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 2799 in recv
      work.wait()
  File "/venv/lib/python3.11/site-packages/torch/distributed/c10d_logger.py", line 83 in wrapper
      return func(*args, **kwargs)
  File "/tmp/ipykernel_1/2.py", line 9 in ring_all_reduce
      dist.recv(buf, left)
  File "{labkit}/check/_core.py", line 152 in call_learner
      return fn(*args)"""


def test_a_hang_is_read_from_the_ranks_stacks():
    import labkit
    import os
    stack = STACK.format(labkit=os.path.dirname(labkit.__file__))
    wait = _core.where_waiting(1, stack)
    assert wait == _core.Wait(1, "recv", "line 9 in ring_all_reduce: `dist.recv(buf, left)`")
    mixed = [wait, _core.Wait(2, "send", None)]
    assert _core.describe_hang(mixed, 3, 5) == (
        "the ranks were still waiting for each other after 5 s: rank 1 in recv (line 9 in "
        "ring_all_reduce: `dist.recv(buf, left)`); rank 2 in send; rank(s) 0 had already "
        "returned: every rank must make the same calls in the same order (each collective on "
        "every rank, each send matched by a recv)")
    assert "still running after 5 s" in _core.describe_hang([], 2, 5)   # no stacks at all


def test_the_stub_is_not_implemented_yet(capsys):
    names = ("sum_of_ranks", "ring_all_reduce", "ring_reduce_scatter", "ring_all_gather",
             "all_reduce_via_rs_ag")
    for name in names:
        result = getattr(check, name)(stub)
        assert (result.status, result.passed, result.hint) == ("not implemented", False, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"… {name}: not implemented yet" for name in names]


# --- notebook 01: all_reduce_via_rs_ag -----------------------------------------------------------

def all_reduce_via_rs_ag(tensor):
    """The reference solution: pad to a multiple of N, reduce-scatter, all-gather, unpad."""
    n, size = dist.get_world_size(), tensor.numel()
    padded = torch.zeros(-(-size // n) * n, dtype=tensor.dtype)
    padded[:size] = tensor
    shard = torch.empty(padded.numel() // n, dtype=tensor.dtype)
    reduce_scatter_tensor(shard, padded)
    all_gather_into_tensor(padded, shard)
    tensor.copy_(padded[:size])


def _rs_ag(tensor, pad=True, reverse=False, gather=True, mean=False):
    n, size = dist.get_world_size(), tensor.numel()
    padded = torch.zeros(-(-size // n) * n if pad else size)
    padded[:size] = tensor
    shard = torch.empty(padded.numel() // n)
    reduce_scatter_tensor(shard, padded)
    if mean:
        shard /= n
    if reverse:
        shards = [torch.empty_like(shard) for _ in range(n)]
        dist.all_gather(shards, shard)
        padded = torch.cat(shards[::-1])
    elif gather:
        all_gather_into_tensor(padded, shard)
    else:
        rank = dist.get_rank()
        padded[rank * shard.numel():(rank + 1) * shard.numel()] = shard
    tensor.copy_(padded[:size])


def rs_ag_without_padding(tensor):
    _rs_ag(tensor, pad=False)


def rs_ag_gathered_in_reverse(tensor):
    _rs_ag(tensor, reverse=True)


def rs_ag_without_all_gather(tensor):
    _rs_ag(tensor, gather=False)


def rs_ag_averaging(tensor):
    _rs_ag(tensor, mean=True)


def test_a_correct_rs_ag_passes_and_moves_what_one_all_reduce_moves(capsys):
    result = check.all_reduce_via_rs_ag(all_reduce_via_rs_ag)
    assert result.passed, result.hint
    f = result.figures
    assert f["reduce_scatter_payload_bytes"] == f["all_gather_payload_bytes"] == \
        f["all_reduce_payload_bytes"] == 4000
    assert f["reduce_scatter_wire_bytes"] + f["all_gather_wire_bytes"] == \
        f["all_reduce_wire_bytes"] == 6000
    line = capsys.readouterr().out
    assert "one reduce-scatter + one all-gather" in line
    assert "3,000 + 3,000 = 6,000 B, what one all-reduce sends (6,000 B)" in line


@pytest.mark.parametrize("fn, phrase", [
    (rs_ag_without_padding, "7 is not a multiple of 2: pad the tensor with zeros to a multiple "
                            "of N (8 here)"),
    (rs_ag_gathered_in_reverse, "the right sums are in the wrong places"),
    (rs_ag_without_all_gather, "no all-gather: after the reduce-scatter each rank holds only its "
                               "own reduced shard"),
    (rs_ag_averaging, "the result is the mean, not the sum"),
    (ring_with_all_reduce, "build it from one reduce-scatter and one all-gather"),
    (ring_all_reduce, "used recv, send: build it from exactly one reduce-scatter and one "
                      "all-gather"),
])
def test_all_reduce_via_rs_ag_names_the_bug(fn, phrase):
    result = check.all_reduce_via_rs_ag(fn)
    assert result.status == "failed"
    assert phrase in result.hint


# --- hints on request -----------------------------------------------------------------------------

def test_each_exercise_has_its_hints_from_a_nudge_to_nearly_the_answer():
    counts = {name: len(_hints._HINTS[name]) for name in _hints.exercises()}
    assert counts.items() >= {"sum_of_ranks": 2, "ring_all_reduce": 3, "ring_reduce_scatter": 3,
                              "ring_all_gather": 2}.items()
    assert "tensor_split" in _hints._HINTS["ring_all_reduce"][0]
    assert "(r - s) % N" in _hints._HINTS["ring_all_reduce"][1]         # the schedule
    assert "empty_like" in _hints._HINTS["ring_all_reduce"][2]          # nearly the answer
    assert "dist.all_reduce" not in _hints._HINTS["sum_of_ranks"][0]    # a nudge only


def test_a_hint_is_printed_and_returned_at_any_level(capsys):
    third = check.hint("ring_all_reduce", 3)            # before 1 and 2: fine
    first = check.hint("ring_all_reduce", 1)
    assert first.startswith("ring_all_reduce, hint 1 of 3 (labkit.check.hint('ring_all_reduce', "
                            "2) says more):\n")
    assert third.startswith("ring_all_reduce, hint 3 of 3 (the last one):\n")
    assert third.endswith(_hints._HINTS["ring_all_reduce"][2])
    assert capsys.readouterr().out == f"{third}\n{first}\n"
    assert check.hint("ring_all_gather", "2").endswith(_hints._HINTS["ring_all_gather"][1])


def test_the_hint_text_comes_from_the_registry(monkeypatch, capsys):
    monkeypatch.setattr(_hints, "_HINTS", {})
    _hints.register("toy", ["look at the ledger", "count the sends"])
    assert check.hint("toy", 2) == "toy, hint 2 of 2 (the last one):\ncount the sends"
    with pytest.raises(ValueError):
        _hints.register("toy", [])


@pytest.mark.parametrize("name, level, phrases", [
    ("ring_allreduce", 1, ["no hints for 'ring_allreduce': did you mean 'ring_all_reduce'?",
                           "hints exist for ", "sum_of_ranks", ", ring_all_reduce"]),
    ("nothing_like_it", 1, ["no hints for 'nothing_like_it': hints exist for"]),
    ("ring_all_reduce", 4, ["ring_all_reduce has hints 1 to 3", "not 4"]),
    ("ring_all_reduce", 0, ["has hints 1 to 3"]),
    ("sum_of_ranks", "next", ["sum_of_ranks has hints 1 to 2", "not 'next'"]),
    ("sum_of_ranks", None, ["has hints 1 to 2"]),
])
def test_a_wrong_name_or_level_says_what_exists(name, level, phrases, capsys):
    text = check.hint(name, level)                        # never raises
    for phrase in phrases:
        assert phrase in text
    assert capsys.readouterr().out == f"{text}\n"


# --- the protocol ---------------------------------------------------------------------------------

def test_the_result_reads_like_the_line_and_serialises_for_grading():
    ok = _core.CheckResult("ex", True, "passed", summary="all good", figures={"bytes": 6000})
    bad = _core.CheckResult("ex", False, "failed", hint="the result is the mean, not the sum")
    todo = _core.CheckResult("ex", False, "not implemented")
    assert [r.line for r in (ok, bad, todo)] == [
        "✓ ex: all good", "✗ ex: the result is the mean, not the sum",
        "… ex: not implemented yet"]
    assert json.loads(json.dumps(bad.to_json())) == {
        "name": "ex", "passed": False, "status": "failed",
        "hint": "the result is the mean, not the sum", "figures": {}}
    assert bool(ok) and not bool(bad)              # `assert check.x(fn)` fails when it should
    with pytest.raises(AssertionError, match="mean, not the sum"):
        assert bad.passed, bad.hint                # the notebook's hidden test


def test_a_check_never_raises(capsys):
    result = check.ring_all_reduce("ring_all_reduce")       # not even for a non-function
    assert result.status == "failed" and "pass your function itself" in result.hint
    lock = threading.Lock()
    result = check.sum_of_ranks(lambda: lock.locked())       # a lock cannot be sent to the ranks
    assert result.status == "failed" and "cannot send" in result.hint


def test_in_a_kernel_the_result_is_published_for_labkit_grade(monkeypatch, capsys):
    shown = []
    monkeypatch.setattr(_core, "_in_kernel", lambda: True)
    monkeypatch.setattr("IPython.display.display", lambda data, raw: shown.append((data, raw)))
    result = _core.CheckResult("ex", False, "failed", hint="h", figures={"x": 1.5})
    _core.report(result)
    assert capsys.readouterr().out == ""           # the line is the output's text, shown once
    assert shown == [({check.MIMETYPE: result.to_json(), "text/plain": "✗ ex: h"}, True)]


def test_outside_a_kernel_only_the_line_is_printed():
    assert not _core._in_kernel()        # pytest is no Jupyter kernel


def test_a_check_counts_as_attempted_once_it_ran_on_the_learners_code(monkeypatch):
    monkeypatch.setattr(_core, "_ATTEMPTED", set())
    def grader(fn):
        try:
            return fn(), {}
        except NotImplementedError:
            raise _core.NotImplementedYet() from None
    toy, quiet = _core.exercise("toy")(grader), _core.exercise("quiet")(grader)
    with contextlib.redirect_stdout(io.StringIO()):
        toy(stub)                                        # the stub: not attempted yet
        assert not _core.attempted("toy")
        toy(lambda: "done")
        quiet(lambda: 1 / 0)                             # failed, but made
    assert _core.attempted("toy", "quiet") and not _core.attempted("toy", "other")


CELLS = [
    "import torch, torch.distributed as dist\nfrom labkit import check",
    "def sum_of_ranks():\n"
    "    t = torch.tensor(float(dist.get_rank()))\n"
    "    dist.all_reduce(t, op=dist.ReduceOp.MAX)\n"
    "    return t.item()",
    "result = check.sum_of_ranks(sum_of_ranks)",
    'check.hint("sum_of_ranks", 1)',
]


def test_a_notebook_shows_one_line_and_carries_the_result_for_grading():
    import nbformat
    from nbclient import NotebookClient
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    outputs = notebook.cells[2].outputs
    # one output, no empty one: the line is the text/plain of the display that carries the result
    assert [o.output_type for o in outputs] == ["display_data"]
    line = outputs[0].data["text/plain"]
    # MAX is right on 2 ranks (max(0, 1) = 0 + 1): that is why the check also runs 3 and 4
    assert line.startswith("✗ sum_of_ranks: on 3 ranks every rank returned 2")
    assert "\n" not in line
    published = outputs[0].data[check.MIMETYPE]
    assert published["status"] == "failed" and published["passed"] is False
    assert "op=MAX" in published["hint"]
    # a hint as the cell's last expression: printed once, not echoed again as Out[]
    hint = notebook.cells[3].outputs
    assert [(o.output_type, o.get("name")) for o in hint] == [("stream", "stdout")]
    assert hint[0].text == f"{check.hint('sum_of_ranks', 1)}\n"
