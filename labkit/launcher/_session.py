"""Persistent ranks (``%%ranks``): start N ranks once, run cells on them, look inside, stop.

``labkit.launch`` runs one function on fresh ranks. A ``RankSession`` keeps its ranks, their
process group and each rank's namespace from cell to cell, a REPL per rank, with the launch's
guarantees, because it is built from the launch's own pieces: the placement plan, the loopback-only
store (held open for the session), ranks forked by the fork server with torchrun's environment,
framed cloudpickle messages on private pipes (commands on the rank's stdin, which stays its
lifeline; replies on its result pipe), the watch loop's rank-tagged output, SIGUSR1 stacks, and
the collective record that the hang doctor reads. The rank's side is ``_rank_loop``.

What happens when a cell goes wrong (docs/ranks.md):
- a rank raises: the others get ``GRACE_S`` to finish the cell. If they do, the error names the
  root cause and every rank keeps its state. If they are still busy (most often waiting in a
  collective for the rank that failed), or an error says a peer was lost (the process group is
  broken), every rank is stopped and fresh ones start: the error says the state was lost, and why;
- a rank dies: the same restart;
- the cell's timeout: the hang doctor's sentence and each busy rank's stack, then SIGINT; ranks
  that return keep their state; if one is still busy ``INTERRUPT_WAIT_S`` later (a rank inside a
  collective sees SIGINT only when the collective returns) the session restarts;
- the stop button: the same as a timeout, without the stacks; then ``KeyboardInterrupt``, so that
  Jupyter cancels the cells queued after this one (it does so only for a cell that failed).
"""
import atexit
import linecache
import os
import select
import signal
import sys
import time
import weakref

import cloudpickle

from labkit.launcher import _collective_record, _hang_doctor, _pickling
from labkit.launcher._framing import frame
from labkit.launcher._launch import (_common_environment, _notebook_cells, _send_job,
                                     _torchrun_variables, _where)
from labkit.launcher._platform import (default_start_method, refuse_unsupported_platform,
                                       threads_per_rank, usable_cores)
from labkit.launcher._ranks import start_rank, stop_and_reap
from labkit.launcher._rendezvous import LoopbackStore
from labkit.launcher._results import DEFAULT_MAX_RESULT_BYTES
from labkit.launcher._session_watch import SessionWatch
from labkit.placement import plan
from labkit.launcher.errors import (LaunchError, LaunchTimeout, failure_message, is_peer_loss,
                                    timeout_hint, waiting_in)

GRACE_S = 3.0            # after a rank raised, the others' time to finish the cell
INTERRUPT_WAIT_S = 3.0   # after SIGINT, the time a busy rank gets to return
STATUS_WAIT_S = 5.0      # for every rank's status answer
START_TIMEOUT_S = 60.0   # at least this long for starting (a cold fork server imports torch)
COLLECTIVE_TIMEOUT_S = 1800  # torch's own default: the kernel stops hung cells long before
START_METHODS = ("forkserver", "spawn")
LOST_STATE = ("Every rank was stopped and {n} fresh ranks were started: the variables, models "
              "and tensors that earlier cells made on the ranks are gone. Run the cells that "
              "set them up again (and %ranks push what they need).")

_SESSIONS = weakref.WeakSet()  # stopped when the kernel exits (the lifeline covers a kill)


@atexit.register
def _stop_all_sessions() -> None:
    for session in list(_SESSIONS):
        session.stop()


def _rank_list(ranks) -> str:
    return ", ".join(map(str, ranks))


def _between_cells(diagnosis: str) -> str:
    """The hang doctor speaks of a launch's function; a rank of a session that is not running
    the cell is idle, waiting for the next."""
    return (diagnosis.replace("has returned from the function", "is idle")
            .replace("returned from the function", "is idle"))


def _hang_hint(stacks: dict, subset: bool) -> str:
    """The launch's advice when ranks wait in torch.distributed; else: the cell's own code."""
    if not any(waiting_in(stack) for stack in stacks.values()):
        return ("No rank was waiting in torch.distributed: the cell's own code was still running "
                "(a loop, a sleep, a long computation). Give it more time with "
                "%%ranks --timeout S.")
    hint = timeout_hint(stacks).replace("Run again with debug=True",
                                        "Start the ranks with --debug")
    if subset:
        hint += (" A collective needs every rank of its group: a cell that runs one on some "
                 "ranks only (%%ranks 0,2) waits for the others forever.")
    return hint


