"""A warm process that has already imported torch and forks fresh ranks on request.

Importing torch costs over a second per process; forking a process that already did costs
milliseconds. Forking is only safe from a process with one thread (a lock held by another thread
stays locked forever in the child), which is why this is a separate, freshly started interpreter
that never ran a torch op, and why it checks its threads before every fork. It holds no process
group, exits when the notebook's process goes away (its control socket closes), and lets the OS
reap the ranks it forks.

Protocol on the control socket, one answer per request, each answer framed by ``_framing``:
- greeting: b"R" once torch is imported, or b"E" + the traceback of the failed import;
- b"F" with four descriptors (the rank's stdin, stdout, stderr and result pipes): b"P" + the new
  rank's pid, or b"E" + why the server refused to fork;
- b"W": b"W" once the extras (``_preload_extras``) are imported too.

The extras cost seconds, and a launch must not wait for them: so right after its greeting the
server forks a *successor* that imports them while the server goes on answering. When the
successor is ready, the server hands it the control socket between two requests and retires;
the launcher never notices, except that later ranks start with the extras already imported.
"""
import importlib
import os
import select
import signal
import socket
import sys
import threading
import traceback

from labkit.launcher._framing import frame

RANK_FDS = 4  # stdin, stdout, stderr, result


def _preload() -> None:
    import cloudpickle  # noqa: F401
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401
    import torch.nn  # noqa: F401

    import labkit.launcher._worker  # noqa: F401


EXTRAS = ("torch._dynamo", "torch.distributed.optim")


def _preload_extras() -> None:
    """Modules that cost seconds at a rank's first use and are safe to import before fork.

    torch's DDP, FSDP2 and its own dispatch modes import torch._dynamo at their first use (2-4 s
    per rank on 2 cores); ZeroRedundancyOptimizer lives in torch.distributed.optim (another
    0.4 s). Imported once here, they cost nothing per launch. They start no threads, so forking
    stays safe (and is checked before every fork).
    """
    for name in EXTRAS:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional speed-up, never a reason to fail
            pass


def other_threads() -> list[str] | None:
    """The threads of this process besides the main one; None where it cannot tell.

    Linux counts every thread in /proc/self/task, Python knows the names of its own; the rest
    were started by native code (a BLAS pool, an extension).
    """
    try:
        count = len(os.listdir("/proc/self/task"))
    except OSError:
        return None
    named = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    native = count - 1 - len(named)
    return named + ([f"{native} started by native code"] if native > 0 else [])


def refuse_to_fork(others: list[str]) -> str:
    """Why forking now would be unsafe, and what to do about it."""
    return (f"labkit's fork server has {len(others) + 1} threads (main, {', '.join(others)}); "
            "a rank forked from it could deadlock (a lock another thread holds is never "
            "released in the child), so no rank was started. A library started those threads "
            "when it was imported: a BLAS thread pool (labkit sets OMP/OPENBLAS/MKL_NUM_THREADS=1 "
            "for the server; a library with its own setting can still start one), or a package "
            "loaded at start-up (sitecustomize, usercustomize, a .pth file). Find and remove it, "
            "or launch with start_method='spawn', which forks nothing.")


