"""Deck 09's values: DDP and ZeRO-1, 2, 3 side by side on real ranks (labkit.stages' reference
implementations, the tracer and the ledger), ZeRO's Table 1 and Figure 1 by execution
(labkit.simulate), and the alpha-beta model's "when does communication dominate", with alpha,
beta and the compute time T1 measured on this machine."""
import statistics
import time

import labkit
from labkit import plots, theory

WIDTHS = (64, 256, 512, 128, 16)          # notebook 09's model: four Linear units, unequal
LOCAL_BATCH, LR, BUCKET, REPEATS = 32, 1e-3, 2**18, 5
SCHEMES = ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3")
WORLD = 2
FIT_SIZES = [4**k for k in range(6, 12)]  # all-reduce sizes for alpha and beta: 4 KiB ... 4 MiB
FIT_REPEATS = 5
SWEEP_WIDTH, GLOBAL_BATCH = 512, 256      # notebook 09's sweep model: one 512 x 512 Linear
TABLE1_SIZES = (64, 1024)                 # N_d of Table 1 run here (the paper's rows, subsampled)


def units_model():
    import torch.nn as nn

    layers = []
    for n_in, n_out in zip(WIDTHS, WIDTHS[1:]):
        layers += [nn.Linear(n_in, n_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def four_strategies():
    """On each rank: the four reference stages on the same model and data; two warm-up steps,
    one step under the tracer and the ledger, REPEATS timed steps in rotating order. Then the
    machine's alpha-beta fit (all-reduces timed by the ledger) and T1 on rank 0."""
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    from labkit import stages

    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(LOCAL_BATCH, WIDTHS[0], generator=gen)
    y = torch.randn(LOCAL_BATCH, WIDTHS[-1], generator=gen)
    out, steps = {}, {}
    for stage, name in enumerate(SCHEMES):
        torch.manual_seed(0)
        model = units_model()
        mem = labkit.MemoryTracer(model, timeline=False)
        extra = {"bucket_bytes": BUCKET} if stage == 2 else {}
        impl = stages.STAGES[stage](model, torch.optim.Adam, tag=mem.tag, lr=LR, **extra)
        mem.optimizers = [impl.optim]

        def step(model=model, impl=impl):
            nn.functional.mse_loss(model(x), y).backward()
            impl.step()
            impl.zero_grad()
        step()
        step()
        with mem, labkit.CommCounter() as comm:
            nn.functional.mse_loss(model(x), y).backward()
            impl.step()
        rest = mem.current
        impl.zero_grad()
        steps[name] = step
        out[name] = {"rest": rest, "peak": mem.peak_total, "times": [],
                     "calls": [(c.op, c.payload_bytes, c.wire_bytes) for c in comm.calls]}
    for repeat in range(REPEATS):
        shift = repeat % len(SCHEMES)
        for name in SCHEMES[shift:] + SCHEMES[:shift]:
            dist.barrier()
            start = time.perf_counter()
            steps[name]()
            out[name]["times"].append(time.perf_counter() - start)

    # alpha and beta: gloo all-reduces of 4 KiB to 4 MiB, timed by the ledger (notebook 09, §5)
    with labkit.CommCounter() as comm:
        for size in FIT_SIZES:
            t = torch.zeros(size // 4)
            for _ in range(FIT_REPEATS + 1):     # the first of each size is a warm-up
                dist.all_reduce(t)
    fit = {}
    for i, call in enumerate(comm.calls):
        if i % (FIT_REPEATS + 1):
            fit.setdefault(call.payload_bytes, []).append(call.seconds)
    out["fit"] = fit

    # T1: one rank's compute for the sweep model's global batch (a DDP step without its
    # all-reduce), while the other rank waits
    if rank == 0:
        torch.manual_seed(0)
        layer = nn.Linear(SWEEP_WIDTH, SWEEP_WIDTH, bias=False)
        opt = torch.optim.Adam(layer.parameters(), lr=LR)
        xs = torch.randn(GLOBAL_BATCH, SWEEP_WIDTH)
        seconds = []
        for _ in range(7):
            start = time.perf_counter()
            layer(xs).square().mean().backward()
            opt.step()
            opt.zero_grad()
            seconds.append(time.perf_counter() - start)
        out["T1"] = statistics.median(seconds[2:])
    dist.barrier()
    return out


def step_comm_time(strategy, num_params, world_size, elem_bytes, alpha, beta):
    """Seconds of one step's collectives under the alpha-beta ring model, the whole model as one
    buffer (notebook 09's step_comm_time)."""
    size = num_params * elem_bytes
    time_of = lambda op: theory.collective_time(op, size, world_size, alpha, beta)   # noqa: E731
    if strategy == "ddp":
        return time_of("all_reduce")
    gathers = 2 if strategy == "zero3" else 1
    return time_of("reduce_scatter") + gathers * time_of("all_gather")


def comm_bound(t1, num_params, alpha, beta, strategy, limit=4096):
    """The smallest N whose communication takes at least the compute T1 / N (None: none up to
    limit)."""
    for n in range(1, limit + 1):
        if step_comm_time(strategy, num_params, n, 4, alpha, beta) >= t1 / n:
            return n
    return None


def values():
    import matplotlib.pyplot as plt

    from labkit import simulate

    ranks = labkit.launch(four_strategies, nprocs=WORLD, threads=1, quiet=True)
    num_params = sum(p.numel() for p in units_model().parameters())
    stage = dict(zip(SCHEMES, (0, 1, 2, 3)))

    # --- every strategy side by side -----------------------------------------------------------
    def state(d):
        return d["rest"]["params"] + d["rest"]["grads"] + d["rest"]["optimizer"]

    rows, summary = [], {}
    for name in SCHEMES:
        worst = max((r[name] for r in ranks), key=state)
        formula = theory.zero_memory_breakdown(num_params, WORLD, stage[name], k=8,
                                               param_bytes=4, grad_bytes=4)
        wire = sum(c[2] for c in ranks[0][name]["calls"])
        wire_formula = theory.zero_bytes_per_step(num_params, WORLD, stage[name], grad_bytes=4,
                                                  param_bytes=4)
        times = [max(ts) for ts in zip(*(r[name]["times"] for r in ranks))]
        summary[name] = {"rest": worst["rest"], "state": state(worst),
                         "formula": sum(formula.values()),
                         "peak": max(r[name]["peak"] for r in ranks), "wire": wire,
                         "wire_formula": wire_formula, "ms": statistics.median(times) * 1e3}
    ddp_wire = summary["DDP"]["wire"]
    for name, s in summary.items():
        calls = len(ranks[0][name]["calls"])
        rows.append(f"| {name.replace('-', chr(0x2011))} | {s['state']:,} | {s['formula']:,.0f} | "
                    f"{s['peak']:,} | {s['wire']:,.0f} | {s['wire_formula']:,.0f} | "
                    f"{s['wire'] / ddp_wire:.3f} | {calls} | {s['ms']:.1f} |")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.7), layout="constrained")
    plots.strategy_bars(SCHEMES, [summary[n]["rest"] for n in SCHEMES],
                        [summary[n]["wire"] for n in SCHEMES],
                        memory_formula=[summary[n]["formula"] for n in SCHEMES],
                        wire_formula=[summary[n]["wire_formula"] for n in SCHEMES],
                        peaks=[summary[n]["peak"] for n in SCHEMES],
                        step_ms=[summary[n]["ms"] for n in SCHEMES], axes=axes,
                        where=f"{WORLD} ranks",
                        time_label=f"ms per step (median of {REPEATS}, measured here)")
    strategy_figure = fig

    # --- ZeRO's Table 1 and Figure 1 by execution ---------------------------------------------
    start = time.perf_counter()
    cells = simulate.table1(world_sizes=TABLE1_SIZES)
    baseline = {n: simulate.zero(7.5e9, world_size=n, stage=0).total for n in TABLE1_SIZES}
    simulate_s = time.perf_counter() - start
    table_rows = []
    for n in TABLE1_SIZES:
        row = [c for c in cells if c["world_size"] == n]
        table_rows.append(f"| {n} | {baseline[n] / 1e9:g} | " + " | ".join(
            f"{c['gb']:.4f} / **{c['paper_gb']}** ({c['match']})" for c in row) + " |")
    kinds = [c["match"] for c in cells]
    printed = [c for c in theory.zero_table1() if c["model"] == "7.5B"]
    fine = [2 ** (k / 8) for k in range(81)]
    names = ("baseline", "P_os", "P_os+g", "P_os+g+p")
    measured = {names[s]: (list(TABLE1_SIZES), [c["gb"] * 1e9 for c in cells if c["stage"] == s])
                for s in (1, 2, 3)}
    measured["baseline"] = (list(TABLE1_SIZES), list(baseline.values()))
    ax = plots.memory_vs_world_size(
        {names[s]: (fine, [theory.zero_memory(7.5e9, n, s) for n in fine]) for s in range(4)},
        measured=measured,
        printed=[(c["world_size"], float(c["paper_gb"]) * 1e9) for c in printed],
        device=(32e9, "32 GB (V100)"), at=64,
        title="7.5e9 parameters, mixed-precision Adam (K = 12): measured by labkit.simulate")
    ax.figure.set_size_inches(9, 4.0)
    figure1 = ax.figure
    at64 = {s: next(c["gb"] for c in cells if c["world_size"] == 64 and c["stage"] == s)
            for s in (1, 2, 3)}

    # --- when does communication dominate? ----------------------------------------------------
    fit = ranks[0]["fit"]
    fit_t = [statistics.median(fit[s]) for s in FIT_SIZES]
    alpha, beta = theory.fit_alpha_beta(FIT_SIZES, fit_t, op="all_reduce", world_size=2)
    t1 = ranks[0]["T1"]
    psi = SWEEP_WIDTH ** 2
    ns = list(range(2, 65))                            # whole numbers of ranks
    crossing = {s: comm_bound(t1, psi, alpha, beta, s) for s in ("ddp", "zero3")}
    ax = plots.compute_vs_comm(
        ns, {"compute, T1 / N": [t1 / n for n in ns],
             "DDP, ZeRO-1, ZeRO-2: communication": [step_comm_time("ddp", psi, n, 4, alpha, beta)
                                                    for n in ns],
             "ZeRO-3: communication": [step_comm_time("zero3", psi, n, 4, alpha, beta)
                                       for n in ns]},
        marks={f"DDP, ZeRO-1, ZeRO-2 bound from N = {crossing['ddp']}": crossing["ddp"],
               f"ZeRO-3 bound from N = {crossing['zero3']}": crossing["zero3"]},
        colours={"compute, T1 / N": "C0", "DDP, ZeRO-1, ZeRO-2: communication": "C3",
                 "ZeRO-3: communication": "C1",
                 f"DDP, ZeRO-1, ZeRO-2 bound from N = {crossing['ddp']}": "C3",
                 f"ZeRO-3 bound from N = {crossing['zero3']}": "C1"},
        log=True, title="α-β model with α, β and T1 measured on this machine (gloo, CPU)")
    ax.figure.set_size_inches(8, 4.4)
    comm_figure = ax.figure
    return {
        "paper_psi": "7.5 × 10⁹",
        "nd_max": str(max(TABLE1_SIZES)),
        "adam_bytes": f"{summary['DDP']['rest']['optimizer'] / num_params:.4g} B/param",
        "num_params": f"{num_params:,}",
        "widths": " → ".join(map(str, WIDTHS)),
        "world": str(WORLD),
        "strategy_figure": strategy_figure,
        "strategy_rows": "\n".join(rows),
        "table1_rows": "\n".join(table_rows),
        "table1_sizes": ", ".join(map(str, TABLE1_SIZES)),
        "table1_count": f"{sum(map(bool, kinds))} of {len(cells)}",
        "table1_kinds": ", ".join(f"{kinds.count(k)} {k}" for k in ("exact", "rounded",
                                                                     "truncated")),
        "simulate_s": f"{simulate_s:.1f} s",
        "figure1": figure1,
        "figure1_at64": ", ".join(f"{names[s]} {at64[s]:.4g} GB" for s in (1, 2, 3)),
        "alpha": f"{alpha * 1e6:.0f} µs",
        "bandwidth": f"{1 / beta / 1e9:.2f} GB/s",
        "t1": f"{t1 * 1e3:.2f} ms",
        "sweep_params": f"{psi:,}",
        "global_batch": str(GLOBAL_BATCH),
        "comm_figure": comm_figure,
    }
