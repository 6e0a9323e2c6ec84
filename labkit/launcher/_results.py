"""A rank's result on its way back: its size limit, its own time budget, and the launcher's reader.

A rank reports on its result pipe in up to three framed messages:

1. ``{"status": "returned"}`` as soon as the learner's function returned. From then on the
   launch's ``timeout`` no longer runs for this rank: pickling and sending get a budget of their
   own (``transfer_budget_s``), so a large result never eats the learner's time silently, and a
   transfer that stalls still ends, with a message that says so;
2. the outcome: ``{"status": "ok", "size": n, ...}``, or a failure (the function raised, the
   result cannot be pickled, or it is larger than ``max_result_bytes``);
3. for "ok", the pickled value itself, ``n`` bytes, pickled once (``_pickling.dumps_result``).

A function that raised sends only its error (2). The limit is for all ranks together and is
checked twice: by the rank after pickling (only the rank can say which part of its result is the
large one) and by the launcher as soon as a message's length is known, before reading it (ranks
that are each under the limit can still be over it together).
"""
import sys
import time

import cloudpickle

from labkit.launcher._framing import FrameReader

DEFAULT_MAX_RESULT_BYTES = 2 * 1024 ** 3  # for all ranks together
TRANSFER_BASE_S = 60.0                    # pickling and sending, whatever the size ...
TRANSFER_BYTES_PER_S = 20 * 1024 ** 2     # ... plus this slow a rate: 2 GiB get 60 + 102 s
REPORT_MAX_BYTES = 64 * 1024 ** 2         # messages 1 and 2 are a few KiB at most


def transfer_budget_s(size: int | None) -> float:
    """Seconds a rank may take, after its function returned, to pickle and send ``size`` bytes."""
    return TRANSFER_BASE_S + (size or 0) / TRANSFER_BYTES_PER_S


