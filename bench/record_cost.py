"""What the collective record (the hang doctor's notes) costs a collective, in a real launch.

Every rank started by labkit.launch notes each torch.distributed call it enters
(labkit/launcher/_collective_hooks.py). This times, in each of 2 ranks, a small all-reduce (4
floats, where the record's share is largest) through the recorded ``dist.all_reduce`` and through
torch's own function behind it (``dist.all_reduce.__wrapped__``), alternating, best of --repeats
runs of --calls calls each, and prints both and the difference per call. The all-reduce runs on a
group of the rank alone: between two ranks, any delay (a few µs of recording, or of anything
else) shifts when the peer's wake-up comes, and on a shared 2-core machine that swings the time
of a call by hundreds of µs either way, hiding the record's own cost. Ordinary tensor ops are not
recorded at all (no dispatch mode), so they cost nothing extra.

Run: .venv/bin/python bench/record_cost.py [--calls N] [--repeats N]
"""
import argparse
import time

import labkit


def timed(calls: int, repeats: int) -> dict:
    import torch
    import torch.distributed as dist
    recorded = dist.all_reduce
    plain = recorded.__wrapped__
    alone = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
    t = torch.ones(4)
    best = {"torch": float("inf"), "recorded": float("inf")}
    for _ in range(repeats):
        for name, fn in (("torch", plain), ("recorded", recorded)):
            start = time.perf_counter()
            for _ in range(calls):
                fn(t, group=alone)
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    options = parser.parse_args()
    for rank, best in enumerate(labkit.launch(timed, 2, args=(options.calls, options.repeats),
                                              quiet=True)):
        torch_us, recorded_us = best["torch"] * 1e6, best["recorded"] * 1e6
        print(f"rank {rank}: all_reduce of 4 floats (a group of one rank) {torch_us:.1f} us "
              f"through torch's function, {recorded_us:.1f} us recorded: "
              f"{recorded_us - torch_us:+.1f} us per call")


if __name__ == "__main__":
    main()
