"""What every check shares: the result, the one printed line, and running learner code on N ranks.

A check never raises because the learner's code is wrong or unfinished: "Run all" must reach the
end of the notebook. Everything that can go wrong in the learner's code (a wrong value, an
exception on one rank, a deadlock, the ``raise NotImplementedError()`` stub) becomes a
``CheckResult`` with a hint that names the likely bug. The notebook's hidden test is
``assert result.passed, result.hint``.

Inside a rank, graders call the learner through ``call_learner``; in the notebook they launch
ranks through ``Ranks``, which turns a crash or a hang into ``Failed(hint)``.
"""
import contextlib
import dataclasses
import functools
import io
import os
import re
import sys
import sysconfig
import time
from typing import Callable, NamedTuple, Optional

import labkit
from labkit.check import _sizes

MIMETYPE = "application/vnd.labkit.check+json"
PASSED, FAILED, NOT_IMPLEMENTED = "passed", "failed", "not implemented"
_MARKS = {PASSED: "✓", FAILED: "✗", NOT_IMPLEMENTED: "…"}


@dataclasses.dataclass
class CheckResult:
    """The outcome of one check: what the notebook's hidden test asserts on.

    ``summary`` says what was verified (shown after ✓); ``hint`` names the likely bug (after ✗);
    ``figures`` are the measured numbers; ``details`` the full error of a crash or hang, when
    there was one (not printed: the hint says what matters; read it for the whole traceback).
    """
    name: str
    passed: bool
    status: str
    hint: Optional[str] = None
    figures: dict = dataclasses.field(default_factory=dict)
    summary: str = ""
    details: Optional[str] = None

    @property
    def line(self) -> str:
        """The one line the check prints."""
        text = {PASSED: self.summary, FAILED: self.hint,
                NOT_IMPLEMENTED: "not implemented yet"}[self.status]
        return f"{_MARKS[self.status]} {self.name}: {text}"

    def to_json(self) -> dict:
        """What ``labkit grade`` reads from the notebook's outputs."""
        return {"name": self.name, "passed": self.passed, "status": self.status,
                "hint": self.hint, "figures": self.figures}

    def __bool__(self):
        # so that `assert labkit.check.x(fn)` fails when the check fails (a dataclass is truthy)
        return self.passed

    def __repr__(self):
        # short: when the check is a cell's last expression, the printed line already says it all
        return f"CheckResult(name={self.name!r}, status={self.status!r})"


class Failed(Exception):
    """Raised by a grader (in the notebook's process) to report a failure with its hint."""

    def __init__(self, hint: str, figures: Optional[dict] = None, details: Optional[str] = None,
                 crash: Optional["Crash"] = None):
        super().__init__(hint)
        self.hint, self.figures, self.details = hint, figures or {}, details
        self.crash = crash   # the learner's crash on the ranks, when that is what failed


class NotImplementedYet(Exception):
    """The learner's function is still the ``raise NotImplementedError()`` stub."""


def exercise(name: str, sizes: bool = False):
    """Turn ``grader(fn, **options) -> (summary, figures)`` into a check that never raises.

    The grader raises ``Failed`` (or lets ``Ranks`` raise it) to fail; the check prints one line,
    publishes the result to the notebook's outputs and returns it. ``sizes``: the grader picks
    its world sizes with ``_sizes.pick``, so under quick sizes (``_sizes``) its line says so.
    """
    def wrap(grader):
        @functools.wraps(grader)
        def check(fn, **options) -> CheckResult:
            result = _grade(name, grader, fn, options)
            if sizes and _sizes.quick():
                _note_quick_sizes(result)
            report(result)
            return result
        return check
    return wrap


def _note_quick_sizes(result: CheckResult) -> None:
    """Say in the line, the hint and the figures that this run used the quick sizes."""
    if result.status == PASSED:
        result.summary += _sizes.NOTE
    elif result.status == FAILED:
        result.hint = (result.hint or "") + _sizes.NOTE
    result.figures["sizes"] = "quick"


