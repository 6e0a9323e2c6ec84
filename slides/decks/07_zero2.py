"""Deck 07's values: ZeRO-2 run on real ranks (labkit.stages' reference DDP, ZeRO-1 and ZeRO-2),
measured by the tracer and the ledger, beside labkit.theory's formulas."""
import labkit
from labkit import plots, theory

WIDTH, LAYERS, BUCKET, LOCAL_BATCH = 128, 8, 2**17, 8    # notebook 07's model and buckets
SCHEMES = ("DDP", "ZeRO-1", "ZeRO-2")
WORLDS = (2, 4)
TOY_BUCKETS = [(5, 6), (4, 4)]    # notebook 07's toy: (elements, padded to a multiple of 2)


def toy_buckets():
    """Notebook 07's picture: one reduce-scatter per bucket; rank r keeps slice r of each."""
    import torch
    import torch.distributed as dist

    from labkit.compat import reduce_scatter_tensor

    rank, world = dist.get_rank(), dist.get_world_size()
    full, kept, j = [], [], 0
    for numel, padded in TOY_BUCKETS:
        grad = torch.zeros(padded)
        grad[:numel] = torch.arange(j + 1.0, j + numel + 1) * (rank + 1)
        j += padded
        mine = torch.empty(padded // world)
        reduce_scatter_tensor(mine, grad)
        full.append(grad)
        kept.append(mine)
    return torch.cat(full), torch.cat(kept)


def three_schemes(with_toy):
    """On each rank: the reference DDP, ZeRO-1 and ZeRO-2 (labkit.stages) on notebook 07's MLP;
    two warm-up steps, then one step under the tracer and the ledger."""
    import torch
    import torch.distributed as dist

    from labkit import models, stages

    rank = dist.get_rank()
    out = {"toy": toy_buckets() if with_toy else None}
    make = lambda: models.MLP(*[WIDTH] * (LAYERS + 1))   # noqa: E731
    x, y = make().batch(LOCAL_BATCH, torch.Generator().manual_seed(rank))
    for stage, name in enumerate(SCHEMES):
        torch.manual_seed(0)
        model = make()
        mem = labkit.MemoryTracer(model)
        extra = {"bucket_bytes": BUCKET} if stage == 2 else {}
        impl = stages.STAGES[stage](model, torch.optim.Adam, tag=mem.tag, lr=1e-3, **extra)
        mem.optimizers = [impl.optim]
        for _ in range(2):
            impl.zero_grad()
            model.loss(model(x), y).backward()
            impl.step()
        impl.zero_grad()
        with mem:
            loss = model.loss(model(x), y)
            with labkit.CommCounter() as in_backward:
                loss.backward()
            with labkit.CommCounter() as in_step:
                impl.step()
        out[name] = {"rest": mem.current, "peak": mem.peak_total, "timeline": mem.timeline,
                     "calls": [("backward", c.op, c.payload_bytes, c.wire_bytes)
                               for c in in_backward.calls]
                     + [("step", c.op, c.payload_bytes, c.wire_bytes) for c in in_step.calls]}
    return out


def mb(nbytes):
    return f"{nbytes / 1e6:.3f} MB"


def values():
    import matplotlib.pyplot as plt

    from labkit import models

    num_params = sum(p.numel() for p in models.MLP(*[WIDTH] * (LAYERS + 1)).parameters())
    runs = {n: labkit.launch(three_schemes, nprocs=n, args=(n == 2,), quiet=True)
            for n in WORLDS}
    stage = dict(zip(SCHEMES, (0, 1, 2)))

    def formula(name, n):
        return theory.zero_memory_breakdown(num_params, n, stage[name], k=8, param_bytes=4,
                                            grad_bytes=4)

    # what every rank holds before and after each bucket's reduce-scatter
    toy = [r["toy"] for r in runs[2]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.1), gridspec_kw={"width_ratios": [10, 5]},
                             layout="constrained")
    plots.collective_picture([t[0] for t in toy], [t[1] for t in toy], axes=axes,
                             title="2 ranks (measured): elements 0-5 are bucket 0 (5 gradients "
                                   "+ 1 padding), 6-9 bucket 1")
    toy_figure = fig

    # memory by category, rank by rank, beside the formula (4 ranks)
    n = 4
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True, layout="constrained")
    for ax, name in zip(axes, SCHEMES):
        plots.memory_bars([r[name]["rest"] for r in runs[n]], formula(name, n), unit="MB", ax=ax,
                          title=f"{name}, {n} ranks, at rest after the step")
        ax.set_ylabel("MB per rank" if ax is axes[0] else "")
        if ax is not axes[-1]:
            ax.get_legend().remove()
    bars_figure = fig

    rows = []
    for n in WORLDS:
        for name in SCHEMES:
            rest = runs[n][0][name]["rest"]
            states = rest["params"] + rest["grads"] + rest["optimizer"]
            f = formula(name, n)
            rows.append(f"| {name} | {n} | {rest['params']:,} | {rest['grads']:,} | "
                        f"{rest['optimizer']:,} | **{states:,}** | {sum(f.values()):,.0f} |")

    # the gradients through one step: ZeRO-1 against ZeRO-2, rank 0 of 2
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), sharey=True, layout="constrained")
    for ax, name in zip(axes, ("ZeRO-1", "ZeRO-2")):
        plots.memory_timeline(runs[2][0][name]["timeline"], unit="MB", ax=ax,
                              title=f"{name}, rank 0 of 2, one step (measured): peak "
                                    f"{runs[2][0][name]['peak'] / 1e6:.3g} MB")
    axes[0].get_legend().remove()
    timeline_figure = fig

    # bytes per step: the ledger beside the formula
    def wire(name, n):
        return sum(c[3] for c in runs[n][0][name]["calls"])

    def model(name, n):
        return theory.zero_bytes_per_step(num_params, n, stage[name], grad_bytes=4, param_bytes=4)

    names = {"all_reduce": "all-reduce", "reduce_scatter": "reduce-scatter",
             "all_gather": "all-gather"}
    byte_rows = []
    for name in SCHEMES:
        counts = {}
        for phase, op, _, _ in runs[4][0][name]["calls"]:
            key = f"{names.get(op, op)}{' (backward)' if phase == 'backward' else ''}"
            counts[key] = counts.get(key, 0) + 1
        what = " + ".join(f"{v} {k}" for k, v in counts.items())
        cells = " | ".join(f"{mb(wire(name, n))} / {mb(model(name, n))}" for n in WORLDS)
        byte_rows.append(f"| {name} | {what} | {cells} | "
                         f"{wire(name, 4) / wire('DDP', 4):.4f} |")

    # the paper's scale (formula, ZeRO §5.2): 7.5e9 parameters, mixed precision, K = 12
    paper_rows = "\n".join(
        f"| {nd} | {theory.zero_memory(7.5e9, nd, 0) / 1e9:g} GB | "
        f"{theory.zero_memory(7.5e9, nd, 1) / 1e9:.4g} GB | "
        f"{theory.zero_memory(7.5e9, nd, 2) / 1e9:.4g} GB |" for nd in (4, 16, 64, 1024))

    def state(name, n):
        rest = runs[n][0][name]["rest"]
        return rest["params"] + rest["grads"] + rest["optimizer"]

    return {
        "num_params": f"{num_params:,}",
        "width": str(WIDTH),
        "paper_psi": "7.5 × 10⁹",
        "layer_bytes": f"{(WIDTH * WIDTH + WIDTH) * 4:,}",
        "bucket_bytes": f"{BUCKET:,}",
        "toy_figure": toy_figure,
        "bars_figure": bars_figure,
        "rest_rows": "\n".join(rows),
        "timeline_figure": timeline_figure,
        "byte_rows": "\n".join(byte_rows),
        "zero2_over_ddp": f"{wire('ZeRO-2', 4) / wire('DDP', 4):.4f}",
        "paper_rows": paper_rows,
        "zero2_saving_4": f"{1 - state('ZeRO-2', 4) / state('DDP', 4):.0%}",
    }
