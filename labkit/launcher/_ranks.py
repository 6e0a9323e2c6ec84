"""Starting, watching and stopping rank processes.

Two ways to start a rank, with the same pipes and the same ``_worker.main`` inside:
``"forkserver"`` (default: forked from a warm process that already imported torch) and
``"spawn"`` (a fresh interpreter per rank; slower, nothing shared).
"""
import os
import signal
import subprocess
import sys
import time

from labkit.launcher._server import fork_server

START_METHODS = ("forkserver", "spawn", "torchrun")


class RankProcess:
    """One running rank: its pid and the parent's ends of its four pipes."""

    def __init__(self, rank, pid, stdin_w, stdout_r, stderr_r, result_r, popen=None):
        self.rank, self.pid, self.popen = rank, pid, popen
        self.stdin_w, self.stdout_r, self.stderr_r, self.result_r = stdin_w, stdout_r, stderr_r, result_r

    def is_alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # the pid was reused by someone else's process
            return False
        return True

    def signal(self, sig: int) -> None:
        """Signal the rank's whole process group: the rank and anything it started.

        The group outlives its leader: a background process a rank started (``sleep 600 &``)
        keeps it, and the rank's stdout, after the rank itself has exited.
        """
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def close_pipe(self, name: str) -> None:
        """Close the parent's end of one pipe ("stdin_w", "stdout_r", ...) once, and forget it."""
        fd = getattr(self, name)
        if fd is not None:
            setattr(self, name, None)
            try:
                os.close(fd)
            except OSError:
                pass

    def close_lifeline(self) -> None:
        """Closing the rank's stdin tells it (if still alive) that the launcher is gone."""
        self.close_pipe("stdin_w")

    def close_pipes(self) -> None:
        for name in ("stdin_w", "stdout_r", "stderr_r", "result_r"):
            self.close_pipe(name)


def stop_and_reap(ranks, wait_s: float = 5.0) -> None:
    """Kill every rank and whatever it started, and wait until each rank is really gone."""
    for rank in ranks:
        rank.signal(signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    for rank in ranks:
        if rank.popen is not None:
            try:
                rank.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while rank.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        rank.close_lifeline()


def _rank_pipes():
    """(child ends, parent ends) for stdin, stdout, stderr and the result channel."""
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    result_r, result_w = os.pipe()
    return [stdin_r, stdout_w, stderr_w, result_w], [stdin_w, stdout_r, stderr_r, result_r]


def start_rank(rank: int, start_method: str, spawn_env: dict, deadline: float) -> RankProcess:
    child_fds, parent_fds = _rank_pipes()
    try:
        if start_method == "forkserver":
            pid, popen = fork_server().fork_rank(child_fds, deadline), None
        else:
            stdin_r, stdout_w, stderr_w, result_w = child_fds
            popen = subprocess.Popen(
                [sys.executable, "-c",
                 f"from labkit.launcher._worker import main; main(stdin_fd=0, result_fd={result_w})"],
                stdin=stdin_r, stdout=stdout_w, stderr=stderr_w, pass_fds=(result_w,),
                start_new_session=True, env=spawn_env)
            pid = popen.pid
    except BaseException:
        for fd in parent_fds:
            os.close(fd)
        raise
    finally:
        for fd in child_fds:
            os.close(fd)
    return RankProcess(rank, pid, *parent_fds, popen=popen)
