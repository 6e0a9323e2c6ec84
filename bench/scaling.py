"""Scaling: step time and bytes per step at 1, 2 and 4 ranks, beside the alpha-beta prediction.

What: the course's reference DDP, ZeRO-1 and ZeRO-3 (`labkit.stages`, the algorithms of notebooks
02, 06 and 08, with synchronous collectives) training one model, a 4 x Linear(1024, 1024) MLP with
Tanh between (4,198,400 parameters, float32) with Adam, at world sizes 1, 2 and 4: the step time
(median and min-max over repeats; a block's time is its slowest rank's) and the wire bytes per step
and rank (`labkit.CommCounter`, ring model) beside `labkit.theory`'s formula and beside the
alpha-beta model of the step.

The model of a step (fixed global batch: --global-batch samples per step, split evenly over the N
ranks, so the work per step is the same at every N and more ranks should make it faster):

    predicted step(N) = F1 / N + U1 * u(N) + sum over the step's collectives of
                        labkit.theory.collective_time(op, bytes, N, alpha, beta)

F1 = forward + backward and U1 = the stage's step() (the update), both measured at N = 1 in this
run; u(N) = 1 for DDP (every rank updates every parameter) and 1/N for ZeRO (each its shard). The
collectives are the ones the step really ran at N (the ledger: op and payload of each); the
stages' collectives are synchronous, so their times add. alpha and beta come from
`labkit.theory.fit_alpha_beta` on a sweep of all-reduces (4 KiB to 16 MiB) on 2 ranks, run first
in the 2-rank launch of this run.

More ranks than cores: that model gives every rank a core of its own. With N ranks on C usable
cores (`labkit.usable_cores()`) and N > C, each rank gets C/N of a core, so its compute takes
N/C times longer: compute divides by C, not by N. A second prediction, "with the core share",
multiplies the compute terms by max(1, N/C); the bench prints both, and a DDP rank's step at
each N in two parts, forward + backward (no communication in it) beside F1/N and F1/min(N, C),
and step() (the all-reduces, then the update) beside its prediction, which shows where the time
went. gloo's own threads also compete with the ranks for the cores; the alpha and beta fitted at
2 ranks do not see that.

How: one launch per world size (gloo, 1 torch thread per rank; the 2-rank launch first runs the
all-reduce sweep); in each, after --warmup steps of each stage, one step of each under the ledger,
then --repeats blocks of --steps steps rotate between the stages.

Run: .venv/bin/python bench/scaling.py [--repeats N] [--steps S] [--global-batch B] [--quick]
[--json PATH]; --quick: 1 warm-up step, 2 blocks of 1 step, a 3-point sweep, to check that it runs
and computes its ratios.
Targets: none; the ratios are measured / predicted (step time) and measured / formula (bytes).
"""
import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import _report   # bench/_report.py: --quick, --json, progress bars, the results table

WIDTH, LAYERS, LR = 1024, 4, 1e-3
STAGES = {"DDP": 0, "ZeRO-1": 1, "ZeRO-3": 3}
SWEEP_BYTES = [4 * 2**10 * 4**k for k in range(7)]   # 4 KiB .. 16 MiB
QUICK_SWEEP_BYTES = [4 * 2**10, 256 * 2**10, 16 * 2**20]


def model() -> torch.nn.Sequential:
    layers = []
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def all_reduce_sweep(sizes, repeats) -> list:
    """Median seconds of a synchronous all-reduce of each size (bytes, float32) on this group;
    each call's time is the slowest rank's."""
    out = []
    for size in sizes:
        x = torch.ones(size // 4)
        dist.all_reduce(x)   # warm: the buffers exist
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - start)
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        out.append(statistics.median(slowest.tolist()))
    return out