class RankSession:
    """N ranks that keep their process group and namespaces between cells (``%%ranks``)."""

    def __init__(self):
        self.ranks, self.watch, self.store, self.settings = [], None, None, None
        self.record_folder = None  # each rank notes the collectives it enters there
        self.cells = 0         # cells run so far, for the file names "<ranks cell N>"
        self.requests = 0      # commands sent so far, to pair replies with them
        self.answers = {}      # request id -> {rank: reply}

    @property
    def running(self) -> bool:
        return bool(self.ranks)

    @property
    def nprocs(self) -> int:
        return len(self.ranks)

    @property
    def pids(self) -> list:
        return [r.pid for r in self.ranks]

    # ---- starting and stopping ----

    def start(self, nprocs: int, backend: str = "auto", threads: int | None = None,
              timeout: float = 60, device: str = "auto", start_method: str | None = None,
              debug: bool = False, quiet: bool = False) -> None:
        """Start ``nprocs`` ranks with a process group; ``timeout`` is each cell's default.

        debug: torch's checks of every collective across ranks (TORCH_DISTRIBUTED_DEBUG=DETAIL),
        so mismatched collectives fail at once instead of hanging."""
        if self.running:
            raise RuntimeError(f"{self.nprocs} ranks are already running. Stop them first "
                               "(%ranks stop), or start again with --restart.")
        if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
            raise ValueError(f"the number of ranks must be a whole number >= 1, got {nprocs!r}.")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a whole number >= 1, got {threads!r}.")
        if start_method is not None and start_method not in START_METHODS:
            raise ValueError(f"start_method={start_method!r}; use one of "
                             f"{', '.join(START_METHODS)}.")
        refuse_unsupported_platform()
        start_method, why = (start_method, "as asked") if start_method else default_start_method()
        placement = plan(nprocs, backend, device)
        self.settings = {"nprocs": nprocs, "placement": placement, "timeout": timeout,
                         "threads": threads or threads_per_rank(nprocs),
                         "start_method": start_method, "debug": debug}
        self._start()
        if not quiet:
            print(f"labkit ranks: {nprocs} rank(s) ready, backend {placement.backend}, tensors on "
                  f"{_where(placement)}, {self.settings['threads']} thread(s) per rank "
                  f"({usable_cores()} usable cores), start method {start_method} ({why}); each "
                  f"cell may run {timeout:g} s", flush=True)

    def _start(self) -> None:
        s = self.settings
        nprocs, placement = s["nprocs"], s["placement"]
        collective_timeout = self._collective_timeout()
        deadline = time.monotonic() + max(s["timeout"], START_TIMEOUT_S)
        job = {"session": True, "backend": placement.backend, "devices": placement.devices,
               "threads": s["threads"], "collective_timeout": collective_timeout,
               "linecache": _notebook_cells(), "sys_path": list(sys.path),
               "cwd": os.getcwd(), "max_result_bytes": DEFAULT_MAX_RESULT_BYTES}
        common_env = _common_environment(s["threads"], debug=s["debug"])
        try:
            self.record_folder = _collective_record.create_folder()
            job[_collective_record.JOB_KEY] = self.record_folder
            self.store = LoopbackStore(nprocs, timeout_s=collective_timeout)
            for rank in range(nprocs):
                env = dict(common_env, **_torchrun_variables(rank, nprocs, self.store.env))
                self.ranks.append(start_rank(rank, s["start_method"], env, deadline))
                _send_job(self.ranks[-1], cloudpickle.dumps(dict(job, env=env)), deadline)
            self.watch = SessionWatch(self.ranks)
            self._wait_until_ready(deadline)
        except BaseException:
            self._tear_down()
            raise
        _SESSIONS.add(self)

    def _collective_timeout(self) -> float:
        """How long a collective may wait inside a rank: longer than any cell may run."""
        return max(self.settings["timeout"], COLLECTIVE_TIMEOUT_S) + 10

    def _wait_until_ready(self, deadline: float) -> None:
        ready = self.answers.setdefault("ready", {})
        while len(ready) < self.nprocs and not self.watch.dead:
            if time.monotonic() >= deadline:
                late = [r for r in range(self.nprocs) if r not in ready]
                raise LaunchTimeout(f"TIMEOUT: rank(s) {_rank_list(late)} had not joined the "
                                    "process group in time. All ranks have been stopped.",
                                    rank=late[0])
            self._pump(0.1)
        failures = {r: a for r, a in ready.items() if a["status"] != "ok"}
        failures.update(self.watch.dead)
        if failures:
            message, cause = failure_message(failures, self.nprocs)
            raise LaunchError("The ranks could not start.\n" + message, rank=cause,
                              failures=failures)

    def stop(self) -> None:
        """Stop every rank and reap it; close the store. Safe to call twice."""
        _SESSIONS.discard(self)
        self._tear_down()

    def _tear_down(self) -> None:
        stop_and_reap(self.ranks)
        if self.watch is not None:
            self.watch.close()
        for rank in self.ranks:
            rank.close_pipes()
        if self.store is not None:
            self.store.close()
        _collective_record.remove_folder(self.record_folder)
        self.ranks, self.watch, self.store, self.answers = [], None, None, {}
        self.record_folder = None

    def restart(self) -> None:
        """Fresh ranks with the same settings (number, backend, threads, timeout)."""
        if self.settings is None:
            raise RuntimeError("no ranks were started yet: %ranks start N")
        self.stop()
        self._start()

    def _restart_after(self, message: str) -> str:
        """Restart; return ``message`` with what happened to the ranks' state."""
        self._flush_output(range(self.nprocs))  # what the old ranks wrote last
        try:
            self.restart()
        except BaseException as exc:  # noqa: BLE001 - report both: the failure and the restart's
            self.stop()
            return (f"{message}\n\nEvery rank was stopped, and starting fresh ones failed too "
                    f"({type(exc).__name__}: {exc}). Start them again with %ranks start.")
        return f"{message}\n\n{LOST_STATE.format(n=self.nprocs)}"

    # ---- commands ----

    def run_cell(self, code: str, ranks=None, timeout: float | None = None) -> dict:
        """Run ``code`` on ``ranks`` (default: all); print their output live and each rank's
        last-expression value; return {rank: that value's summary (text) or None}."""
        __tracebackhide__ = True  # IPython: show the error, not labkit's frames
        self._require_running()
        if timeout is not None and not 0 < timeout <= self._collective_timeout() - 10:
            raise ValueError(f"a cell's timeout must be between 0 and "
                             f"{self._collective_timeout() - 10:g} s (the ranks' collectives give "
                             "up after that); start the ranks with a larger --timeout.")
        self.cells += 1
        filename = f"<ranks cell {self.cells}>"
        from labkit.launcher._rank_loop import split_cell
        split_cell(code, filename)  # a SyntaxError is shown once, here, not by every rank
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        replies = self._ask("run", {"code": code, "filename": filename}, ranks,
                            timeout or self.settings["timeout"], f"cell {self.cells}")
        return {rank: reply.get("value") for rank, reply in replies.items()}

    def push(self, values: dict, ranks=None) -> None:
        """Copy ``values`` (name -> object) into each rank's namespace, by value (cloudpickle)."""
        __tracebackhide__ = True
        self._require_running()
        try:
            data = _pickling.dumps(dict(values))
        except Exception as exc:
            raise ValueError(f"cannot send {', '.join(values)} to the ranks: {type(exc).__name__}:"
                             f" {exc}. Open files, locks, sockets and generators cannot be copied;"
                             " create them on the ranks instead.") from None
        self._ask("push", {"values": data, "linecache": _notebook_cells()}, ranks,
                  self.settings["timeout"], "push")

    def pull(self, name: str, ranks=None) -> list:
        """``name``'s value on each rank (tensors as CPU tensors), as a list by rank."""
        __tracebackhide__ = True
        self._require_running()
        replies = self._ask("pull", {"name": name}, ranks, self.settings["timeout"], f"pull {name}")
        return [cloudpickle.loads(replies[r]["data"]) for r in sorted(replies)]

    def status(self) -> list:
        """Per rank: pid, idle or busy (cell, line, source), live tensor bytes by category (a
        ``MemoryTracer`` inside its ``with``), the last collective entered. Never waits long."""
        self._require_running()
        request = self._new_request()
        self._send(request, "status", {}, range(self.nprocs))
        deadline = time.monotonic() + STATUS_WAIT_S
        answers = self.answers[request]
        while len(answers) < self.nprocs and time.monotonic() < deadline:
            self._pump(0.05)
        self.answers.pop(request, None)
        collectives = _collective_record.read_all(self.record_folder, self.nprocs)
        return [dict(answers.get(r) or {"rank": r, "pid": self.ranks[r].pid, "busy": None},
                     last_collective=_hang_doctor.last_entered(collectives.get(r)))
                for r in range(self.nprocs)]

    # ---- sending and waiting ----

    def _require_running(self) -> None:
        if not self.running:
            raise RuntimeError("no ranks are running: start them with %ranks start N "
                               "(e.g. %ranks start 4).")

    def _pump(self, wait_s: float) -> None:
        self.watch.pump(wait_s)
        while self.watch.replies:
            reply = self.watch.replies.popleft()
            answers = self.answers.get("ready" if reply["kind"] == "ready" else reply["id"])
            if answers is not None:  # replies to a request given up on are dropped
                answers[reply["rank"]] = reply

    def _new_request(self) -> int:
        self.requests += 1
        self.answers[self.requests] = {}  # rank -> reply, filled by _pump
        return self.requests

    def _send(self, request: int, op: str, command: dict, ranks) -> None:
        data = frame(cloudpickle.dumps(dict(command, op=op, id=request)))
        deadline = time.monotonic() + max(self.settings["timeout"], 10)
        for rank in ranks:
            self._write(self.ranks[rank], data, deadline)

    def _write(self, process, data: bytes, deadline: float) -> None:
        """Write a command without blocking: read replies meanwhile, so neither side waits on
        the other's full pipe."""
        view = memoryview(data)
        while view and process.stdin_w is not None:
            if time.monotonic() >= deadline:
                raise LaunchTimeout(f"rank {process.rank} stopped reading commands.",
                                    rank=process.rank)
            if not select.select([], [process.stdin_w], [], 0.05)[1]:
                self._pump(0)
                continue
            try:
                view = view[os.write(process.stdin_w, view):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                return  # the rank is gone: the watch reports it

    def _ask(self, op: str, command: dict, ranks, timeout: float, what: str) -> dict:
        """Send a command to ``ranks``, wait for every reply, deal with what went wrong."""
        __tracebackhide__ = True
        targets = list(range(self.nprocs)) if ranks is None else sorted(ranks)
        self._pump(0)
        if self.watch.dead:  # a rank ended between cells (e.g. killed for its memory)
            self._raise_dead(what, before=True)
        request = self._new_request()
        answers = self.answers[request]
        try:
            self._send(request, op, command, targets)
            self._wait(request, targets, timeout, what)
        except KeyboardInterrupt:
            self._on_interrupt(request, targets, what)
        finally:
            self.answers.pop(request, None)
        self._flush_output(targets)
        self._print_values(answers)
        failures = {r: a for r, a in answers.items() if a["status"] != "ok"}
        if failures:
            self._raise_failures(failures, what)
        return answers

    def _wait(self, request: int, targets: list, timeout: float, what: str) -> None:
        __tracebackhide__ = True
        answers = self.answers[request]
        deadline, first_failure = time.monotonic() + timeout, None
        while len(answers) < len(targets):
            now = time.monotonic()
            if self.watch.dead:
                self._raise_dead(what)
            busy = [r for r in targets if r not in answers]
            if first_failure is not None and now >= first_failure + GRACE_S:
                self._raise_failures({r: a for r, a in answers.items() if a["status"] != "ok"},
                                     what, busy=busy)
            if now >= deadline:
                self._raise_timeout(request, busy, timeout, what, subset=len(targets) < self.nprocs)
            self._pump(min(0.1, deadline - now))
            if first_failure is None and any(a["status"] != "ok" for a in answers.values()):
                first_failure = time.monotonic()

    def _interrupt(self, request: int, busy: list) -> list:
        """SIGINT to each busy rank; the ranks still busy ``INTERRUPT_WAIT_S`` later."""
        for rank in busy:
            self.ranks[rank].signal(signal.SIGINT)
        answers = self.answers[request]
        deadline = time.monotonic() + INTERRUPT_WAIT_S
        while time.monotonic() < deadline and any(r not in answers for r in busy) \
                and not self.watch.dead:
            self._pump(0.05)
        return [r for r in busy if r not in answers]

    def _on_interrupt(self, request: int, targets: list, what: str) -> None:
        __tracebackhide__ = True
        busy = [r for r in targets if r not in self.answers[request]]
        try:
            still_busy = self._interrupt(request, busy)
        except KeyboardInterrupt:  # the stop button again: do not wait any longer
            still_busy = busy
        lost = self._why_ranks_cannot_go_on(request, still_busy)
        if lost:
            message = self._restart_after(f"Interrupted {what}: {lost}")
        else:
            self._flush_output(targets)
            message = (f"Interrupted {what} on rank(s) {_rank_list(busy)}; every rank is still "
                       "running and keeps its variables.")
        raise KeyboardInterrupt(message) from None

    def _why_ranks_cannot_go_on(self, request: int, still_busy: list) -> str | None:
        """After an interrupt: why the session must restart, in words; None when it need not."""
        if still_busy:
            return (f"rank(s) {_rank_list(still_busy)} did not return within "
                    f"{INTERRUPT_WAIT_S:g} s of an interrupt (a rank waiting inside a collective "
                    "sees it only when the collective returns).")
        if self.watch.dead:
            return f"rank(s) {_rank_list(sorted(self.watch.dead))} ended."
        if self._broken(self.answers[request]):
            return "a rank lost its connection to a peer, so the process group cannot be used."
        return None

    def _flush_output(self, ranks) -> None:
        for rank in ranks:
            self.watch.flush_output(rank)

    @staticmethod
    def _broken(answers: dict) -> bool:
        """An error that says a peer was lost: the process group cannot be used any more."""
        return any(a["status"] == "error" and is_peer_loss(a) for a in answers.values())

    def _busy_lines(self, busy: list) -> list:
        """Where each busy rank is, in one line each, from the ranks' own status answers."""
        lines = []
        for answer in (a for a in self.status() if a["rank"] in busy):
            if answer.get("line"):
                cell = answer["cell"].strip("<>").removeprefix("ranks ")
                where = f"{cell}, line {answer['line']}: {answer['source']}"
            else:
                where = answer.get("function") or "a command"
            lines.append(f"  rank {answer['rank']}: busy in {where}")
        return lines

    def _raise_failures(self, failures: dict, what: str, busy=()) -> None:
        __tracebackhide__ = True
        message, cause = failure_message(failures, self.nprocs)
        if busy:
            lines = [message, "", f"Rank(s) {_rank_list(busy)} were still running {what} "
                     f"{GRACE_S:g} s after rank {cause} failed, most likely waiting for it in "
                     "a collective:"] + self._busy_lines(busy)
            message = self._restart_after("\n".join(lines))
        elif self._broken(failures):
            message = self._restart_after(message + "\n\nThe process group lost a rank's "
                                          "connection, so it cannot be used any more.")
        else:
            message += ("\n\nThe other ranks finished; every rank is still running and keeps "
                        f"its variables (rank {cause}'s as the error left them).")
        raise LaunchError(message, rank=cause, failures=failures)

    def _raise_dead(self, what: str, before: bool = False) -> None:
        __tracebackhide__ = True
        dead = dict(self.watch.dead)
        message, cause = failure_message(dead, self.nprocs)
        if before:
            message = f"A rank had ended since the last command, so {what} did not run.\n" + message
        raise LaunchError(self._restart_after(message), rank=cause, failures=dead)

    def _raise_timeout(self, request: int, busy: list, timeout: float, what: str,
                       subset: bool) -> None:
        __tracebackhide__ = True
        collectives = _collective_record.read_all(self.record_folder, self.nprocs)
        stacks = self.watch.stacks_of(busy)
        lines = [f"TIMEOUT: {what} was still running on rank(s) {_rank_list(busy)} after "
                 f"{timeout:g} s.", ""]
        diagnosis = _between_cells(_hang_doctor.diagnose(collectives, self.nprocs, busy))
        if diagnosis:
            lines += [diagnosis, ""]
        lines += ["Where each of them was (most recent call first):"]
        for rank in busy:
            lines += [f"[rank {rank}]", stacks.get(rank) or "  (no stack: the rank did not answer)"]
        lines += ["", _hang_hint(stacks, subset)]
        message = "\n".join(lines)
        lost = self._why_ranks_cannot_go_on(request, self._interrupt(request, busy))
        if lost:
            message = self._restart_after(f"{message}\n\nThen {lost}")
        else:
            self._flush_output(busy)
            message += ("\n\nThe ranks were interrupted (KeyboardInterrupt in the cell) and "
                        "returned: every rank is still running and keeps its variables.")
        raise LaunchTimeout(message, rank=busy[0], stacks=stacks, collectives=collectives)

    def _print_values(self, answers: dict) -> None:
        for rank in sorted(answers):
            value = answers[rank].get("value")
            if value is not None:
                prefix = f"[rank {rank}] Out: "
                print(prefix + value.replace("\n", "\n" + " " * len(prefix)), flush=True)

