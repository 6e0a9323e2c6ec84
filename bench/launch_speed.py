"""Launch speed: labkit.launch (cold, burst and warm) against torchrun, same function, same machine.

Measures "launch call -> first all_reduce done" (the ranks stamp the time right after their first
all_reduce; the launcher's clock and theirs are the same wall clock). Cold = the first launch in a
fresh Python process that has just run `import labkit, torch` as a notebook does (in a notebook
labkit starts its fork server at import, so it imports torch in parallel with the notebook; the
script sets LABKIT_PRESTART=1 to get the same); "cold, no prestart" sets LABKIT_PRESTART=0 so the
first launch also pays for the server's import of torch. Burst = the second launch in that fresh
process, right after the first, while the server is still importing its extras in the
background. Warm = later launches in this process. Spawn = `start_method="spawn"` (a fresh
interpreter per rank). torchrun = `labkit.launch(..., start_method="torchrun")`, which runs real
torchrun on this machine (the rendezvous `--standalone` picks, its store in a private file) on
the same function.

How: at 2 ranks, then at 4, --repeats repeats; each repeat launches every kind once, in an order
rotated from one repeat to the next, so load from other processes hits all kinds alike. Printed:
the median [min-max] seconds of each kind, and the median over repeats of labkit's time /
torchrun's in the same repeat (with "how many times faster"). --quick: one repeat of cold (and
burst), warm and torchrun only, to check that the bench runs and computes its ratios.

Run: make bench   (or .venv/bin/python bench/launch_speed.py [--repeats N] [--quick] [--json PATH])
Targets (2-core machine): warm 4 ranks <= 0.2 s; burst 4 ranks <= 0.5 s; cold faster than torchrun
(and <= 1.5 s), at 2 and 4 ranks.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import _report   # bench/_report.py: --quick, --json, progress bars, the results table

COLD_SCRIPT = r"""
import json, sys, time
start = time.time()
import labkit, torch, torch.distributed as dist
imported = time.time()
def first_all_reduce():
    dist.all_reduce(torch.ones(1))
    return time.time()
call = time.time()
done = max(labkit.launch(first_all_reduce, nprocs=int(sys.argv[1]), quiet=True))
second_call = time.time()
second_done = max(labkit.launch(first_all_reduce, nprocs=int(sys.argv[1]), quiet=True))
print(json.dumps({"import_s": imported - start, "call_to_all_reduce_s": done - call,
                  "process_start_to_all_reduce_s": done - start,
                  "burst_call_to_all_reduce_s": second_done - second_call}))
