"""Persistent ranks (%ranks / %%ranks) in a real Jupyter kernel, and their pure helpers.

The kernel tests share one kernel (module fixture) and two ranks; each test sets up what it needs
on the ranks first, because a test before it may have restarted them.
"""
import json
import re
import time

import psutil
import pytest
from jupyter_client.manager import start_new_kernel

from labkit.launcher._rank_loop import split_cell, summarise
from labkit.launcher._session_watch import cell_frames
from labkit.magics import describe_status, parse_ranks

# ---- without a kernel ----


def test_split_cell_evaluates_the_last_expression_unless_the_cell_ends_with_a_semicolon():
    namespace = {}
    statements, last = split_cell("x = 20\nx + 1", "<ranks cell 1>")
    exec(statements, namespace)
    assert eval(last, namespace) == 21
    assert split_cell("x = 20\nx + 1;", "<ranks cell 2>")[1] is None
    assert split_cell("x = 20", "<ranks cell 3>")[1] is None
    assert split_cell("", "<ranks cell 4>")[1] is None
    with pytest.raises(SyntaxError) as error:
        split_cell("x = (", "<ranks cell 5>")
    assert error.value.filename == "<ranks cell 5>"


def test_summarise_shows_small_tensors_whole_and_large_ones_by_shape_and_statistics():
    import torch
    assert summarise(None) is None
    assert summarise(torch.tensor([1.0, 2.0])) == "tensor([1., 2.])"
    big = summarise(torch.arange(1000, dtype=torch.float32).reshape(10, 100))
    assert big.startswith("tensor [10, 100] float32 on cpu: [0, 1, 2, 3, 4, 5, ...]")
    assert "min 0, max 999, mean 499.5" in big
    assert "4 of 100 True" in summarise(torch.arange(100) < 4)
    assert "requires_grad" in summarise(torch.nn.Parameter(torch.zeros(100)))
    pair = summarise([torch.tensor([1.0]), torch.zeros(50)])
    assert pair.startswith("[tensor([1.]), tensor [50] float32")
    assert summarise(list(range(10_000))).count(" ... ") == 1
    assert len(summarise(list(range(10_000)))) < 700

    class Broken:
        def __repr__(self):
            raise RuntimeError("no repr")
    assert "repr failed with RuntimeError: no repr" in summarise(Broken())


def test_parse_ranks_accepts_lists_and_ranges_and_refuses_ranks_outside_the_session():
    assert parse_ranks("0,2", 4) == [0, 2]
    assert parse_ranks("1-3", 4) == [1, 2, 3]
    assert parse_ranks(None, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="ranks 0 to 3"):
        parse_ranks("4", 4)
    with pytest.raises(ValueError, match="e.g. 0,2"):
        parse_ranks("zero", 4)


def test_a_ranks_stack_keeps_the_cell_and_drops_labkits_frames_and_threads():
    dump = "\n".join([
        "Thread 0x0001 (most recent call first):",
        '  File "/x/labkit/launcher/_rank_loop.py", line 150 in read_commands',
        "Current thread 0x0002 (most recent call first):",
        '  File "/x/labkit/launcher/_collective_hooks.py", line 172 in recorded',
        "      return original(*args, **kwargs)",
        '  File "<ranks cell 3>", line 2 in <module>',
        "      time.sleep(9)",
        '  File "/x/labkit/launcher/_rank_loop.py", line 170 in run',
        '  File "/x/labkit/launcher/_rank_loop.py", line 160 in serve_forever'])
    assert cell_frames(dump) == '  File "<ranks cell 3>", line 2 in <module>\n      time.sleep(9)'


def test_describe_status_says_idle_or_where_a_rank_is_busy():
    idle = {"rank": 0, "pid": 11, "busy": False, "tensors": {"params": 2048, "grads": 0},
            "last_collective": None}
    assert describe_status(idle) == ("[rank 0] pid 11, idle; tensors params 2.0 KiB; "
                                     "last collective: none recorded")
    busy = {"rank": 1, "pid": 12, "busy": True, "cell": "<ranks cell 4>", "line": 3,
            "source": "dist.barrier()", "function": "barrier", "tensors": None,
            "last_collective": "barrier #2"}
    assert describe_status(busy) == ("[rank 1] pid 12, busy in cell 4, line 3: dist.barrier() "
                                     "(in barrier); last collective: barrier #2")