def human_size(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


# ---- which part of a result is the large one (only when a result is too large) ----

def _parts(value, path: str):
    """The parts a value is made of, each with its path from ``result``."""
    if isinstance(value, dict):
        return [(f"{path}[{key!r}]", part) for key, part in value.items()]
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return [(f"{path}.{name}", part) for name, part in zip(value._fields, value)]
    if isinstance(value, (list, tuple)):
        return [(f"{path}[{i}]", part) for i, part in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return [(f"{path} (an item)", part) for part in value]
    attributes = getattr(value, "__dict__", None)  # dataclasses and other objects, nn.Module too
    if isinstance(attributes, dict) and not isinstance(value, type):
        return [(f"{path}.{name}", part) for name, part in attributes.items()]
    return []


def _leaf(value):
    """(bytes it ships, words for it) for a tensor, an array or a string; None for containers."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        dtensor = sys.modules.get("torch.distributed.tensor")
        if dtensor is not None and isinstance(value, dtensor.DTensor):
            value = value.to_local()  # what the rank sends (see _pickling.portable)
        if value.layout == torch.strided and not value.is_nested and not value.is_quantized:
            size = value.numel() * value.element_size()
        else:
            from labkit.launcher._pickling import dumps_result
            size = len(dumps_result(value))
        dtype = str(value.dtype).removeprefix("torch.")
        return size, f"a {dtype} tensor {list(value.shape)} of {human_size(size)}"
    if type(value).__module__ == "numpy" and hasattr(value, "nbytes") and hasattr(value, "shape"):
        return int(value.nbytes), (f"a {value.dtype} array {list(value.shape)} of "
                                   f"{human_size(value.nbytes)}")
    if isinstance(value, (bytes, bytearray, str, memoryview)):
        size = value.nbytes if isinstance(value, memoryview) else len(value)
        return size, f"a {type(value).__name__} of {human_size(size)}"
    return None


def _shortened(path: str, most: int = 80) -> str:
    return path if len(path) <= most else f"{path[:most // 2 - 2]}...{path[-(most // 2 - 1):]}"


def largest_part(value, max_parts: int = 100_000) -> str | None:
    """Where the largest tensor, array or string sits in ``value``, e.g.
    "result['model.weight'], a float32 tensor [4096, 4096] of 64.0 MiB"."""
    best, seen, todo, looked_at = None, set(), [("result", value, 0)], 0
    while todo and looked_at < max_parts:
        path, part, depth = todo.pop()
        looked_at += 1
        if id(part) in seen:
            continue
        seen.add(id(part))
        leaf = _leaf(part)
        if leaf is not None:
            if best is None or leaf[0] > best[0]:
                best = (leaf[0], f"{_shortened(path)}, {leaf[1]}")
        elif depth < 30:
            todo.extend((p, v, depth + 1) for p, v in reversed(_parts(part, path)))
    return best[1] if best else None


def too_large_message(rank: int, size: int, limit: int, largest: str | None,
                      others: int = 0) -> str:
    """What to tell the learner when a result does not fit ``max_result_bytes`` (one line, short
    enough to be shown whole after "ROOT CAUSE")."""
    text = f"rank {rank} returned {human_size(size)}"
    text += f"; with the other ranks' {human_size(others)} that is over" if others else ", over"
    text += f" max_result_bytes ({human_size(limit)}, all ranks together)"
    if largest:
        text += f"; the largest part is {largest}"
    return text + ". Return a smaller piece, or raise max_result_bytes."


def too_large_outcome(rank: int, message: str, size: int) -> dict:
    return {"status": "too_large", "rank": rank, "time": time.time(), "type": "ResultTooLarge",
            "message": message, "size": size, "traceback": ""}


# ---- the launcher's side ----

class Allowance:
    """``max_result_bytes`` for all ranks together: how much each rank's value may still take."""

    def __init__(self, limit: int):
        self.limit = limit
        self.taken = {}  # rank -> bytes of its value, once its length is known

    def left_for(self, rank: int) -> int:
        return self.limit - sum(size for r, size in self.taken.items() if r != rank)


class IncomingResult:
    """One rank's result pipe, read message by message (see the module's docstring)."""

    def __init__(self, rank: int, allowance: Allowance):
        self.rank = rank
        self.allowance = allowance
        self.reader = FrameReader()
        self.length_checked = False  # the current message's length, once its header arrived
        self.returned_at = None  # time.monotonic() when the function returned (message 1)
        self.announced = None    # the "ok" outcome, waiting for its value (message 3)
        self.outcome = None      # the rank's final outcome
        self.refused = False     # True when the launcher stopped reading an oversized message

    @property
    def sending(self) -> bool:
        """The function returned; its result is still on its way."""
        return self.returned_at is not None and self.outcome is None

    def feed(self, data: bytes) -> dict | None:
        """Take a chunk from the pipe; return the rank's outcome once it is complete or refused."""
        while self.outcome is None:
            message = self.reader.feed(data)
            if self.reader.size is not None and not self.length_checked:
                self.length_checked = True
                if self._refuse(self.reader.size):
                    break
            if message is None:
                break
            data, self.reader, self.length_checked = self.reader.leftover, FrameReader(), False
            self._take(message)
            if not data:
                break
        return self.outcome

    def _take(self, message: bytes) -> None:
        if self.announced is not None:  # message 3: the value
            self.outcome = dict(self.announced, value=message)
            return
        report = cloudpickle.loads(message)
        if report["status"] == "returned":
            self.returned_at = time.monotonic()
        elif report["status"] == "ok":
            self.announced = report
        else:
            self.outcome = report

    def _refuse(self, size: int) -> bool:
        """Check a message's length as soon as it is known; True when it is refused."""
        if self.announced is None:
            if size <= REPORT_MAX_BYTES:
                return False
            message = (f"rank {self.rank} sent a report of {human_size(size)} on its result pipe, "
                       "where a few KiB are expected; the launcher did not read it.")
        else:
            left = self.allowance.left_for(self.rank)
            if size <= left:
                self.allowance.taken[self.rank] = size
                return False
            message = too_large_message(self.rank, size, self.allowance.limit,
                                        self.announced.get("largest"),
                                        others=self.allowance.limit - left)
        self.outcome, self.refused = too_large_outcome(self.rank, message, size), True
        return True

    def expected_size(self) -> int | None:
        if self.announced is None:
            return None
        return self.reader.size if self.reader.size is not None else self.announced["size"]

    def late(self, now: float) -> bool:
        """The rank has been pickling or sending its result for longer than its budget."""
        return self.sending and now > self.returned_at + transfer_budget_s(self.expected_size())

    def late_message(self, now: float) -> str:
        size = self.expected_size()
        if size is None:
            doing = "was still pickling its result"
        else:
            doing = (f"was still sending its {human_size(size)} result "
                     f"({human_size(self.reader.received)} had arrived)")
        return (f"TIMEOUT: rank {self.rank} finished its function but {doing} "
                f"{now - self.returned_at:.0f} s later. The launch's timeout counts only the "
                f"function; pickling and sending a result get {transfer_budget_s(size):.0f} s of "
                "their own. All ranks have been stopped.")

    def died_message(self) -> str | None:
        """Words for a rank whose pipe closed after its function returned; None before."""
        if self.returned_at is None:
            return None
        size = self.expected_size()
        if size is None:
            return f"rank {self.rank} finished its function but ended while pickling its result"
        return (f"rank {self.rank} finished its function but ended while sending its "
                f"{human_size(size)} result ({human_size(self.reader.received)} had arrived)")
