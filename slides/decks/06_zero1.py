"""Deck 06's values: ZeRO-1's reduce-scatter and all-gather on 4 real ranks, and the course's
reference ZeRO-1 (labkit.stages.ZeRO1) beside torch's ZeroRedundancyOptimizer + DDP on the same
model: optimizer state per rank (tracer) and the ledger of one step, against the formulas."""
import math

import torch

import labkit
from labkit import models, plots, theory

NUM, RANKS, TOY_LR = 10, 4, 0.1       # the toy: 10 elements, padded to 12 on 4 ranks; SGD
WIDTHS = (256, 512, 128, 15)          # notebook 06's model: three Linear layers of unequal size
LOCAL_BATCH, LR, WORLDS = 8, 1e-3, (2, 4)
PSI_BIG, N_BIG = 7.5e9, 64            # the ZeRO paper's example, for elements against bytes


def toy_step():
    """Notebook 06's toy: rank r's gradient of element j is (r+1)(j+1); SGD, lr 0.1, from 0."""
    import torch.distributed as dist

    from labkit.compat import all_gather_into_tensor, reduce_scatter_tensor

    rank, world = dist.get_rank(), dist.get_world_size()
    shard_size = math.ceil(NUM / world)
    grad = torch.zeros(shard_size * world)                      # the padded flat gradient
    grad[:NUM] = torch.arange(1, NUM + 1.0) * (rank + 1)
    summed = torch.empty(shard_size)
    reduce_scatter_tensor(summed, grad)                         # rank r: the sum of shard r
    shard = torch.zeros(shard_size) - TOY_LR * summed / world      # SGD on shard r only
    params = torch.empty(shard_size * world)
    all_gather_into_tensor(params, shard)                       # every shard, everywhere
    return grad, summed, shard, params


