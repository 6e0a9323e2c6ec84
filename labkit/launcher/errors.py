"""The launcher's errors, and how a crash on one rank is told apart from its consequences.

When one rank fails, its peers fail a moment later with "connection closed by peer" or a
timeout: they are victims. The root cause is the first rank that failed for another reason.
"""
import linecache
import re

# Messages a rank gets because a *peer* went away or stopped answering (gloo, NCCL, the store).
_PEER_LOSS = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Timed out waiting|"
    r"Application timeout caused pair closure|Socket Timeout|ECONNRESET|EPIPE|"
    r"NCCL communicator was aborted|DistNetworkError|DistStoreError|failed to recv|"
    r"Connection refused|remote process exited|Work.*timed out|Watchdog caught collective",
    re.IGNORECASE)


def is_peer_loss(failure: dict) -> bool:
    return bool(_PEER_LOSS.search(f"{failure.get('type', '')}: {failure.get('message', '')}"))


class LaunchError(RuntimeError):
    """One or more ranks failed. ``rank`` is the root cause; ``failures`` maps rank -> details."""

    def __init__(self, message: str, rank: int | None = None, failures: dict | None = None):
        super().__init__(message)
        self.rank = rank
        self.failures = failures or {}


class LaunchTimeout(LaunchError):
    """Ranks were still running at the launch's timeout. ``stacks`` maps rank -> where it waited;
    ``collectives`` maps rank -> the last collectives it entered, oldest first (dicts described in
    ``labkit.launcher._collective_record``), from which the message's diagnosis was made."""

    def __init__(self, message: str, rank: int | None = None, failures: dict | None = None,
                 stacks: dict | None = None, collectives: dict | None = None):
        super().__init__(message, rank, failures)
        self.stacks = stacks or {}
        self.collectives = collectives or {}


# Mistakes learners make often, recognised by their message, with what to do instead.
_HINTS = [
    (re.compile(r"initialize the default process group twice|default process group has already "
                r"been initialized", re.IGNORECASE),
     "Hint: labkit.launch has already initialised the process group in every rank. Remove "
     "dist.init_process_group() from the function, or guard it with "
     "`if not dist.is_initialized():` so the same code also runs under torchrun."),
    (re.compile(r"Detected mismatch between collectives", re.IGNORECASE),
     "Hint: the ranks called different collectives (or the same one with different shapes) at "
     "the same point. Every rank must call the same collectives, in the same order, with "
     "tensors of the same shape and dtype."),
]


# The advice after a timeout's stacks: which one depends on what the ranks wait in.
COLLECTIVE_TIMEOUT_HINT = ("Every rank must call the same collectives in the same order. Ranks "
                           "waiting in different places (above) usually mean that one rank "
                           "skipped, added or reordered a collective. Run again with debug=True "
                           "to have torch compare collectives across ranks and fail at once, "
                           "naming the mismatch.")
_SEND_RECV_RULES = ("Each send(tensor, dst) needs a matching recv(buffer, src) on rank dst, "
                    "with src the sender's rank. On gloo a send of any size may wait until the "
                    "receiver has posted its recv, so if every rank sends first, nobody receives. "
                    "Post "
                    "the sends with req = dist.isend(...), then the recvs, then req.wait(); do "
                    "not modify a tensor handed to isend before its wait() returns (gloo sends "
                    "from that memory).")
POINT_TO_POINT_TIMEOUT_HINT = ("The unfinished ranks wait in sends and recvs (above): a "
                               "point-to-point deadlock. " + _SEND_RECV_RULES)
REQUEST_TIMEOUT_HINT = ("Every unfinished rank waits in a request's wait() (above). If the "
                        "requests come from isend/irecv: " + _SEND_RECV_RULES + " If they come "
                        "from collectives with async_op=True: " + COLLECTIVE_TIMEOUT_HINT)

_POINT_TO_POINT = {"send", "recv", "isend", "irecv", "batch_isend_irecv"}
_STACK_FRAME = re.compile(r'^\s*File "(?P<file>.+)", line \d+ in (?P<name>.+)$')


