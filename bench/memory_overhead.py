"""Memory tracer overhead: N steps traced by labkit.MemoryTracer vs the same N steps untraced.

Two models, fp32, CPU, batch 64:
* "mlp 1M": the ~1M-parameter MLP of the memory notebook (Linear(1024, 512), ReLU,
  Linear(512, 1024), Ψ = 1,050,112); a step is forward, backward and Adam's update. Few ops, each
  a large matrix product: the tracer's cost per op hides behind the arithmetic.
* "deep 100": 100 x (Linear(256, 256), ReLU); a step is forward and backward, or the forward
  alone (its graph dropped). Many small ops, and a new peak at almost every op of the forward:
  the case that shows the tracer's cost per op.

Each case runs in this process on one model, alternating (the order rotated each repeat), after
warm-up steps; the ratio is the median over repeats of traced / untraced time, so load from other
processes on a shared machine hits both alike; its spread is the min-max over repeats. The
garbage of earlier runs is collected before each run, outside the timing (what lived before the
runs, torch's modules and the model, is frozen out of the collector: `gc.freeze`). Wall time
decides the target; the CPU time of this process (less sensitive to other processes) is printed
beside it. Also timed: the tracer without its timeline
(``timeline=False``), and two empty TorchDispatchModes, the floor any tracer built on torch's
Python dispatch pays: labkit's base (``labkit._torch_private.DispatchMode``) and torch's own,
whose ``torch._disable_dynamo`` wrapper costs more per op.

Run: .venv/bin/python bench/memory_overhead.py [--steps N] [--repeats R] [--threads T] [--quick]
[--json PATH]; --quick: 2 steps x 3 repeats, to check that it runs and computes its ratios.
Target from the memory tracer issue: traced <= 1.5x untraced, for each model.
"""
import argparse
import contextlib
import gc
import statistics
import time

import torch

import _report   # bench/_report.py: --quick, --json, progress bars, the results table
from labkit._torch_private import DispatchMode, TorchDispatchMode
from labkit.memory import MemoryTracer

TARGET = 1.5


class EmptyMode(DispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class TorchEmptyMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def mlp_1m():
    """(model, optimizer, step): the notebook's MLP, one training step with Adam."""
    model = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 1024))
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(64, 1024)

    def step():
        model(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, step


def deep_100(backward=True):
    """(model, None, step): 100 small layers; forward and backward (grads dropped after), or the
    forward alone."""
    layers = [m for _ in range(100) for m in (torch.nn.Linear(256, 256), torch.nn.ReLU())]
    model = torch.nn.Sequential(*layers)
    x = torch.randn(64, 256)

    def step():
        loss = model(x).sum()
        if backward:
            loss.backward()
            model.zero_grad()
    return model, None, step


def compare(name, build, args, results=None, id=None):
    """Time untraced, traced, traced without timeline and two empty modes; print a row each;
    add traced / untraced (wall) to ``results``."""
    torch.manual_seed(0)
    model, optimizer, step = build()

    def timed(tracer=None):
        """(wall, cpu) seconds for args.steps steps."""
        gc.collect()  # the garbage of earlier runs is collected here, not inside the next run
        wall, cpu = time.perf_counter(), time.process_time()
        with tracer if tracer is not None else contextlib.nullcontext():
            for _ in range(args.steps):
                step()
        return time.perf_counter() - wall, time.process_time() - cpu

    for _ in range(3):  # warm-up: optimizer state exists, allocator and kernels are warm
        step()
    # What lives now (torch's modules, the model) lives to the end: out of the collector's way,
    # so that each collection before a run scans only what the runs made (0.16 s otherwise).
    gc.collect()
    gc.freeze()
    tracers = {"untraced": lambda: None, "traced": lambda: MemoryTracer(model, optimizer),
               "traced, no timeline": lambda: MemoryTracer(model, optimizer, timeline=False),
               "empty labkit mode": EmptyMode, "empty torch mode": TorchEmptyMode}
    runs = {label: [] for label in tracers}
    peaks, entries = set(), 0
    for repeat in _report.progress(range(args.repeats), desc=id or name):
        labels, turn = list(runs), repeat % len(runs)
        for label in labels[turn:] + labels[:turn]:  # rotate: no order favoured
            tracer = tracers[label]()
            runs[label].append(timed(tracer))
            if label == "traced":
                peaks.add(tracer.peak_total)
                entries = len(tracer.timeline)
    gc.unfreeze()   # the next case's collections may free this one's model

    def row(label):
        """Median ms/step and median ratio to the untraced run of the same repeat."""
        cells = []
        for i, clock in enumerate(("wall", "cpu")):
            ms = statistics.median(r[i] for r in runs[label]) * 1000 / args.steps
            ratio = statistics.median(r[i] / u[i] for r, u in zip(runs[label], runs["untraced"]))
            cells.append(f"{clock} {ms:7.2f} ms/step {ratio:5.2f}x")
        print(f"  {label:20s} " + "   ".join(cells))
        return statistics.median(r[0] / u[0] for r, u in zip(runs[label], runs["untraced"]))

    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{entries / args.steps:.0f} timeline entries per step")
    ratios = {label: row(label) for label in runs}
    if len(peaks) == 1:
        print(f"  traced peak {peaks.pop():,} B, the same in every repeat")
    else:
        print(f"  traced peak differs between repeats: {', '.join(f'{p:,}' for p in sorted(peaks))} B")
    verdict = "met" if ratios["traced"] <= TARGET else "NOT met"
    if results is not None:
        traced = [r[0] * 1000 / args.steps for r in runs["traced"]]
        untraced = [u[0] * 1000 / args.steps for u in runs["untraced"]]
        results.add(f"tracer/{id}", "traced / untraced step (wall)", name, "ms", "traced",
                    traced, "untraced", untraced,
                    ratios=[t / u for t, u in zip(traced, untraced)],
                    target=f"ratio <= {TARGET}", met=ratios["traced"] <= TARGET)
    print(f"  target: traced wall time <= {TARGET}x untraced: {verdict} ({ratios['traced']:.2f}x;"
          f" the tracer's own share over the empty labkit mode: "
          f"{ratios['traced'] - ratios['empty labkit mode']:+.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    _report.add_arguments(parser, "2 steps x 3 repeats: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 2, 3
    torch.set_num_threads(args.threads)
    results = _report.Results("memory_overhead", args.quick, {
        "steps": args.steps, "repeats": args.repeats, "threads": args.threads})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.steps} steps x "
          f"{args.repeats} repeats per run")
    compare("mlp 1M (forward, backward, Adam)", mlp_1m, args, results, "mlp_1m")
    compare("deep 100 (forward, backward)", deep_100, args, results, "deep_100")
    compare("deep 100 (forward only)", lambda: deep_100(backward=False), args, results,
            "deep_100_forward")
    results.finish(args.json)


if __name__ == "__main__":
    main()
