"""The launcher: run a function defined in a notebook on N ranks, and never hang.

Public names (also on ``labkit``): ``launch``, ``shutdown``, ``warm_up``, ``LaunchError``,
``LaunchTimeout``. How the pieces fit is in docs/launcher.md and docs/architecture.md:

    _launch       launch(): checks the call, starts the ranks, watches them, returns or raises
    _watch        the watch loop: every rank's pipes, deadlines, stacks of stuck ranks
    _output       rank output in the cell: whole tagged lines, progress bars live
    _results      a rank's result on its way back: size limit, its own time, the reader
    _ranks        starting (fork server or spawn), signalling and reaping rank processes
    _server       the client of the warm fork server: prestart, fork_rank, warm_up, shutdown
    _forkserver   the fork server process itself
    _worker       what runs inside a rank
    _rendezvous   the loopback-only store the ranks meet at
    _framing      length-prefixed messages on the private pipes
    _pickling     cloudpickle that keeps file names, for tracebacks with the notebook's lines
    _platform     cores, threads per rank, loopback interface, default start method
    _torchrun     start_method="torchrun"
    _session      RankSession: persistent ranks for the %ranks / %%ranks magics (labkit.magics)
    _session_watch  the watch loop of a session: replies instead of a result, stacks to the cell
    _rank_loop    what a persistent rank runs: commands in, cells in its own namespace, replies
    errors        LaunchError, LaunchTimeout, the root cause, readable stacks
"""
from labkit.launcher._launch import launch
from labkit.launcher._platform import usable_cores
from labkit.launcher._server import prestart, shutdown, warm_up
from labkit.launcher._session import RankSession
from labkit.launcher.errors import LaunchError, LaunchTimeout

__all__ = ["launch", "shutdown", "warm_up", "prestart", "LaunchError", "LaunchTimeout",
           "usable_cores", "RankSession"]