# ---- in a real kernel ----

SETUP = "%%ranks\nimport torch, torch.distributed as dist\nrank = dist.get_rank()"


class Kernel:
    def __init__(self):
        self.manager, self.client = start_new_kernel(kernel_name="python3")

    def run(self, code, timeout=90):
        """Run a cell; (text of stdout and stderr, the error's (name, value) or None, result)."""
        messages = []
        reply = self.client.execute_interactive(code, timeout=timeout,
                                                output_hook=messages.append)
        return self._outcome(reply, messages)

    @staticmethod
    def _outcome(reply, messages):
        text = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
        results = [m["content"]["data"]["text/plain"] for m in messages
                   if m["msg_type"] == "execute_result"]
        error = None
        if reply["content"]["status"] == "error":
            error = (reply["content"]["ename"], reply["content"]["evalue"])
        return text, error, results[0] if results else None

    def ok(self, code, timeout=90):
        text, error, result = self.run(code, timeout)
        assert error is None, error
        return text, result

    def interrupt_when(self, code, seen, timeout=60):
        """Start a cell, press the stop button once ``seen`` is in its output; its outcome."""
        msg_id = self.client.execute(code)
        messages, deadline = [], time.monotonic() + timeout
        while not re.search(seen, "".join(m["content"].get("text", "") for m in messages)):
            message = self.client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if message["parent_header"].get("msg_id") == msg_id:
                messages.append(message)
        self.manager.interrupt_kernel()
        reply = self.client.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == msg_id
        return self._outcome(reply, messages)

    def rank_pids(self):
        text, _ = self.ok("%ranks status")
        return [int(p) for p in re.findall(r"\] pid (\d+)", text)]

    def close(self):
        self.client.stop_channels()
        if self.manager.is_alive():
            self.manager.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def kernel():
    kernel = Kernel()
    kernel.ok("%load_ext labkit")
    text, _ = kernel.ok("%ranks start 2 --timeout 30")
    assert text.startswith("labkit ranks: 2 rank(s) ready, backend gloo")
    yield kernel
    kernel.close()


def test_state_persists_across_cells_and_each_rank_shows_its_value(kernel):
    kernel.ok(SETUP)
    text, _ = kernel.ok("%%ranks\nt = torch.tensor([float(rank)])\ndist.all_reduce(t)\n"
                        "print('sum', t.item())")
    assert "[rank 0] sum 1.0\n" in text and "[rank 1] sum 1.0\n" in text
    text, _ = kernel.ok("%%ranks\nt * 10 + rank")  # the next cell sees t and rank
    assert "[rank 0] Out: tensor([10.])\n" in text and "[rank 1] Out: tensor([11.])\n" in text
    text, _ = kernel.ok("%%ranks\nt * 10 + rank;")
    assert "Out:" not in text


def test_a_cell_on_a_subset_of_ranks_runs_there_only(kernel):
    kernel.ok(SETUP)
    text, _ = kernel.ok("%%ranks 1\nmarker = 'set on ' + str(rank)\nmarker")
    assert text == "[rank 1] Out: 'set on 1'\n"
    text, _ = kernel.ok("%%ranks\n'marker' in dir()")
    assert "[rank 0] Out: False\n" in text and "[rank 1] Out: True\n" in text


def test_push_sends_notebook_functions_and_pull_returns_a_list_by_rank(kernel):
    kernel.ok(SETUP)
    kernel.ok("SCALE = 7\ndef triple(x):\n    return 3 * x")
    kernel.ok("%ranks push triple SCALE")
    kernel.ok("%%ranks\nresult = triple(rank) + SCALE\nshard = torch.arange(10.)[rank::2]")
    _, result = kernel.ok("values = %ranks pull result\nvalues")
    assert result == "[7, 10]"
    _, result = kernel.ok("shards = %ranks pull shard\n[s.tolist() for s in shards]")
    assert result == "[[0.0, 2.0, 4.0, 6.0, 8.0], [1.0, 3.0, 5.0, 7.0, 9.0]]"
    _, error, _ = kernel.run("%ranks pull no_such_name")
    assert error[0] == "LaunchError" and "name 'no_such_name' is not defined on rank 0" in error[1]


