"""Hints on request: ``labkit.check.hint("ring_all_reduce", 1)``.

A notebook shows the exercise, not the way to solve it; a learner who is stuck asks for a hint,
and then for the next one. Each exercise registers an ordered list (``register``, next to its
grader): level 1 is a nudge, each level reveals more, the last is nearly the answer. Asking for a
later level first is fine. A wrong name or level answers with what exists, never a traceback.
"""
import difflib
import numbers
from typing import Sequence

_HINTS: dict = {}   # exercise -> tuple of hint texts, level 1 first


def register(exercise: str, hints: Sequence[str]) -> None:
    """Give ``exercise`` its hints, level 1 first (registering again replaces them)."""
    if not hints or not all(isinstance(h, str) and h.strip() for h in hints):
        raise ValueError(f"{exercise}: hints must be a non-empty list of non-empty strings")
    _HINTS[exercise] = tuple(hints)


def exercises() -> list:
    """The exercises that have hints, in the order they were registered."""
    return list(_HINTS)


class Hint(str):
    """The text ``hint`` printed. As a cell's last expression it shows nothing more: IPython
    calls ``_ipython_display_`` instead of echoing the string a second time."""

    def _ipython_display_(self):
        pass


def hint(exercise: str, level: int = 1) -> str:
    """Print and return hint ``level`` (1 = a nudge, the last = nearly the answer) for
    ``exercise``, the name of its check (``"ring_all_reduce"``)."""
    text = Hint(_text(exercise, level))
    print(text, flush=True)
    return text


def _text(exercise, level) -> str:
    hints = _HINTS.get(exercise)
    if hints is None:
        close = difflib.get_close_matches(str(exercise), list(_HINTS), n=1)
        maybe = f"did you mean {close[0]!r}? " if close else ""
        return (f"no hints for {exercise!r}: {maybe}hints exist for "
                f"{', '.join(_HINTS) or 'no exercise yet'}; ask for one with "
                f"labkit.check.hint(name, 1)")
    count = len(hints)
    if isinstance(level, str) and level.strip().isdigit():
        level = int(level)
    if not isinstance(level, numbers.Integral) or isinstance(level, bool) \
            or not 1 <= level <= count:
        return (f"{exercise} has hints 1 to {count} (1 a nudge, {count} nearly the answer), "
                f"not {level!r}: ask with labkit.check.hint({exercise!r}, 1)")
    more = (f" (labkit.check.hint({exercise!r}, {level + 1}) says more)" if level < count
            else " (the last one)")
    return f"{exercise}, hint {level} of {count}{more}:\n{hints[level - 1]}"
