"""The client of the warm fork server (``_forkserver``): one per notebook process.

``prestart`` starts it when labkit is imported, ``fork_rank`` asks it for a rank, ``warm_up``
waits until it has imported the extras, ``shutdown`` stops it.
"""
import atexit
import os
import socket
import subprocess
import sys
import threading

from labkit.launcher._forkserver import PID
from labkit.launcher._platform import with_labkit_importable


class ForkServer:
    """Client side of ``_forkserver``: one per notebook process, started on first use."""

    def __init__(self, start_timeout_s: float = 120.0):
        """Start the server; it imports torch in the background until ``wait_ready``."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, OMP_NUM_THREADS="1", LABKIT_PRESTART="0")  # no server of its own
        with_labkit_importable(env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "labkit.launcher._forkserver", str(theirs.fileno())],
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
