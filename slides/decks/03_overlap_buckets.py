"""Deck 03's values: notebook 03's BucketedDDP on 2 gloo ranks (its ledger, a timeline of one
step, step time against bucket size beside the model), the order in which gradients become
ready, and torch's own DDP buckets read from the ledger."""
import datetime
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import labkit
from labkit import models, plots, theory

WAIT = datetime.timedelta(seconds=30)
WIDTH, LAYERS, LOCAL_BATCH = 256, 32, 32          # notebook 03's deep, narrow MLP
CAP = 2**20                                       # 1 MiB buckets for the ledger and timeline
CAPS = [1, 2**18, 2**20, 2**22, 2**24]            # bytes; 1: one bucket per tensor
AR_SIZES = [4**k for k in range(6, 12)] + [2**23]  # 4 KiB ... 8 MiB, for alpha and beta
BIG = (1024, 1536, 1536, 1536, 1024)              # notebook 03, section 7: ~31 MB of gradients


def deep_mlp():
    return models.MLP(*[WIDTH] * (LAYERS + 1))


def bucket_sizes(param_bytes, bucket_bytes):
    """Notebook 03's rule: reverse registration order; close a bucket once it holds at least
    bucket_bytes (torch's compute_bucket_assignment_by_size, reducer.cpp)."""
    buckets, size = [], 0
    for nbytes in reversed(param_bytes):
        size += nbytes
        if size >= bucket_bytes:
            buckets.append(size)
            size = 0
    return buckets + ([size] if size else [])


def backward_and_sync_time(buckets, backward_s, n, alpha, beta):
    """Notebook 03's model: gradients made at a constant rate over backward_s, in bucket order;
    a bucket's all-reduce starts once its last byte exists and the previous one has ended."""
    total, done, end = sum(buckets), 0, 0.0
    for size in buckets:
        done += size
        end = max(end, backward_s * done / total) + theory.collective_time(
            "all_reduce", size, n, alpha, beta)
    return end


class Bucket:
    def __init__(self, params):
        self.params = params
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype)
        self.view, offset = {}, 0
        for p in params:
            self.view[p] = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.arrived, self.handle = set(), None

    def complete(self):
        return len(self.arrived) == len(self.params)


class BucketManager:
    """Notebook 03's solution: buckets in reverse order, closed at >= bucket_bytes, each
    all-reduced asynchronously once complete, always in bucket order."""

    def __init__(self, params, bucket_bytes):
        groups, size = [[]], 0
        for p in reversed(params):
            groups[-1].append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                groups.append([])
                size = 0
        self.buckets = [Bucket(g) for g in groups if g]
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        self.next = 0

    def _launch_ready(self):
        while self.next < len(self.buckets) and self.buckets[self.next].complete():
            bucket = self.buckets[self.next]
            bucket.handle = dist.all_reduce(bucket.buffer, async_op=True)
            self.next += 1

    def grad_ready(self, p):
        bucket = self.bucket_of[p]
        bucket.view[p].copy_(p.grad)
        bucket.arrived.add(p)
        self._launch_ready()

    def finish(self):
        for bucket in self.buckets[self.next:]:
            for p in bucket.params:
                if p not in bucket.arrived:
                    bucket.view[p].zero_()
                    bucket.arrived.add(p)
        self._launch_ready()
        for bucket in self.buckets:
            bucket.handle.wait(timeout=WAIT)
            bucket.buffer /= dist.get_world_size()
            for p in bucket.params:
                if p.grad is None:
                    p.grad = bucket.view[p].clone()
                else:
                    p.grad.copy_(bucket.view[p])
            bucket.arrived, bucket.handle = set(), None
        self.next = 0


class BucketedDDP(nn.Module):
    def __init__(self, module, bucket_bytes):
        super().__init__()
        self.module = module
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t, src=0)
        params = [p for p in module.parameters() if p.requires_grad]
        self.manager = BucketManager(params, bucket_bytes)
        for p in params:
            p.register_post_accumulate_grad_hook(self.manager.grad_ready)

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    def finish_gradient_sync(self):
        self.manager.finish()


def one_step_ledger(bucket_bytes):
    """Notebook 03, section 4: the all-reduces launched during backward, and in finish."""
    torch.manual_seed(0)
    model = deep_mlp()
    ddp = BucketedDDP(model, bucket_bytes)
    x, y = model.batch(LOCAL_BATCH, torch.Generator().manual_seed(dist.get_rank()))
    with labkit.CommCounter() as in_backward:
        model.loss(ddp(x), y).backward()
    with labkit.CommCounter() as in_sync:
        ddp.finish_gradient_sync()
    return [[(c.op, c.payload_bytes, c.async_op) for c in comm.calls]
            for comm in (in_backward, in_sync)]