def rank_main(global_batch, steps, repeats, warmup, sweep, show=False) -> dict:
    """On each rank: (2 ranks: the sweep), warm-up, one counted step per stage, timed blocks."""
    import labkit
    from labkit import stages
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    swept = all_reduce_sweep(*sweep) if sweep else None
    local = global_batch // world
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = [(torch.randn(local, WIDTH, generator=gen), torch.randn(local, WIDTH, generator=gen))
               for _ in range(2)]
    runs = {}
    for name, stage in STAGES.items():
        torch.manual_seed(0)
        net = model()
        runs[name] = (net, stages.STAGES[stage](net, torch.optim.Adam, lr=LR))
    done = dict.fromkeys(STAGES, 0)

    def step(name):
        """One step; (forward + backward seconds, step() seconds)."""
        net, stage = runs[name]
        x, y = batches[done[name] % len(batches)]
        start = time.perf_counter()
        torch.nn.functional.mse_loss(net(x), y).backward()
        middle = time.perf_counter()
        stage.step()
        stage.zero_grad()
        done[name] += 1
        return middle - start, time.perf_counter() - middle

    for name in STAGES:
        for _ in range(warmup):
            step(name)
    counted = {}
    for name in STAGES:
        dist.barrier()
        with labkit.CommCounter() as comm:
            step(name)
        counted[name] = {"wire": comm.total_wire_bytes(),
                         "calls": [(c.op, c.payload_bytes) for c in comm.calls],
                         "ops": {op: row["calls"] for op, row in comm.summary().items()}}
    names = list(STAGES)
    times = {name: [] for name in names}
    phases = {name: [] for name in names}   # (forward + backward, step()) per step
    for repeat in _report.progress(range(repeats), desc=f"{world} rank(s)",
                                   show=show and rank == 0):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                phases[name].append(step(name))
            times[name].append(time.perf_counter() - start)
    return {"times": times, "phases": phases, "counted": counted, "swept": swept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed blocks per stage")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=128,
                        help="samples per step, split evenly over the ranks")
    parser.add_argument("--sweep-repeats", type=int, default=10,
                        help="all-reduces per size in the alpha-beta sweep")
    _report.add_arguments(parser, "1 warm-up step, 2 blocks of 1 step, a 3-point sweep")
    args = parser.parse_args()
    sizes = SWEEP_BYTES
    if args.quick:
        args.warmup, args.repeats, args.steps, args.sweep_repeats = 1, 2, 1, 3
        sizes = QUICK_SWEEP_BYTES
    worlds = (1, 2, 4)
    if any(args.global_batch % n for n in worlds):
        parser.error(f"--global-batch must split evenly over {worlds} ranks")
    import labkit
    from labkit import theory
    cores = labkit.usable_cores()
    psi = sum(p.numel() for p in model().parameters())
    results = _report.Results("scaling", args.quick, {
        "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup,
        "global_batch": args.global_batch, "ranks": list(worlds), "sweep_bytes": sizes,
        "sweep_repeats": args.sweep_repeats, "usable_cores": cores, "parameters": psi})
    print(f"torch {torch.__version__}, {os.cpu_count()} cores ({cores} usable), gloo, 1 thread "
          f"per rank; {LAYERS} x Linear({WIDTH}, {WIDTH}), {psi:,} parameters (float32), Adam; "
          f"global batch {args.global_batch} split over the ranks (fixed global batch); stages "
          f"{', '.join(STAGES)} (labkit.stages); {args.warmup} warm-up step(s), 1 counted step, "
          f"then {args.repeats} rotating blocks of {args.steps} step(s)")
    by_world = {}
    for n in worlds:
        sweep = (sizes, args.sweep_repeats) if n == 2 else None
        work = len(STAGES) * (args.warmup + 1 + args.steps * args.repeats)
        by_world[n] = labkit.launch(rank_main, nprocs=n, threads=1, quiet=True,
                                    timeout=180 + 3 * n * work,
                                    args=(args.global_batch, args.steps, args.repeats,
                                          args.warmup, sweep, _report.show_progress()))
    labkit.shutdown()

    swept = by_world[2][0]["swept"]
    alpha, beta = theory.fit_alpha_beta(sizes, swept, "all_reduce", 2)
    r2 = theory.r_squared(sizes, swept, alpha, beta, "all_reduce", 2)
    print(f"\nalpha-beta fit, all-reduce on 2 ranks ({len(sizes)} sizes, {sizes[0]:,}-"
          f"{sizes[-1]:,} B, median of {args.sweep_repeats} each): alpha = {alpha * 1e6:.1f} us, "
          f"beta = {beta * 1e9:.3f} ns/B ({1 / beta / 1e9 if beta else float('inf'):.2f} GB/s), "
          f"r^2 = {r2:.3f}")
    for size, seconds in zip(sizes, swept):
        print(f"  {size:>12,} B  measured {seconds * 1e3:8.3f} ms  model "
              f"{theory.collective_time('all_reduce', size, 2, alpha, beta) * 1e3:8.3f} ms")

    def blocks(n, name):   # ms per step of each block, its slowest rank's
        return [max(ts) * 1e3 / args.steps for ts in zip(*(r["times"][name] for r in by_world[n]))]

    def phase(n, name, i):  # median ms over the steps of rank 0 ... N-1, their slowest
        per_rank = [statistics.median(p[i] for p in r["phases"][name]) for r in by_world[n]]
        return max(per_rank) * 1e3

    one = {name: (phase(1, name, 0), phase(1, name, 1)) for name in STAGES}
    print("\nat 1 rank (ms): " + "; ".join(f"{name} forward+backward F1 {f:.1f}, update U1 "
                                            f"{u:.1f}" for name, (f, u) in one.items()))
    print("predicted step(N) = F1/N + U1*u(N) + sum of the step's collectives under the "
          "alpha-beta model; u = 1 (DDP), 1/N (ZeRO); 'core share': compute x max(1, N/"
          f"{cores})\n")
    head = (f"{'stage':<7}{'ranks':>6}{'measured ms [min-max]':>24}{'predicted':>10}"
            f"{'(compute+comm)':>16}{'meas/pred':>10}{'core share':>11}{'speedup':>8}"
            f"{'wire B/step':>13}{'formula B':>12}  collectives per step")
    print(head)
    summary = {}
    for name, stage in STAGES.items():
        f1, u1 = one[name]
        t1 = statistics.median(blocks(1, name))
        for n in worlds:
            measured = blocks(n, name)
            counted = by_world[n][0]["counted"][name]
            comm = sum(theory.collective_time(op, payload, n, alpha, beta)
                       for op, payload in counted["calls"]
                       if op in ("all_reduce", "reduce_scatter", "all_gather", "broadcast"))
            compute = f1 / n + u1 * (1 if stage == 0 else 1 / n)
            predicted = compute + comm * 1e3
            shared = compute * max(1, n / cores) + comm * 1e3
            wire = statistics.mean(r["counted"][name]["wire"] for r in by_world[n])
            formula = theory.zero_bytes_per_step(psi, n, stage, grad_bytes=4, param_bytes=4)
            med = statistics.median(measured)
            ops = ", ".join(f"{op} {k}" for op, k in counted["ops"].items())
            print(f"{name:<7}{n:>6}{_report.fmt_stats(_report.stats(measured)):>24}"
                  f"{predicted:>10.1f}{f'({compute:.0f}+{comm * 1e3:.0f})':>16}"
                  f"{med / predicted:>10.2f}{shared:>11.1f}{t1 / med:>8.2f}"
                  f"{wire:>13,.0f}{formula:>12,.0f}  {ops or '-'}")
            summary[(name, n)] = {"measured": med, "predicted": predicted, "shared": shared,
                                  "compute": compute, "comm": comm * 1e3}
            stage_id = name.lower().replace("-", "")
            results.add(f"scaling/step_time/{stage_id}/{n}", f"step time, {name}", f"{n} rank(s)",
                        "ms", "measured", measured, "alpha-beta model", predicted,
                        ratios=[m / predicted for m in measured],
                        note=f"compute {compute:.1f} ms + communication {comm * 1e3:.1f} ms")
            if n > cores:
                results.add(f"scaling/step_time_core_share/{stage_id}/{n}",
                            f"step time, {name}", f"{n} ranks, {cores} cores", "ms", "measured",
                            measured, "model, core share", shared,
                            ratios=[m / shared for m in measured])
            if n > 1:
                results.add(f"scaling/wire_bytes/{stage_id}/{n}", f"wire bytes per step, {name}",
                            f"{n} ranks", "B", "measured", wire, "formula", formula)
    results.extra["alpha_beta"] = {"alpha_s": alpha, "beta_s_per_byte": beta, "r_squared": r2,
                                   "sizes": sizes, "seconds": swept}
    results.extra["at_1_rank_ms"] = {name: {"forward_backward": f, "update": u}
                                     for name, (f, u) in one.items()}

    print("\na DDP rank's step in two parts, median ms per step (the slowest rank's): forward + "
          "backward (no communication in it), and step() (the all-reduces, then the update)")
    fb = {n: phase(n, "DDP", 0) for n in worlds}
    upd = {n: phase(n, "DDP", 1) for n in worlds}
    f1, u1 = fb[1], upd[1]
    for n in worlds:
        comm = summary[("DDP", n)]["comm"]
        print(f"  {n} rank(s): forward+backward {fb[n]:6.1f} (F1/N = {f1 / n:5.1f} with a core "
              f"each, F1/min(N, {cores}) = {f1 / min(n, cores):5.1f} with the cores shared); "
              f"step() {upd[n]:6.1f} (U1 + comm = {u1 + comm:5.1f}, with the core share "
              f"{u1 * max(1, n / cores) + comm:5.1f})")
    results.extra["ddp_phases_ms"] = {"forward_backward": fb, "step": upd}
    over = [n for n in worlds if n > cores]
    if not over:
        print(f"\nno world size here exceeds the {cores} usable cores: every rank has a core.")
        return results.finish(args.json)
    for n in over:
        own, shared = f1 / n, f1 / cores
        closer = "the cores shared" if abs(fb[n] - shared) < abs(fb[n] - own) else "a core each"
        ddp = summary[("DDP", n)]
        print(f"\nmore ranks than cores: {n} ranks on {cores} usable cores "
              f"(labkit.usable_cores()), so each rank gets {cores}/{n} of a core. A DDP rank's "
              f"forward + backward took {fb[n]:.1f} ms per step at {n} ranks: F1/{n} = "
              f"{own:.1f} ms if each rank had a core, F1/{cores} = {shared:.1f} ms with "
              f"{cores} cores shared by {n} ranks; the measurement is closer to {closer}. The "
              f"compute of a fixed global batch divides by the cores, not by the ranks, and "
              f"the ranks' collectives (and gloo's threads) compete for the same cores. DDP's "
              f"step at {n} ranks: measured {ddp['measured']:.1f} ms, predicted "
              f"{ddp['predicted']:.1f} ms with a core per rank, {ddp['shared']:.1f} ms with the "
              f"core share.")
        expected = u1 * n / cores + ddp["comm"]
        print(f"Its step() (all-reduces, then the update) took {upd[n]:.1f} ms against "
              f"{expected:.1f} ms predicted with the core share: " + (
                  f"{upd[n] / expected:.1f}x, so the all-reduces of {n} ranks on {cores} cores "
                  f"took longer than alpha and beta fitted on 2 ranks say (a rank's turn in the "
                  f"ring waits for a core)." if upd[n] > 1.2 * expected else
                  "the model with the core share accounts for it."))
        if cores in worlds:
            print(f"At {cores} ranks (one per core) DDP's step took "
                  f"{summary[('DDP', cores)]['measured']:.1f} ms: going from {cores} to {n} "
                  f"ranks made it {ddp['measured'] / summary[('DDP', cores)]['measured']:.2f}x "
                  f"as long.")
    results.finish(args.json)


if __name__ == "__main__":
    main()
