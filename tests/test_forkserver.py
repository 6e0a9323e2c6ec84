"""The fork server never gets out of step: interrupts, deadlines, threads, and the warm-up.

Delays are injected from outside, without test hooks in labkit: SIGSTOP freezes the server (or its
successor) exactly as a slow import or a busy machine would, and SIGCONT lets it go on.
"""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch
import torch.distributed as dist

import labkit
from conftest import fork_server_pid, leftover_processes
from labkit.launcher import _server


def rank_sum():
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    return t.item()


def server_processes():
    """The fork server and the successor it forked to import the extras (same session)."""
    session = fork_server_pid()
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == session:
                found.append(p)
        except OSError:
            pass
    return found


def fresh_server():
    labkit.shutdown()
    _server.fork_server()
    return fork_server_pid()


def freeze(session, sig=signal.SIGSTOP):
    """Stop (or continue) every process of the server's session; gone already is fine."""
    try:
        os.killpg(session, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def restart_server_after():
    yield
    labkit.shutdown()


@pytest.mark.parametrize("when", ["before its greeting", "after its greeting"])
def test_a_frozen_server_times_out_at_the_launchs_own_deadline(when, restart_server_after,
                                                               no_leftovers):
    session = fresh_server()
    if when == "after its greeting":
        labkit.warm_up()
    freeze(session)
    start = time.monotonic()
    try:
        with pytest.raises(labkit.LaunchTimeout, match="fork server"):
            labkit.launch(rank_sum, 2, timeout=2, quiet=True)
    finally:
        freeze(session, signal.SIGCONT)  # a no-op once the launcher has killed it
    assert time.monotonic() - start < 15  # the launch's 2 s, not the server's 30 s or 120 s
    assert not psutil.pid_exists(session) or psutil.Process(session).status() == "zombie"
    assert labkit.launch(rank_sum, 2, quiet=True) == [3.0, 3.0]  # a fresh server at once


def test_a_timeout_inside_a_request_never_leaves_an_answer_for_the_next_one(restart_server_after):
    """The stale answer (the pid of a rank forked for a launch that gave up) must never be read
    as the pid of the next launch's rank: signals and kills would hit the wrong process."""
    session = fresh_server()
    labkit.warm_up()
    freeze(session)
    with pytest.raises(labkit.LaunchTimeout):
        labkit.launch(rank_sum, 2, timeout=1, quiet=True)
    freeze(session, signal.SIGCONT)
    time.sleep(0.5)  # had the old server lived on, it would have answered by now
    labkit.warm_up()
    error = pytest.raises(labkit.LaunchTimeout, labkit.launch, rank_1_hangs, 2, timeout=3,
                          quiet=True).value
    assert "time.sleep(600)" in error.stacks[1], error.stacks  # SIGUSR1 reached the real rank 1


def rank_1_hangs():
    if dist.get_rank() == 1:
        time.sleep(600)
    return dist.get_rank()


STOP_BUTTON_NOTEBOOK = """
import os, signal, time, labkit, torch, torch.distributed as dist
from labkit.launcher import _server
labkit.warm_up()
print("SESSION", _server.server_session())
"""


def test_the_stop_button_while_ranks_start_then_a_clean_launch():
    from jupyter_client.manager import start_new_kernel
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        out = []
        client.execute_interactive(STOP_BUTTON_NOTEBOOK, timeout=120,
                                   output_hook=lambda m: out.append(m["content"].get("text", "")))
        session = int(re.search(r"SESSION (\d+)", "".join(out))[1])
        freeze(session)  # the server takes "forever" to fork: the launch waits in fork_rank
        msg_id = client.execute("labkit.launch(lambda: dist.get_rank(), nprocs=2, timeout=60)")
        time.sleep(1.5)
        manager.interrupt_kernel()  # the stop button
        reply = client.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        freeze(session, signal.SIGCONT)  # had it survived, it would now answer into the void
        out.clear()
        client.execute_interactive(
            "def hangs():\n"
            "    if dist.get_rank() == 1:\n"
            "        time.sleep(600)\n"
            "    return dist.get_rank()\n"
            "print('RESULTS', labkit.launch(lambda: dist.get_rank() * 10, nprocs=3, quiet=True))\n"
            "try:\n"
            "    labkit.launch(hangs, nprocs=2, timeout=3, quiet=True)\n"
            "except labkit.LaunchTimeout as e:\n"
            "    print('STACK1', 'time.sleep(600)' in e.stacks[1])\n"
            "import psutil\n"
            "server = _server.server_session()\n"
            "left = [p.pid for p in psutil.Process().children(recursive=True)\n"
            "        if os.getsid(p.pid) != server and p.status() != 'zombie']\n"
            "print('LEFT', left, server != %d)" % session,
            timeout=120, output_hook=lambda m: out.append(m["content"].get("text", "")))
        text = "".join(out)
        assert "RESULTS [0, 10, 20]" in text
        assert "STACK1 True" in text, text
        assert "LEFT [] True" in text, text  # a new server, and nothing else left running
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def leaves_a_sleeper_then_raises():
    if dist.get_rank() == 1:
        sleeper = subprocess.Popen(["sleep", "600"])  # holds the rank's stdout and stderr
        print("SLEEPER", sleeper.pid, flush=True)
        raise RuntimeError("rank 1 failed after starting a background process")
    dist.barrier()


@pytest.mark.timeout(90)
def test_the_output_drain_after_a_failure_is_bounded_and_kills_what_ranks_started(capsys,
                                                                                  no_leftovers):
    start = time.monotonic()
    with pytest.raises(labkit.LaunchError) as info:
        labkit.launch(leaves_a_sleeper_then_raises, 2, timeout=30, quiet=True)
    assert time.monotonic() - start < 30  # bounded by the launch, never by the sleeper
    assert info.value.rank == 1 and "background process" in str(info.value)
    sleeper = int(re.search(r"SLEEPER (\d+)", capsys.readouterr().out)[1])
    assert not psutil.pid_exists(sleeper) or psutil.Process(sleeper).status() == "zombie"


SITECUSTOMIZE = """
import threading, time
threading.Thread(target=time.sleep, args=(3600,), name="sneaky-pool", daemon=True).start()
"""


def test_a_server_with_threads_refuses_to_fork_with_the_fix(tmp_path, monkeypatch,
                                                            restart_server_after, no_leftovers):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)  # an "extension" that starts a thread
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    labkit.shutdown()
    with pytest.raises(RuntimeError) as info:
        labkit.launch(rank_sum, 2, timeout=60, quiet=True)
    message = str(info.value)
    assert re.search(r"has \d+ threads \(.*sneaky-pool", message), message
    assert "start_method='spawn'" in message
    assert labkit.launch(rank_sum, 2, start_method="spawn", quiet=True) == [3.0, 3.0]