_ATTEMPTED: set = set()   # checks that ran on the learner's own function in this process


def attempted(*names: str) -> bool:
    """True once every named check has run on the learner's own function in this process
    (passed or failed; the stub does not count). A grader's summary shows a figure that answers
    a prediction only after the learner has made that prediction: "predict, then measure"."""
    return all(name in _ATTEMPTED for name in names)


def _grade(name, grader, fn, options) -> CheckResult:
    result = _grade_once(name, grader, fn, options)
    if callable(fn) and result.status != NOT_IMPLEMENTED:
        _ATTEMPTED.add(name)
    return result


def _grade_once(name, grader, fn, options) -> CheckResult:
    if not callable(fn):
        return CheckResult(name, False, FAILED, hint=f"pass your function itself, e.g. "
                           f"labkit.check.{name}({name}), not {type(fn).__name__} {fn!r:.60}")
    try:
        summary, figures = grader(fn, **options)
    except Failed as failure:
        return CheckResult(name, False, FAILED, hint=failure.hint, figures=failure.figures,
                           details=failure.details)
    except NotImplementedYet:
        return CheckResult(name, False, NOT_IMPLEMENTED)
    except Exception as exc:  # noqa: BLE001 - a check must never stop "Run all"
        return CheckResult(name, False, FAILED, details=repr(exc),
                           hint=f"the check itself could not run ({type(exc).__name__}: {exc}); "
                                "this is likely a bug in labkit: please report it")
    return CheckResult(name, True, PASSED, figures=figures, summary=summary)


def report(result: CheckResult) -> None:
    """Show the result's line once. In a Jupyter kernel it is the text/plain of one display output
    that also carries the result for ``labkit grade`` (front ends without a renderer for our type
    show the line; a separate print would leave an empty output). Elsewhere it is printed."""
    if _in_kernel():
        from IPython.display import display
        display({MIMETYPE: result.to_json(), "text/plain": result.line}, raw=True)
    else:
        print(result.line, flush=True)