def measured_steps():
    """On each rank: labkit.stages.ZeRO1, then torch's ZeroRedundancyOptimizer + DDP, on the
    same model and data; two warm-up steps each, then one step under the tracer and the ledger."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from labkit import stages

    rank = dist.get_rank()
    x, y = models.MLP(*WIDTHS).batch(LOCAL_BATCH, torch.Generator().manual_seed(rank))
    out = {}
    for name in ("zero1", "torch"):
        torch.manual_seed(0)
        model = models.MLP(*WIDTHS)
        if name == "zero1":
            forward, zero = model, stages.ZeRO1(model, torch.optim.Adam, lr=LR)
        else:
            forward = DDP(model)
            zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam,
                                           lr=LR)

        def step():
            zero.zero_grad()
            model.loss(forward(x), y).backward()
            zero.step()

        step()
        step()                         # DDP rebuilds its buckets at the start of step 2
        with labkit.MemoryTracer(model, zero.optim) as mem, labkit.CommCounter() as comm:
            step()
        now = mem.current
        out[name] = {"states": {k: now[k] for k in ("params", "grads", "optimizer")},
                     "calls": [(c.op, c.payload_bytes, c.wire_bytes) for c in comm.calls]}
    out["toy"] = toy_step() if dist.get_world_size() == RANKS else None
    return out


def _by_op(calls):
    rows = {}
    for op, payload, wire in calls:
        row = rows.setdefault(op, [0, 0, 0.0])
        row[0], row[1], row[2] = row[0] + 1, row[1] + payload, row[2] + wire
    return rows


def values():
    import matplotlib.pyplot as plt

    out = {}
    num = sum(p.numel() for p in models.MLP(*WIDTHS).parameters())
    runs = {n: labkit.launch(measured_steps, nprocs=n, quiet=True) for n in WORLDS}

    # the toy: reduce-scatter, then all-gather, what every rank holds
    toy = [r["toy"] for r in runs[RANKS]]
    for key, (before, after), title in (
            ("reduce_scatter_figure", (0, 1),
             f"reduce_scatter_tensor on {RANKS} gloo ranks, measured at build"),
            ("all_gather_figure", (2, 3),
             f"all_gather_into_tensor on {RANKS} gloo ranks, measured at build")):
        widths = [len(toy[0][before]), len(toy[0][after])]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.1), gridspec_kw={"width_ratios": widths},
                                 layout="constrained")
        plots.collective_picture([t[before] for t in toy], [t[after] for t in toy], title=title,
                                 axes=axes)
        out[key] = fig
    out["toy_num"] = str(NUM)
    out["toy_padded"] = str(math.ceil(NUM / RANKS) * RANKS)
    out["toy_shard"] = str(math.ceil(NUM / RANKS))
    out["ranks"] = str(RANKS)
    out["toy_lr"] = f"{TOY_LR:g}"

    # memory per rank at 4 ranks: model states, both implementations, against the formula
    formula = theory.zero_memory_breakdown(num, RANKS, 1, k=8, param_bytes=4, grad_bytes=4)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True, layout="constrained")
    for ax, name, label in zip(axes, ("zero1", "torch"),
                               ("labkit.stages.ZeRO1 (flat, padded)", "torch ZeroRedundancyOptimizer")):
        plots.memory_bars([r[name]["states"] for r in runs[RANKS]], formula, unit="MB", ax=ax,
                          title=f"{label}, {RANKS} ranks")
    axes[0].get_legend().remove()
    out["state_bars_figure"] = fig
    rows = []
    for rank, r in enumerate(runs[RANKS]):
        rows.append(f"| {rank} | {r['zero1']['states']['optimizer']:,} | "
                    f"{r['torch']['states']['optimizer']:,} |")
    padded_share = math.ceil(num / RANKS)
    out["state_rows"] = "\n".join(rows)
    out["state_formula"] = f"{num * 8 / RANKS:,.0f}"
    out["state_padded"] = f"{padded_share * 8:,}"
    largest = max(p.numel() for p in models.MLP(*WIDTHS).parameters())
    out["largest_share"] = f"{largest / num:.0%}"
    out["num_params"] = f"{num:,}"
    out["model"] = f"MLP {'-'.join(map(str, WIDTHS))}"

    # the ledger of one step, both implementations, N = 2 and 4
    op_names = {"reduce_scatter": "reduce-scatter", "all_gather": "all-gather",
                "all_reduce": "all-reduce", "broadcast": "broadcast"}
    rows, ratios = [], []
    for n in WORLDS:
        padded = math.ceil(num / n) * n
        formulas = {"zero1": theory.zero_bytes_per_step(padded, n, 1, grad_bytes=4, param_bytes=4),
                    "torch": theory.ddp_bytes_per_step(num, n, 4)
                    + theory.wire_bytes("broadcast", 4 * num, n)}
        totals = {}
        for name, label in (("zero1", "ZeRO-1 (stages)"), ("torch", "torch ZeRO + DDP")):
            by = _by_op(runs[n][0][name]["calls"])
            calls = ", ".join(f"{op_names.get(op, op)} × {c}" for op, (c, _, _) in by.items())
            payload = sum(p for _, p, _ in by.values())
            wire = sum(w for _, _, w in by.values())
            totals[name] = wire
            rows.append(f"| {n} | {label} | {calls} | {payload:,} | {wire:,.0f} | "
                        f"{formulas[name]:,.0f} |")
        ratios.append(f"{totals['torch'] / totals['zero1']:.3g} at N = {n}")
    out["ledger_rows"] = "\n".join(rows)
    out["ledger_ratios"] = ", ".join(ratios)
    out["ddp_wire_4"] = f"{theory.ddp_bytes_per_step(num, RANKS, 4):,.0f}"

    # elements against bytes, at the paper's scale
    out["big_psi"] = f"{PSI_BIG / 1e9:g} × 10<sup>9</sup>"
    out["big_n"] = str(N_BIG)
    out["big_elements"] = f"{2 * PSI_BIG / 1e9:g} × 10<sup>9</sup> elements"
    out["big_bytes"] = f"{theory.zero_bytes_per_step(PSI_BIG, N_BIG, 1) / 1e9:.4g} GB"
    out["big_as_bytes"] = f"{2 * PSI_BIG / 1e9:g} GB"
    out["big_limit"] = f"{2 * 2 * PSI_BIG / 1e9:g} GB"
    # the same at the measured scale: ZeRO-1 at 2 ranks, fp32
    n = WORLDS[0]
    wire = sum(w for _, _, w in runs[n][0]["zero1"]["calls"])
    out["small_n"] = str(n)
    out["small_two_psi"] = f"{2 * num:,}"
    out["small_wire"] = f"{wire:,.0f}"
    out["small_formula"] = f"{theory.zero_bytes_per_step(math.ceil(num / n) * n, n, 1, 4, 4):,.0f}"
    return out