"""


def first_all_reduce():
    import torch
    import torch.distributed as dist
    dist.all_reduce(torch.ones(1))
    return time.time()


def cold(nprocs: int, prestart: bool) -> dict:
    env = dict(os.environ, LABKIT_PRESTART="1" if prestart else "0")
    out = subprocess.run([sys.executable, "-c", COLD_SCRIPT, str(nprocs)], env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def in_process(nprocs: int, start_method: str) -> float:
    import labkit
    call = time.time()
    done = max(labkit.launch(first_all_reduce, nprocs=nprocs, quiet=True,
                             start_method=start_method, timeout=300))
    return done - call


KINDS = ("cold", "cold, no prestart", "warm", "spawn", "torchrun")
QUICK_KINDS = ("cold", "warm", "torchrun")
TARGETS = {  # (ranks, kind): (target as text, test on (labkit seconds, ratio to torchrun))
    (4, "warm"): ("ours <= 0.2 s", lambda s, r: s <= 0.2),
    (4, "burst"): ("ours <= 0.5 s", lambda s, r: s <= 0.5),
    (2, "cold"): ("ours <= 1.5 s, ratio < 1", lambda s, r: s <= 1.5 and r < 1),
    (4, "cold"): ("ours <= 1.5 s, ratio < 1", lambda s, r: s <= 1.5 and r < 1),
}


def measure(n: int, kind: str) -> dict:
    """One launch of ``kind`` at ``n`` ranks: {row: seconds} ("cold" also gives "burst" and
    "cold, from process start", from the same fresh process)."""
    if kind == "cold":
        run = cold(n, prestart=True)
        return {"cold": run["call_to_all_reduce_s"], "burst": run["burst_call_to_all_reduce_s"],
                "cold, from process start": run["process_start_to_all_reduce_s"]}
    if kind == "cold, no prestart":
        return {kind: cold(n, prestart=False)["call_to_all_reduce_s"]}
    method = {"warm": "forkserver", "spawn": "spawn", "torchrun": "torchrun"}[kind]
    return {kind: in_process(n, method)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    _report.add_arguments(parser, "1 repeat of cold (and burst), warm and torchrun only")
    args = parser.parse_args()
    repeats, kinds = (1, QUICK_KINDS) if args.quick else (args.repeats, KINDS)
    import labkit
    import torch
    results = _report.Results("launch_speed", args.quick, {"repeats": repeats, "ranks": [2, 4],
                                                           "kinds": list(kinds)})
    print(f"torch {torch.__version__}, {os.cpu_count()} cores ({labkit.usable_cores()} usable); "
          f"seconds from the launch call to the first all_reduce done; {repeats} repeat(s), each "
          f"launching every kind once, in an order rotated each repeat\n")
    rows = {}   # (ranks, row) -> [seconds per repeat]
    bar = _report.progress(total=2 * repeats * len(kinds), desc="launches")
    for n in (2, 4):
        in_process(n, "forkserver")  # make sure the server is up before timing warm launches
        for repeat in range(repeats):
            shift = repeat % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                for row, seconds in measure(n, kind).items():
                    rows.setdefault((n, row), []).append(seconds)
                bar.update()
    bar.close()
    labkit.shutdown()
    order = ["warm", "burst", "cold", "cold, no prestart", "cold, from process start", "spawn",
             "torchrun"]
    order = [row for row in order if (2, row) in rows]
    print(f"{'':<26}{'2 ranks, median [min-max]':>28}{'4 ranks, median [min-max]':>28}")
    for row in order:
        print(f"{row:<26}" + "".join(f"{_report.fmt_stats(_report.stats(rows[(n, row)])):>28}"
                                     for n in (2, 4)))
    # per repeat, labkit's launch / torchrun's in the same repeat
    compared = [row for row in order if row not in ("torchrun", "cold, from process start")]
    ratios = {(n, row): [a / b for a, b in zip(rows[(n, row)], rows[(n, "torchrun")])]
              for n in (2, 4) for row in compared}
    print("\nlabkit / torchrun, median of the per-repeat ratios (how many times faster than "
          "torchrun in brackets)")
    for row in compared:
        medians = [statistics.median(ratios[(n, row)]) for n in (2, 4)]
        print(f"{row:<26}" + "".join(f"{m:>20.3f} ({1 / m:5.1f}x)" for m in medians))
    print()
    for n in (2, 4):
        for row in compared:
            target, test = TARGETS.get((n, row), (None, None))
            seconds, ratio = statistics.median(rows[(n, row)]), statistics.median(ratios[(n, row)])
            met = test(seconds, ratio) if test else None
            results.add(f"launch/{row.replace(', ', '_').replace(' ', '_')}/{n}",
                        "launch to first all-reduce", f"{row}, {n} ranks", "s", "labkit",
                        rows[(n, row)], "torchrun", rows[(n, "torchrun")], ratios=ratios[(n, row)],
                        target=target, met=met)
            if target:
                print(f"{'MET ' if met else 'MISSED'} {row}, {n} ranks: {target} "
                      f"({seconds:.3f} s, {ratio:.3f}x torchrun)")
            elif row == "cold, no prestart":
                print(f"info   {row}, {n} ranks: {seconds:.3f} s (no target: import torch "
                      f"alone takes about 1.5 s here)")
    results.extra["from_process_start_s"] = {n: rows[(n, "cold, from process start")]
                                             for n in (2, 4)}
    results.finish(args.json)


if __name__ == "__main__":
    main()
