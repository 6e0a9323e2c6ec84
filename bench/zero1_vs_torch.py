"""A reference ZeRO-1 in plain Python (notebook 06's design) against torch's ZeroRedundancyOptimizer + DDP.

What: per training step on the same model, data and ranks, (1) the bytes: the payload handed to
collectives and the wire bytes of the ring model, from `labkit.CommCounter`, and the bytes each
rank process really wrote (Linux `/proc/self/io`, "wchar", which counts gloo's socket writes);
(2) the step time. Three implementations:
- "ours": the parameters flattened into one buffer (each parameter a view into it), padded with
  zeros to a multiple of N; rank r owns the contiguous r-th shard and runs torch.optim.Adam over it
  alone; a step is a reduce-scatter of the flat gradient into the shard (torch's
  reduce_scatter_tensor, through labkit.compat), a division by N, Adam on the shard, and an
  all-gather of the shards back into the buffer, in place;
- "ours-ring": the same, with the reduce-scatter done as a ring of send/recv (notebook 01's
  ring_reduce_scatter). On gloo torch 2.13's reduce_scatter_tensor is an all-reduce of a copy
  (ProcessGroupGloo::reduce_scatter_tensor_coalesced), so only this variant sends on gloo what the
  ring model says a reduce-scatter sends;
- "torch": DistributedDataParallel (one all-reduce of the gradients in backward) with
  torch.distributed.optim.ZeroRedundancyOptimizer(Adam), which gives each parameter to one rank
  and broadcasts every parameter from its owner after the local step.

How: 2 and 4 ranks (one launch each), gloo, 1 torch thread per rank, an MLP of three Linear
layers of unequal sizes (2,230,527 parameters, float32: two about a million each, one a tenth of
that), 32 samples per rank, Adam (lr 1e-3), the same initial weights and data for all three.
After 2 warm-up steps each (DDP rebuilds its buckets at the start of its second step, with two
small broadcasts), one step of each under a CommCounter and the wchar counter gives the bytes (they do not
vary from run to run); then --repeats blocks of --steps steps alternate between the three, the
order rotated each repeat so that load from other processes hits all alike. A block's time is its
slowest rank's; the step-time ratio is the median over repeats of ours / torch's in the same
repeat, with its range. At the end the three models must hold the same parameters (allclose,
rtol 1e-4, atol 1e-6: three reductions in three orders, in float32, over several Adam steps).

Run: .venv/bin/python bench/zero1_vs_torch.py [--repeats N] [--steps S] [--quick] [--json PATH]
(--quick: 3 blocks of 1 step, to check that it runs and computes its ratios).
Target (course issue): ours / torch <= 0.67 in ring-model wire bytes; payload, bytes written and
step time are reported beside it.
"""
import datetime
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

import _paired   # bench/_paired.py: the command line and the launches
import _report   # bench/_report.py: --quick, --json, progress bars, the results table

TARGET = 0.67
WIDTHS = (512, 2048, 512, 255)   # 2,230,527 parameters: 1,050,624 + 1,049,088 + 130,815
BATCH, LR = 32, 1e-3
RTOL, ATOL = 1e-4, 1e-6
NAMES = ("ours", "ours-ring", "torch")
WAIT = datetime.timedelta(seconds=60)


