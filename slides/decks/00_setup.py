"""Deck 00's values: real launches on this machine (ranks, an all-reduce, a crash, start-up times)."""
import statistics
import time

import labkit
from labkit import plots


def whoami():
    import os

    import torch
    import torch.distributed as dist

    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "pid": os.getpid(),
            "backend": dist.get_backend(), "threads": torch.get_num_threads()}


def all_reduce_before_after():
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    t = torch.tensor([1.0, 10.0, 100.0]) * (rank + 1)
    before = t.clone()
    dist.all_reduce(t)
    return before, t


def buggy():
    """Notebook 00's crash: a bug on rank 1 only (shapes 3 and 4 do not broadcast)."""
    import torch
    import torch.distributed as dist

    x = torch.ones(3)
    if dist.get_rank() == 1:
        x = x + torch.ones(4)
    dist.all_reduce(x)


def nothing():
    return None


def start_times(start_method, repeats=3):
    """Median seconds from launch() to the results, for 2 ranks doing nothing."""
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        labkit.launch(nothing, nprocs=2, start_method=start_method, quiet=True)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def values():
    ranks = labkit.launch(whoami, nprocs=4, quiet=True)
    rows = "\n".join(f"| {r['rank']} | {r['world']} | {r['pid']} | {r['backend']} | {r['threads']} |"
                     for r in ranks)
    pairs = labkit.launch(all_reduce_before_after, nprocs=4, quiet=True)
    ax, _ = plots.collective_picture([b for b, _ in pairs], [a for _, a in pairs],
                                     title="dist.all_reduce(t) on 4 ranks (gloo), measured")
    try:
        labkit.launch(buggy, nprocs=2, timeout=60, quiet=True)
        crash = "(the launch did not fail: this deck's example is broken)"
    except labkit.LaunchError as error:
        crash = str(error).strip().splitlines()[0]
    warm = start_times(None)
    cold = start_times("spawn", repeats=1)
    return {
        "rank_rows": rows,
        "all_reduce_figure": ax.figure,
        "crash_first_line": crash,
        "warm_s": f"{warm:.2f} s",
        "cold_s": f"{cold:.2f} s",
        "cold_over_warm": f"{cold / warm:.0f}×",
    }
