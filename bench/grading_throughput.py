"""Grading throughput: notebooks graded per minute by `labkit grade`, at -j 1 and at -j 2.

A class of copies of the course's solution notebooks (one learner folder per copy, --learners of
them) is graded by the real command (`python -m labkit grade FOLDER -j N`), every notebook in its
own worker, sandbox and kernel, exactly as for a class; the integrity check runs after each
notebook. Each -j is timed --repeats times, alternating, each run into a fresh output folder (so
nothing is reused). Printed: notebooks per minute at each -j (median [min-max]) and the ratio
-j 2 / -j 1. Every notebook runs its own ranks, so on 2 cores -j 2 gains little on the heavy
notebooks and more on light ones; the numbers say how long a class takes on this machine:
notebooks / (per minute) minutes.

Run: .venv/bin/python bench/grading_throughput.py [--notebooks 00_setup,02_naive_ddp] [--learners 2]
     [--repeats 1]      (--quick: the toy fixture, 4 learners, one repeat)
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_class(folder: Path, sources: list[Path], learners: int) -> int:
    for number in range(learners):
        learner = folder / f"learner{number:03d}"
        learner.mkdir(parents=True)
        for source in sources:
            shutil.copy(source, learner / source.name)
    return learners * len(sources)


def grade(folder: Path, jobs: int, template: Path, out: Path) -> float:
    start = time.perf_counter()
    env = {**os.environ, "LABKIT_DEVICE": "cpu"}
    done = subprocess.run([sys.executable, "-m", "labkit", "grade", str(folder), "-j", str(jobs),
                           "--out", str(out), "--template", str(template)],
                          capture_output=True, text=True, env=env, timeout=7200)
    if done.returncode != 0:
        sys.exit(f"labkit grade -j {jobs} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebooks", default="00_setup,02_naive_ddp,09_capstone")
    parser.add_argument("--learners", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    if options.quick:
        sources, template = [ROOT / "tests" / "fixtures" / "source" / "toy.ipynb"], \
            ROOT / "tests" / "fixtures"
        options.learners, options.repeats = 4, 1
    else:
        sources = [ROOT / "notebooks" / "source" / f"{name}.ipynb"
                   for name in options.notebooks.split(",")]
        template = ROOT / "notebooks"
    per_minute = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="labkit-bench-grading-") as scratch:
        scratch = Path(scratch)
        count = make_class(scratch / "class", sources, options.learners)
        for repeat in range(options.repeats):
            for jobs in ((1, 2) if repeat % 2 == 0 else (2, 1)):
                seconds = grade(scratch / "class", jobs, template, scratch / f"out{repeat}-{jobs}")
                per_minute[jobs].append(count / seconds * 60)
                print(f"-j {jobs}: {count} notebooks in {seconds:.0f} s", flush=True)
    for jobs, values in per_minute.items():
        print(f"-j {jobs}: {statistics.median(values):.2f} notebooks per minute "
              f"[{min(values):.2f}-{max(values):.2f}]")
    ratio = statistics.median(b / a for a, b in zip(per_minute[1], per_minute[2]))
    print(f"-j 2 / -j 1: {ratio:.2f}x the notebooks per minute ({', '.join(s.name for s in sources)};"
          f" {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
