"""Length-prefixed messages over the private pipes between the launcher and its ranks.

Only pipes that the launcher created itself carry pickled bytes, so nothing a stranger on the
network could write is ever unpickled.
"""
import os
import struct

_HEADER = struct.Struct("!Q")


def write_message(fd: int, data: bytes) -> None:
    """Write one message: an 8-byte length, then the bytes."""
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_message(fd: int) -> bytes | None:
    """Read one message; None when the writer closed the pipe first (it died or never wrote)."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    return _read_exactly(fd, size)