def _in_kernel() -> bool:
    """True in a Jupyter kernel (not a terminal IPython, not plain Python)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None


# --- inside a rank -------------------------------------------------------------------------------

class LearnerCrash(RuntimeError):
    """The learner's function raised inside a rank; the message carries the case it was given.

    Format: ``<case> :: <ExceptionType>: <message>``, read back by ``Ranks`` in the notebook.
    Peer-loss messages ("Connection closed by peer") stay in the text, so the launcher still
    ranks those ranks as victims, not as the root cause.
    """


_TORCH_DIR = os.sep + "torch" + os.sep
CASE_MARK = "labkit.check case: "


def call_learner(fn, *args, case: str = ""):
    """Call the learner's function in a rank; tag its exceptions with the case it was running.

    ``NotImplementedError`` raised by the learner's own code (the stub) passes through
    untouched, so the notebook reports "not implemented yet"; one raised inside torch is a
    crash like any other.
    """
    if case:
        # If the rank dies in native code (gloo aborts on a receive buffer that is too small),
        # no exception carries the case: this line, last in the rank's stderr, still does.
        print(f"{CASE_MARK}{case}", file=sys.stderr, flush=True)
    try:
        return fn(*args)
    except NotImplementedError as exc:
        if not _raised_in_torch(exc):
            raise
        raise LearnerCrash(f"{case} :: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise LearnerCrash(f"{case} :: {type(exc).__name__}: {exc}") from exc


def call_here(fn, *args, who: str):
    """Call the learner's function in the notebook's own process (a formula, a sampler, a
    training step): the stub means "not implemented yet", any other exception becomes a hint
    that starts with ``who`` ("shard_indices(10, 0, 4)"), never a traceback."""
    try:
        return fn(*args)
    except NotImplementedError as exc:
        if not _raised_in_torch(exc):
            raise NotImplementedYet() from None
        raise Failed(f"{who} raised {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a wrong function is a hint, not a traceback
        raise Failed(f"{who} raised {type(exc).__name__}: {exc}") from None


def _raised_in_torch(exc) -> bool:
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _TORCH_DIR in tb.tb_frame.f_code.co_filename


# --- in the notebook: launching and reading failures ---------------------------------------------

class Crash(NamedTuple):
    """A learner function that raised: on which rank, with which case, what, and where."""
    rank: int
    nprocs: int
    case: str
    type: str
    message: str
    where: Optional[str]   # "line 12 in ring_all_reduce: `tensor[i] += buf`", when known
    traceback: str = ""    # the rank's traceback, or the last lines of its stderr if it died


class Wait(NamedTuple):
    """Where a rank was waiting when the launch timed out."""
    rank: int
    op: Optional[str]      # "send", "recv", "wait" (a request's .wait()), "all_reduce", ...
    where: Optional[str]   # the learner's line, when it is in the stack


class Ranks:
    """Launches one check's ranks under a per-launch timeout and a budget for the whole check.

    ``crash_advice(crash)`` and ``hang_advice(waits, nprocs)`` let a grader add what it knows
    about its exercise to the generic hints (return None to add nothing).
    """

    def __init__(self, exercise: str, timeout: float = 10.0, budget: float = 25.0,
                 crash_advice: Optional[Callable] = None, hang_advice: Optional[Callable] = None):
        self.exercise, self.timeout = exercise, timeout
        self.crash_advice, self.hang_advice = crash_advice, hang_advice
        _wait_for_fork_server()   # importing torch there is not the learner's time
        self.deadline = time.monotonic() + budget

    def run(self, worker, nprocs: int, *args) -> list:
        """``labkit.launch(worker, nprocs, args)``; a crash or hang raises ``Failed``."""
        left = self.deadline - time.monotonic()
        if left < 1.0:
            raise Failed(f"the check ran out of time before it could try {nprocs} ranks: "
                         f"{self.exercise} is too slow (a loop over single elements?)")
        timeout = min(self.timeout, left)
        # The ranks' stdout (the learner's prints) shows as usual; their stderr (torch's C++
        # logging, warnings) would bury the one line the check prints, so it goes to `details`.
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                return labkit.launch(worker, nprocs, args=args, timeout=timeout, quiet=True)
        except labkit.LaunchTimeout as error:
            raise Failed(self._hang_hint(error, nprocs, timeout),
                         details=_details(error, stderr)) from None
        except labkit.LaunchError as error:
            if any(f.get("type") == "NotImplementedError" for f in error.failures.values()):
                raise NotImplementedYet() from None
            raise Failed(self._crash_hint(error, nprocs), details=_details(error, stderr),
                         crash=read_crash(error, nprocs)) from None
        except ValueError as error:   # labkit.launch refused the function (e.g. cannot pickle)
            raise Failed(str(error)) from None

    def _crash_hint(self, error, nprocs) -> str:
        crash = read_crash(error, nprocs)
        if crash is None:
            return f"{self.exercise} failed on {nprocs} ranks: {str(error).splitlines()[0]}"
        at = f" ({crash.where})" if crash.where else ""
        if crash.type == "NativeError":   # killed by a C++ exception (gloo, torch)
            hint = (f"{self.exercise} crashed rank {crash.rank} of {crash.nprocs} in native code"
                    + (f" with {crash.case}" if crash.case else "") + f"{at}: "
                    f"{_shorten(crash.message)}")
        elif crash.case:   # the learner's function raised
            hint = (f"{self.exercise} raised {crash.type} on rank {crash.rank} of {crash.nprocs} "
                    f"with {crash.case}{at}: {_shorten(crash.message)}")
        else:            # the rank died (killed, os._exit, a crash in native code)
            hint = (f"{self.exercise} failed on rank {crash.rank} of {crash.nprocs}{at}: "
                    f"{crash.type}: {_shorten(crash.message)}")
        advice = device_advice(crash) or (self.crash_advice(crash) if self.crash_advice else None)
        if not advice:
            return hint
        hint = hint.rstrip(".")
        return f"{hint}{' ' if hint.endswith(('?', '!')) else '. '}{advice}"

    def _hang_hint(self, error, nprocs, timeout) -> str:
        waits = [where_waiting(rank, stack) for rank, stack in sorted(error.stacks.items())]
        hint = describe_hang(waits, nprocs, timeout)
        advice = self.hang_advice(waits, nprocs) if self.hang_advice else None
        return f"{hint}; {advice}" if advice else hint


# Tensors on two devices meeting in one op: a buffer made on the default CPU beside the rank's
# CUDA tensors. NCCL says it one way, an op on mixed tensors another.
_DEVICE_MISMATCH = re.compile(
    r"No backend type associated with device type|Tensors must be CUDA|"
    r"Expected all tensors to be on the same device|found at least two devices|"
    r"expected device \S+ but got device|to be on the same device|must be on the same device",
    re.IGNORECASE)
DEVICE_ADVICE = ("Your tensors live on this rank's device (labkit.device(): a GPU when there "
                 "is one), so make every buffer on the device of the tensors you were given "
                 "(torch.zeros(k, device=p.device, dtype=p.dtype), torch.zeros_like(t), "
                 "t.new_zeros(k)), not on the default CPU")


def device_advice(crash: "Crash") -> Optional[str]:
    """The sentence that a crash from tensors on two devices gets, whatever the exercise (it
    comes instead of the grader's own advice, which reads sizes and dtypes into such a crash);
    None for any other crash."""
    return DEVICE_ADVICE if _DEVICE_MISMATCH.search(crash.message or "") else None


_warm = False


def _wait_for_fork_server() -> None:
    """Let the fork server finish starting before a check's clock runs, once per process.

    The fork server imports torch (seconds, in a fresh kernel), then the extras that torch's DDP
    and ZeRO need at their first use; ranks forked before that would import them themselves,
    spending seconds of the learner's timeout on start-up. ``warm_up`` waits for both.
    """
    global _warm
    if _warm:
        return
    try:
        from labkit.launcher import warm_up
        warm_up()
        _warm = True
    except Exception:  # noqa: BLE001 - the check's own launch will say what is wrong
        pass


def _details(error, stderr) -> str:
    text = "".join(line for line in stderr.getvalue().splitlines(keepends=True)
                   if CASE_MARK not in line)   # our own bookkeeping, not the ranks' words
    return str(error) + (f"\n\nWhat the ranks wrote to stderr:\n{text}" if text else "")


# "[rank1]:[F1127 22:06:10.96 ProcessGroupGloo.cpp:1537] " and "[/path/to/pair.cc:553] "
_LOG_PREFIX = re.compile(r"^(\[rank\d+\]:)?\[[^\]]*\.(cpp|cc|h):\d+\]\s*")


def _shorten(text: str, limit: int = 200) -> str:
    first = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    first = _LOG_PREFIX.sub("", first)
    return first if len(first) <= limit else first[:limit - 3] + "..."


_TB_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>.+)$')
_STACK_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<name>.+)$')


def read_crash(error, nprocs: int) -> Optional[Crash]:
    """The root-cause rank's exception, split into case, type, message and the learner's line."""
    failure = error.failures.get(error.rank) if error.rank is not None else None
    if not failure:
        return None
    case, text = "", f"{failure.get('type', '')}: {failure.get('message', '')}"
    traceback = failure.get("traceback", "") or ""
    if failure.get("type") == LearnerCrash.__name__ and " :: " in failure.get("message", ""):
        case, text = failure["message"].split(" :: ", 1)
    elif failure.get("type") == "RankDied":
        case, native = _native_death(traceback)
        if native:
            text = f"NativeError: {native}"
    kind, _, message = text.partition(": ")
    return Crash(error.rank, nprocs, case, kind, message,
                 _learner_line(traceback, _TB_FRAME), traceback)


# "  what():  [enforce fail at /path/gloo/transport/tcp/pair.cc:456] op.preamble.length <= ..."
_NATIVE_WHAT = re.compile(r"what\(\):\s*(\[[^\]]*\]\s*)?(?P<message>.+)$")


def _native_death(stderr: str):
    """(the case the rank was running, the C++ exception that killed it) from its last stderr
    lines; "" for what is not there."""
    case = native = ""
    for line in stderr.splitlines():
        if line.startswith(CASE_MARK):
            case, native = line[len(CASE_MARK):].strip(), ""
        match = _NATIVE_WHAT.search(line)
        if match:
            native = match["message"].strip()
    return case, native


def _learner_line(text: str, frame: re.Pattern, newest_first: bool = False) -> Optional[str]:
    """The innermost frame of the learner's own code (not torch, not labkit) in a traceback."""
    found, lines = None, text.splitlines()
    for i, line in enumerate(lines):
        match = frame.match(line)
        if not match or _is_library(match["file"]):
            continue
        source = lines[i + 1].strip() if i + 1 < len(lines) and not frame.match(lines[i + 1]) \
            else ""
        found = f"line {match['line']} in {match['name']}" + (f": `{source}`" if source else "")
        if newest_first:
            return found
    return found


_LIBRARIES = tuple(os.path.abspath(p) for p in {
    os.path.dirname(labkit.__file__), sysconfig.get_paths()["stdlib"],
    sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})


def _is_library(path: str) -> bool:
    """Code the learner did not write: labkit, torch, the standard library, installed packages."""
    path = os.path.abspath(path)
    return (_TORCH_DIR in path or "site-packages" in path or "dist-packages" in path
            or path.startswith(_LIBRARIES) or path.startswith("<frozen"))


_WAITING_OPS = {"send", "recv", "isend", "irecv", "all_reduce", "broadcast", "reduce",
                "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
                "reduce_scatter_tensor", "reduce_scatter_single", "barrier", "all_to_all",
                "gather", "scatter", "batch_isend_irecv"}


def where_waiting(rank: int, stack: str) -> Wait:
    """Read a rank's stack (newest frame first, from faulthandler) into what it waited in."""
    op = None
    for line in stack.splitlines():
        match = _STACK_FRAME.match(line)
        if match and _TORCH_DIR in match["file"] and match["name"] in _WAITING_OPS:
            op = match["name"]
            break
    where = _learner_line(stack, _STACK_FRAME, newest_first=True)
    if op is None and where and ".wait()" in where:
        op = "wait"
    return Wait(rank, op, where)


def describe_hang(waits: list, nprocs: int, timeout: float) -> str:
    """One sentence on a deadlock, from where each unfinished rank waited."""
    if not waits:   # no stacks (a platform without SIGUSR1)
        return (f"the ranks were still running after {timeout:g} s: a deadlock (a send or "
                "collective that no other rank matches), or very slow code")
    stuck = {w.rank for w in waits}
    done = [r for r in range(nprocs) if r not in stuck]
    ops = {w.op for w in waits}
    example = next((w.where for w in waits if w.where), None)
    at = f" (at {example})" if example else ""
    if not done and ops <= {"recv", "irecv", "wait"} and "wait" not in ops:
        head = f"deadlock on {nprocs} ranks: every rank is waiting to receive{at}, so nobody sends"
    elif not done and ops == {"wait"}:
        head = (f"deadlock on {nprocs} ranks: every rank is waiting for a request to finish{at}; "
                "no send on one rank met a matching receive on another")
    elif not done and ops == {"send"}:
        head = (f"deadlock on {nprocs} ranks: every rank is waiting to send{at}; on gloo, "
                "send may not return until the receiver has posted its recv, so if every rank "
                "sends first, nobody receives")
    else:
        places = "; ".join(f"rank {w.rank} in {w.op or 'your code'}"
                           + (f" ({w.where})" if w.where else "") for w in waits)
        head = f"the ranks were still waiting for each other after {timeout:g} s: {places}"
        if done:
            head += (f"; rank(s) {', '.join(map(str, done))} had already returned: every rank "
                     "must make the same calls in the same order (each collective on every "
                     "rank, each send matched by a recv)")
    return head
