"""What the GPU tests share: time limits, where things are, a command run in the background."""
import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"

LAUNCH_TIMEOUT = 90   # s for one labkit.launch: each rank creates a CUDA context (a few s)
CHECK_TIMEOUT = 60    # s per launch inside a check (the checks' default, 10-20 s, is for CPUs)
BENCH_TIMEOUT = 240   # s for bench/run_all.py --quick (about 200 s on a 2-core CPU machine)
HAVE_PYTEST_TIMEOUT = importlib.util.find_spec("pytest_timeout") is not None


def timeout(seconds: float):
    """``pytest.mark.timeout(seconds)`` where pytest-timeout is installed; else nothing (the
    launches' own ``timeout=`` and the subprocesses' ``timeout=`` bound every test)."""
    if HAVE_PYTEST_TIMEOUT:
        return pytest.mark.timeout(seconds)
    return lambda test: test


def gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class Background:
    """A command run in a session of its own, its output in ``log``: ``start()`` now, ``wait()``
    later (``wait()`` starts it if nothing did). ``skip_reason``: when it cannot run here,
    ``wait()`` skips the test with that reason instead."""

    def __init__(self, command, log: Path, timeout_s: float, skip_reason=None, **popen):
        self.command, self.log, self.timeout_s, self.popen = command, log, timeout_s, popen
        self.skip_reason, self.process = skip_reason, None

    def start(self):
        if self.process is None and self.skip_reason is None:
            self._file = open(self.log, "w")
            self.started = time.monotonic()
            self.process = subprocess.Popen(self.command, stdout=self._file,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, **self.popen)
        return self

    def wait(self):
        """(exit status, or None if it ran past its time; its output)."""
        if self.skip_reason is not None:
            pytest.skip(self.skip_reason)
        self.start()
        left = self.timeout_s - (time.monotonic() - self.started)
        try:
            returncode = self.process.wait(timeout=max(1.0, left))
        except subprocess.TimeoutExpired:
            self.stop()
            returncode = None
        self._file.close()
        output = self.log.read_text(errors="replace")
        if returncode is None:
            output += f"\n[stopped after {self.timeout_s:.0f} s]"
        return returncode, output

    def stop(self):
        """Kill it and everything in its session (labkit's ranks and servers leave on their own
        when their launcher goes)."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
