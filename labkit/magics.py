"""``%load_ext labkit``: the ``%ranks`` and ``%%ranks`` magics, ranks that stay between cells.

    %ranks start 4              4 ranks with a process group, kept until %ranks stop
    %%ranks                     the cell runs on every rank (its first line is the magic)
    %%ranks 0,2                 ... or on some ranks
    %ranks push f data          copy the notebook's f and data to every rank, by value
    values = %ranks pull x      [x on rank 0, x on rank 1, ...]
    %ranks status               each rank: idle or busy where, tensor bytes, last collective
    %ranks restart              fresh ranks, same settings (their state is lost)
    %ranks stop

This module parses and prints; ``labkit.launcher._session.RankSession`` does the work, with the
launcher's guarantees (docs/ranks.md).
"""
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from labkit.launcher._results import human_size
from labkit.launcher._session import RankSession
from labkit.launcher.errors import LaunchError

COMMANDS = ("start", "stop", "restart", "status", "push", "pull")


@magic_arguments()
@argument("command", choices=COMMANDS, help="what to do")
@argument("names", nargs="*", help="start: the number of ranks; push: names in the notebook; "
                                   "pull: one name on the ranks")
@argument("--backend", default="auto", help="start: auto, gloo or nccl")
@argument("--threads", type=int, default=None, help="start: torch threads per rank")
@argument("--timeout", type=float, default=60, help="start: seconds each cell may run (60)")
@argument("--device", default="auto", help="start: auto, cpu or cuda")
@argument("--debug", action="store_true", help="start: torch checks every collective across ranks")
@argument("--restart", action="store_true", help="start: stop running ranks first")
@argument("--ranks", default=None, help="push, pull: only these ranks, e.g. 0,2")
def _line_arguments(line):
    """%ranks start N | stop | restart | status | push NAME... | pull NAME"""


@magic_arguments()
@argument("ranks", nargs="?", default=None, help="the ranks to run the cell on, e.g. 0,2 (all)")
@argument("--timeout", type=float, default=None, help="seconds this cell may run")
def _cell_arguments(line):
    """%%ranks [RANKS] [--timeout S]"""


@magics_class
class RanksMagics(Magics):
    """The ``%ranks`` magics of one kernel, and its one ``RankSession``."""

    def __init__(self, shell):
        super().__init__(shell)
        self.session = RankSession()

    @line_cell_magic
    def ranks(self, line, cell=None):
        """Persistent ranks (docs/ranks.md).

        %ranks start N [--backend B] [--threads T] [--timeout S] [--device D] [--debug] [--restart]
        %%ranks [RANKS] [--timeout S]      run the cell on every rank, or on RANKS (e.g. 0,2)
        %ranks push NAME ... [--ranks R]   copy the notebook's objects to the ranks
        %ranks pull NAME [--ranks R]       a list of NAME's value on each rank
        %ranks status | restart | stop
        """
        __tracebackhide__ = True  # an error shows its message, not these frames
        try:
            if cell is not None:
                return self._cell(line, cell)
            return self._line(line)
        except (LaunchError, KeyboardInterrupt, SyntaxError) as error:
            raise error.with_traceback(None) from None  # the message says it all
        except (RuntimeError, ValueError) as exc:  # no ranks, a bad option: say what to do
            raise UsageError(str(exc)) from None

    def _cell(self, line, cell):
        __tracebackhide__ = True
        args = parse_argstring(_cell_arguments, line)
        ranks = self._ranks(args.ranks)
        self.session.run_cell(cell, ranks=ranks, timeout=args.timeout)

    def _line(self, line):
        __tracebackhide__ = True
        args = parse_argstring(_line_arguments, line)
        command, names = args.command, args.names
        if command == "start":
            if len(names) != 1 or not names[0].isdigit():
                raise UsageError("how many ranks? e.g. %ranks start 4")
            if args.restart:
                self.session.stop()
            self.session.start(int(names[0]), backend=args.backend, threads=args.threads,
                               timeout=args.timeout, device=args.device, debug=args.debug)
        elif command == "stop":
            self.session.stop()
            print("labkit ranks: stopped", flush=True)
        elif command == "restart":
            self.session.restart()
            print(f"labkit ranks: {self.session.nprocs} fresh rank(s) ready", flush=True)
        elif command == "status":
            for answer in self.session.status():
                print(describe_status(answer), flush=True)
        elif command == "push":
            if not names:
                raise UsageError("which names? e.g. %ranks push model batch")
            missing = [n for n in names if n not in self.shell.user_ns]
            if missing:
                raise UsageError(f"not defined in the notebook: {', '.join(missing)}")
            self.session.push({n: self.shell.user_ns[n] for n in names},
                              ranks=self._ranks(args.ranks))
        elif command == "pull":
            if len(names) != 1:
                raise UsageError("pull one name, e.g. values = %ranks pull x")
            return self.session.pull(names[0], ranks=self._ranks(args.ranks))

    def _ranks(self, text):
        if text is None:
            return None
        if not self.session.running:
            raise UsageError("no ranks are running: start them with %ranks start N")
        return parse_ranks(text, self.session.nprocs)


def parse_ranks(text: str, nprocs: int) -> list:
    """"0,2" or "1-3" or "all" -> sorted rank numbers; a ValueError that says what to write."""
    if text in (None, "", "all"):
        return list(range(nprocs))
    ranks = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            ranks.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"{text!r} is not a list of ranks; write e.g. 0,2 or 1-3.") from None
    if not ranks or min(ranks) < 0 or max(ranks) >= nprocs:
        raise ValueError(f"ranks {text!r}: the session has ranks 0 to {nprocs - 1}.")
    return sorted(ranks)


def describe_status(answer: dict) -> str:
    """One line for one rank of ``%ranks status``."""
    head = f"[rank {answer['rank']}] pid {answer['pid']}, "
    if answer.get("busy") is None:
        return head + "no answer within a few seconds"
    if not answer["busy"]:
        state = "idle"
    elif answer.get("line"):
        cell = answer["cell"].strip("<>").removeprefix("ranks ")
        state = f"busy in {cell}, line {answer['line']}: {answer['source']}"
        if answer.get("function") not in (None, "<module>"):
            state += f" (in {answer['function']})"
    else:
        state = f"busy in {answer.get('function') or 'a command'}"
    parts = [state]
    if answer.get("tensors") is not None:  # a MemoryTracer is inside its ``with``
        parts.append("tensors " + (", ".join(f"{k} {human_size(v)}"
                                             for k, v in answer["tensors"].items() if v) or "0 B"))
    parts.append(f"last collective: {answer.get('last_collective') or 'none recorded'}")
    return head + "; ".join(parts)


def load_ipython_extension(ipython) -> None:
    ipython.register_magics(RanksMagics)


def unload_ipython_extension(ipython) -> None:
    magics = ipython.magics_manager.registry.get("RanksMagics")
    if magics is not None:
        magics.session.stop()
