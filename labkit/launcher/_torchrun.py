"""``launch(..., start_method="torchrun")``: the same function under real ``torchrun --standalone``.

For comparison and authenticity: torchrun's own agent starts, watches and stops the ranks. The
job and each rank's outcome travel as files in a private folder; output is streamed as torchrun
prints it. Slower to start (an agent plus one fresh interpreter per rank).
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

from labkit.launcher.errors import LaunchError, LaunchTimeout, failure_message


def _stream(pipe) -> None:
    for line in iter(pipe.readline, b""):
        print(line.decode("utf-8", errors="replace").rstrip("\n"), flush=True)


def launch_with_torchrun(job: dict, nprocs: int, timeout: float, env: dict) -> list:
    folder = tempfile.mkdtemp(prefix="labkit-torchrun-")
    os.chmod(folder, 0o700)
    try:
        with open(os.path.join(folder, "job.pkl"), "wb") as f:
            f.write(cloudpickle.dumps(job))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nprocs}", "-m", "labkit.launcher._worker", folder]
        agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        reader = threading.Thread(target=_stream, args=(agent.stdout,), daemon=True)
        reader.start()
        try:
            agent.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LaunchTimeout(f"TIMEOUT: torchrun was still running after {timeout:g} s; it and "
                                "its ranks have been stopped. (labkit.launch's default start "
                                "method shows where each rank waited.)") from None
        finally:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
            reader.join(timeout=5)
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
                                             f"{agent.returncode})", "traceback": ""}
        if failures:
            message, cause = failure_message(failures, nprocs)
            raise LaunchError(message, rank=cause, failures=failures)
        return [cloudpickle.loads(outcomes[r]["value"]) for r in range(nprocs)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
