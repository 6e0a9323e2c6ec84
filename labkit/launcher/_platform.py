"""What this machine lets a launch use: cores, threads per rank, loopback, how to start ranks.

``os.cpu_count()`` counts the machine's cores, not the ones this process may use: a container
or a JupyterHub pod is often limited to a share of them (a cgroup quota, ``cpu.max``) and a
process can be pinned to a few (CPU affinity). Threads per rank follow the usable cores, since
oversubscribing them made DDP steps 3-9x slower on a 2-core machine.
"""
import math
import os
import sys

FORKSERVER_PLATFORMS = ("linux",)  # where the fork server is supported and tested


def machine_cores() -> int:
    return os.cpu_count() or 1


def affinity_cores() -> int:
    """Cores this process may run on (``taskset``, ``docker --cpuset-cpus``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or machine_cores()
    return machine_cores()


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _number(path: str) -> int | None:
    try:
        return int(_read(path) or "")
    except ValueError:  # missing or unreadable: no limit we can trust
        return None


def _v2_quota(text: str) -> float | None:
    """``cpu.max`` holds "QUOTA PERIOD" (microseconds) or "max PERIOD" (no limit)."""
    parts = text.split()
    if len(parts) == 2 and parts[0] != "max":
        try:
            return int(parts[0]) / int(parts[1])
        except (ValueError, ZeroDivisionError):
            return None
    return None


def cgroup_cpu_limit(root: str = "/") -> float | None:
    """CPUs' worth of time the cgroup quota allows (e.g. 1.5), None when there is no limit.

    cgroup v2: the smallest ``cpu.max`` on the path from this process's group up to the root;
    cgroup v1: ``cpu.cfs_quota_us / cpu.cfs_period_us``. ``root`` is for tests.
    """
    membership = _read(os.path.join(root, "proc/self/cgroup")) or ""
    limits = []
    for line in membership.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: "0::/user.slice/..."
            parts = [p for p in path.split("/") if p]
            for depth in range(len(parts), -1, -1):
                text = _read(os.path.join(root, "sys/fs/cgroup", *parts[:depth], "cpu.max"))
                quota = _v2_quota(text) if text else None
                if quota:
                    limits.append(quota)
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/docker/abc"
            for folder in (path.lstrip("/"), ""):
                base = os.path.join(root, "sys/fs/cgroup", controllers, folder)
                quota, period = (_number(os.path.join(base, f"cpu.cfs_{n}_us"))
                                 for n in ("quota", "period"))
                if quota and period and quota > 0 and period > 0:  # quota -1: no limit
                    limits.append(quota / period)
                    break
    return min(limits) if limits else None


def usable_cores(root: str = "/") -> int:
    """Cores this process can really keep busy: affinity, capped by the cgroup quota."""
    cores = affinity_cores() if root == "/" else machine_cores()
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return max(1, cores)


def threads_per_rank(nprocs: int) -> int:
    """Share the usable cores between the ranks, at least one thread each."""
    return max(1, usable_cores() // nprocs)


def refuse_unsupported_platform() -> None:
    """Launching needs POSIX (pipes the launcher can wait on, process groups it can signal)."""
    if sys.platform.startswith(("win32", "cygwin")):
        raise RuntimeError(
            "labkit.launch runs ranks on Linux and macOS; on Windows it needs WSL2 (Ubuntu), "
            "where everything works as on Linux: see docs/launcher.md, 'Windows'. What needs no "
            "ranks works here too: labkit.theory, labkit.plots, labkit.widgets, labkit.simulate.")


def default_start_method() -> tuple[str, str]:
    """The start method a launch uses when none is given, and why (shown in the banner)."""
    if fork_server_supported():
        return "forkserver", "the default on Linux"
    return "spawn", f"the default on {sys.platform}: the fork server runs on Linux only"


def fork_server_supported() -> bool:
    return sys.platform.startswith(FORKSERVER_PLATFORMS) and hasattr(os, "fork")


def interactive_session() -> bool:
    """True inside a Jupyter kernel, IPython or the Python REPL: where a launch is likely soon."""
    ipython = sys.modules.get("IPython")
    if ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None:
        return True
    return hasattr(sys, "ps1") or bool(sys.flags.interactive)


def prestart_wanted() -> bool:
    """Start the fork server at ``import labkit``? LABKIT_PRESTART=0/1 decides; by default only
    in an interactive session on Linux (a script or ``labkit grade`` starts it at the first
    launch, and may never launch at all)."""
    setting = os.environ.get("LABKIT_PRESTART", "")
    if setting in ("0", "1"):
        return setting == "1" and fork_server_supported()
    return interactive_session() and fork_server_supported()


def loopback_interface() -> str | None:
    """'lo' on Linux, 'lo0' on macOS: where gloo should listen so nothing is reachable from outside."""
    import socket
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def with_labkit_importable(env: dict) -> dict:
    """``env`` with the folder holding the ``labkit`` package first on PYTHONPATH."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env
