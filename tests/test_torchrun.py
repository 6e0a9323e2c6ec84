"""start_method="torchrun": a hang, the stop button or a killed launcher leaves no rank and no
agent behind; the ranks never host a store of their own.

torchrun starts each rank in a session of its own, so once its agent is gone the ranks are no
longer below the test process: each rank prints its pid and its agent's, and the test checks
that every one of those processes is gone.
"""
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import torch
import torch.distributed as dist

import labkit

PID_LINE = re.compile(r"labkit-test rank (\d+) pid (\d+) agent (\d+)")


def print_pids_then_hang():
    """Rank 0 never reaches the barrier, so rank 1 waits in it: a hang on every rank."""
    print(f"labkit-test rank {dist.get_rank()} pid {os.getpid()} agent {os.getppid()}", flush=True)
    if dist.get_rank() == 0:
        time.sleep(600)
    dist.barrier()


def pids_in(text: str) -> dict:
    """{rank: (pid, agent pid)} from the lines the ranks printed."""
    return {int(r): (int(pid), int(agent)) for r, pid, agent in PID_LINE.findall(text)}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_alive(pids, wait_s: float) -> list:
    """The pids still running after up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [pid for pid in pids if alive(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_a_hang_under_torchrun_times_out_and_leaves_no_process(no_leftovers, capsys):
    with pytest.raises(labkit.LaunchTimeout):
        labkit.launch(print_pids_then_hang, 2, start_method="torchrun", quiet=True, timeout=30)
    found = pids_in(capsys.readouterr().out)
    assert sorted(found) == [0, 1], "both ranks should have printed their pids"
    processes = {pid for pair in found.values() for pid in pair}
    assert not still_alive(processes, wait_s=5.0), "a rank or torchrun's agent outlived the launch"


LAUNCHER = textwrap.dedent("""
    import os, signal, sys, tempfile, time
    import torch.distributed as dist
    import labkit

    tempfile.tempdir = sys.argv[1]  # the folder a killed launcher leaves is the test's to remove
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if our parent ignores SIGINT

    def print_pids_then_hang():
        print(f"labkit-test rank {dist.get_rank()} pid {os.getpid()} agent {os.getppid()}",
              flush=True)
        time.sleep(600)

    labkit.launch(print_pids_then_hang, 2, start_method="torchrun", quiet=True, timeout=300)
""")


def read_lines(pipe, lines: queue.Queue) -> None:
    for line in iter(pipe.readline, ""):
        lines.put(line)


def wait_for_pids(lines: queue.Queue, nprocs: int, wait_s: float) -> dict:
    """Read the launcher's output until every rank has printed its pids (or time runs out)."""
    deadline, seen = time.monotonic() + wait_s, ""
    while len(pids_in(seen)) < nprocs and time.monotonic() < deadline:
        try:
            seen += lines.get(timeout=0.5)
        except queue.Empty:
            pass
    return pids_in(seen)


def start_launcher(folder) -> tuple:
    """A launch under torchrun in a process of its own, and the pids its ranks printed."""
    env = dict(os.environ, LABKIT_PRESTART="0")
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(folder)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=read_lines, args=(launcher.stdout, lines), daemon=True).start()
    try:
        found = wait_for_pids(lines, 2, wait_s=120)
    except BaseException:
        launcher.kill()
        raise
    if sorted(found) != [0, 1]:
        launcher.kill()
        pytest.fail(f"both ranks should have printed their pids, got {found}")
    return launcher, {pid for pair in found.values() for pid in pair}


def assert_all_gone(processes: set, wait_s: float) -> None:
    left = still_alive(processes, wait_s)
    for pid in left:  # do not leave them running for the next test
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, "ranks or torchrun's agent outlived the launcher"


def test_a_killed_launcher_leaves_no_rank_and_no_agent_behind(tmp_path):
    launcher, processes = start_launcher(tmp_path)
    launcher.send_signal(signal.SIGKILL)  # no cleanup of any kind in the launcher
    launcher.wait(timeout=10)
    assert_all_gone(processes, wait_s=10.0)


def test_the_stop_button_stops_torchrun_and_its_ranks(tmp_path):
    launcher, processes = start_launcher(tmp_path)
    launcher.send_signal(signal.SIGINT)  # what the kernel gets from the stop button
    try:
        launcher.wait(timeout=30)
    finally:
        launcher.kill()
    assert_all_gone(processes, wait_s=5.0)
    assert launcher.returncode == -signal.SIGINT, "KeyboardInterrupt should reach the caller"


def rank_sum_and_store():
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    store = dist.distributed_c10d._get_default_store()  # the process group's own PrefixStore
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return t.item(), type(store).__name__


def test_torch_without_a_loopback_socket_store_uses_a_private_file_store(monkeypatch):
    from labkit.launcher import _rendezvous
    monkeypatch.setattr(_rendezvous, "_tcp_store_takes_a_socket", lambda: False)
    results = labkit.launch(rank_sum_and_store, 2, start_method="torchrun", quiet=True)
    assert results == [(3.0, "FileStore")] * 2
