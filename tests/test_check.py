"""labkit.check: the graders of notebooks 00 and 01, run on correct and on deliberately buggy code.

Every planted bug must fail with a hint that names it (a distinctive phrase per bug); a correct
solution must pass; nothing may raise, hang or leave a process behind. The learner functions
below are what a learner might write in the notebook.
"""
import json
import sys
import threading

import cloudpickle
import pytest
import torch
import torch.distributed as dist

from labkit import check
from labkit.check import _core
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


def test_a_correct_sum_of_ranks_passes_with_the_sums_as_figures(capsys):
    result = check.sum_of_ranks(sum_of_ranks)
    assert result.passed and result.status == "passed" and result.hint is None
    assert result.figures == {"2 ranks": 1.0, "3 ranks": 3.0, "4 ranks": 6.0}
    assert capsys.readouterr().out == (
        "✓ sum_of_ranks: every rank returned N(N-1)/2: "
        "1 on 2 ranks, 3 on 3 ranks, 6 on 4 ranks\n")
    assert check.sum_of_ranks(sum_of_ranks_as_int_tensor).passed


@pytest.mark.parametrize("fn, phrase", [
    (own_rank, "the all_reduce is missing"),
    (with_max, "that is op=MAX"),
    (a_vector, "return one number"),
    (returns_nothing, "returned None"),
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


def _ring(tensor, split=None, add=True, gather=True, exchange=None):
    """The reference ring with one thing changed, to plant a bug."""
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = split(tensor, n) if split else tensor.tensor_split(n)
    right, left = (rank + 1) % n, (rank - 1) % n

    def isend_recv(send, receive_into):
        request = dist.isend(send, right)
        dist.recv(receive_into, left)
        request.wait()
    exchange = exchange or isend_recv
    for step in range(n - 1):
        received = torch.empty_like(chunks[(rank - step - 1) % n])
        exchange(chunks[(rank - step) % n].clone(), received)
        if add:
            chunks[(rank - step - 1) % n].add_(received)
        else:
            chunks[(rank - step - 1) % n].copy_(received)
    if gather:
        for step in range(n - 1):
            exchange(chunks[(rank + 1 - step) % n].clone(), chunks[(rank - step) % n])


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
    _ring(tensor, gather=False)


def ring_with_all_reduce(tensor):
    dist.all_reduce(tensor)


def ring_whole_tensors(tensor):
    """Correct sums, but every rank sends its whole tensor N-1 times: not a ring."""
    rank, n = dist.get_rank(), dist.get_world_size()
    total = tensor.clone()
    for step in range(1, n):
        received = torch.empty_like(tensor)
        request = dist.isend(tensor.clone(), (rank + step) % n)
        dist.recv(received, (rank - step) % n)
        request.wait()
        total += received
    tensor.copy_(total)


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


def test_a_correct_ring_passes_and_sends_what_the_ring_formula_says(capsys):
    result = check.ring_all_reduce(ring_all_reduce)
    assert result.passed, result.hint
    figures = result.figures
    assert (figures["ranks"], figures["elements"], figures["tensor_bytes"]) == (4, 1000, 4000)
    assert figures["bytes_sent_per_rank"] == [6000] * 4         # 2(N-1)/N·S, chunks of 250
    assert figures["sends_per_rank"] == [6] * 4                  # 2(N-1) steps
    assert figures["ring_formula_bytes"] == 6000.0
    line = capsys.readouterr().out
    assert line.startswith("✓ ring_all_reduce: matches dist.all_reduce on 2, 3, 4 ranks for "
                           "1, 7, 12, 64, 1000 elements")
    assert "each rank sent 6,000 B in 6 sends" in line and line.count("\n") == 1


@pytest.mark.parametrize("fn, phrase", [
    (ring_floor_chunks, "chunk boundaries"),
    (ring_torch_chunk, "torch.tensor_split(tensor, 2) always gives 2 chunks"),
    (ring_overwrite, "add the received chunk to your own"),
    (ring_without_all_gather, "the all-gather phase is missing"),
    (ring_with_all_reduce, "build it from send/recv"),
    (ring_whole_tensors, "send one chunk"),
    (ring_returning_a_copy, "returned the sum but left `tensor` unchanged"),
    (ring_with_a_typo, " of 2 with a tensor of 12 elements"),   # either rank may fail first
    (ring_assigning_into_the_tuple, "update a chunk in place with chunks[i].add_(received)"),
    (ring_shrinking_the_tensor, "changed from (12,) torch.float32 to (1,) torch.float32"),
])
def test_ring_all_reduce_names_the_bug(fn, phrase):
    result = check.ring_all_reduce(fn)
    assert result.status == "failed"
    assert phrase in result.hint


def test_the_hints_point_at_the_wrong_elements_and_the_learners_line():
    hint = check.ring_all_reduce(ring_floor_chunks).hint
    assert "with 7 elements on 2 ranks, elements [6:7] are wrong" in hint
    assert "gives [0:4] [4:7]" in hint
    hint = check.ring_all_reduce(ring_without_all_gather).hint
    assert "rank 0: [500:1000], rank 1: [0:500] of 1000 elements correct" in hint
    hint = check.ring_all_reduce(ring_with_a_typo).hint
    assert hint.startswith("ring_all_reduce raised IndexError on rank ")
    assert "`return chunks[dist.get_world_size()]`" in hint


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
    for grader in (check.sum_of_ranks, check.ring_all_reduce, check.all_reduce_via_rs_ag):
        result = grader(stub)
        assert (result.status, result.passed, result.hint) == ("not implemented", False, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"… {name}: not implemented yet"
                     for name in ("sum_of_ranks", "ring_all_reduce", "all_reduce_via_rs_ag")]


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
    assert capsys.readouterr().out == "✗ ex: h\n"
    assert shown == [({check.MIMETYPE: result.to_json(), "text/plain": ""}, True)]


def test_outside_a_kernel_only_the_line_is_printed():
    assert not _core._in_kernel()        # pytest is no Jupyter kernel


CELLS = [
    "import torch, torch.distributed as dist\nfrom labkit import check",
    "def sum_of_ranks():\n"
    "    t = torch.tensor(float(dist.get_rank()))\n"
    "    dist.all_reduce(t, op=dist.ReduceOp.MAX)\n"
    "    return t.item()",
    "result = check.sum_of_ranks(sum_of_ranks)",
]


def test_a_notebook_shows_one_line_and_carries_the_result_for_grading():
    import nbformat
    from nbclient import NotebookClient
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    outputs = notebook.cells[2].outputs
    streams = [o for o in outputs if o.output_type == "stream"]
    assert [o.name for o in streams] == ["stdout"]
    # MAX is right on 2 ranks (max(0, 1) = 0 + 1): that is why the check also runs 3 and 4
    assert streams[0].text.startswith("✗ sum_of_ranks: on 3 ranks every rank returned 2")
    assert streams[0].text.count("\n") == 1
    published = [o.data[check.MIMETYPE] for o in outputs
                 if o.output_type == "display_data" and check.MIMETYPE in o.data]
    assert len(published) == 1
    assert published[0]["status"] == "failed" and published[0]["passed"] is False
    assert "op=MAX" in published[0]["hint"]
