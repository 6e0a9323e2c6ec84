"""``labkit doctor``: is this machine ready for the course? Print the facts, then prove it with a launch."""
import platform
import sys
import time


def _all_reduce_check():
    """Each rank contributes rank + 1; every rank must end with 1 + 2 + ... + world size."""
    import torch
    import torch.distributed as dist
    from labkit.placement import device
    value = torch.tensor([dist.get_rank() + 1.0], device=device())
    dist.all_reduce(value)
    return value.item()


FIXES = {
    "LaunchTimeout": "The ranks could not reach each other in time. On macOS set "
                     "GLOO_SOCKET_IFNAME=lo0; check that a firewall allows connections on "
                     "127.0.0.1; see docs/launcher.md, 'Troubleshooting'.",
    "ModuleNotFoundError": "A package is missing in this environment: run `make lab` (or "
                           "`pip install -e .`) in the course folder.",
    "RuntimeError": "See the message above; docs/launcher.md, 'Troubleshooting', lists the usual "
                    "causes (fork server could not import torch, ports, GPUs).",
}


def facts(nprocs: int) -> list[tuple[str, str]]:
    import torch
    import torch.distributed as dist

    from labkit.launcher._launch import _where
    from labkit.placement import plan
    from labkit.launcher._platform import machine_cores, threads_per_rank, usable_cores
    available = {name: getattr(dist, f"is_{name}_available", lambda: False)()
                 for name in ("gloo", "nccl", "mpi")}
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    placement = plan(nprocs)
    gpu_names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus)) if gpus else "none"
    return [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", torch.__version__),
        ("backends", ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in available.items())),
        ("GPUs", f"{gpus} ({gpu_names})" if gpus else "none (CUDA not available)"),
        ("cores", f"{machine_cores()} on this machine, {usable_cores()} usable here (CPU affinity "
                  "and the container's CPU quota)"),
        ("threads", f"{threads_per_rank(nprocs)} per rank for {nprocs} ranks "
                    "(max(1, usable cores // ranks))"),
        ("backend", f"{placement.backend}, tensors on {_where(placement)} (what labkit.launch "
                    f"picks for {nprocs} ranks)"),
    ]


def run(nprocs: int = 2, timeout: float = 120) -> bool:
    """Print the environment and run a real all-reduce on ``nprocs`` ranks; True when all is well."""
    for name, value in facts(nprocs):
        print(f"{name:<9} {value}")
    expected = nprocs * (nprocs + 1) / 2
    print(f"{'launch':<9} {nprocs}-rank all_reduce through labkit.launch ...", flush=True)
    start = time.perf_counter()
    try:
        import labkit
        results = labkit.launch(_all_reduce_check, nprocs=nprocs, timeout=timeout, quiet=True)
    except Exception as exc:  # noqa: BLE001 - the doctor reports any failure with a fix
        print(f"FAILED: {type(exc).__name__}: {exc}")
        print("How to fix: " + FIXES.get(type(exc).__name__, FIXES["RuntimeError"]))
        return False
    seconds = time.perf_counter() - start
    if results != [expected] * nprocs:
        print(f"FAILED: the all_reduce gave {results}, expected {[expected] * nprocs}. The "
              "backend is broken in this environment; reinstall torch.")
        return False
    print(f"OK: every rank got {expected:g} = 1 + ... + {nprocs}, in {seconds:.2f} s")
    return True
