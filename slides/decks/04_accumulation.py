"""Deck 04's values: accumulation against one big batch (gradients, BatchNorm, token counts),
its memory under the tracer, and torch's DDP with and without no_sync() on 2 real ranks."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import labkit
from labkit import models, plots, theory

BATCH, KS = 32, (2, 4, 8)                   # the equivalence: one batch of 32, k micro-batches
MEM_BATCH, MEM_KS = 1024, (1, 4, 16)        # the memory: MLP 256-1024-1024-256, Adam, fp32
MEM_WIDTHS = (256, 1024, 1024, 256)
DDP_WIDTHS, DDP_K, DDP_MICRO, DDP_RANKS = (64, 256, 256, 64), 4, 8, 2
LENGTHS = [3, 50, 7, 90]                    # tokens per micro-batch (notebook 04, section 5)


# --- k micro-batches against one batch ------------------------------------------------------

def _flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _fresh(widths=(16, 32, 1)):
    torch.manual_seed(0)
    return models.MLP(*widths)


def _data(n, widths=(16, 32, 1), seed=1):
    return models.MLP(*widths).batch(n, torch.Generator().manual_seed(seed))


def _accumulate(model, x, y, k, scale=True):
    for xb, yb in zip(x.chunk(k), y.chunk(k)):
        loss = model.loss(model(xb), yb)
        (loss / k if scale else loss).backward()


def equivalence(k, steps=3):
    """(max |grad diff| with loss/k, median ratio without 1/k, max |param diff| after Adam steps)."""
    x, y = _data(BATCH)
    big, acc, raw = _fresh(), _fresh(), _fresh()
    model_loss = big.loss
    model_loss(big(x), y).backward()
    _accumulate(acc, x, y, k)
    _accumulate(raw, x, y, k, scale=False)
    grad_diff = (_flat_grad(acc) - _flat_grad(big)).abs().max().item()
    ratio = (_flat_grad(raw) / _flat_grad(big)).median().item()
    # a few optimizer steps each way, fresh batches every step
    big, acc = _fresh(), _fresh()
    opt_big, opt_acc = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (big, acc))
    for step in range(steps):
        x, y = _data(BATCH, seed=10 + step)
        opt_big.zero_grad()
        big.loss(big(x), y).backward()
        opt_big.step()
        opt_acc.zero_grad()
        _accumulate(acc, x, y, k)
        opt_acc.step()
    param_diff = max((a - b).abs().max().item() for a, b in zip(acc.parameters(), big.parameters()))
    return grad_diff, ratio, param_diff


def token_counts():
    """Four micro-batches of LENGTHS tokens: mean of means / k, and sum / total, vs one batch."""
    gen = torch.Generator().manual_seed(3)
    feats = [torch.randn(n, 16, generator=gen, dtype=torch.float64) for n in LENGTHS]
    targets = [torch.randn(n, 1, generator=gen, dtype=torch.float64) for n in LENGTHS]
    torch.manual_seed(0)
    linear = nn.Linear(16, 1).double()

    def gradient(losses):
        linear.zero_grad()
        for loss in losses:
            loss.backward()
        return torch.cat([p.grad.flatten() for p in linear.parameters()])

    big = gradient([F.mse_loss(linear(torch.cat(feats)), torch.cat(targets))])
    means = gradient([F.mse_loss(linear(f), t) / len(LENGTHS) for f, t in zip(feats, targets)])
    total = sum(LENGTHS)
    summed = gradient([F.mse_loss(linear(f), t, reduction="sum") / total
                       for f, t in zip(feats, targets)])
    return (means - big).abs().max().item(), (summed - big).abs().max().item(), big.abs().max().item()


def batchnorm(k, x, y):
    """Gradient and running mean after one accumulated pass of k micro-batches (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 1)).double()
    for xb, yb in zip(x.chunk(k), y.chunk(k)):
        (F.mse_loss(model(xb), yb) / k).backward()
    return _flat_grad(model), model[1].running_mean.clone(), int(model[1].num_batches_tracked)


# --- memory ----------------------------------------------------------------------------------

