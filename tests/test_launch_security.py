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
