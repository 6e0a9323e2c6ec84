"""A warm process that has already imported torch and forks fresh ranks on request.

Importing torch costs over a second per process; forking a process that already did costs
milliseconds. Forking is only safe from a process that never ran a torch op (no thread pools,
no CUDA), which is why this is a separate, freshly started interpreter and not the notebook's
kernel. It holds no process group, exits when the notebook's process goes away (its control
socket closes), and lets the OS reap the ranks it forks.

Protocol on the control socket: the launcher sends b"F" with four descriptors (the rank's
stdin, stdout, stderr and result pipes) and the server answers with the new rank's pid; or b"W"
(no descriptors), answered with b"W" once the optional extras are imported too.
"""
import os
import select
import signal
import socket
import struct
import sys
import traceback

PID = struct.Struct("!i")
RANK_FDS = 4  # stdin, stdout, stderr, result


def _preload() -> None:
    import cloudpickle  # noqa: F401
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401
    import torch.nn  # noqa: F401

    import labkit.launcher._worker  # noqa: F401


def _preload_extras() -> None:
    """Modules that cost seconds at a rank's first use and are safe to import before fork.

    The first op under a TorchDispatchMode (labkit's MemoryTracer and CommCounter) imports
    torch._dynamo: about 2 s per rank. Imported here once, while the server is idle, it costs
    nothing per launch. It starts no threads, so forking stays safe.
    """
    try:
        import torch._dynamo  # noqa: F401
    except Exception:  # noqa: BLE001 - an optional speed-up, never a reason to fail
        pass


def _become_rank(control: socket.socket, fds: list[int]) -> None:
    """In the forked child: take the pipes as 0, 1, 2 and 3, leave the server's session, run."""
    control.close()
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


def serve(control_fd: int) -> None:
    control = socket.socket(fileno=control_fd)
    try:
        _preload()
    except BaseException:  # noqa: BLE001 - tell the launcher why, then stop
        control.sendall(b"E" + traceback.format_exc().encode())
        return
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the OS reaps the ranks: no zombies
    control.sendall(b"R")
    extras_loaded = False
    while True:
        if not extras_loaded and not select.select([control], [], [], 0.05)[0]:
            _preload_extras()  # nobody is waiting: use the idle moment
            extras_loaded = True
            continue
        try:
            message, fds, _flags, _addr = socket.recv_fds(control, 1, RANK_FDS)
        except (OSError, ConnectionError):
            return
        if not message:  # the launcher's process is gone
            return
        if message == b"W":
            if not extras_loaded:
                _preload_extras()
                extras_loaded = True
            control.sendall(b"W")
            continue
        pid = os.fork()
        if pid == 0:
            _become_rank(control, fds)
        for fd in fds:
            os.close(fd)
        control.sendall(PID.pack(pid))


if __name__ == "__main__":
    serve(int(sys.argv[1]))
