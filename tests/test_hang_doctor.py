"""The hang doctor: each rank's record of the collectives it entered, and the one sentence a
timeout gets from comparing them (``labkit.launcher._collective_hooks``, ``_collective_record``,
``_hang_doctor``).

Synthetic records test ``diagnose`` sentence by sentence; real launches test that a skipped
collective, a reordered pair, mismatched sizes and a send/recv deadlock are each named in the
``LaunchTimeout`` message, before the stacks.
"""
import os
import stat

import pytest
import torch
import torch.distributed as dist

import labkit
from labkit.launcher import _collective_record as record
from labkit.launcher._hang_doctor import diagnose, last_entered

STACKS = "Where each unfinished rank was waiting"


def call(op, seq, nbytes=16, *, dtype="float32", shapes=None, group="world", peer=None,
         returned=True, asynchronous=False):
    """One entry as a rank writes it (``n`` is filled in by ``ranks``)."""
    return {"op": op, "seq": seq, "bytes": nbytes, "dtype": dtype, "tensors": 1,
            "shapes": shapes if shapes is not None else [[nbytes // 4]], "group": group,
            "peer": peer, "async": asynchronous, "batch": False, "returned": returned}


def ranks(*records):
    """{rank: entries} with each entry's running number ``n``, as ``read`` returns them."""
    return {r: [dict(e, n=i + 1) for i, e in enumerate(entries)]
            for r, entries in enumerate(records)}


def all_reduces(count, last_inside=False):
    return [call("all_reduce", s, 4096, returned=not (last_inside and s == count))
            for s in range(1, count + 1)]


# --- diagnose, sentence by sentence ------------------------------------------------------------

def test_a_skipped_collective_names_the_rank_behind_and_the_sequence_number():
    collectives = ranks(all_reduces(7, True), all_reduces(6), all_reduces(7, True),
                        all_reduces(7, True))
    assert diagnose(collectives, 4, unfinished=[0, 2, 3]) == (
        "Ranks 0, 2, 3 entered all_reduce #7 (4.0 KiB, float32); rank 1 stopped at #6 and "
        "returned from the function: it skipped this collective, or the others added one.")
    assert "rank 1 stopped at #6 and finished the cell" in diagnose(
        collectives, 4, unfinished=[0, 2, 3], returned="finished the cell")   # %%ranks' words
    # the same, but rank 1 is still running its own code: it may just be late
    sentence = diagnose(collectives, 4, unfinished=[0, 1, 2, 3])
    assert sentence.endswith("rank 1 stopped at #6 and is busy in its own code: it skipped this "
                             "collective or has not reached it yet.")


def test_a_rank_behind_waiting_in_a_send_says_so():
    behind = all_reduces(2) + [call("send", 1, peer=3, returned=False)]
    collectives = ranks(all_reduces(3, True), behind, all_reduces(3, True), all_reduces(2))
    sentence = diagnose(collectives, 4, unfinished=[0, 1, 2, 3])
    assert sentence == (
        "Ranks 0 and 2 entered all_reduce #3 (4.0 KiB, float32); rank 1 stopped at #2 and waits "
        "in send #1 to rank 3 (16 B, float32); rank 3 stopped at #2 and is busy in its own code: "
        "they skipped this collective or have not reached it yet.")


def test_a_reordered_pair_names_both_collectives_at_the_same_number():
    swapped = all_reduces(2) + [call("broadcast", 3, 4096, returned=False)]
    collectives = ranks(all_reduces(3, True), swapped, all_reduces(3, True), all_reduces(3, True))
    assert diagnose(collectives, 4) == (
        "Ranks 0, 2, 3 entered all_reduce #3 (4.0 KiB, float32); rank 1 entered broadcast #3 "
        "(4.0 KiB, float32): the ranks called different collectives at the same point (one of "
        "them skipped a collective, or called them in another order).")


def test_mismatched_sizes_name_the_odd_rank_and_both_sizes():
    collectives = ranks([call("all_reduce", 1), call("all_reduce", 2, returned=False)],
                        [call("all_reduce", 1), call("all_reduce", 2, 12, returned=False)],
                        [call("all_reduce", 1), call("all_reduce", 2, returned=False)],
                        [call("all_reduce", 1), call("all_reduce", 2, returned=False)])
    assert diagnose(collectives, 4) == (
        "All ranks entered all_reduce #2, rank 1 with 12 B, the others with 16 B: every rank "
        "must pass tensors of the same shape and dtype.")


def test_two_ranks_with_different_sizes_are_both_named_and_dtypes_are_shown_when_they_differ():
    assert diagnose(ranks([call("all_reduce", 1, returned=False)],
                          [call("all_reduce", 1, 12)]), 2, unfinished=[0]).startswith(
        "All ranks entered all_reduce #1, rank 0 with 16 B, rank 1 with 12 B")
    halves = ranks([call("all_reduce", 1, 16, dtype="float16", shapes=[[8]], returned=False)],
                   [call("all_reduce", 1, 32, dtype="float32", shapes=[[8]], returned=False)])
    assert "rank 0 with 16 B of float16, rank 1 with 32 B of float32" in diagnose(halves, 2)
    shaped = ranks([call("all_reduce", 1, 16, shapes=[[2, 2]], returned=False)],
                   [call("all_reduce", 1, 16, shapes=[[4]], returned=False)])
    assert "rank 0 with 16 B shaped [2, 2], rank 1 with 16 B shaped [4]" in diagnose(shaped, 2)


def test_uneven_all_to_all_splits_are_not_a_mismatch():
    uneven = ranks([call("all_to_all_single", 1, 16, returned=False)],
                   [call("all_to_all_single", 1, 32, returned=False)])
    assert diagnose(uneven, 2).startswith("Ranks 0 and 1 both entered all_to_all_single #1 and agree")


def test_ranks_that_all_send_first_are_a_send_send_deadlock():
    pair = ranks([call("send", 1, peer=1, returned=False)], [call("send", 1, peer=0, returned=False)])
    assert diagnose(pair, 2) == (
        "Ranks 0 and 1 both wait in send to each other: every rank sends first and nobody "
        "receives (on gloo a send may wait until its receiver has posted the matching recv).")
    ring = ranks(*[[call("send", 1, peer=(r + 1) % 4, returned=False)] for r in range(4)])
    assert diagnose(ring, 4).startswith(
        "Ranks 0, 1, 2, 3 all wait in send (0 → 1, 1 → 2, 2 → 3, 3 → 0): every rank sends first")
    receivers = ranks([call("recv", 1, peer=1, returned=False)],
                      [call("recv", 1, peer=0, returned=False)])
    assert diagnose(receivers, 2) == ("Ranks 0 and 1 both wait in recv from each other: every "
                                      "rank receives first and nobody sends.")


def test_a_recv_whose_send_never_came_counts_the_messages():
    sender = [call("send", 1, peer=1), call("send", 2, peer=1)]
    receiver = [call("recv", 1, peer=0), call("recv", 2, peer=0),
                call("recv", 3, peer=0, returned=False)]
    assert diagnose(ranks(sender, receiver), 2, unfinished=[1]) == (
        "Rank 1 waits in recv #3 from rank 0 (16 B, float32), but rank 0 sent only 2 to rank 1 "
        "and returned from the function: every send needs a matching recv on its peer, in the "
        "same order.")


def test_a_send_to_a_rank_that_waits_elsewhere_says_where_that_rank_waits():
    collectives = ranks([call("send", 1, peer=1, returned=False)],
                        [call("recv", 1, peer=2, returned=False)],
                        [])
    assert diagnose(collectives, 3) == (
        "Rank 0 waits in send #1 to rank 1 (16 B, float32), but rank 1 received only 0 from "
        "rank 0 and waits in recv #1 from rank 2 (16 B, float32): every send needs a matching "
        "recv on its peer, in the same order.")
    # a rank in a send while its peer waits in a collective: the collective's view comes first
    collectives = ranks([call("send", 1, peer=1, returned=False)],
                        [call("all_reduce", 1, returned=False)])
    assert diagnose(collectives, 2) == (
        "Rank 1 entered all_reduce #1 (16 B, float32); rank 0 entered no collective on it and "
        "waits in send #1 to rank 1 (16 B, float32): it skipped this collective or has not "
        "reached it yet.")


def test_when_the_collectives_agree_the_sentence_says_where_each_rank_is():
    busy = ranks(all_reduces(3), all_reduces(3))
    assert diagnose(busy, 2) == (
        "The ranks' collectives agree so far; ranks 0 and 1 are not inside any collective (rank 0 "
        "after all_reduce #3 (4.0 KiB, float32), rank 1 after all_reduce #3 (4.0 KiB, float32)): "
        "busy in their own code (stack below).")
    stuck = ranks(all_reduces(3, True), all_reduces(3, True))
    assert diagnose(stuck, 2).startswith("Ranks 0 and 1 both entered all_reduce #3 (4.0 KiB, "
                                         "float32) and agree on it")
    assert diagnose(ranks([], []), 2) == ("No rank had entered a collective yet: ranks 0 and 1 "
                                          "are busy in their own code or still setting up "
                                          "(stacks below).")
    assert diagnose({}, 2) == ""           # no record at all: nothing to say


def test_a_subgroup_is_compared_among_its_own_ranks():
    pair = [0, 2]
    collectives = ranks([call("all_reduce", 1, group=pair, returned=False)],
                        [],
                        [call("broadcast", 1, group=pair, returned=False)])
    assert diagnose(collectives, 3, unfinished=[0, 2]) == (
        "Rank 0 entered all_reduce #1 on group [0, 2] (16 B, float32); rank 2 entered broadcast "
        "#1 on group [0, 2] (16 B, float32): the ranks called different collectives at the same "
        "point (one of them skipped a collective, or called them in another order).")


def test_a_ring_that_let_old_entries_go_is_not_read_as_a_rank_behind():
    # rank 1's record holds only sends now (n starts at 100): its all-reduces are unknown
    truncated = [dict(call("send", s, peer=0), n=99 + s) for s in range(1, 65)]
    collectives = {0: [dict(e, n=i + 1) for i, e in enumerate(all_reduces(3, True))],
                   1: truncated}
    assert "stopped at" not in diagnose(collectives, 2)


def test_last_entered_is_a_status_line():
    assert last_entered([]) == "none yet"
    assert last_entered(all_reduces(2, True)) == "all_reduce #2 (4.0 KiB, float32), still inside"
    assert last_entered([call("recv", 4, peer=None)]) == "recv #4 from any rank (16 B, float32), returned"


def test_a_rank_traceback_leaves_out_the_records_wrapper():
    from labkit.launcher.errors import without_recorder_frames
    traceback = ('Traceback (most recent call last):\n'
                 '  File "/tmp/ipykernel_1/3.py", line 3, in step\n'
                 '    dist.all_reduce(t)\n'
                 '  File "/x/labkit/launcher/_collective_hooks.py", line 172, in recorded\n'
                 '    return original(*args, **kwargs)\n'
                 '           ^^^^^^^^^^^^^^^^^^^^^^^^^\n'
                 '  File "/x/torch/distributed/distributed_c10d.py", line 3245, in all_reduce\n'
                 '    work = group.allreduce([tensor], opts)\n'
                 'RuntimeError: boom\n')
    assert without_recorder_frames(traceback) == traceback.replace(
        '  File "/x/labkit/launcher/_collective_hooks.py", line 172, in recorded\n'
        '    return original(*args, **kwargs)\n'
        '           ^^^^^^^^^^^^^^^^^^^^^^^^^\n', "")


# --- the record file ---------------------------------------------------------------------------

def test_the_record_keeps_the_last_entries_in_order_and_marks_returns(tmp_path):
    path = str(tmp_path / "rank-0.collectives")
    ring = record.RecordFile(path)
    for n in range(1, record.SLOTS + 11):
        slot = ring.enter({"n": n, "op": "all_reduce", "seq": n})
        if n < record.SLOTS + 10:
            ring.returned(slot)
    entries = record.read(path)
    assert [e["n"] for e in entries] == list(range(11, record.SLOTS + 11))
    assert all(e["returned"] for e in entries[:-1]) and not entries[-1]["returned"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ring.close()


def test_a_torn_or_foreign_record_is_read_as_what_parses(tmp_path):
    path = str(tmp_path / "rank-0.collectives")
    ring = record.RecordFile(path)
    ring.enter({"n": 1, "op": "all_reduce", "seq": 1})
    ring.enter({"n": 2, "op": "broadcast", "seq": 1})
    ring.close()
    with open(path, "r+b") as f:            # a slot caught half-written: not JSON
        f.seek(64 + record.SLOT_BYTES + 3)
        f.write(b"\x00garbage")
    assert [e["op"] for e in record.read(path)] == ["all_reduce"]
    (tmp_path / "other").write_bytes(b"\x80\x04pickled?" * 100)   # never unpickled: ignored
    assert record.read(str(tmp_path / "other")) == []
    assert record.read(str(tmp_path / "missing")) == []


# --- what a rank records (real launches) -------------------------------------------------------

def recorded_calls():
    """Ordinary ops, then one call of each kind; what this rank's record says about them."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    from labkit import compat
    from labkit.launcher import _collective_hooks
    rank = dist.get_rank()
    other = 1 - rank
    x = torch.ones(4)
    for _ in range(200):                      # ordinary tensor ops: nothing recorded
        x = x @ torch.eye(4) + 0
    ordinary = _collective_hooks.entries_written()
    dist.all_reduce(x)                                        # world #1
    dist.broadcast(x, 0, async_op=True).wait()                # world #2, async
    compat.all_gather_into_tensor(torch.empty(8), x)          # world #3, one entry under this name
    names = [None, None]
    dist.all_gather_object(names, f"rank {rank}")             # world #4 (its inner all_gathers: no)
    pair = dist.new_group([0, 1])
    dist.all_reduce(x, group=pair)                            # group [0, 1] #1
    if rank == 0:                                             # send calls isend inside: one entry
        dist.send(x, 1)
        dist.recv(x, 1)
    else:
        dist.recv(x, 0)
        dist.send(x, 0)
    ops = [dist.P2POp(dist.isend, x.clone(), other), dist.P2POp(dist.irecv, torch.empty(4), other)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return {"ordinary": ordinary, "mode": _get_current_dispatch_mode() is None,
            "entries": record.read(_collective_hooks.record_file()), "x": x.tolist(),
            "names": names, "status": _collective_hooks.last_entered()}


def test_each_call_is_recorded_once_with_its_number_and_nothing_else_is(no_leftovers):
    results = labkit.launch(recorded_calls, 2, quiet=True)
    for rank, result in enumerate(results):
        other = 1 - rank
        assert result["x"] == [4.0] * 4 and result["names"] == ["rank 0", "rank 1"]
        assert result["ordinary"] == 0 and result["mode"], "ordinary ops must not be recorded"
        seen = [(e["op"], e["seq"], e["bytes"], e["group"], e["peer"], e["async"], e["batch"])
                for e in result["entries"]]
        p2p = [("send", 1, 16, "world", other, False, False),
               ("recv", 1, 16, "world", other, False, False)]
        assert seen == [
            ("all_reduce", 1, 16, "world", None, False, False),
            ("broadcast", 2, 16, "world", None, True, False),
            ("all_gather_into_tensor", 3, 32, "world", None, False, False),
            ("all_gather_object", 4, None, "world", None, False, False),
            ("all_reduce", 1, 16, [0, 1], None, False, False),
            *(p2p if rank == 0 else p2p[::-1]),
            ("isend", 2, 16, "world", other, True, True),
            ("irecv", 2, 16, "world", other, True, True)]
        assert all(e["returned"] for e in result["entries"])
        assert [e["n"] for e in result["entries"]] == list(range(1, 10))
        assert result["entries"][0]["shapes"] == [[4]] and result["entries"][0]["dtype"] == "float32"
        assert result["status"] == f"irecv #2 from rank {other} (16 B, float32), returned"


def staged_then_recorded_again():
    """Host-memory point-to-point installed on top of the record, and the record on top of it."""
    from labkit.launcher import _collective_hooks, _staging
    _staging.install(condition=lambda t: True)          # wraps the record's send, recv, ...
    _collective_hooks.install(_collective_hooks.record_file())   # ... and the record wraps it
    rank = dist.get_rank()
    other = 1 - rank
    mine, got, batched = torch.full((3,), rank + 1.0), torch.zeros(3), torch.zeros(3)
    if rank == 0:
        dist.send(mine, other)
        dist.recv(got, other)
    else:
        dist.recv(got, other)
        dist.send(mine, other)
    ops = [dist.P2POp(dist.isend, mine * 10, other), dist.P2POp(dist.irecv, batched, other)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return got.tolist(), batched.tolist(), [(e["op"], e["seq"]) for e in
                                            record.read(_collective_hooks.record_file())]


def test_the_record_composes_with_host_memory_point_to_point(no_leftovers):
    for rank, (got, batched, calls) in enumerate(labkit.launch(staged_then_recorded_again, 2,
                                                               quiet=True)):
        other = 2 - rank
        assert got == [float(other)] * 3 and batched == [10.0 * other] * 3
        first = [("send", 1), ("recv", 1)]
        assert calls == (first if rank == 0 else first[::-1]) + [("isend", 2), ("irecv", 2)]


def where_my_record_is():
    from labkit.launcher import _collective_hooks
    path = _collective_hooks.record_file()
    return (path, stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode),
            stat.S_IMODE(os.stat(path).st_mode))


def test_the_record_folder_is_private_and_removed_after_the_launch(no_leftovers):
    (path0, folder_mode, file_mode), (path1, _, _) = labkit.launch(where_my_record_is, 2,
                                                                    quiet=True)
    folder = os.path.dirname(path0)
    assert os.path.dirname(path1) == folder
    assert (os.path.basename(path0), os.path.basename(path1)) == ("rank-0.collectives",
                                                                  "rank-1.collectives")
    assert folder_mode == 0o700 and file_mode == 0o600
    assert not os.path.exists(folder), "the launch should remove its record folder"


def numbered_ledger():
    from labkit.comm import CommCounter
    rank, x = dist.get_rank(), torch.ones(4)
    pair = dist.new_group([0, 1])
    with CommCounter() as comm:
        dist.all_reduce(x)
        dist.all_reduce(x, group=pair)
        dist.broadcast(x, 0)
        for _ in range(2):
            dist.send(x, 1) if rank == 0 else dist.recv(x, 0)
        dist.barrier()
    return [(c.op, n) for c, n in zip(comm.calls, comm.sequence_numbers)], len(comm.calls[0])


def test_the_ledger_numbers_calls_per_group_and_peer_and_keeps_its_tuples(no_leftovers):
    for rank, (numbered, fields) in enumerate(labkit.launch(numbered_ledger, 2, quiet=True)):
        p2p = "send" if rank == 0 else "recv"
        assert numbered == [("all_reduce", 1), ("all_reduce", 1), ("broadcast", 2),
                            (p2p, 1), (p2p, 2), ("barrier", 3)]
        assert fields == 7          # CommCall is the same 7-field tuple as before


# --- a timeout's diagnosis (real launches) -----------------------------------------------------

def skips_the_seventh():
    for step in range(7):
        if dist.get_rank() == 1 and step == 6:
            break                                   # rank 1 skips the 7th all-reduce
        dist.all_reduce(torch.ones(1024))


def swaps_a_pair():
    t = torch.ones(1024)
    dist.all_reduce(t)
    dist.all_reduce(t)
    if dist.get_rank() == 1:                        # rank 1 broadcasts first
        dist.broadcast(t, 0)
        dist.all_reduce(t)
    else:
        dist.all_reduce(t)
        dist.broadcast(t, 0)


def sizes_differ():
    dist.all_reduce(torch.ones(1))
    dist.all_reduce(torch.ones(3 if dist.get_rank() == 1 else 4))


def sends_first():
    other = 1 - dist.get_rank()
    dist.send(torch.ones(4), other)                 # both ranks send before either receives
    dist.recv(torch.empty(4), other)


@pytest.mark.parametrize("fn, nprocs, sentence", [
    (skips_the_seventh, 4,
     "Ranks 0, 2, 3 entered all_reduce #7 (4.0 KiB, float32); rank 1 stopped at #6 and returned "
     "from the function: it skipped this collective, or the others added one."),
    (swaps_a_pair, 4,
     "Ranks 0, 2, 3 entered all_reduce #3 (4.0 KiB, float32); rank 1 entered broadcast #3 "
     "(4.0 KiB, float32): the ranks called different collectives at the same point (one of them "
     "skipped a collective, or called them in another order)."),
    (sizes_differ, 2,
     "All ranks entered all_reduce #2, rank 0 with 16 B, rank 1 with 12 B: every rank must pass "
     "tensors of the same shape and dtype."),
    (sends_first, 2,
     "Ranks 0 and 1 both wait in send to each other: every rank sends first and nobody receives "
     "(on gloo a send may wait until its receiver has posted the matching recv)."),
])
def test_a_hang_is_diagnosed_in_one_sentence_before_the_stacks(fn, nprocs, sentence, no_leftovers,
                                                               monkeypatch):
    folders = []
    create = record.create_folder
    monkeypatch.setattr(record, "create_folder", lambda: folders.append(create()) or folders[-1])
    labkit.warm_up()        # the timeout is for the ranks, not for the fork server's imports
    with pytest.raises(labkit.LaunchTimeout) as info:
        labkit.launch(fn, nprocs, timeout=6, quiet=True)
    message = str(info.value)
    assert message.startswith("TIMEOUT: ")
    assert message.splitlines()[2] == sentence, message
    assert message.index(sentence) < message.index(STACKS)
    assert sorted(info.value.collectives) == list(range(nprocs))
    assert "_collective_hooks" not in message       # the record's wrapper is not in the stacks
    assert len(folders) == 1 and not os.path.exists(folders[0])


def test_a_hang_under_torchrun_is_diagnosed_too(no_leftovers):
    with pytest.raises(labkit.LaunchTimeout) as info:
        labkit.launch(sends_first, 2, start_method="torchrun", timeout=20, quiet=True)
    assert str(info.value).splitlines()[2].startswith(
        "Ranks 0 and 1 both wait in send to each other: every rank sends first")
    assert [e["op"] for e in info.value.collectives[0]] == ["send"]