def timeline(bucket_bytes, steps=4):
    """Notebook 03, section 5: the last of a few steps, timed on this rank. A hook registered
    after BucketedDDP's stamps each gradient with the time and the ledger's length, so an
    all-reduce started at the first stamp after which the ledger holds it."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = deep_mlp()
    ddp = BucketedDDP(model, bucket_bytes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = model.batch(LOCAL_BATCH, torch.Generator().manual_seed(rank))
    stamps, box = [], {}
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(
            lambda p: stamps.append((time.perf_counter(), len(box["comm"].calls))))
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        stamps.clear()
        box["comm"] = comm = labkit.CommCounter()
        dist.barrier()
        t0 = time.perf_counter()
        with comm:
            loss = model.loss(ddp(x), y)
            t_backward = time.perf_counter()
            loss.backward()
            t_sync = time.perf_counter()
            ddp.finish_gradient_sync()
            t_end = time.perf_counter()
        optimizer.step()
    calls = comm.calls
    starts = [next((t for t, seen in stamps if seen > i), t_sync) for i in range(len(calls))]
    return {"backward": (t_backward - t0, t_sync - t0), "sync": (t_sync - t0, t_end - t0),
            "grads": [t - t0 for t, _ in stamps],
            "comms": [(s - t0, c.seconds, c.payload_bytes) for s, c in zip(starts, calls)]}


def median_time(fn, repeats, warmup=2):
    times = []
    for _ in range(warmup + repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def sweep(caps, repeats=4):
    """Notebook 03, section 6: forward, backward, update alone; gloo's all-reduce by size; the
    step time of BucketedDDP for each bucket size."""
    rank = dist.get_rank()
    x, y = deep_mlp().batch(LOCAL_BATCH, torch.Generator().manual_seed(rank))
    torch.manual_seed(0)
    model = deep_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    out = {"forward": median_time(lambda: model.loss(model(x), y), repeats)}
    runs = []

    def backward():
        loss = model.loss(model(x), y)
        start = time.perf_counter()
        loss.backward()
        runs.append(time.perf_counter() - start)

    median_time(backward, repeats)
    out["backward"] = statistics.median(runs[2:])
    out["update"] = median_time(optimizer.step, repeats)
    comm = labkit.CommCounter()
    buffers = {size: torch.zeros(size // 4) for size in AR_SIZES}
    for t in buffers.values():
        dist.all_reduce(t)
    for _ in range(5):
        for t in buffers.values():
            dist.barrier()
            with comm:
                dist.all_reduce(t)
    out["all_reduce"] = {s: statistics.median(c.seconds for c in comm.calls
                                              if c.payload_bytes == s) for s in AR_SIZES}
    out["step"] = {}
    for cap in caps:
        torch.manual_seed(0)
        model = deep_mlp()
        ddp = BucketedDDP(model, cap)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        def step():
            optimizer.zero_grad(set_to_none=True)
            model.loss(ddp(x), y).backward()
            ddp.finish_gradient_sync()
            optimizer.step()
        out["step"][cap] = median_time(step, repeats)
    return out


def torch_buckets():
    """Notebook 03, section 7: the all-reduces torch's DDP issues in its first two steps, with
    bucket_cap_mb left at None and set to 25."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = dist.get_rank()
    out = {}
    for cap_mb in (None, 25):
        torch.manual_seed(0)
        model = models.MLP(*BIG)
        ddp = DDP(model, bucket_cap_mb=cap_mb)
        x, y = model.batch(4, torch.Generator().manual_seed(rank))
        out[cap_mb] = []
        for _ in range(2):
            with labkit.CommCounter() as comm:
                model.loss(ddp(x), y).backward()
            out[cap_mb].append([c.payload_bytes for c in comm.calls if c.op == "all_reduce"])
    return out


def on_two_ranks():
    return {"ledger": one_step_ledger(CAP), "timeline": timeline(CAP), "sweep": sweep(CAPS),
            "torch": torch_buckets()}


def ready_order():
    """Notebook 03, section 1: the order in which gradient hooks fire, one process."""
    probe = models.MLP(8, 16, 16, 4)
    names = {p: n for n, p in probe.named_parameters()}
    ready = []
    for p in probe.parameters():
        p.register_post_accumulate_grad_hook(lambda p: ready.append(names[p]))
    x, y = probe.batch(5, torch.Generator().manual_seed(0))
    probe.loss(probe(x), y).backward()
    return list(names.values()), ready


def _mib(nbytes):
    return f"{nbytes / 2**20:.2f} MiB"


