import os
import time

import psutil
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def fork_server_pid():
    from labkit.launcher import _server
    return _server.server_session()


def _in_session(process, session) -> bool:
    try:
        return session is not None and os.getsid(process.pid) == session
    except OSError:
        return False


def leftover_processes(wait_s: float = 3.0) -> list:
    """Processes below this one other than the idle fork server (and the successor it forked to
    import the extras: both stay in the server's session, ranks leave it), after letting exits
    settle."""
    deadline = time.monotonic() + wait_s
    while True:
        server = fork_server_pid()
        left = [p for p in psutil.Process().children(recursive=True)
                if not _in_session(p, server) and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.fixture
def no_leftovers():
    """Fails the test if any rank (or anything it started) outlives the launch."""
    yield
    left = leftover_processes()
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


def pytest_terminal_summary(terminalreporter):
    """How long each notebook took to run, from tests that call
    ``record_property("notebook_run_s", seconds)``."""
    rows = sorted({(report.nodeid, value)
                   for reports in terminalreporter.stats.values() for report in reports
                   if getattr(report, "when", None) == "call"
                   for name, value in getattr(report, "user_properties", ())
                   if name == "notebook_run_s"})
    if rows:
        terminalreporter.section("notebook run times")
        for nodeid, seconds in rows:
            terminalreporter.write_line(f"{seconds:7.1f} s  {nodeid}")