def blas_in_rank():
    import numpy
    a = numpy.ones((200, 200))
    return float((a @ a)[0, 0])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_a_users_blas_thread_setting_does_not_make_the_server_threaded(monkeypatch,
                                                                      restart_server_after):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")  # numpy's OpenBLAS starts a pool at import
    fresh_server()
    labkit.warm_up()
    for process in server_processes():
        assert process.num_threads() == 1, (process.pid, process.num_threads())
    assert labkit.launch(blas_in_rank, 2, quiet=True) == [200.0, 200.0]


def dynamo_imported():
    return "torch._dynamo" in sys.modules


def test_launches_do_not_wait_for_the_warm_up_and_get_it_once_ready(restart_server_after):
    session = fresh_server()
    labkit.launch(rank_sum, 2, quiet=True)  # the server has greeted: torch is in
    successors = [p for p in server_processes() if p.pid != session]
    assert len(successors) == 1, "the server should import the extras in a successor"
    successors[0].suspend()  # the warm-up takes "forever"
    try:
        for _ in range(3):
            assert labkit.launch(rank_sum, 4, timeout=30, quiet=True) == [10.0] * 4
        assert labkit.launch(dynamo_imported, 2, quiet=True) == [False, False]
    finally:
        successors[0].resume()
    labkit.warm_up()  # now the successor has taken over
    assert labkit.launch(dynamo_imported, 2, quiet=True) == [True, True]
    assert labkit.launch(rank_sum, 2, quiet=True) == [3.0, 3.0]


def test_the_server_and_its_successor_go_with_the_launchers_process():
    script = textwrap.dedent("""
        import os, time, labkit
        from labkit.launcher import _server
        _server.fork_server()
        labkit.launch(lambda: 1, 2, quiet=True)
        print(_server.server_session(), flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        session = int(child.stdout.readline())
        members = [p for p in psutil.process_iter() if _session_of(p) == session]
        assert len(members) == 2  # the server and its successor
        child.kill()  # no atexit, no cleanup
        child.wait()
        gone = psutil.wait_procs(members, timeout=15)[1]
        assert not gone, f"outlived the launcher: {gone}"
    finally:
        child.kill()


def _session_of(process):
    try:
        return os.getsid(process.pid)
    except OSError:
        return None


def test_leftovers_helper_sees_no_server_processes_after_shutdown():
    fresh_server()
    labkit.warm_up()
    labkit.shutdown()
    assert leftover_processes() == []
