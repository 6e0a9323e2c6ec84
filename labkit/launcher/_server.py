"""The client of the warm fork server (``_forkserver``): one per notebook process.

``prestart`` starts it when labkit is imported in an interactive session, ``fork_rank`` asks it
for a rank, ``warm_up`` waits until it has imported the extras, ``shutdown`` stops it.

A request and its answer are one conversation on a socket. If anything interrupts one halfway (the
stop button, a deadline, a dead server), the answer may still arrive later and would be read as
the answer to the next request: the wrong pid, which the launcher would then signal and kill. So
any exception inside a request closes the server for good; the next launch starts a fresh one.
"""
import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from labkit.launcher._framing import recv_message
from labkit.launcher._platform import prestart_wanted, with_labkit_importable
from labkit.launcher.errors import LaunchTimeout

WARM_UP_TIMEOUT_S = 300.0  # warm_up() without a deadline: importing torch on a busy laptop
# Thread pools that a library may start when it is imported; the server must stay single-threaded.
SINGLE_THREADED = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                          "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                                          "NUMEXPR_NUM_THREADS")}


class ForkServer:
    """A started server process and the launcher's end of its control socket."""

    def __init__(self):
        """Start the server; it imports torch in the background until its greeting arrives."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = with_labkit_importable(dict(os.environ, LABKIT_PRESTART="0", **SINGLE_THREADED))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "labkit.launcher._forkserver", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        theirs.close()
        self._control = ours
        self._lock = threading.Lock()
        self._greeted = False
        self._closed = False

    def is_alive(self) -> bool:
        return not self._closed and self.process.poll() is None

    def fork_rank(self, child_fds, deadline: float) -> int:
        """A new rank with these four descriptors as its stdin, stdout, stderr and result pipe."""
        answer = self._request(b"F", child_fds, deadline, "to start a rank")
        if answer.startswith(b"P"):
            return int(answer[1:])
        raise RuntimeError(answer[1:].decode(errors="replace"))

    def wait_warm(self, deadline: float) -> None:
        """Wait until the server has also imported the extras (torch._dynamo, for DDP and FSDP2)."""
        self._request(b"W", [], deadline, "to import torch._dynamo and friends")

    def _request(self, request: bytes, fds, deadline: float, purpose: str) -> bytes:
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise LaunchTimeout("TIMEOUT: another launch in this process kept labkit's fork "
                                "server busy until this launch's timeout.")
        try:
            if self._closed:  # another launch in this process closed it while this one waited
                raise RuntimeError("labkit's fork server was restarted by another launch in this "
                                   "process while this one waited; run the launch again.")
            self._greet(deadline)
            socket.send_fds(self._control, [request], list(fds))
            return self._answer(deadline, purpose)
        except BaseException:
            self.close()  # out of step, or interrupted: never ask this server anything again
            raise
        finally:
            self._lock.release()

    def _greet(self, deadline: float) -> None:
        """The server's first message: it has imported torch, or says why it could not."""
        if self._greeted:
            return
        greeting = self._answer(deadline, "to import torch")
        if greeting != b"R":
            detail = greeting[1:].decode(errors="replace")
            raise RuntimeError("labkit's fork server could not import torch:\n" + detail)
        self._greeted = True

    def _answer(self, deadline: float, purpose: str) -> bytes:
        try:
            answer = recv_message(self._control, deadline)
        except TimeoutError:
            raise LaunchTimeout(f"TIMEOUT: labkit's fork server was still working {purpose} when "
                                "the launch's timeout ran out (importing torch can take a while "
                                "on a busy machine). Run again, with a larger timeout=, or use "
                                "start_method='spawn'.") from None
        if not answer:
            raise RuntimeError("labkit's fork server exited unexpectedly; the next launch "
                               "starts a new one.")
        return answer

    def close(self) -> None:
        """Stop the server and its successor (its whole process group; ranks have their own)."""
        self._closed = True
        self._control.close()
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


_server = None
_server_lock = threading.Lock()


def fork_server() -> ForkServer:
    """The warm fork server, (re)started when missing, dead or closed after a failed request."""
    global _server
    with _server_lock:
        if _server is None or not _server.is_alive():
            if _server is not None:
                _server.close()
            _server = ForkServer()
        return _server


def server_session() -> int | None:
    """The session id of the server and its successor (ranks leave it), for tests and tools."""
    server = _server
    return server.process.pid if server is not None and server.is_alive() else None


def warm_up(timeout: float = WARM_UP_TIMEOUT_S) -> None:
    """Wait until the fork server is ready and has imported the extras, so a launch pays no
    start-up inside its timeout, even one that uses DDP or FSDP2 (labkit.check uses this)."""
    fork_server().wait_warm(time.monotonic() + timeout)


def prestart() -> None:
    """Start the fork server now, so that it imports torch while the notebook does other things.

    ``import labkit`` calls this in an interactive session (a Jupyter kernel, IPython, the REPL)
    on Linux; LABKIT_PRESTART=0 turns it off, LABKIT_PRESTART=1 turns it on everywhere.
    """
    global _server
    with _server_lock:
        if _server is None:
            _server = ForkServer()


def prestart_if_wanted() -> None:
    if prestart_wanted():
        prestart()


def shutdown() -> None:
    """Stop the warm fork server (it holds no ranks and no process group). Safe to call twice."""
    global _server
    with _server_lock:
        if _server is not None:
            _server.close()
            _server = None


atexit.register(shutdown)