def test_status_says_each_rank_is_idle_with_its_pid_and_tracer_bytes(kernel):
    kernel.ok(SETUP + "\ndist.all_reduce(torch.ones(3))")
    pids = kernel.rank_pids()
    text, _ = kernel.ok("%ranks status")
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    assert re.search(r"\[rank 0\] pid \d+, idle; last collective: all_reduce #\d+ "
                     r"\(12 B, float32\), returned\n", text)
    kernel.ok("%%ranks\nimport labkit\nmem = labkit.MemoryTracer().__enter__()\n"
              "buffer = mem.tag(torch.zeros(256 * 1024), 'comm')")
    text, _ = kernel.ok("%ranks status")
    assert text.count("tensors comm 1.0 MiB") == 2
    kernel.ok("%%ranks\nmem.__exit__(None, None, None)")


def test_a_rank_that_raises_is_the_root_cause_and_the_others_keep_their_state(kernel):
    kernel.ok(SETUP + "\nkept = rank + 100")
    _, error, _ = kernel.run("%%ranks\nif rank == 1:\n    raise KeyError('only-on-rank-1')\n"
                             "after = True")
    assert error[0] == "LaunchError"
    assert error[1].startswith("ROOT CAUSE: rank 1 of 2: KeyError: 'only-on-rank-1'")
    assert "raise KeyError('only-on-rank-1')" in error[1]  # the cell's own line
    assert "keeps its variables" in error[1]
    text, _ = kernel.ok("%%ranks\n(kept, 'after' in dir())")
    assert "[rank 0] Out: (100, True)\n" in text and "[rank 1] Out: (101, False)\n" in text


def test_ranks_waiting_for_a_crashed_rank_are_restarted_and_the_message_says_state_was_lost(kernel):
    kernel.ok(SETUP + "\nkept = True")
    before = kernel.rank_pids()
    _, error, _ = kernel.run("%%ranks\nif rank == 1:\n    raise ValueError('early')\n"
                             "dist.barrier()")
    assert error[0] == "LaunchError"
    assert error[1].startswith("ROOT CAUSE: rank 1 of 2: ValueError: early")
    assert re.search(r"rank 0: busy in cell \d+, line 3: dist.barrier\(\)", error[1])
    assert "fresh ranks were started" in error[1] and "are gone" in error[1]
    assert not set(kernel.rank_pids()) & set(before)
    text, _ = kernel.ok("%%ranks\n'kept' in dir()")
    assert text.count("Out: False") == 2


def test_a_hung_collective_times_out_with_each_stack_then_the_ranks_work_again(kernel):
    kernel.ok(SETUP)
    _, error, _ = kernel.run("%%ranks --timeout 3\nif rank == 0:\n    dist.barrier()")
    assert error[0] == "LaunchTimeout"
    assert re.match(r"TIMEOUT: cell \d+ was still running on rank\(s\) 0 after 3 s", error[1])
    # the hang doctor's sentence, then rank 0's stack
    assert re.search(r"Rank 0 entered barrier #\d+; rank 1 [^.]* is idle", error[1])
    assert error[1].index("Rank 0 entered barrier") < error[1].index("[rank 0]")
    assert '<ranks cell' in error[1] and "dist.barrier()" in error[1]
    assert "some ranks only" not in error[1]  # the cell ran on every rank
    assert "fresh ranks were started" in error[1]
    kernel.ok(SETUP)
    text, _ = kernel.ok("%%ranks\nt = torch.ones(1)\ndist.all_reduce(t)\nt.item()")
    assert text.count("Out: 2.0") == 2


def test_a_cell_busy_in_python_times_out_and_the_ranks_keep_their_state(kernel):
    kernel.ok(SETUP + "\nkept = rank")
    _, error, _ = kernel.run("%%ranks --timeout 2\nimport time\ntime.sleep(60)")
    assert error[0] == "LaunchTimeout"
    assert "time.sleep(60)" in error[1] and "No rank was waiting in torch.distributed" in error[1]
    assert "keeps its variables" in error[1]
    text, _ = kernel.ok("%%ranks\nkept")
    assert "[rank 0] Out: 0\n" in text and "[rank 1] Out: 1\n" in text


