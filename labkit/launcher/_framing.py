"""Length-prefixed messages: the one framing used on every private pipe of a launch.

A message is an 8-byte big-endian length, then that many bytes. The job goes to a rank this way
(on its stdin) and the rank's outcome comes back this way (on its result pipe). Only pipes that
the launcher created itself carry these bytes, so nothing a stranger on the network could write
is ever unpickled.
"""
import os
import socket
import struct
import time

_HEADER = struct.Struct("!Q")
HEADER_SIZE = _HEADER.size


def frame(data: bytes) -> bytes:
    """The bytes that carry ``data`` as one message."""
    return _HEADER.pack(len(data)) + data


def write_message(fd: int, data: bytes) -> None:
    """Write one message on a blocking descriptor (a large one without copying it first)."""
    for part in (_HEADER.pack(len(data)), data):
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view):]


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
    """Read one message from a blocking descriptor; None when the writer closed it first."""
    header = _read_exactly(fd, HEADER_SIZE)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    return _read_exactly(fd, size)


def recv_message(sock: socket.socket, deadline: float) -> bytes | None:
    """Read one message from a socket before ``deadline`` (a ``time.monotonic()`` value).

    None when the other end closed first; ``TimeoutError`` when the deadline passes.
    """
    def exactly(size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    header = exactly(HEADER_SIZE)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    return exactly(size) if size else b""


class FrameReader:
    """Rebuilds one message from the chunks a non-blocking read gives, in any sizes.

    ``size`` is known as soon as the header has arrived (None before), so a reader can say how
    far a large message has come, or refuse one that is too large before reading it all.
    Bytes that arrived after the message (the start of the next one) are kept in ``leftover``.
    """

    def __init__(self):
        self._buffer = bytearray()
        self.size = None
        self.message = None
        self.leftover = b""

    @property
    def received(self) -> int:
        """Bytes of the message body received so far."""
        return max(0, len(self._buffer) - HEADER_SIZE)

    def feed(self, data: bytes) -> bytes | None:
        """Add a chunk; return the whole message once it is complete (and ever after)."""
        if self.message is None:
            self._buffer += data
            if self.size is None and len(self._buffer) >= HEADER_SIZE:
                (self.size,) = _HEADER.unpack_from(self._buffer)
            if self.size is not None and len(self._buffer) >= HEADER_SIZE + self.size:
                end = HEADER_SIZE + self.size
                self.message = bytes(memoryview(self._buffer)[HEADER_SIZE:end])
                self.leftover = bytes(memoryview(self._buffer)[end:])
                self._buffer = bytearray()
        return self.message
