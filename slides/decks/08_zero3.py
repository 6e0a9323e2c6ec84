"""Deck 08's values: ZeRO-3 on real ranks (notebook 08's solution, with and without prefetch,
beside labkit.stages' reference DDP), measured by the tracer, the ledger and a clock, beside
labkit.theory's formulas."""
import datetime
import math
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import labkit
from labkit import plots, theory
from labkit.compat import all_gather_into_tensor, reduce_scatter_tensor

WAIT = datetime.timedelta(seconds=30)
WIDTHS = (64, 256, 256, 256, 256, 10)      # notebook 08's model: five Linear units, unequal
LOCAL_BATCH, LR = 32, 1e-3
SCHEMES = ("ZeRO-3", "ZeRO-3 prefetch")
PSI, RANKS = 5, 2                           # notebook 08's toy unit: 5 parameters on 2 ranks


# Notebook 08's solution (notebooks/source/08_zero3.ipynb, the ZeRO3 cell), unchanged.
class ZeRO3(nn.Module):
    """ZeRO stage 3: rank r stores slice r of each unit's flat parameters, and gathers a unit only
    while it computes (forward, then backward); also the optimizer of those slices."""

    def __init__(self, module, optimizer_class, *, prefetch=False, **kwargs):
        super().__init__()
        self.module, self.prefetch = module, prefetch
        self.world, rank = dist.get_world_size(), dist.get_rank()
        self.units = [u for u in module.children() if any(True for _ in u.parameters())]
        self.flats, self.params, self.where, shards = [], [], {}, []
        with torch.no_grad():
            for i, unit in enumerate(self.units):
                params = list(unit.parameters())
                size = math.ceil(sum(p.numel() for p in params) / self.world)
                flat = torch.zeros(size * self.world, dtype=params[0].dtype)
                offset = 0
                for p in params:                    # each parameter a view of its unit's flat
                    flat[offset:offset + p.numel()].copy_(p.flatten())
                    p.data = flat[offset:offset + p.numel()].view_as(p)
                    p.register_post_accumulate_grad_hook(self._grad_ready)
                    self.where[p] = (i, offset)
                    offset += p.numel()
                shards.append(nn.Parameter(flat[rank * size:(rank + 1) * size].clone()))
                flat.untyped_storage().resize_(0)   # free: views (and saved views) see 0 bytes
                self.flats.append(flat)
                self.params.append(params)
        self.shards = nn.ParameterList(shards)
        self.optim = optimizer_class(list(self.shards), **kwargs)
        self.pending = [None] * len(self.units)     # an all-gather in flight, per unit
        self.gathered = [False] * len(self.units)
        self.arrived = [0] * len(self.units)        # grads accumulated in this backward
        self.reduced = [False] * len(self.units)
        self.in_flight = None                       # (work, flat grad, output, unit)

    def _gather(self, i, async_op=False):
        """Start (or do) unit i's all-gather into its flat buffer, unless it is there or coming."""
        if self.gathered[i] or self.pending[i] is not None:
            return
        flat = self.flats[i]
        flat.untyped_storage().resize_(flat.numel() * flat.element_size())
        work = all_gather_into_tensor(flat, self.shards[i].detach(), async_op=async_op)
        if async_op:
            self.pending[i] = work
        else:
            self.gathered[i] = True

    def _ready(self, i):
        """Unit i gathered: wait for its all-gather if one is in flight, else gather it now."""
        if self.pending[i] is not None:
            self.pending[i].wait(timeout=WAIT)
            self.pending[i], self.gathered[i] = None, True
        self._gather(i)

    def _free(self, i):
        if self.pending[i] is not None:             # never free under a running all-gather
            self.pending[i].wait(timeout=WAIT)
            self.pending[i] = None
        self.flats[i].untyped_storage().resize_(0)
        self.gathered[i] = False

    def forward(self, x):
        """Unit by unit: all-gather, run, free; and what makes the backward gather it again."""
        index = {id(u): i for i, u in enumerate(self.units)}
        for unit in self.module.children():
            i = index.get(id(unit))
            if i is None:                           # no parameters: nothing to gather
                x = unit(x)
                continue
            self._gather(i, async_op=self.prefetch)
            if self.prefetch and i + 1 < len(self.units):
                self._gather(i + 1, async_op=True)  # the next unit's, while this one computes
            self._ready(i)
            x = unit(x)
            self._free(i)
            if torch.is_grad_enabled() and x.requires_grad:
                # fires when the gradient of this unit's output is ready: before its backward
                x.register_hook(lambda grad, i=i: self._before_backward(i))
        return x

    def _before_backward(self, i):
        self._gather(i, async_op=self.prefetch)
        if self.prefetch and i > 0:
            self._gather(i - 1, async_op=True)      # the unit whose backward comes next
        self._ready(i)

    def _grad_ready(self, p):
        i, _ = self.where[p]
        self.arrived[i] += 1
        if self.arrived[i] == len(self.params[i]):  # the unit's backward is done
            self._reduce(i)

    @torch.no_grad()
    def _reduce(self, i):
        """Pack unit i's gradients, reduce-scatter them into its shard, free the full unit."""
        flat_grad = self.flats[i].new_zeros(self.flats[i].numel())
        for p in self.params[i]:
            if p.grad is not None:
                _, offset = self.where[p]
                flat_grad[offset:offset + p.numel()].copy_(p.grad.flatten())
                p.grad = None
        self._wait_reduce()                         # one in flight: its buffer alone stays alive
        out = torch.empty_like(self.shards[i])
        self.in_flight = (reduce_scatter_tensor(out, flat_grad, async_op=True), flat_grad, out, i)
        self.reduced[i] = True
        self._free(i)

    def _wait_reduce(self):
        if self.in_flight is not None:
            work, _, out, i = self.in_flight
            work.wait(timeout=WAIT)
            shard = self.shards[i]
            shard.grad = out if shard.grad is None else shard.grad + out
            self.in_flight = None

    @torch.no_grad()
    def step(self):
        """After loss.backward(): wait for outstanding work, average the shards' gradients, step."""
        for i in range(len(self.units)):
            if not self.reduced[i]:                 # backward did not reach it: its grads or zeros
                self._reduce(i)
        self._wait_reduce()
        for i in range(len(self.units)):
            self._free(i)
        self.arrived, self.reduced = [0] * len(self.units), [False] * len(self.units)
        for shard in self.shards:
            shard.grad /= self.world
        self.optim.step()

    def zero_grad(self, set_to_none=True):
        for p in list(self.module.parameters()) + list(self.shards):
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def full_state_dict(self):
        """{name: full parameter}, as in self.module.named_parameters(), on every rank."""
        for i in range(len(self.units)):
            self._ready(i)
        full = {name: p.detach().clone() for name, p in self.module.named_parameters()}
        for i in range(len(self.units)):
            self._free(i)
        return full


