"""Deck 02's values: notebook 02's NaiveDDP trained on 2 and 4 gloo ranks against one process,
its bytes per step from the ledger beside the formula, its memory per rank, and torch's DDP
seen in the same ledger."""
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

import labkit
from labkit import models, plots, theory

SAMPLES, FEATURES, OUTPUTS, LOCAL_BATCH = 90, 16, 4, 5     # notebook 02, section 5
WIDTHS = (512, 1024, 1024, 10)                             # notebook 02, section 6
WORLDS = (2, 4)


class NaiveDDP(nn.Module):
    """Notebook 02's solution: rank 0's parameters and buffers broadcast at construction;
    sync_gradients() all-reduces every trainable gradient and divides it by N."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=0)

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    def sync_gradients(self):
        world = dist.get_world_size()
        for p in self.module.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world


def steps_per_epoch(world):
    return math.ceil(SAMPLES / world) // LOCAL_BATCH


def frozen_first_layer_mlp():
    model = models.MLP(*WIDTHS)
    for p in model.layers[0].parameters():
        p.requires_grad_(False)
    return model


def train_on_ranks(X, Y, sync):
    """Notebook 02, section 5: every rank from its own random weights, its DistributedSampler
    shard, NaiveDDP; sync=False skips the all-reduce."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    model = models.MLP(FEATURES, 32, OUTPUTS)
    ddp = NaiveDDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mine = list(DistributedSampler(range(len(X)), world, rank, shuffle=False))
    for step in range(steps_per_epoch(world)):
        batch = mine[step * LOCAL_BATCH:(step + 1) * LOCAL_BATCH]
        optimizer.zero_grad(set_to_none=True)
        model.loss(ddp(X[batch]), Y[batch]).backward()
        if sync:
            ddp.sync_gradients()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_one_process(X, Y, world):
    """The same steps in one process, from rank 0's weights, on the global batches."""
    torch.manual_seed(0)
    model = models.MLP(FEATURES, 32, OUTPUTS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shards = [list(DistributedSampler(range(len(X)), world, r, shuffle=False))
              for r in range(world)]
    order = [i for column in zip(*shards) for i in column]
    global_batch = world * LOCAL_BATCH
    for step in range(steps_per_epoch(world)):
        batch = order[step * global_batch:(step + 1) * global_batch]
        optimizer.zero_grad(set_to_none=True)
        model.loss(model(X[batch]), Y[batch]).backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def step_costs(steps=3, local_batch=64):
    """Notebook 02, section 6: a few NaiveDDP steps under the ledger (bytes and seconds of each
    all-reduce, the step's time), then one under the MemoryTracer."""
    import time

    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = frozen_first_layer_mlp()
    ddp = NaiveDDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = model.batch(local_batch, torch.Generator().manual_seed(rank))
    rows = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        comm = labkit.CommCounter()
        start = time.perf_counter()
        with comm:
            model.loss(ddp(x), y).backward()
            ddp.sync_gradients()
        optimizer.step()
        total = time.perf_counter() - start
        reduces = [c for c in comm.calls if c.op == "all_reduce"]
        rows.append({"step": total, "all_reduce": sum(c.seconds or 0.0 for c in reduces),
                     "calls": len(reduces), "payload": sum(c.payload_bytes for c in reduces),
                     "wire": sum(c.wire_bytes for c in reduces),
                     "ops": sorted({c.op for c in comm.calls})})
    with labkit.MemoryTracer(model, optimizer) as memory:
        optimizer.zero_grad(set_to_none=True)
        model.loss(ddp(x), y).backward()
        ddp.sync_gradients()
        optimizer.step()
    return rows[1:], dict(memory.current)


def torch_ddp_ledger():
    """Notebook 02, section 7: the collectives torch's DDP issues, phase by phase."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = dist.get_rank()
    seen = {}

    def calls(comm):
        return [(c.op, c.payload_bytes) for c in comm.calls]

    model = models.WithBatchNorm().float()
    with labkit.CommCounter() as comm:
        ddp = DDP(model)
    seen["construction"] = calls(comm)
    x, y = model.batch(4, torch.Generator().manual_seed(rank), torch.float32)
    for phase in ("forward, step 1", "forward, step 2"):
        with labkit.CommCounter() as comm:
            out = ddp(x)
        seen[phase] = calls(comm)
    with labkit.CommCounter() as comm:
        model.loss(out, y).backward()
    seen["backward"] = calls(comm)
    return seen


def on_ranks(X, Y, with_torch):
    out = {"synced": train_on_ranks(X, Y, True), "alone": train_on_ranks(X, Y, False),
           "costs": step_costs()}
    if with_torch:
        out["torch"] = torch_ddp_ledger()
    return out


def largest_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def values():
    data = torch.Generator().manual_seed(0)
    X = torch.randn(SAMPLES, FEATURES, generator=data)
    Y = torch.randn(SAMPLES, OUTPUTS, generator=data)
    runs = {n: labkit.launch(on_ranks, nprocs=n, args=(X, Y, n == 2), quiet=True)
            for n in WORLDS}
    eps = torch.finfo(torch.float32).eps
    equal_rows = []
    for n, ranks in runs.items():
        reference = train_one_process(X, Y, n)
        synced = max(largest_difference(r["synced"], reference) for r in ranks)
        alone = max(largest_difference(r["alone"], reference) for r in ranks)
        spread = max(largest_difference(r["alone"], ranks[0]["alone"]) for r in ranks)
        equal_rows.append(f"| {n} | {steps_per_epoch(n)} | {synced:.1e} "
                          f"({synced / eps:.1f} eps) | {alone:.1e} | {spread:.1e} |")

    probe = frozen_first_layer_mlp()
    trainable = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    all_params = sum(p.numel() for p in probe.parameters())
    byte_rows, share = [], {}
    for n, ranks in runs.items():
        rows, _ = ranks[0]["costs"]
        row = rows[-1]
        formula = theory.ddp_bytes_per_step(trainable, n, 4)
        byte_rows.append(f"| {n} | {row['calls']} | {row['payload']:,} | {4 * trainable:,} | "
                         f"{row['wire']:,.0f} | {formula:,.0f} |")
        share[n] = sum(r["all_reduce"] for r in rows) / sum(r["step"] for r in rows)

    n = max(WORLDS)
    per_rank = [{c: b for c, b in r["costs"][1].items() if c in ("params", "grads")}
                for r in runs[n]]
    formula = {"params": 4 * all_params, "grads": 4 * trainable}
    ax = plots.memory_bars(per_rank, predicted=formula, unit="MB",
                           title=f"NaiveDDP on {n} ranks: parameters and gradients per rank "
                                 "(MemoryTracer) beside the whole model")
    ax.figure.set_size_inches(7.4, 3.2)

    ledger = runs[2][0]["torch"]
    bn = models.WithBatchNorm()
    ledger_rows = "\n".join(
        f"| {phase} | " + (", ".join(f"`{op}` {b} B" for op, b in ops) or "none") + " |"
        for phase, ops in ledger.items())
    return {
        "shard_rows": "\n".join(
            f"| {r} | {list(DistributedSampler(range(10), 4, r, shuffle=False))} |"
            for r in range(4)),
        "equal_rows": "\n".join(equal_rows),
        "model_desc": f"{len(WIDTHS) - 1} layers, {all_params:,} parameters, "
                      f"{trainable:,} trainable",
        "byte_rows": "\n".join(byte_rows),
        "share_2": f"{share[2]:.0%}",
        "memory_figure": ax.figure,
        "ledger_rows": ledger_rows,
        "bn_bytes": f"{sum(p.numel() * 4 for p in bn.parameters())} B of parameters, "
                    f"{sum(b.numel() * 4 for b in bn.buffers() if b.is_floating_point())} B of "
                    f"float32 buffers",
        "all_equal": "yes" if all(r["costs"][1]["params"] == 4 * all_params
                                  for ranks in runs.values() for r in ranks) else "NO",
        "param_mb": f"{4 * all_params / 1e6:.2f} MB",
    }
