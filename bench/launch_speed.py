"""Launch speed: labkit.launch (cold and warm) against torchrun, same function, same machine.

Measures "launch call -> first all_reduce done" (the ranks stamp the time right after their first
all_reduce; the launcher's clock and theirs are the same wall clock). Cold = the first launch in a
fresh Python process that has just run `import labkit, torch` as a notebook does (in a notebook
labkit starts its fork server at import, so it imports torch in parallel with the notebook; the
script sets LABKIT_PRESTART=1 to get the same); "cold, no prestart" sets LABKIT_PRESTART=0 so the
first launch also pays for the server's import of torch. Burst = the second launch in that fresh
process, right after the first, while the server is still importing its extras in the
background. Warm = later launches in the same process. torchrun =
`labkit.launch(..., start_method="torchrun")`, which runs real torchrun on this machine (the
rendezvous `--standalone` picks, its store in a private file) on the same function.

Run: make bench   (or .venv/bin/python bench/launch_speed.py [--repeats N])
Targets (2-core machine): warm 4 ranks <= 0.2 s; burst 4 ranks <= 0.5 s; cold faster than torchrun
(and <= 1.5 s).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    import labkit
    import torch
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, median of {repeats} runs; "
          "seconds from the launch call to the first all_reduce done\n")
    rows = {}
    for n in (2, 4):
        cold_runs = [cold(n, prestart=True) for _ in range(repeats)]
        rows[(n, "cold")] = statistics.median(r["call_to_all_reduce_s"] for r in cold_runs)
        rows[(n, "cold, from process start")] = statistics.median(
            r["process_start_to_all_reduce_s"] for r in cold_runs)
        rows[(n, "burst")] = statistics.median(r["burst_call_to_all_reduce_s"] for r in cold_runs)
        rows[(n, "cold, no prestart")] = statistics.median(
            cold(n, prestart=False)["call_to_all_reduce_s"] for _ in range(repeats))
        in_process(n, "forkserver")  # make sure the server is up before timing warm launches
        rows[(n, "warm")] = statistics.median(in_process(n, "forkserver") for _ in range(max(5, repeats)))
        rows[(n, "spawn")] = statistics.median(in_process(n, "spawn") for _ in range(repeats))
        rows[(n, "torchrun")] = statistics.median(in_process(n, "torchrun") for _ in range(repeats))
    labkit.shutdown()
    kinds = ["warm", "burst", "cold", "cold, no prestart", "cold, from process start", "spawn",
             "torchrun"]
    print(f"{'':<26}{'2 ranks':>10}{'4 ranks':>10}")
    for kind in kinds:
        print(f"{kind:<26}" + "".join(f"{rows[(n, kind)]:>10.3f}" for n in (2, 4)))
    print("\nratios (how many times faster than torchrun)")
    for kind in ("warm", "burst", "cold", "cold, no prestart", "spawn"):
        print(f"{kind:<26}" + "".join(f"{rows[(n, 'torchrun')] / rows[(n, kind)]:>10.1f}"
                                      for n in (2, 4)))
    checks = [("warm 4-rank launch <= 0.2 s", rows[(4, "warm")] <= 0.2),
              ("burst 4-rank launch (the second, right after the first) <= 0.5 s",
               rows[(4, "burst")] <= 0.5),
              ("cold launch <= 1.5 s (2 and 4 ranks)", max(rows[(2, "cold")], rows[(4, "cold")]) <= 1.5),
              ("cold launch <= 1.5 s without prestart (import torch alone takes longer here)",
               max(rows[(2, "cold, no prestart")], rows[(4, "cold, no prestart")]) <= 1.5),
              ("cold launch faster than torchrun", all(rows[(n, "cold")] < rows[(n, "torchrun")]
                                                       for n in (2, 4)))]
    print()
    for name, ok in checks:
        print(f"{'MET ' if ok else 'MISSED'} {name}")


if __name__ == "__main__":
    main()
