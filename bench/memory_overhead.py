"""Memory tracer overhead: N training steps traced by labkit.MemoryTracer vs the same N untraced.

Model: the ~1M-parameter MLP of the memory notebook (Linear(1024, 512), ReLU, Linear(512, 1024),
Ψ = 1,050,112), Adam, batch 64, fp32, CPU. Both runs happen in this process on the same model,
alternating, after warm-up steps; the ratio is the median over repeats of traced / untraced time,
so load from other processes on a shared machine hits both alike. Wall time decides the target;
the CPU time of this process (less sensitive to other processes) is printed beside it.
Also times the tracer without its timeline (``timeline=False``), and an empty TorchDispatchMode:
the floor any tracer built on torch's Python dispatch pays.

Run: .venv/bin/python bench/memory_overhead.py [--steps N] [--repeats R] [--threads T]
Target from the memory tracer issue: traced <= 1.5x untraced.
"""
import argparse
import gc
import statistics
import time

import torch

from torch.utils._python_dispatch import TorchDispatchMode

from labkit.memory import MemoryTracer

TARGET = 1.5


class EmptyMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 1024))
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(64, 1024)

    def steps(n):
        for _ in range(n):
            model(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad()

    def timed(tracer=None):
        """(wall, cpu) seconds for args.steps steps."""
        gc.collect()  # the garbage of earlier runs is collected here, not inside the next run
        wall, cpu = time.perf_counter(), time.process_time()
        if tracer is None:
            steps(args.steps)
        else:
            with tracer:
                steps(args.steps)
        return time.perf_counter() - wall, time.process_time() - cpu

    steps(3)  # warm-up: Adam state exists, allocator and kernels are warm
    tracers = {"untraced": lambda: None, "traced": lambda: MemoryTracer(model, optimizer),
               "traced, no timeline": lambda: MemoryTracer(model, optimizer, timeline=False),
               "empty dispatch mode": EmptyMode}
    runs = {name: [] for name in tracers}
    peaks = set()
    for repeat in range(args.repeats):
        names, turn = list(runs), repeat % len(runs)
        for name in names[turn:] + names[:turn]:  # rotate: no order favoured
            tracer = tracers[name]()
            runs[name].append(timed(tracer))
            if name == "traced":
                mem = tracer
                peaks.add(mem.peak_total)

    def row(name):
        """Median ms/step and median ratio to the untraced run of the same repeat."""
        cells = []
        for i, clock in enumerate(("wall", "cpu")):
            ms = statistics.median(r[i] for r in runs[name]) * 1000 / args.steps
            ratio = statistics.median(r[i] / p[i] for r, p in zip(runs[name], runs["untraced"]))
            cells.append(f"{clock} {ms:6.2f} ms/step {ratio:5.2f}x")
        print(f"{name:20s} " + "   ".join(cells))
        return statistics.median(r[0] / p[0] for r, p in zip(runs[name], runs["untraced"]))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.steps} steps x "
          f"{args.repeats} repeats, {len(mem.timeline) / args.steps:.0f} timeline entries per step")
    row("untraced")
    ratio = row("traced")
    row("traced, no timeline")
    row("empty dispatch mode")
    print(f"traced peak {sorted(peaks)} B (same every repeat: {len(peaks) == 1})")
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"target: traced wall time <= {TARGET}x untraced: {verdict} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
