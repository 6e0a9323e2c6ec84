"""The watch loop of a ``RankSession``: the launch's ``Watch``, reading replies instead of results.

A launch's rank sends one result; a persistent rank sends a stream of framed replies on the same
private pipe (``_rank_loop``), which this loop rebuilds and queues for the session. Output is
printed as a launch prints it, and a rank's last words are printed before its reply is shown.
"""
import os
from collections import deque

import cloudpickle

from labkit.launcher._framing import FrameReader
from labkit.launcher._watch import Watch, collect_stacks


class SessionWatch(Watch):
    """The launch's watch loop, reading each rank's result pipe as a stream of framed replies."""

    def __init__(self, ranks):
        super().__init__(ranks)
        self.readers = {r.rank: FrameReader() for r in ranks}
        self.replies = deque()
        self.dead = {}  # rank -> the launch's "died" outcome

    def _on_result(self, rank: int, data: bytes) -> None:
        if not data:  # the result pipe closed: the rank is gone
            self.dead.setdefault(rank, self._died(rank))
            return
        while data:
            message = self.readers[rank].feed(data)
            if message is None:
                return
            data, self.readers[rank] = self.readers[rank].leftover, FrameReader()
            self.replies.append(cloudpickle.loads(message))  # from our own rank, private pipe

    def flush_output(self, rank: int) -> None:
        """Print what the rank wrote before its reply, and end its unfinished line."""
        process = self.ranks[rank]
        for fd, stream in ((process.stdout_r, "out"), (process.stderr_r, "err")):
            while fd is not None:
                try:
                    data = os.read(fd, 1 << 16)
                except (BlockingIOError, OSError):
                    break
                self._on_output(rank, stream, data)
                if not data:
                    break
            rest, self.partial[(rank, stream)] = self.partial[(rank, stream)], b""
            if rest:
                self._on_output(rank, stream, rest + b"\n")
        self.console.end_open_line()

    def stacks_of(self, ranks) -> dict:
        """Each rank's Python stack (SIGUSR1), without labkit's own frames and threads."""
        stacks = collect_stacks(self, ranks)
        self.capturing_stacks = False
        for rank in self.stacks:
            self.stacks[rank] = []
        return {rank: cell_frames(stacks.get(rank, "")) for rank in ranks}


def cell_frames(stack: str) -> str:
    """A rank's stack down to the cell: the command reader's thread and the loop's frames out."""
    blocks, current = [], []
    for line in stack.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")) and current:
            blocks.append(current)
            current = []
        current.append(line)
    blocks.append(current)
    blocks = [b for b in blocks
              if not any("_rank_loop.py" in line and " in read_commands" in line for line in b)]
    shown = []
    for block in blocks:
        hidden = False  # a frame of the collective record, and its source line
        for line in block:
            path = line.replace("\\", "/")
            if "labkit/launcher/_rank_loop.py" in path:
                break
            if line.lstrip().startswith("File "):
                hidden = "labkit/launcher/_collective_hooks.py" in path
            if hidden:
                continue
            if len(blocks) > 1 or not line.startswith(("Thread 0x", "Current thread 0x")):
                shown.append(line)  # one thread needs no header
    return "\n".join(shown)
