"""Point-to-point on gloo with CUDA tensors: through host memory, as gloo's own collectives do.

When ranks share a GPU they use gloo (NCCL refuses two ranks on one GPU). gloo's collectives take
CUDA tensors (they copy them to host memory, run on the CPU and copy back), but its ``send`` and
``recv`` do not: the torch.distributed docs ("Backends") mark them CPU-only, and torch hands the
tensor's device pointer to gloo's TCP transport without a check. A learner's ring (notebook 01)
would crash or read garbage. So in such a rank labkit replaces ``send``, ``recv``, ``isend`` and
``irecv`` with versions that do what gloo's collectives do: copy a CUDA tensor to the CPU, send
that, and copy what arrives back into the CUDA tensor (for ``irecv``: when ``wait()`` returns).
CPU tensors pass straight through. ``batch_isend_irecv`` and ``P2POp`` use the same functions.

Only ranks of ``labkit.launch`` with ranks sharing a GPU get this (``install``); under NCCL, or
on the CPU, torch's own functions run untouched.
"""
import functools

_NAMES = ("send", "recv", "isend", "irecv")
_installed = {}


def _needs_host_copy(tensor) -> bool:
    return getattr(tensor, "device", None) is not None and tensor.device.type != "cpu"


class StagedReceive:
    """The request ``irecv`` returns for a CUDA tensor: ``wait()`` waits for the host buffer and
    copies it into the tensor; everything else is the real request's."""

    def __init__(self, work, host, tensor):
        self._work, self._host, self._tensor = work, host, tensor
        self._copied = False

    def wait(self, *args, **kwargs):
        done = self._work.wait(*args, **kwargs)
        if not self._copied:
            self._tensor.copy_(self._host)
            self._copied = True
        return done

    def __getattr__(self, name):
        return getattr(self._work, name)


def _staged(name, original):
    if name in ("send", "isend"):
        @functools.wraps(original)
        def send_through_host(tensor, *args, **kwargs):
            if not _needs_host_copy(tensor):
                return original(tensor, *args, **kwargs)
            return original(tensor.detach().to("cpu", copy=True), *args, **kwargs)
        return send_through_host

    if name == "recv":
        @functools.wraps(original)
        def recv_through_host(tensor, *args, **kwargs):
            if not _needs_host_copy(tensor):
                return original(tensor, *args, **kwargs)
            host = tensor.detach().to("cpu", copy=True)
            sender = original(host, *args, **kwargs)
            tensor.copy_(host)
            return sender
        return recv_through_host

    @functools.wraps(original)
    def irecv_through_host(tensor, *args, **kwargs):
        if not _needs_host_copy(tensor):
            return original(tensor, *args, **kwargs)
        host = tensor.detach().to("cpu", copy=True)
        work = original(host, *args, **kwargs)
        return None if work is None else StagedReceive(work, host, tensor)
    return irecv_through_host


def install(condition=_needs_host_copy) -> None:
    """Route this process's point-to-point calls through host memory for tensors where
    ``condition(tensor)`` holds (default: tensors not on the CPU). Idempotent; tests pass a
    condition that stages CPU tensors too, to run the same path without a GPU."""
    global _needs_host_copy
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    _needs_host_copy = condition
    for name in _NAMES:
        if name in _installed:
            continue
        original = getattr(c10d, name)
        _installed[name] = original
        replacement = _staged(name, original)
        setattr(c10d, name, replacement)   # batch_isend_irecv and P2POp look these up here
        setattr(dist, name, replacement)


def installed() -> bool:
    return bool(_installed)