def waiting_in(stack: str) -> str | None:
    """The torch.distributed function a rank's stack (newest frame first) waits in; "wait" when
    its newest frame calls ``.wait()`` (Work.wait is C++: it has no frame of its own); else None.
    """
    lines, newest = stack.splitlines(), True
    for i, line in enumerate(lines):
        if line.startswith(("Thread 0x", "Current thread 0x")):
            newest = True
        match = _STACK_FRAME.match(line)
        if not match:
            continue
        if "/torch/distributed/" in match["file"].replace("\\", "/"):
            return match["name"]
        source = lines[i + 1] if i + 1 < len(lines) else ""
        if newest and not _STACK_FRAME.match(source) and ".wait()" in source:
            return "wait"
        newest = False
    return None


def timeout_hint(stacks: dict) -> str:
    """Send/recv advice when the stuck ranks all wait in point-to-point ops, else the collective
    advice: debug=True finds mismatched collectives but does not check sends and recvs. A bare
    ``.wait()`` may be an isend's or an async collective's, so it alone gets both."""
    ops = {waiting_in(stack) for stack in stacks.values()}
    if ops == {"wait"}:
        return REQUEST_TIMEOUT_HINT
    if ops and ops <= _POINT_TO_POINT | {"wait"}:
        return POINT_TO_POINT_TIMEOUT_HINT
    return COLLECTIVE_TIMEOUT_HINT


def hint_for(failure: dict) -> str | None:
    text = f"{failure.get('type', '')}: {failure.get('message', '')}"
    return next((hint for pattern, hint in _HINTS if pattern.search(text)), None)


def root_cause(failures: dict) -> int:
    """The rank that failed first for a reason of its own, not because a peer went away."""
    return min(failures, key=lambda r: (is_peer_loss(failures[r]), failures[r]["time"], r))


def _one_line(failure: dict) -> str:
    text = f"{failure['type']}: {failure['message']}".strip()
    first = text.splitlines()[0] if text else ""
    return first if len(first) <= 300 else first[:297] + "..."


def failure_message(failures: dict, world_size: int) -> tuple[str, int]:
    """The text of a LaunchError: root cause first, with its traceback, then the consequences."""
    cause = root_cause(failures)
    first = failures[cause]
    lines = [f"ROOT CAUSE: rank {cause} of {world_size}: {_one_line(first)}", ""]
    if first.get("traceback"):
        lines += [f"Traceback on rank {cause}:", without_recorder_frames(first["traceback"]).rstrip(),
                  ""]
    hint = hint_for(first)
    if hint:
        lines += [hint, ""]
    others = [r for r in sorted(failures) if r != cause]
    if others:
        lines.append("Other ranks, as consequences of that failure:")
        for r in others:
            lines.append(f"  rank {r}: {_one_line(failures[r])}")
    return "\n".join(lines).rstrip(), cause


_RECORDER_FILES = ("labkit/launcher/_collective_hooks.py", "labkit\\launcher\\_collective_hooks.py")
def without_recorder_frames(traceback_text: str) -> str:
    """A traceback without the collective record's wrapper (``_collective_hooks``): it sits
    between every ``dist.*`` call of the learner and torch's, and is not the learner's business."""
    kept, skipping = [], False
    for line in traceback_text.splitlines(keepends=True):
        if line.startswith("  File "):
            skipping = _RECORDER_FILES[0] in line.replace("\\", "/")
        elif not line.startswith("    "):
            skipping = False
        if not skipping:
            kept.append(line)
    return "".join(kept)


_FAULTHANDLER_FRAME = re.compile(r'^\s*File "(?P<file>.+)", line (?P<line>\d+) in (?P<name>.+)$')


def readable_stack(dump: str) -> str:
    """Tidy a faulthandler dump: drop labkit's own watcher thread, add the source lines.

    Source lines come from this process's line cache, which also knows the notebook's cells.
    """
    blocks, current = [], []
    for line in dump.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")) and current:
            blocks.append(current)
            current = []
        if line.strip():
            current.append(line)
    if current:
        blocks.append(current)
    shown = []
    for block in blocks:
        if any("_worker.py" in l and " in watch" in l for l in block):
            continue  # labkit's lifeline thread, not the learner's
        for line in block:
            match = _FAULTHANDLER_FRAME.match(line)
            if match and match["file"].endswith(("labkit/launcher/_worker.py", "labkit\\launcher\\_worker.py")):
                break  # below the learner's function: labkit's own frames
            if match and match["file"].endswith(_RECORDER_FILES):
                continue  # the collective record's wrapper, between the learner's call and torch's
            shown.append(line)
            if match:
                source = linecache.getline(match["file"], int(match["line"])).strip()
                if source:
                    shown.append(f"      {source}")
    return "\n".join(shown)
