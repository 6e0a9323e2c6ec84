"""What the ranks write, shown in the cell: whole lines tagged ``[rank r]``, progress bars live.

Lines are printed whole, so the output of four ranks never interleaves mid-line. A progress bar
(tqdm and friends) never ends its line: it redraws it after a carriage return (``\\r``). Such a
line is shown as it changes, each version printed after a ``\\r`` of our own, so the notebook (or
terminal) redraws it in place; when the bar finishes its line, or another rank needs the screen,
the line is ended.
"""
import sys


def split_lines(buffered: bytes, at_end: bool) -> tuple[list[str], bytes]:
    """Complete lines (as text, each showing what a terminal would) and the unfinished rest."""
    *lines, rest = buffered.split(b"\n")
    if at_end and rest:  # end of stream: a last line without a newline is complete too
        lines, rest = lines + [rest], b""
    return [visible(raw) for raw in lines], rest


def visible(raw: bytes) -> str:
    """The text a terminal shows for one line: what follows the last carriage return."""
    segments = [s for s in raw.decode("utf-8", errors="replace").split("\r") if s]
    return segments[-1] if segments else ""


def redrawn(rest: bytes) -> str | None:
    """The current version of a line being redrawn with ``\\r``; None for plain unfinished text."""
    if b"\r" not in rest:
        return None
    return visible(rest) or None


class Console:
    """Prints rank output; remembers which rank's progress line is on screen, unfinished."""

    def __init__(self):
        self.open_line = None  # (rank, stream) of a progress line shown without its end

    @staticmethod
    def _file(stream: str):
        return sys.stderr if stream == "err" else sys.stdout

    def line(self, rank: int, stream: str, text: str) -> None:
        """A complete line; it replaces the same rank's progress line if that one is open."""
        if self.open_line == (rank, stream):
            print(f"\r[rank {rank}] {text}", file=self._file(stream), flush=True)
            self.open_line = None
            return
        self.end_open_line()
        print(f"[rank {rank}] {text}", file=self._file(stream), flush=True)

    def progress(self, rank: int, stream: str, text: str) -> None:
        """The current version of a line the rank keeps redrawing."""
        if self.open_line != (rank, stream):
            self.end_open_line()
        print(f"\r[rank {rank}] {text}", end="", file=self._file(stream), flush=True)
        self.open_line = (rank, stream)

    def end_open_line(self) -> None:
        if self.open_line is not None:
            print(file=self._file(self.open_line[1]), flush=True)
            self.open_line = None