def _sizes(sizes):
    return " + ".join(_mib(s) for s in sizes)


def values():
    registered, ready = ready_order()
    ranks = labkit.launch(on_two_ranks, nprocs=2, quiet=True)
    param_bytes = [p.numel() * p.element_size() for p in deep_mlp().parameters()]
    predicted = bucket_sizes(param_bytes, CAP)
    during, after = ranks[0]["ledger"]
    launched = [b for _, b, _ in during + after]

    lines = [r["timeline"] for r in ranks]
    ax = plots.step_timeline(lines, title=f"one step of BucketedDDP, {_mib(CAP)} buckets, "
                                          "2 ranks", legend=True)
    ax.figure.set_size_inches(8.4, 3.1)
    ax.title.set_fontsize(11)
    early = [sum(start < tl["backward"][1] for start, _, _ in tl["comms"]) for tl in lines]

    sweeps = [r["sweep"] for r in ranks]
    slower = {key: max(s[key] for s in sweeps) for key in ("forward", "backward", "update")}
    ar_t = [max(s["all_reduce"][size] for s in sweeps) for size in AR_SIZES]
    alpha, beta = theory.fit_alpha_beta(AR_SIZES, ar_t, op="all_reduce", world_size=2)
    sweep_rows = []
    step_s = {}
    for cap in CAPS:
        step_s[cap] = max(s["step"][cap] for s in sweeps)
        layout = bucket_sizes(param_bytes, cap)
        model_s = slower["forward"] + backward_and_sync_time(
            layout, slower["backward"], 2, alpha, beta) + slower["update"]
        label = "1 B (one per tensor)" if cap == 1 else _mib(cap)
        sweep_rows.append(f"| {label} | {len(layout)} | {step_s[cap] * 1e3:.1f} | "
                          f"{model_s * 1e3:.1f} |")
    no_overlap = slower["forward"] + slower["backward"] + slower["update"] + \
        theory.collective_time("all_reduce", sum(param_bytes), 2, alpha, beta)

    seen = ranks[0]["torch"]
    big_bytes = [p.numel() * p.element_size() for p in models.MLP(*BIG).parameters()]
    torch_rows = "\n".join(
        f"| `bucket_cap_mb={cap}` | {_sizes(first)} | {_sizes(second)} |"
        for cap, (first, second) in seen.items())
    return {
        "registered": ", ".join(f"`{n}`" for n in registered),
        "ready": ", ".join(f"`{n}`" for n in ready),
        "deep_desc": f"{LAYERS} layers of {WIDTH} → {WIDTH}: {len(param_bytes)} tensors, "
                     f"{sum(param_bytes):,} B of gradients",
        "cap": _mib(CAP),
        "n_predicted": str(len(predicted)),
        "predicted_sizes": ", ".join(f"{b:,}" for b in predicted),
        "n_during": str(len(during)),
        "n_after": str(len(after)),
        "during_sizes": ", ".join(f"{b:,}" for _, b, _ in during) or "none",
        "after_sizes": ", ".join(f"{b:,}" for _, b, _ in after) or "none",
        "layout_equal": "yes" if launched == predicted else "NO",
        "all_async": "yes" if all(a for _, _, a in during + after) else "NO",
        "timeline_figure": ax.figure,
        "early": " and ".join(f"{e} of {len(tl['comms'])}" for e, tl in zip(early, lines)),
        "sweep_rows": "\n".join(sweep_rows),
        "no_overlap": f"{no_overlap * 1e3:.1f} ms",
        "phases": f"forward {slower['forward'] * 1e3:.1f} ms, backward "
                  f"{slower['backward'] * 1e3:.1f} ms, optimizer step "
                  f"{slower['update'] * 1e3:.1f} ms",
        "alpha_beta": f"α = {alpha * 1e6:.0f} µs, 1/β = {1 / beta / 1e9:.2f} GB/s",
        "fastest": "1 B (one per tensor)" if min(step_s, key=step_s.get) == 1
                   else _mib(min(step_s, key=step_s.get)),
        "per_tensor_ratio": f"{step_s[1] / min(step_s.values()):.1f}×",
        "torch_rows": torch_rows,
        "big_desc": f"{sum(big_bytes) / 2**20:.1f} MiB of gradients (last layer "
                    f"{_mib(big_bytes[-1] + big_bytes[-2])})",
        "rule_25": _sizes(bucket_sizes(big_bytes, 25 * 2**20)),
        "rule_first_1": _mib(bucket_sizes(big_bytes, 2**20)[0]),
        "mib_bytes": f"{25 * 2**20:,} B",
        "mb_bytes": f"{25 * 10**6:,} B",
    }