def test_the_stop_button_interrupts_a_sleeping_cell_and_the_ranks_survive(kernel):
    kernel.ok(SETUP + "\nkept = rank")
    pids = kernel.rank_pids()
    _, error, _ = kernel.interrupt_when(
        "%%ranks\nimport time\nprint('sleeping', flush=True)\ntime.sleep(60)",
        r"(\[rank 0\] sleeping(.|\n)*\[rank 1\] sleeping)|"
        r"(\[rank 1\] sleeping(.|\n)*\[rank 0\] sleeping)")
    assert error[0] == "KeyboardInterrupt" and "keeps its variables" in error[1]
    assert kernel.rank_pids() == pids
    text, _ = kernel.ok("%%ranks\nkept")
    assert "[rank 0] Out: 0\n" in text and "[rank 1] Out: 1\n" in text


def test_the_stop_button_restarts_ranks_blocked_in_a_collective(kernel):
    kernel.ok(SETUP)
    pids = kernel.rank_pids()
    _, error, _ = kernel.interrupt_when(
        "%%ranks\nprint('entering', flush=True)\nif rank == 0:\n    dist.barrier()",
        r"\[rank 0\] entering")
    assert error[0] == "KeyboardInterrupt"
    assert re.search(r"Interrupted cell \d+: rank\(s\) 0 did not return within", error[1])
    assert "fresh ranks were started" in error[1]
    assert not set(kernel.rank_pids()) & set(pids)
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
               for p in pids)
    kernel.ok(SETUP)


def test_a_rank_that_dies_is_reported_and_the_ranks_are_restarted(kernel):
    kernel.ok(SETUP + "\nkept = True")
    before = kernel.rank_pids()
    _, error, _ = kernel.run("%%ranks 1\nimport os\nos._exit(3)")
    assert error[0] == "LaunchError"
    assert error[1].startswith("ROOT CAUSE: rank 1 of 2: RankDied: rank 1 ended without returning")
    assert "fresh ranks were started" in error[1]
    assert not set(kernel.rank_pids()) & set(before)
    text, _ = kernel.ok("%%ranks\n'kept' in dir()")
    assert text.count("Out: False") == 2


CYCLES = """
import json, os, threading, psutil
from labkit.launcher._server import server_session
def count():
    server = server_session()
    others = [p for p in psutil.Process().children(recursive=True)
              if p.status() != psutil.STATUS_ZOMBIE and os.getsid(p.pid) != server]
    return {"fds": len(os.listdir('/proc/self/fd')), "processes": len(others),
            "threads": threading.active_count()}
ip = get_ipython()
ip.run_line_magic('ranks', 'stop')
ip.run_line_magic('ranks', 'start 2 --timeout 30')
ip.run_cell_magic('ranks', '', 'import torch.distributed as dist\\ndist.barrier()')
ip.run_line_magic('ranks', 'stop')
baseline = count()
for _ in range(20):
    ip.run_line_magic('ranks', 'start 2 --timeout 30')
    ip.run_cell_magic('ranks', '', 'import torch.distributed as dist\\ndist.barrier()')
    ip.run_line_magic('ranks', 'stop')
print('COUNTS', json.dumps([baseline, count()]))
"""


def test_twenty_start_stop_cycles_leave_no_process_descriptor_or_thread(kernel):
    text, _ = kernel.ok(CYCLES, timeout=300)
    baseline, after = json.loads(text.split("COUNTS ", 1)[1])
    assert baseline["processes"] == 0
    assert after == baseline
    kernel.ok("%ranks start 2 --timeout 30")


def test_unloading_the_extension_stops_the_ranks(kernel):
    pids = kernel.rank_pids()
    kernel.ok("%unload_ext labkit")
    assert len(pids) == 2 and not any(
        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    kernel.ok("%load_ext labkit\n%ranks start 2 --timeout 30")


def test_no_rank_outlives_a_killed_kernel():
    kernel = Kernel()
    try:
        kernel.ok("%load_ext labkit")
        kernel.ok("%ranks start 2")
        pids = kernel.rank_pids()
        psutil.Process(kernel.manager.provisioner.process.pid).kill()  # no atexit, nothing
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                for p in pids):
            time.sleep(0.1)
        assert len(pids) == 2
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                       for p in pids), "a rank outlived its kernel"
    finally:
        kernel.close()
