"""``launch(..., start_method="torchrun")``: the same function under real torchrun.

For comparison and authenticity: torchrun's own agent does the rendezvous and starts, watches and
stops the ranks. The job and each rank's outcome travel as files in a private 0700 folder; output
is streamed as torchrun prints it. Slower to start (an agent plus one fresh interpreter per rank).

Nothing listens on the network. ``torchrun --standalone`` would host its rendezvous store, and a
second store for the ranks, on every interface, and its agent unpickles what it reads from the
first. So we give torchrun what ``--standalone`` gives it (one node, the c10d rendezvous, a fresh
run id) with the store as a file in the private folder (``store_type=file``), turn off the second
store (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) and let the ranks join the launcher's loopback
store as clients.

No rank outlives the launch: each rank watches a lifeline, a FIFO in the folder that the launcher
holds open for writing, and exits when it closes (the launcher's process may die too). To stop a
launch, torchrun gets SIGTERM, so its agent stops its ranks; SIGKILL follows after a grace period.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import cloudpickle
import psutil

from labkit.launcher import _collective_record, _hang_doctor
from labkit.launcher._rendezvous import LOOPBACK, LoopbackStore
from labkit.launcher.errors import LaunchError, LaunchTimeout, failure_message

STOP_GRACE_S = 5.0  # after SIGTERM, how long torchrun gets to stop its ranks before SIGKILL
KILL_WAIT_S = 10.0  # how long a SIGKILLed process may take to disappear
LIFELINE = "lifeline"


class Lifeline:
    """A FIFO the launcher holds open for writing; its readers see EOF once the launcher lets go.

    The kernel closes the descriptor when the launcher's process dies, however it dies.
    """

    def __init__(self, folder: str):
        path = os.path.join(folder, LIFELINE)
        os.mkfifo(path, 0o600)
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # so opening to write does not block
        self._fd = os.open(path, os.O_WRONLY)
        os.close(reader)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_lifeline(folder: str) -> int:
    """A rank's read end of the lifeline. Reading it gives EOF at once if the launcher is gone."""
    fd = os.open(os.path.join(folder, LIFELINE), os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    return fd


def torchrun_command(folder: str, nprocs: int) -> list:
    """What ``--standalone`` sets, with the rendezvous store as a file in the private folder."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
            f"--nproc-per-node={nprocs}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={os.path.join(folder, 'rendezvous')}", "--rdzv-conf=store_type=file",
            f"--rdzv-id={os.path.basename(folder)}", f"--local-addr={LOOPBACK}",
            f"--log-dir={os.path.join(folder, 'torchrun')}",
            "-m", "labkit.launcher._worker", folder]


def agent_environment(env: dict, store: LoopbackStore) -> dict:
    """The launch's environment, less the options that would make torchrun listen on a port."""
    env = dict(env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # no second store for the ranks
    env.pop("TORCHELASTIC_HEALTH_CHECK_PORT", None)  # no health-check server
    if "LABKIT_FILE_STORE" in store.env:  # torch without loopback TCP stores: a file for the ranks
        env["LABKIT_FILE_STORE"] = store.env["LABKIT_FILE_STORE"]
    return env


def _check_platform() -> None:
    if not hasattr(os, "mkfifo"):
        raise ValueError("start_method='torchrun' needs Linux or macOS (a named pipe makes sure "
                         "no rank outlives the notebook); use the default start method.")


def launch_with_torchrun(job: dict, nprocs: int, timeout: float, env: dict) -> list:
    """Run the job on ``nprocs`` ranks under torchrun; the same results and errors as launch()."""
    _check_platform()
    folder = tempfile.mkdtemp(prefix="labkit-torchrun-")
    os.chmod(folder, 0o700)
    records = os.path.join(folder, "collectives")   # each rank's collective record
    try:
        os.mkdir(records, 0o700)
        with LoopbackStore(nprocs, timeout_s=timeout + 10) as store, Lifeline(folder) as lifeline:
            with open(os.path.join(folder, "job.pkl"), "wb") as f:
                f.write(cloudpickle.dumps(dict(job, store_address=store.address,
                                               **{_collective_record.JOB_KEY: records})))
            try:
                exit_code = _run_torchrun(torchrun_command(folder, nprocs),
                                          agent_environment(env, store), lifeline, timeout)
            except LaunchTimeout as timed_out:
                raise _diagnosed(timed_out, folder, records, nprocs) from None
        return _results(folder, nprocs, exit_code)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _diagnosed(timed_out: LaunchTimeout, folder: str, records: str, nprocs: int) -> LaunchTimeout:
    """The timeout, with the hang doctor's sentence after its first line (ranks that wrote no
    result file count as unfinished)."""
    collectives = _collective_record.read_all(records, nprocs)
    unfinished = [r for r in range(nprocs)
                  if not os.path.exists(os.path.join(folder, f"result-{r}.pkl"))]
    diagnosis = _hang_doctor.diagnose(collectives, nprocs, unfinished)
    message = str(timed_out) + (f"\n\n{diagnosis}" if diagnosis else "")
    return LaunchTimeout(message, rank=unfinished[0] if unfinished else None,
                         collectives=collectives)


def _stream(pipe, muted: threading.Event) -> None:
    """Print torchrun's output line by line, until the launcher stops it (then it is noise)."""
    for line in iter(pipe.readline, b""):
        if not muted.is_set():
            print(line.decode("utf-8", errors="replace").rstrip("\n"), flush=True)


def _run_torchrun(command: list, env: dict, lifeline: Lifeline, timeout: float) -> int:
    """Run torchrun until it exits or ``timeout`` passes; stop it and every rank on any error."""
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    muted = threading.Event()
    reader = threading.Thread(target=_stream, args=(agent.stdout, muted), daemon=True)
    reader.start()
    try:
        return agent.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LaunchTimeout(f"TIMEOUT: torchrun was still running after {timeout:g} s; it and "
                            "its ranks have been stopped. (labkit.launch's default start "
                            "method shows where each rank waited.)") from None
    finally:
        if agent.poll() is None:  # the timeout, the stop button or any other error
            muted.set()  # torchrun's traceback of the SIGTERM we send would only confuse
            _stop(agent, lifeline)
        lifeline.close()  # any rank still running exits now
        reader.join(timeout=5)
        if not reader.is_alive():  # else a process still holds the pipe; leave it to the reader
            agent.stdout.close()


def _stop(agent: subprocess.Popen, lifeline: Lifeline) -> None:
    """SIGTERM: torchrun's agent stops its ranks. Then the lifeline, then SIGKILL what is left.

    The ranks run in sessions of their own, so signalling the agent's process group alone would
    leave them running.
    """
    family = _family(agent.pid)
    _signal_group(agent.pid, signal.SIGTERM)
    lifeline.close()
    try:
        agent.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        family += _family(agent.pid)
        _signal_group(agent.pid, signal.SIGKILL)
    for process in family:
        _kill(process)
    try:
        agent.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        pass  # stuck in the kernel; nothing more a signal can do
    psutil.wait_procs(family, timeout=KILL_WAIT_S)


def _family(pid: int) -> list:
    """Every process below ``pid`` (torchrun's ranks and anything they started)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(process: psutil.Process) -> None:
    """SIGKILL, unless it is gone (psutil checks that the pid was not reused meanwhile)."""
    try:
        process.kill()
    except psutil.Error:
        pass


def _results(folder: str, nprocs: int, exit_code: int) -> list:
    outcomes = {}
    for rank in range(nprocs):
        path = os.path.join(folder, f"result-{rank}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                outcomes[rank] = cloudpickle.loads(f.read())
    failures = {r: o for r, o in outcomes.items() if o["status"] != "ok"}
    for rank in range(nprocs):
        if rank not in outcomes:
            failures[rank] = {"rank": rank, "time": time.time(), "type": "RankDied",
                              "message": f"no result from rank {rank} (torchrun exit code "
                                         f"{exit_code})", "traceback": ""}
    if failures:
        message, cause = failure_message(failures, nprocs)
        raise LaunchError(message, rank=cause, failures=failures)
    return [cloudpickle.loads(outcomes[r]["value"]) for r in range(nprocs)]