def mlp() -> torch.nn.Sequential:
    layers = []
    for n_in, n_out in zip(WIDTHS, WIDTHS[1:]):
        layers += [torch.nn.Linear(n_in, n_out), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def ring_reduce_scatter(out: torch.Tensor, flat: torch.Tensor) -> None:
    """out = chunk r of the sum over ranks of flat (whose length N divides), by a ring of
    send/recv in N-1 steps; flat is used as scratch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    chunks = flat.chunk(world)
    right, left = (rank + 1) % world, (rank - 1) % world
    for step in range(world - 1):
        send, into = chunks[(rank - step - 1) % world], chunks[(rank - step - 2) % world]
        incoming = torch.empty_like(into)
        request = dist.isend(send, dst=right)
        dist.recv(incoming, src=left)
        request.wait(timeout=WAIT)
        into += incoming
    out.copy_(chunks[rank])


class ZeRO1:
    """ZeRO stage 1: rank r keeps the optimizer state of the r-th 1/N of the flat parameters."""

    def __init__(self, params, optimizer_class, ring=False, **kwargs):
        from labkit.compat import reduce_scatter_tensor
        self.params, self.ring = list(params), ring
        self.reduce_scatter = ring_reduce_scatter if ring else reduce_scatter_tensor
        self.world, rank = dist.get_world_size(), dist.get_rank()
        size = math.ceil(sum(p.numel() for p in self.params) / self.world)
        self.flat = torch.zeros(size * self.world, dtype=self.params[0].dtype)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                self.flat[offset:offset + p.numel()].copy_(p.flatten())
                p.data = self.flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        self.shard = torch.nn.Parameter(self.flat[rank * size:(rank + 1) * size])
        self.optim = optimizer_class([self.shard], **kwargs)

    @torch.no_grad()
    def step(self):
        from labkit.compat import all_gather_into_tensor
        grads = [p.grad.flatten() for p in self.params]
        padding = self.flat.new_zeros(self.flat.numel() - sum(g.numel() for g in grads))
        self.shard.grad = torch.empty_like(self.shard)
        self.reduce_scatter(self.shard.grad, torch.cat(grads + [padding]))
        self.shard.grad /= self.world
        self.optim.step()
        all_gather_into_tensor(self.flat, self.shard.detach())  # in place: shard r of flat

    def zero_grad(self, set_to_none=True):
        for p in self.params + [self.shard]:
            p.grad = None


def written_bytes():
    """Bytes this process has written so far, sockets included (Linux); None elsewhere."""
    try:
        with open("/proc/self/io") as io:
            return next(int(line.split()[1]) for line in io if line.startswith("wchar"))
    except (OSError, StopIteration):
        return None


def rank_main(steps: int, repeats: int, warmup: int, show: bool = False) -> dict:
    """Runs on each rank: warm-up, one counted step each, alternating timed blocks, equality."""
    import labkit
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    rank = dist.get_rank()
    torch.manual_seed(0)
    nets = {name: mlp() for name in NAMES}
    for name in NAMES[1:]:
        nets[name].load_state_dict(nets[NAMES[0]].state_dict())
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    batches = [(torch.randn(BATCH, WIDTHS[0], generator=gen),
                torch.randn(BATCH, WIDTHS[-1], generator=gen)) for _ in range(4)]
    runs = {
        "ours": (nets["ours"], ZeRO1(nets["ours"].parameters(), torch.optim.Adam, lr=LR)),
        "ours-ring": (nets["ours-ring"], ZeRO1(nets["ours-ring"].parameters(), torch.optim.Adam,
                                               ring=True, lr=LR)),
        "torch": (DDP(nets["torch"]),
                  ZeroRedundancyOptimizer(nets["torch"].parameters(),
                                          optimizer_class=torch.optim.Adam, lr=LR)),
    }
    done = dict.fromkeys(NAMES, 0)

    def block(name, n):
        model, optimizer = runs[name]
        for _ in range(n):
            x, y = batches[done[name] % len(batches)]
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            done[name] += 1

    for name in NAMES:
        block(name, warmup)
    counted = {}
    for name in NAMES:
        dist.barrier()
        before = written_bytes()
        with labkit.CommCounter() as comm:
            block(name, 1)
        after = written_bytes()
        counted[name] = {"payload": comm.total_payload_bytes(), "wire": comm.total_wire_bytes(),
                         "written": None if before is None else after - before,
                         "ops": {op: row["calls"] for op, row in comm.summary().items()}}
    times = {name: [] for name in NAMES}
    for repeat in _report.progress(range(repeats), desc=f"{dist.get_world_size()} ranks",
                                   show=show and rank == 0):
        shift = repeat % len(NAMES)
        for name in NAMES[shift:] + NAMES[:shift]:
            dist.barrier()  # bounded by the process group's timeout (labkit's collective_timeout)
            start = time.perf_counter()
            block(name, steps)
            times[name].append(time.perf_counter() - start)
    flat = {name: torch.cat([p.detach().flatten() for p in nets[name].parameters()])
            for name in NAMES}
    diff = max((flat[name] - flat["torch"]).abs().max().item() for name in NAMES[:2])
    close = all(torch.allclose(flat[name], flat["torch"], rtol=RTOL, atol=ATOL)
                for name in NAMES[:2])
    state = {"ours": runs["ours"][1].optim, "torch": runs["torch"][1].optim}
    state_bytes = {name: sum(t.numel() * t.element_size() for s in opt.state.values()
                             for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
                   for name, opt in state.items()}
    return {"times": times, "counted": counted, "diff": diff, "close": close,
            "state": state_bytes, "steps_done": dict(done)}


def report(world: int, results: list, steps: int, out: _report.Results) -> bool:
    """Print one world size's bytes and times; add them to ``out``; True if the target is met."""
    def block_times(name):  # a block lasts as long as its slowest rank
        return [max(ts) for ts in zip(*(r["times"][name] for r in results))]

    blocks = {name: block_times(name) for name in NAMES}
    print(f"\n== {world} ranks ==")
    states = ", ".join(f"{r['state']['torch']:,}" for r in results)
    print(f"Adam state per rank, bytes: ours {results[0]['state']['ours']:,} on every rank; "
          f"torch {states}")
    print(f"{'':>10} {'payload B':>12} {'wire B (ring)':>14} {'written B (gloo)':>17} "
          f"{'ms/step':>8}  collectives per step (rank 0)")
    for name in NAMES:
        counted = [r["counted"][name] for r in results]
        payload = statistics.mean(c["payload"] for c in counted)
        wire = statistics.mean(c["wire"] for c in counted)
        written = (statistics.mean(c["written"] for c in counted)
                   if counted[0]["written"] is not None else float("nan"))
        ops = ", ".join(f"{op} {n}" for op, n in counted[0]["ops"].items())
        ms = statistics.median(blocks[name]) * 1000 / steps
        print(f"{name:>10} {payload:>12,.0f} {wire:>14,.0f} {written:>17,.0f} {ms:>8.1f}  {ops}")

    def mean_of(name, key):
        return statistics.mean(r["counted"][name][key] for r in results)

    ok = all(r["close"] for r in results)
    for name in NAMES[:2]:
        ratios = [o / t for o, t in zip(blocks[name], blocks["torch"])]
        wire = mean_of(name, "wire") / mean_of("torch", "wire")
        payload = mean_of(name, "payload") / mean_of("torch", "payload")
        written = (mean_of(name, "written") / mean_of("torch", "written")
                   if results[0]["counted"][name]["written"] is not None else float("nan"))
        print(f"{name} / torch: wire bytes {wire:.3f} (target <= {TARGET}: "
              f"{'met' if wire <= TARGET else 'NOT met'}), payload {payload:.3f}, written "
              f"{written:.3f}, step time median {statistics.median(ratios):.3f}x "
              f"(per repeat {min(ratios):.3f}-{max(ratios):.3f})")
        ok = ok and wire <= TARGET
        case = f"{world} ranks"
        out.add(f"zero1/wire_bytes/{name}/{world}", "wire bytes per step (ring model)", case, "B",
                name, mean_of(name, "wire"), "torch ZeRO+DDP", mean_of("torch", "wire"),
                target=f"ratio <= {TARGET}", met=wire <= TARGET)
        if results[0]["counted"][name]["written"] is not None:
            out.add(f"zero1/written_bytes/{name}/{world}", "bytes written per step (gloo)", case,
                    "B", name, mean_of(name, "written"), "torch ZeRO+DDP",
                    mean_of("torch", "written"))
        out.add(f"zero1/step_time/{name}/{world}", "step time", case, "ms", name,
                [t * 1000 / steps for t in blocks[name]], "torch ZeRO+DDP",
                [t * 1000 / steps for t in blocks["torch"]], ratios=ratios)
        out.extra.setdefault("payload_bytes", {})[f"{name}/{world}"] = mean_of(name, "payload")
    out.extra.setdefault("payload_bytes", {})[f"torch/{world}"] = mean_of("torch", "payload")
    out.check(f"{world} ranks: the three end with equal parameters",
              all(r["close"] for r in results))
    print(f"parameters after {results[0]['steps_done']['torch']} steps each: "
          f"{'equal' if all(r['close'] for r in results) else 'NOT equal'} "
          f"(allclose rtol {RTOL:g} atol {ATOL:g}; max |ours - torch| "
          f"{max(r['diff'] for r in results):.2g})")
    return ok


def main() -> None:
    args = _paired.arguments(__doc__, repeats=20, quick_warmup=2)
    results = _report.Results("zero1_vs_torch", args.quick, {
        "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup, "ranks": [2, 4]})
    n_params = sum(p.numel() for p in mlp().parameters())
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, gloo, 1 thread per rank; MLP "
          f"{' -> '.join(map(str, WIDTHS))}, {n_params:,} parameters (float32), {BATCH} samples "
          f"per rank, Adam; {args.warmup} warm-up steps, 1 counted step, then {args.repeats} "
          f"rotating blocks of {args.steps} steps each")
    ok = _paired.each_world(rank_main, args, NAMES, report, results)
    print(f"\ntarget: ours / torch <= {TARGET} in ring-model wire bytes at 2 and 4 ranks, same "
          f"parameters: {'met' if ok else 'NOT met'}")
    results.finish(args.json)


if __name__ == "__main__":
    main()
