"""The watch loop of a launch: every rank's stdout, stderr and result pipe, read on one thread.

Output goes to the cell that launched (``_output``); results arrive as framed messages; a rank
whose result pipe closes without a whole message died.
"""
import os
import selectors
import signal
import time

from labkit.launcher._output import Console, redrawn, split_lines
from labkit.launcher._results import DEFAULT_MAX_RESULT_BYTES, Allowance, IncomingResult
from labkit.launcher.errors import readable_stack


class Watch:
    """Reads every rank's stdout, stderr and result pipe in one loop on the calling thread."""

    def __init__(self, ranks, max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES):
        self.ranks = {r.rank: r for r in ranks}
        self.selector = selectors.DefaultSelector()
        self.partial = {}
        self.console = Console()
        allowance = Allowance(max_result_bytes)  # for all ranks' results together
        self.incoming = {r.rank: IncomingResult(r.rank, allowance) for r in ranks}
        self.outcomes = {}  # rank -> outcome dict, filled as results arrive
        self.capturing_stacks = False
        self.stacks = {r.rank: [] for r in ranks}
        self.tails = {r.rank: [] for r in ranks}  # last stderr lines, for ranks that die silently
        for r in ranks:
            for fd, stream in ((r.stdout_r, "out"), (r.stderr_r, "err"), (r.result_r, "result")):
                os.set_blocking(fd, False)
                self.selector.register(fd, selectors.EVENT_READ, (r.rank, stream))
                self.partial[(r.rank, stream)] = b""

    _PIPES = {"out": "stdout_r", "err": "stderr_r", "result": "result_r"}

    @property
    def open_pipes(self) -> int:
        return len(self.selector.get_map())

    def drain(self, until: float) -> None:
        """Read what the ranks still write until their pipes close, or until ``until``
        (``time.monotonic()``): a process a rank started may hold a pipe open forever."""
        while self.open_pipes and time.monotonic() < until:
            self.pump(min(0.05, max(0.0, until - time.monotonic())))

    def close(self) -> None:
        self.console.end_open_line()
        self.selector.close()

    def pump(self, wait_s: float) -> None:
        for key, _ in self.selector.select(timeout=wait_s):
            rank, stream = key.data
            try:
                data = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if stream == "result":
                self._on_result(rank, data)
            else:
                self._on_output(rank, stream, data)
            if not data:
                self.selector.unregister(key.fd)
                self.ranks[rank].close_pipe(self._PIPES[stream])

    def _on_output(self, rank: int, stream: str, data: bytes) -> None:
        lines, rest = split_lines(self.partial[(rank, stream)] + data, at_end=not data)
        self.partial[(rank, stream)] = rest
        for line in lines:
            if stream == "err":
                self.tails[rank] = (self.tails[rank] + [line])[-20:]
                if self.capturing_stacks:
                    self.stacks[rank].append(line)
                    continue
            self.console.line(rank, stream, line)
        progress = redrawn(rest)
        if progress is not None and not (stream == "err" and self.capturing_stacks):
            self.console.progress(rank, stream, progress)

    def _on_result(self, rank: int, data: bytes) -> None:
        if rank in self.outcomes:
            return
        incoming = self.incoming[rank]
        outcome = incoming.feed(data)
        if outcome is None and not data:  # the pipe closed before a whole result arrived
            outcome = self._died(rank)
        if outcome is not None:
            self.outcomes[rank] = outcome
        if incoming.refused:  # too large: read no further; the rank waits until it is stopped
            self.selector.unregister(self.ranks[rank].result_r)

    def running(self) -> list:
        """Ranks still inside the learner's function (the launch's timeout runs for these)."""
        return [r for r in sorted(self.ranks)
                if r not in self.outcomes and not self.incoming[r].sending]

    def late_sender(self, now: float) -> int | None:
        """A rank whose result is taking longer than its own budget to arrive, if any."""
        return next((r for r in sorted(self.ranks) if self.incoming[r].late(now)), None)

    def _died(self, rank: int) -> dict:
        process = self.ranks[rank]
        code = process.popen.poll() if process.popen is not None else None
        how = (f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exit code {code}" if code is not None else "killed, crashed in native code, "
               "or ended by os._exit()")
        tail = "\n".join(self.tails[rank][-10:])
        what = self.incoming[rank].died_message() or f"rank {rank} ended without returning or raising"
        return {"status": "died", "rank": rank, "time": time.time(), "type": "RankDied",
                "message": f"{what} ({how}); "
                           "a rank killed for using too much memory looks like this too.",
                "traceback": f"Last lines rank {rank} wrote to stderr:\n{tail}" if tail else ""}

    def failures(self) -> dict:
        return {r: o for r, o in self.outcomes.items() if o["status"] != "ok"}


def collect_stacks(watch: Watch, unfinished: list, wait_s: float = 1.0) -> dict:
    """Ask each unfinished rank where it is (faulthandler on SIGUSR1) and gather the answers."""
    if not hasattr(signal, "SIGUSR1"):
        return {}
    watch.capturing_stacks = True
    for rank in unfinished:
        try:
            os.kill(watch.ranks[rank].pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    end = time.monotonic() + wait_s
    while time.monotonic() < end and watch.open_pipes:
        watch.pump(0.05)
    return {r: readable_stack("\n".join(watch.stacks[r])) for r in unfinished}
