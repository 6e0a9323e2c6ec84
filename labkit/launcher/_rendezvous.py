"""The launcher's rendezvous store: owned by the notebook's process, reachable on loopback only.

A plain ``TCPStore("127.0.0.1", port, is_master=True)`` listens on *all* interfaces whatever host
it is given, and a store has no authentication. So we bind the listening socket to 127.0.0.1
ourselves and hand it to the store. Port 0 lets the OS choose, so launches never collide.
"""
import inspect
import os
import shutil
import socket
import tempfile
from datetime import timedelta

LOOPBACK = "127.0.0.1"


def _tcp_store_takes_a_socket() -> bool:
    import torch.distributed as dist
    try:
        return "master_listen_fd" in (dist.TCPStore.__init__.__doc__ or "") or \
            "master_listen_fd" in str(inspect.signature(dist.TCPStore.__init__))
    except (TypeError, ValueError):
        return "master_listen_fd" in (dist.TCPStore.__init__.__doc__ or "")


class LoopbackStore:
    """A rendezvous for one launch. ``env`` holds what the ranks need to join it."""

    def __init__(self, world_size: int, timeout_s: float):
        import torch.distributed as dist
        self._store = None
        self._folder = None
        self.address = None  # (host, port) for clients; None with the file fallback
        if _tcp_store_takes_a_socket():
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind((LOOPBACK, 0))
            listener.listen(max(128, world_size))
            port = listener.getsockname()[1]
            # the store takes ownership of the descriptor and closes it when it is destroyed
            self._store = dist.TCPStore(LOOPBACK, port, world_size, is_master=True,
                                        timeout=timedelta(seconds=timeout_s),
                                        wait_for_workers=False,
                                        master_listen_fd=listener.detach(), use_libuv=False)
            self.address = (LOOPBACK, port)
            # torchrun's contract: every rank is a client of a store the launcher hosts
            self.env = {"MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port),
                        "TORCHELASTIC_USE_AGENT_STORE": "True"}
        else:  # older torch: a file in a private folder, no port at all
            self._folder = tempfile.mkdtemp(prefix="labkit-store-")
            os.chmod(self._folder, 0o700)
            self.env = {"MASTER_ADDR": LOOPBACK, "MASTER_PORT": "0",
                        "LABKIT_FILE_STORE": os.path.join(self._folder, "store")}

    def close(self) -> None:
        self._store = None  # dropping the last reference stops the server and closes its socket
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def join(address: tuple, run_id: str, world_size: int, timeout_s: float):
    """A client of the launcher's loopback store, with keys of its own for this launch.

    Ranks started by torchrun use it instead of ``env://``, whose rank 0 would host a store of
    its own on every interface.
    """
    import torch.distributed as dist
    host, port = address
    client = dist.TCPStore(host, port, world_size, is_master=False,
                           timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"labkit/{run_id}/", client)
