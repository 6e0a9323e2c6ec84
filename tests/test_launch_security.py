"""Nothing a launch starts may listen on an address other than loopback."""
import ipaddress
import os

import psutil
import torch
import torch.distributed as dist

import labkit


def listening(pid):
    return [(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN]


def report_listeners(launcher_pid):
    dist.all_reduce(torch.ones(1))  # every rank has joined the store and connected gloo
    found = {f"rank {dist.get_rank()}": listening(os.getpid())}
    if dist.get_rank() == 0:
        found["launcher (store)"] = listening(launcher_pid)
        found["fork server"] = listening(os.getppid())
    dist.barrier()  # all still alive while the others look
    return found


def test_every_process_of_a_launch_listens_on_loopback_only():
    seen = {}
    for per_rank in labkit.launch(report_listeners, 4, args=(os.getpid(),), quiet=True):
        seen.update(per_rank)
    assert seen["launcher (store)"], "the store should be listening during the launch"
    for who, sockets in seen.items():
        for ip, port in sockets:
            assert ipaddress.ip_address(ip).is_loopback, f"{who} listens on {ip}:{port}"


def family(pid):
    """A process and everything below it."""
    parent = psutil.Process(pid)
    return [parent] + parent.children(recursive=True)


def report_listeners_under_torchrun(launcher_pid):
    """Each rank lists its own sockets; rank 0 also torchrun's agent, its ranks and the launcher."""
    dist.all_reduce(torch.ones(1))  # every rank has joined the store and connected gloo
    found = {f"rank {dist.get_rank()}": listening(os.getpid())}
    if dist.get_rank() == 0:
        agent = psutil.Process(os.getppid())
        found["agent is torchrun"] = "torch.distributed.run" in " ".join(agent.cmdline())
        for process in family(agent.pid):
            found[f"agent or its child {process.pid}"] = listening(process.pid)
        found["launcher"] = listening(launcher_pid)
    dist.barrier()  # all still alive while the others look
    return found


def test_every_process_of_a_torchrun_launch_listens_on_loopback_only(no_leftovers):
    seen = {}
    for per_rank in labkit.launch(report_listeners_under_torchrun, 2, args=(os.getpid(),),
                                  start_method="torchrun", quiet=True, timeout=120):
        seen.update(per_rank)
    assert seen.pop("agent is torchrun") is True, "rank 0's parent should be torchrun's agent"
    assert len([who for who in seen if who.startswith("agent or its child")]) >= 3  # agent, 2 ranks
    for who, sockets in seen.items():
        for ip, port in sockets:
            assert ipaddress.ip_address(ip).is_loopback, f"{who} listens on {ip}:{port}"


def test_every_process_of_a_rank_session_listens_on_loopback_only_and_talks_over_pipes(
        no_leftovers):
    """Persistent ranks (%ranks): the same store and ranks, commands and replies on pipes."""
    import stat
    from labkit.launcher._session import RankSession
    session = RankSession()
    session.start(2, quiet=True)
    try:
        session.run_cell("import torch, torch.distributed as dist\ndist.all_reduce(torch.ones(1))")
        seen = {"kernel (store)": listening(os.getpid())}
        for rank, pid in enumerate(session.pids):
            seen[f"rank {rank}"] = listening(pid)
            seen[f"parent of rank {rank}"] = listening(psutil.Process(pid).ppid())
            # the rank reads commands on fd 0 and replies on fd 3: pipes only the kernel holds
            channels = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 3)]
            assert all(c.startswith("pipe:") for c in channels), f"rank {rank}: {channels}"
            process = session.ranks[rank]
            assert stat.S_ISFIFO(os.fstat(process.stdin_w).st_mode)
            assert stat.S_ISFIFO(os.fstat(process.result_r).st_mode)
    finally:
        session.stop()
    assert seen["kernel (store)"], "the store should be listening while the ranks run"
    for who, sockets in seen.items():
        for ip, port in sockets:
            assert ipaddress.ip_address(ip).is_loopback, f"{who} listens on {ip}:{port}"