def traced_step(k):
    torch.manual_seed(0)
    model = models.MLP(*MEM_WIDTHS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = model.batch(MEM_BATCH, torch.Generator().manual_seed(1))
    with labkit.MemoryTracer(model, optimizer) as mem:
        optimizer.zero_grad()
        for xb, yb in zip(x.chunk(k), y.chunk(k)):
            (model.loss(model(xb.clone()), yb.clone()) / k).backward()
        optimizer.step()
    peak = {c: max(by[c] for _, _, by in mem.timeline)
            for c in ("params", "grads", "optimizer", "activations")}
    return mem, peak


# --- DDP with and without no_sync ------------------------------------------------------------

def ddp_steps():
    """Both variants on the same ranks: {use_no_sync: (ledger, gradients)}."""
    return {use: ddp_step(use) for use in (False, True)}


def ddp_step(use_no_sync):
    """Two warm-up steps, then one measured optimizer step of DDP_K micro-batches (torch DDP)."""
    import contextlib

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = models.MLP(*DDP_WIDTHS)
    ddp = DDP(model)
    x, y = model.batch(DDP_K * DDP_MICRO, torch.Generator().manual_seed(dist.get_rank()))
    micro = list(zip(x.chunk(DDP_K), y.chunk(DDP_K)))

    def step():
        model.zero_grad(set_to_none=True)
        for i, (xb, yb) in enumerate(micro):
            skip = use_no_sync and i < DDP_K - 1
            with ddp.no_sync() if skip else contextlib.nullcontext():
                (model.loss(ddp(xb), yb) / DDP_K).backward()

    step()                                    # warm-up: DDP rebuilds its buckets in step 2
    step()
    with labkit.CommCounter() as comm:
        step()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return [(c.op, c.payload_bytes, c.wire_bytes) for c in comm.calls], grads


def single_process_grad():
    """The same global batch (both ranks' samples) in one process, one backward."""
    torch.manual_seed(0)
    model = models.MLP(*DDP_WIDTHS)
    xs, ys = zip(*(model.batch(DDP_K * DDP_MICRO, torch.Generator().manual_seed(r))
                   for r in range(DDP_RANKS)))
    model.loss(model(torch.cat(xs)), torch.cat(ys)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _sci(x):
    """1.2e-08 as 1.2 × 10⁻⁸ for a slide; 0 as 0."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa} × 10<sup>{int(exponent)}</sup>"


def values():
    out = {}
    # equivalence
    rows = []
    for k in KS:
        grad_diff, ratio, param_diff = equivalence(k)
        rows.append(f"| {k} | {BATCH // k} | {_sci(grad_diff)} | {_sci(param_diff)} | {ratio:.3g} |")
    out["equivalence_rows"] = "\n".join(rows)
    out["batch"] = str(BATCH)
    out["fp32_eps"] = _sci(torch.finfo(torch.float32).eps)

    means, summed, scale = token_counts()
    out["token_lengths"] = ", ".join(map(str, LENGTHS))
    out["token_means_diff"] = _sci(means)
    out["token_sum_diff"] = _sci(summed)
    out["token_grad_scale"] = f"{scale:.2g}"

    # BatchNorm
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.randn(64, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    big_grad, big_mean, _ = batchnorm(1, x, y)
    rows = []
    for k in (1, 2, 4, 8):
        grad, mean, count = batchnorm(k, x, y)
        rows.append(f"| {k} | {_sci((grad - big_grad).abs().max().item())} | "
                    f"{_sci((mean - big_mean).abs().max().item())} | {count} |")
    out["bn_rows"] = "\n".join(rows)
    out["bn_batch"] = str(x.shape[0])

    # memory
    traced = {k: traced_step(k) for k in MEM_KS}
    num_params = sum(p.numel() for p in models.MLP(*MEM_WIDTHS).parameters())
    base = traced[1][1]["activations"]
    rows = []
    for k in MEM_KS:
        peak = traced[k][1]
        rows.append(f"| {k} | {MEM_BATCH // k} | {peak['params'] / 1e6:.2f} | {peak['grads'] / 1e6:.2f} | "
                    f"{peak['optimizer'] / 1e6:.2f} | {peak['activations'] / 1e6:.2f} | "
                    f"{peak['activations'] / base:.3g} |")
    out["memory_rows"] = "\n".join(rows)
    out["mem_batch"] = str(MEM_BATCH)
    out["mem_params"] = f"{num_params / 1e6:.2f} M"
    out["mem_state_formula"] = f"{16 * num_params / 1e6:.2f} MB"
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), sharey=True, layout="constrained")
    for ax, k in zip(axes, (1, 4)):
        plots.memory_timeline(traced[k][0].timeline, unit="MB", ax=ax,
                              title=f"k = {k}: {MEM_BATCH // k} samples per micro-batch")
    axes[0].get_legend().remove()
    out["timeline_figure"] = fig

    # DDP + no_sync
    num = sum(p.numel() for p in models.MLP(*DDP_WIDTHS).parameters())
    grad_bytes = 4 * num
    reference = single_process_grad()
    rows, grads, wires = [], {}, {}
    measured = labkit.launch(ddp_steps, nprocs=DDP_RANKS, quiet=True)[0]
    for use in (False, True):
        calls, grads[use] = measured[use]
        reduces = [c for c in calls if c[0] == "all_reduce"]
        wire = sum(w for _, _, w in reduces)
        wires[use] = wire
        formula = (1 if use else DDP_K) * theory.ddp_bytes_per_step(num, DDP_RANKS, 4)
        rows.append(f"| {'with' if use else 'without'} `no_sync()` | {len(reduces)} | "
                    f"{sum(p for _, p, _ in reduces):,} | {wire:,.0f} | {formula:,.0f} | "
                    f"{_sci((grads[use] - reference).abs().max().item())} |")
    out["ddp_rows"] = "\n".join(rows)
    out["ddp_grad_bytes"] = f"{grad_bytes:,}"
    out["ddp_setup"] = (f"MLP {'-'.join(map(str, DDP_WIDTHS))} (fp32), {DDP_RANKS} ranks, "
                        f"k = {DDP_K} micro-batches of {DDP_MICRO} samples per rank")
    out["ddp_saved"] = f"{DDP_K - 1}"
    saved = (DDP_K - 1) * theory.ddp_bytes_per_step(num, DDP_RANKS, 4)
    out["ddp_saved_bytes"] = f"{wires[False] - wires[True]:,.0f}"
    out["ddp_saved_formula"] = f"{saved:,.0f}"
    return out
