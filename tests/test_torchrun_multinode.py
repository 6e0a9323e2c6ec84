"""docs/launcher.md's two-machine torchrun commands, with two "machines" on this one.

Each machine is a torchrun agent of its own with one rank (``--nproc-per-node 1``), everything
on 127.0.0.1 (``--local-addr`` and gloo on the loopback interface). The rank joins gloo and
all-reduces its rank. The docs' old command (``--rdzv-endpoint`` alone) must not make a job: with
torchrun's defaults both machines are node 0 of the static rendezvous.
"""
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch.distributed as dist

from labkit.launcher._platform import loopback_interface

pytestmark = pytest.mark.skipif(
    sys.platform.startswith(("win32", "cygwin")) or not dist.is_available()
    or not dist.is_gloo_available() or importlib.util.find_spec("torch.distributed.run") is None,
    reason="needs torchrun (torch.distributed.run) with gloo, on Linux or macOS")

LOOPBACK = "127.0.0.1"
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                    "launcher.md")

TRAIN = """
import json, os, sys
import torch, torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank())])
dist.all_reduce(total)
seen = {"node": int(os.environ["GROUP_RANK"]), "rank": dist.get_rank(),
        "world": dist.get_world_size(), "sum": total.item()}
with open(os.path.join(sys.argv[1], f"{os.getpid()}.json"), "w") as f:
    json.dump(seen, f)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}  # torchrun's options
    env.pop("TORCHELASTIC_HEALTH_CHECK_PORT", None)
    env["OMP_NUM_THREADS"] = "1"
    if loopback_interface():
        env["GLOO_SOCKET_IFNAME"] = loopback_interface()
    return env


def stop(agent: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to a torchrun agent (it stops its ranks), then SIGKILL to what is left of it, its
    process group and its ranks (each in a session of its own)."""
    try:
        family = psutil.Process(agent.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if agent.poll() is None:
        agent.terminate()
        try:
            agent.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)  # not reaped yet, so the group id is still its
    for process in family:
        try:
            process.kill()  # psutil refuses if the pid now belongs to another process
        except psutil.NoSuchProcess:
            pass
    agent.wait(timeout=10)


def run_two_machines(tmp_path, per_machine: list, wait_s: float, until=all) -> tuple:
    """Start ``torchrun --nnodes 2 --nproc-per-node 1 ARGS`` once per ARGS in ``per_machine``;
    wait until ``until`` of them have exited or ``wait_s`` has passed, then stop all.
    Returns the exit codes (None: still running when stopped), what the ranks saw, the logs."""
    script, results = tmp_path / "train.py", tmp_path / "results"
    script.write_text(TRAIN)
    results.mkdir()
    agents, logs = [], []
    try:
        for n, args in enumerate(per_machine):
            logs.append(tmp_path / f"machine{n}.log")
            with open(logs[-1], "w") as log:
                agents.append(subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                     "--nproc-per-node", "1", *args, "--local-addr", LOOPBACK,
                     str(script), str(results)],
                    stdout=log, stderr=subprocess.STDOUT, env=environment(),
                    start_new_session=True))
        deadline = time.monotonic() + wait_s
        while not until(a.poll() is not None for a in agents) and time.monotonic() < deadline:
            time.sleep(0.1)
        codes = [a.poll() for a in agents]
    finally:
        for agent in agents:
            stop(agent)
    seen = sorted((json.loads(p.read_text()) for p in results.glob("*.json")),
                  key=lambda s: s["rank"])
    return codes, seen, "\n".join(f"--- machine {n}\n{log.read_text()[-3000:]}"
                                  for n, log in enumerate(logs))


# what the rank on each machine should see: distinct ranks and node ranks, world 2, sum 0 + 1
A_TWO_NODE_JOB = [{"node": r, "rank": r, "world": 2, "sum": 1.0} for r in range(2)]


def test_the_c10d_rendezvous_makes_one_job_of_two_machines(tmp_path, no_leftovers):
    c10d = ["--rdzv-backend", "c10d", "--rdzv-id", "labkit-test-job",
            "--rdzv-endpoint", f"{LOOPBACK}:{free_port()}"]
    codes, seen, logs = run_two_machines(tmp_path, [c10d, c10d], wait_s=60)
    assert codes == [0, 0], logs
    assert seen == A_TWO_NODE_JOB, logs


def test_the_static_rendezvous_with_node_ranks_makes_one_job_of_two_machines(tmp_path,
                                                                            no_leftovers):
    port = str(free_port())
    static = [["--node-rank", str(n), "--master-addr", LOOPBACK, "--master-port", port]
              for n in range(2)]
    codes, seen, logs = run_two_machines(tmp_path, static, wait_s=60)
    assert codes == [0, 0], logs
    assert seen == A_TWO_NODE_JOB, logs


def test_rdzv_endpoint_alone_makes_both_machines_node_0_and_no_job(tmp_path, no_leftovers):
    endpoint = ["--rdzv-endpoint", f"{LOOPBACK}:{free_port()}"]
    # both agents try to host the store as node 0: one cannot listen, the other waits for node 1
    codes, seen, logs = run_two_machines(tmp_path, [endpoint, endpoint], wait_s=30, until=any)
    assert seen == [], f"no rank should have started: {seen}\n{logs}"
    assert sorted(codes, key=str) == [1, None], logs  # one failed, the other was still waiting
    assert "EADDRINUSE" in logs, logs


def torchrun_config(command: str):
    """torchrun's own reading of a command line: (backend, node rank or None, endpoint, id)."""
    from torch.distributed.run import config_from_args, parse_args
    args = shlex.split(command.replace("PORT", "29400").replace("JOB", "job-7"))[1:]
    config, _, _ = config_from_args(parse_args(args))
    return (config.rdzv_backend, config.rdzv_configs.get("rank"), config.rdzv_endpoint,
            config.run_id)


def test_torch_reads_the_docs_commands_as_the_docs_say(monkeypatch):
    for name in [k for k in os.environ if k.startswith("PET_")]:
        monkeypatch.delenv(name)  # torchrun takes its options' defaults from these
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    commands = re.findall(r"^(torchrun --nnodes 2 [^#\n]*?)\s*(?:#.*)?$", open(DOCS).read(), re.M)
    assert sorted(torchrun_config(c) for c in commands) == [
        ("c10d", None, "HOST:29400", "job-7"),
        ("static", 0, "HOST:29400", "none"),
        ("static", 1, "HOST:29400", "none"),
    ], commands
    broken = "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:PORT train.py"
    assert torchrun_config(broken) == ("static", 0, "HOST:29400", "none")  # node 0 everywhere
