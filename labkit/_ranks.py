"""Starting, watching and stopping rank processes.

Two ways to start a rank, with the same pipes and the same ``labkit._worker.main`` inside:
``"forkserver"`` (default: forked from a warm process that already imported torch) and
``"spawn"`` (a fresh interpreter per rank; slower, nothing shared).
"""
import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from labkit._forkserver import PID

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
        """Signal the rank's whole process group (the rank and anything it started)."""
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
    """Kill every rank still running and wait until each is really gone (no zombies, no orphans)."""
    for rank in ranks:
        if rank.is_alive():
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


class ForkServer:
    """Client side of ``labkit._forkserver``: one per notebook process, started on first use."""

    def __init__(self, start_timeout_s: float = 120.0):
        """Start the server; it imports torch in the background until ``wait_ready``."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, OMP_NUM_THREADS="1", LABKIT_PRESTART="0")  # no server of its own
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "labkit._forkserver", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        theirs.close()
        self._control = ours
        self._lock = threading.Lock()
        self._ready = False
        self._start_timeout_s = start_timeout_s

    def wait_ready(self) -> None:
        """Wait for the server's greeting: it has imported torch, or says why it could not."""
        if self._ready:
            return
        self._control.settimeout(self._start_timeout_s)
        try:
            greeting = self._control.recv(1 << 16)
        except socket.timeout:
            self.close()
            raise RuntimeError(f"labkit's fork server did not start within "
                               f"{self._start_timeout_s:.0f} s (importing torch hung?). Try "
                               "labkit.launch(..., start_method='spawn').") from None
        if greeting != b"R":
            self.close()
            detail = greeting[1:].decode(errors="replace") or "it exited without saying why"
            raise RuntimeError("labkit's fork server could not import torch:\n" + detail)
        self._control.settimeout(30.0)
        self._ready = True

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def fork_rank(self, child_fds) -> int:
        with self._lock:
            self.wait_ready()
            socket.send_fds(self._control, [b"F"], child_fds)
            data = b""
            while len(data) < PID.size:
                chunk = self._control.recv(PID.size - len(data))
                if not chunk:
                    raise RuntimeError("labkit's fork server exited unexpectedly")
                data += chunk
            return PID.unpack(data)[0]

    def wait_warm(self) -> None:
        """Wait until the server has also imported the extras (torch._dynamo, for dispatch modes)."""
        with self._lock:
            self.wait_ready()
            socket.send_fds(self._control, [b"W"], [])
            if self._control.recv(1) != b"W":
                raise RuntimeError("labkit's fork server exited unexpectedly")

    def close(self) -> None:
        try:
            self._control.close()
        finally:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()


_server = None
_server_lock = threading.Lock()


def fork_server() -> ForkServer:
    """The warm fork server, (re)started when missing or dead."""
    global _server
    with _server_lock:
        if _server is None or not _server.is_alive():
            if _server is not None:
                _server.close()
            _server = ForkServer()
        return _server


def warm_up() -> None:
    """Wait until the fork server is ready and has imported the extras, so a launch that traces
    memory or communication pays no start-up inside its timeout (labkit.check uses this)."""
    fork_server().wait_warm()


def prestart() -> None:
    """Start the fork server now, so that it imports torch while the notebook does other things.

    Called when labkit is imported; set LABKIT_PRESTART=0 to start it at the first launch instead.
    """
    global _server
    with _server_lock:
        if _server is None:
            _server = ForkServer()


def shutdown() -> None:
    """Stop the warm fork server (it holds no ranks and no process group). Safe to call twice."""
    global _server
    with _server_lock:
        if _server is not None:
            _server.close()
            _server = None


atexit.register(shutdown)


def start_rank(rank: int, start_method: str, spawn_env: dict) -> RankProcess:
    child_fds, parent_fds = _rank_pipes()
    try:
        if start_method == "forkserver":
            pid, popen = fork_server().fork_rank(child_fds), None
        else:
            stdin_r, stdout_w, stderr_w, result_w = child_fds
            popen = subprocess.Popen(
                [sys.executable, "-c",
                 f"from labkit._worker import main; main(stdin_fd=0, result_fd={result_w})"],
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