class Server:
    """Answers the launcher's requests on the control socket (the server, or its successor)."""

    def __init__(self, control: socket.socket, extras_loaded: bool, private_fds=()):
        self.control = control
        self.extras_loaded = extras_loaded
        self.successor = None
        self.private_fds = list(private_fds)  # descriptors a forked rank must not keep

    def run(self) -> None:
        """Answer requests until the launcher goes away, or a ready successor takes over."""
        while True:
            watched = [self.control] + ([self.successor.ready_r] if self.successor else [])
            readable = select.select(watched, [], [])[0]
            if self.control in readable:
                if not self.answer():
                    return
            elif self.successor.wait_ready():
                self.hand_over()
            else:  # the successor died before it was ready: go on serving without extras
                self.forget_successor()

    def answer(self) -> bool:
        """One request, one answer. False when the launcher's process is gone."""
        try:
            message, fds, _flags, _addr = socket.recv_fds(self.control, 1, RANK_FDS)
        except (OSError, ConnectionError):
            message, fds = b"", []
        if not message:
            if self.successor is not None:
                self.successor.stop()
            return False
        if message == b"W":
            self.load_extras()
            self.control.sendall(frame(b"W"))
            if self.successor is not None and self.successor.ready:
                self.hand_over()
            return True
        self.control.sendall(frame(self.fork_rank(fds)))
        return True

    def load_extras(self) -> None:
        """Make sure the extras are imported: by the successor if there is one, else here."""
        if self.extras_loaded:
            return
        if self.successor is not None and not self.successor.wait_ready():
            self.forget_successor()
        if self.successor is None:
            _preload_extras()
        self.extras_loaded = True

    def fork_rank(self, fds: list[int]) -> bytes:
        others = other_threads()
        if others:
            for fd in fds:
                os.close(fd)
            return b"E" + refuse_to_fork(others).encode()
        pid = os.fork()
        if pid == 0:
            _become_rank(self.control, fds, self.private_fds)
        for fd in fds:
            os.close(fd)
        return b"P" + str(pid).encode()

    def start_successor(self) -> None:
        self.successor = Successor(self.control, self.private_fds)
        self.private_fds += [self.successor.ready_r, self.successor.go_w]

    def forget_successor(self) -> None:
        self.private_fds = [fd for fd in self.private_fds
                            if fd not in (self.successor.ready_r, self.successor.go_w)]
        self.successor.close()
        self.successor = None

    def hand_over(self) -> None:
        """Give the control socket to the ready successor; this process only waits from now on."""
        self.successor.take_over()
        raise _Retired(self.successor)


class _Retired(Exception):
    """Unwinds the retired server's loop, wherever it was, right after the handover."""

    def __init__(self, successor):
        super().__init__()
        self.successor = successor


class Successor:
    """A child forked from the server: it imports the extras, then takes the server's place.

    Two pipes: ``ready`` (successor -> server) carries one byte when the extras are in and stays
    open while the successor lives; ``go`` (server -> successor) carries one byte at handover.
    """

    def __init__(self, control: socket.socket, private_fds: list[int]):
        self.ready_r, ready_w = os.pipe()
        go_r, self.go_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            for fd in [self.ready_r, self.go_w, *private_fds]:
                os.close(fd)
            _run_successor(control, ready_w, go_r)
        os.close(ready_w)
        os.close(go_r)
        self.ready = False

    def wait_ready(self) -> bool:
        """Block until the extras are imported; False if the successor died first."""
        if not self.ready:
            self.ready = os.read(self.ready_r, 1) == b"!"
        return self.ready

    def take_over(self) -> None:
        os.write(self.go_w, b"!")

    def wait_until_gone(self) -> None:
        """The ready pipe closes when the successor exits."""
        while os.read(self.ready_r, 1):
            pass

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for fd in (self.ready_r, self.go_w):
            try:
                os.close(fd)
            except OSError:
                pass


def _run_successor(control: socket.socket, ready_w: int, go_r: int) -> None:
    """In the successor: import the extras, say so, wait for the control socket, then serve."""
    try:
        _preload_extras()
        os.write(ready_w, b"!")
        if os.read(go_r, 1) == b"!":  # b"": the server is gone, and so is the launcher
            os.close(go_r)
            _serve(Server(control, extras_loaded=True, private_fds=[ready_w]))
    finally:
        os._exit(0)


def _serve(server: Server) -> None:
    try:
        server.run()
    except _Retired as retired:
        retired.successor.wait_until_gone()


def _become_rank(control: socket.socket, fds: list[int], private_fds: list[int]) -> None:
    """In the forked child: take the pipes as 0, 1, 2 and 3, leave the server's session, run."""
    control.close()
    for fd in private_fds:
        os.close(fd)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()  # its own process group, so the launcher can stop it and anything it started
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 3:
            os.close(fd)
    from labkit.launcher import _worker
    try:
        _worker.main(stdin_fd=0, result_fd=3)
    finally:
        os._exit(1)


def main(control_fd: int) -> None:
    control = socket.socket(fileno=control_fd)
    try:
        _preload()
    except BaseException:  # noqa: BLE001 - tell the launcher why, then stop
        control.sendall(frame(b"E" + traceback.format_exc().encode()))
        return
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the OS reaps the ranks: no zombies
    control.sendall(frame(b"R"))
    server = Server(control, extras_loaded=False)
    if not other_threads():  # a fork now could hang the successor; ranks get the clear refusal
        server.start_successor()
    _serve(server)


if __name__ == "__main__":
    main(int(sys.argv[1]))