class StampedCounter(labkit.CommCounter):
    """labkit's ledger, plus when each collective was called and the span of every other op
    (notebook 08's StampedCounter)."""

    def __init__(self):
        super().__init__()
        self.starts, self.ops = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        if getattr(func, "namespace", None) in ("c10d", "_c10d_functional"):
            before = len(self.calls)
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if len(self.calls) > before:
                self.starts.append(start)
            return out
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.ops.append((start, time.perf_counter()))
        return out


def units_model():
    layers = []
    for n_in, n_out in zip(WIDTHS, WIDTHS[1:]):
        layers += [nn.Linear(n_in, n_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def toy_unit():
    """Notebook 08's picture: one unit's all-gather, then its gradient's reduce-scatter."""
    rank, world = dist.get_rank(), dist.get_world_size()
    size = math.ceil(PSI / world)
    flat = torch.zeros(size * world)
    flat[:PSI] = torch.arange(1.0, PSI + 1)
    shard = flat[rank * size:(rank + 1) * size].clone()
    gathered = torch.empty(size * world)
    all_gather_into_tensor(gathered, shard)
    grad = torch.zeros(size * world)
    grad[:PSI] = torch.arange(1.0, PSI + 1) * (rank + 1)
    shard_grad = torch.empty(size)
    reduce_scatter_tensor(shard_grad, grad)
    return shard, gathered, grad, shard_grad


def measure(with_timeline):
    """On each rank: ZeRO-3 without and with prefetch (the timeline's runs), and the reference
    DDP for its bytes; two warm-up steps each, then one step under the tracer and the ledgers."""
    from labkit import stages

    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(LOCAL_BATCH, WIDTHS[0], generator=gen)
    y = torch.randn(LOCAL_BATCH, WIDTHS[-1], generator=gen)
    loss_fn = nn.functional.mse_loss
    out = {"toy": toy_unit() if with_timeline else None}
    for name in (SCHEMES if with_timeline else SCHEMES[:1]) + ("DDP",):
        torch.manual_seed(0)
        model = units_model()
        if name == "DDP":
            impl = stages.DDP(model, torch.optim.Adam, lr=LR)
            forward, owner = model, impl.optim
        else:
            impl = forward = ZeRO3(model, torch.optim.Adam, prefetch=name.endswith("prefetch"),
                                   lr=LR)
            owner = impl.optim
        for _ in range(2):
            loss_fn(forward(x), y).backward()
            impl.step()
            impl.zero_grad()
        with labkit.MemoryTracer(model, owner, timeline=False) as mem:
            with StampedCounter() as in_forward:
                t0 = time.perf_counter()
                loss = loss_fn(forward(x), y)
            t1 = time.perf_counter()
            with StampedCounter() as in_backward:
                loss.backward()
            with StampedCounter() as in_step:
                impl.step()
            rest = mem.current
        ledgers = (("forward", in_forward), ("backward", in_backward), ("step", in_step))
        full = (impl.full_state_dict() if name != "DDP"
                else {k: p.detach().clone() for k, p in model.named_parameters()})
        out[name] = {"rest": rest, "peak": dict(mem.peak),
                     "calls": [(phase, c.op, c.payload_bytes, c.wire_bytes, s - t0, c.seconds)
                               for phase, ledger in ledgers
                               for c, s in zip(ledger.calls, ledger.starts)],
                     "compute": [(a - t0, b - t0) for _, ledger in ledgers[:2]
                                 for a, b in ledger.ops],
                     "backward_starts": t1 - t0,
                     "params": torch.cat([full[k].flatten() for k in sorted(full)])}
    return out


def merged(spans, gap=2e-5):
    """The union of (start, end) spans, sorted and disjoint (gaps under 20 µs closed)."""
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def lanes(d):
    """One rank's lanes for plots.prefetch_timeline, from a measured step."""
    busy, split = merged(d["compute"]), d["backward_starts"]
    comm = {op: [(s, s + sec if sec else None) for _, o, _, _, s, sec in d["calls"] if o == op]
            for op in ("all_gather", "reduce_scatter")}
    return {"forward": [(a, b) for a, b in busy if a < split],
            "backward": [(a, b) for a, b in busy if a >= split],
            "backward_starts": split, **comm}


def hidden_share(d):
    """The share of the all-gathers' time during which this rank was computing."""
    busy = merged(d["compute"])
    gathers = [(s, s + sec) for _, op, _, _, s, sec in d["calls"] if op == "all_gather" and sec]
    total = sum(b - a for a, b in gathers)
    covered = sum(max(0.0, min(b, d_) - max(a, c)) for a, b in gathers for c, d_ in busy)
    return covered / total if total else 0.0


def values():
    import matplotlib.pyplot as plt

    runs = {2: labkit.launch(measure, nprocs=2, args=(True,), quiet=True),
            4: labkit.launch(measure, nprocs=4, args=(False,), quiet=True)}
    num_params = sum(p.numel() for p in units_model().parameters())
    unit_params = [sum(p.numel() for p in u.parameters()) for u in units_model()
                   if isinstance(u, nn.Linear)]
    unit_bytes = [4 * n for n in unit_params]

    # one unit's collectives, rank by rank, before and after
    toy = [r["toy"] for r in runs[2]]
    fig, axes = plt.subplots(2, 2, figsize=(9, 3.6), layout="constrained")
    plots.collective_picture([t[0] for t in toy], [t[1] for t in toy], axes=axes[0])
    plots.collective_picture([t[2] for t in toy], [t[3] for t in toy], axes=axes[1])
    for ax, title in zip(axes.flat, ("all-gather: before (the shards)", "after: the whole unit",
                                     "reduce-scatter: before (each rank's gradient)",
                                     "after: the summed gradient of its shard")):
        ax.set_title(title, fontsize="medium")
    toy_figure = fig

    # bytes per step: the ledger by phase, beside the formula and DDP's
    phases = ("forward", "backward", "step")
    names = {"all_gather": "all-gather", "reduce_scatter": "reduce-scatter",
             "all_reduce": "all-reduce"}
    byte_rows, ratio = [], {}
    for n in (2, 4):
        ddp = sum(c[3] for c in runs[n][0]["DDP"]["calls"])
        wire = sum(c[3] for c in runs[n][0]["ZeRO-3"]["calls"])
        ratio[n] = wire / ddp
        by_phase = []
        for phase in phases:
            counts = {}
            for p, op, *_ in runs[n][0]["ZeRO-3"]["calls"]:
                if p == phase:
                    counts[names[op]] = counts.get(names[op], 0) + 1
            by_phase.append(" + ".join(f"{v} {k}" for k, v in counts.items()) or "nothing")
        formula = theory.zero_bytes_per_step(num_params, n, 3, grad_bytes=4, param_bytes=4)
        byte_rows.append(f"| {n} | {' | '.join(by_phase)} | {wire:,.0f} | {formula:,.0f} | "
                         f"{ddp:,.0f} | **{wire / ddp:.3f}** |")

    # memory at rest, rank by rank, beside the formula
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), sharey=True, layout="constrained",
                             gridspec_kw={"width_ratios": [3, 5]})
    for ax, n in zip(axes, (2, 4)):
        formula = theory.zero_memory_breakdown(num_params, n, 3, k=8, param_bytes=4,
                                               grad_bytes=4)
        plots.memory_bars([r["ZeRO-3"]["rest"] for r in runs[n]], formula, unit="MB", ax=ax,
                          title=f"ZeRO-3, {n} ranks, at rest after the step")
        ax.set_ylabel("MB per rank" if n == 2 else "")
    axes[0].get_legend().remove()
    bars_figure = fig

    # the peak: what is gathered beyond the shards, without and with prefetch (2 ranks)
    largest, two = max(unit_bytes), sum(sorted(unit_bytes)[-2:])
    peak_rows = []
    for name in SCHEMES:
        d = runs[2][0][name]
        gathered = d["peak"]["params"] - d["rest"]["params"]
        peak_rows.append(f"| {name} | {d['rest']['params']:,} | {d['peak']['params']:,} | "
                         f"**{gathered:,}** | {gathered / largest:.2f} |")

    # the timeline of one step, without and with prefetch (2 ranks)
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.4), sharey=True, layout="constrained")
    for ax, name in zip(axes, SCHEMES):
        plots.prefetch_timeline([lanes(r[name]) for r in runs[2]], ax=ax, legend=False,
                                title=f"{name}, 2 ranks, one step (measured)")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize="small")
    timeline_figure = fig
    hidden = {name: [hidden_share(r[name]) for r in runs[2]] for name in SCHEMES}

    # data parallelism: what travelled, and the result against DDP's
    sizes = sorted({c[2] for c in runs[2][0]["ZeRO-3"]["calls"]})
    padded = sorted({4 * math.ceil(n / 2) * 2 for n in unit_params})
    activations = [4 * LOCAL_BATCH * w for w in WIDTHS[1:-1]]
    diff = max((r[name]["params"] - r["DDP"]["params"]).abs().max().item()
               for n in runs for r in runs[n] for name in SCHEMES if name in r)
    example = (f"ZeRO Table 1: 7.5 × 10⁹ parameters on 64 ranks, "
               f"{theory.zero_memory(7.5e9, 64, 3) / 1e9:.3g} GB per device, against "
               f"{theory.zero_memory(7.5e9, 64, 0) / 1e9:g} GB with plain data parallelism "
               "(GB = 10⁹ bytes).")
    return {
        "paper_example": example,
        "num_params": f"{num_params:,}",
        "widths": " → ".join(map(str, WIDTHS)),
        "unit_bytes": ", ".join(f"{b:,}" for b in unit_bytes),
        "toy_figure": toy_figure,
        "byte_rows": "\n".join(byte_rows),
        "ratio_2": f"{ratio[2]:.3f}",
        "bars_figure": bars_figure,
        "largest_unit": f"{largest:,}",
        "two_largest": f"{two:,}",
        "peak_rows": "\n".join(peak_rows),
        "timeline_figure": timeline_figure,
        "hidden": "; ".join(f"{name}: {', '.join(f'{h:.0%}' for h in hidden[name])}"
                            for name in SCHEMES),
        "payloads": ", ".join(f"{s:,}" for s in sizes),
        "padded_units": ", ".join(f"{s:,}" for s in padded),
        "activation_bytes": ", ".join(f"{s:,}" for s in sorted(set(activations))),
        "diff": f"{diff:.1e}",
    }
