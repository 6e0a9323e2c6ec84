"""Where a class's grading is, on stderr: a tqdm bar with an ETA on a terminal, lines in a log.

On a terminal: one bar over the notebooks to grade (done, total, elapsed, ETA), the cell the
last started notebook is at, and a line above the bar for each notebook as it ends. Elsewhere
(a log, CI): a line when a notebook starts, naming the released notebook it is graded against,
and one when it ends, with its score and, for several, how many are left and about how long.
Workers call ``start``/``end`` from their threads, so every method holds a lock.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from labkit import grading


class ClassProgress:
    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._lock, self._bar = threading.Lock(), None
        self.total = self.done = self.started = 0
        self._began = time.monotonic()

    def begin(self, total: int, reused: int) -> None:
        self.total, self._began = total, time.monotonic()
        if reused:
            self._line(f"{reused} notebook{'s' if reused > 1 else ''} unchanged since the last "
                       "run: grades reused")
        if self.live and total:
            self._bar = tqdm(total=total, unit="notebook", file=self.stream, dynamic_ncols=True,
                             desc="grading")

    def start(self, submission, cells: int):
        """A notebook starts in a worker: returns the callback for its cells."""
        path, template = submission.path, Path(submission.template).name
        with self._lock:
            self.started += 1
            if not self.live:
                self._line(f"grading {path}{self._count(self.started)} against {template}: "
                           f"{cells} code cells")

        def on_cell(number: int) -> None:
            if self._bar is not None:
                with self._lock:
                    self._bar.set_postfix_str(f"{path.name}: cell {number}/{cells}")
        return on_cell

    def end(self, grade, counted: bool = True) -> None:
        """A notebook ends (``counted``: one of those the bar counts, which were run)."""
        with self._lock:
            self.done += counted
            text = grading.outcome(grade)
            if not self.live and self.total > 1 and counted:
                text += f" ({self.done}/{self.total}{self._eta()})"
            for incident in grade.incidents:
                text += f"\n  ! {incident}"
            self._line(text)
            if self._bar is not None and counted:
                self._bar.update(1)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _count(self, number: int) -> str:
        return f" ({number}/{self.total})" if self.total > 1 else ""

    def _eta(self) -> str:
        left = self.total - self.done
        if not left:
            return ""
        seconds = (time.monotonic() - self._began) / self.done * left
        return f", about {seconds / 60:.0f} min left" if seconds >= 90 else \
            f", about {seconds:.0f} s left"

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()
