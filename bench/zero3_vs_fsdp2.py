"""A reference ZeRO-3 in plain Python (notebook 08's design) against torch's FSDP2 fully_shard.

What: per training step on the same model, data and ranks, (1) the step time, (2) the peak memory
per rank (labkit.MemoryTracer: the largest total of live tensor bytes during one step, and the model
state at rest after it), (3) the bytes per step (ring-model wire bytes from labkit.CommCounter),
and (4) that all end with equal parameters. Three implementations:
- "ours": each unit (a child of the nn.Sequential) has its parameters flattened into one buffer,
  padded to a multiple of N; rank r keeps slice r as the parameter of torch.optim.Adam and frees
  the buffer's storage (resize_(0)). Forward: all-gather a unit, run it, free it. Backward: a hook
  on the unit's output all-gathers it again before its backward; when every parameter's grad has
  accumulated (post-accumulate-grad hooks) the flat gradient is reduce-scattered (async, one in
  flight) into the shard and the unit freed. step(): wait, divide by N, Adam on the shards;
- "ours-prefetch": the same, with the next unit's all-gather started asynchronously before the
  current unit computes (unit i+1 in forward, i-1 in backward);
- "fsdp2": torch.distributed.fsdp.fully_shard on each Linear, then on the Sequential (torch
  2.13's defaults: reshard_after_forward True for the units, False for the root), on a CPU
  DeviceMesh, with torch.optim.Adam over its DTensor parameters.

How: 2 and 4 ranks (one launch each), gloo, 1 torch thread per rank, 10 x Linear(1024, 1024)
with Tanh between (10,496,000 parameters, float32), 16 samples per rank, Adam (lr 1e-3), the same
initial weights and data for all three. After --warmup steps each, one step of each under the
tracer and the ledger; then --repeats blocks of --steps steps rotate between the three. A block's
time is its slowest rank's; the ratio is the median over repeats of ours / fsdp2 in the same
repeat, with its range. At the end the full parameters must be equal (allclose, rtol 1e-4,
atol 1e-6: three reductions in float32 in different orders, over several Adam steps).

Run: .venv/bin/python bench/zero3_vs_fsdp2.py [--repeats N] [--steps S] [--quick] [--json PATH]
(--quick: 1 warm-up step, 3 blocks of 1 step, to check that it runs and computes its ratios).
Target (course issue): step time ours / fsdp2 <= 1.0x; peak memory and bytes reported beside it.
"""
import datetime
import math
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import _paired   # bench/_paired.py: the command line and the launches
import _report   # bench/_report.py: --quick, --json, progress bars, the results table

TARGET = 1.0
WIDTH, LAYERS, BATCH, LR = 1024, 10, 16, 1e-3
RTOL, ATOL = 1e-4, 1e-6
NAMES = ("ours", "ours-prefetch", "fsdp2")
WAIT = datetime.timedelta(seconds=120)


def model() -> nn.Sequential:
    layers = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


class ZeRO3(nn.Module):
    """ZeRO stage 3 over the units (children) of an nn.Sequential; also their optimizer."""

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
                for p in params:
                    flat[offset:offset + p.numel()].copy_(p.flatten())
                    p.data = flat[offset:offset + p.numel()].view_as(p)
                    p.register_post_accumulate_grad_hook(self._grad_ready)
                    self.where[p] = (i, offset)
                    offset += p.numel()
                shards.append(nn.Parameter(flat[rank * size:(rank + 1) * size].clone()))
                flat.untyped_storage().resize_(0)
                self.flats.append(flat)
                self.params.append(params)
        self.shards = nn.ParameterList(shards)
        self.optim = optimizer_class(list(self.shards), **kwargs)
        self.pending = [None] * len(self.units)
        self.gathered = [False] * len(self.units)
        self.arrived = [0] * len(self.units)
        self.reduced = [False] * len(self.units)
        self.in_flight = None

    def _gather(self, i, async_op=False):
        from labkit.compat import all_gather_into_tensor
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
        if self.pending[i] is not None:
            self.pending[i].wait(timeout=WAIT)
            self.pending[i], self.gathered[i] = None, True
        self._gather(i)

    def _free(self, i):
        if self.pending[i] is not None:
            self.pending[i].wait(timeout=WAIT)
            self.pending[i] = None
        self.flats[i].untyped_storage().resize_(0)
        self.gathered[i] = False

    def forward(self, x):
        index = {id(u): i for i, u in enumerate(self.units)}
        for unit in self.module.children():
            i = index.get(id(unit))
            if i is None:
                x = unit(x)
                continue
            self._gather(i, async_op=self.prefetch)
            if self.prefetch and i + 1 < len(self.units):
                self._gather(i + 1, async_op=True)
            self._ready(i)
            x = unit(x)
            self._free(i)
            if torch.is_grad_enabled() and x.requires_grad:
                x.register_hook(lambda grad, i=i: self._before_backward(i))
        return x

    def _before_backward(self, i):
        self._gather(i, async_op=self.prefetch)
        if self.prefetch and i > 0:
            self._gather(i - 1, async_op=True)
        self._ready(i)

    def _grad_ready(self, p):
        i, _ = self.where[p]
        self.arrived[i] += 1
        if self.arrived[i] == len(self.params[i]):
            self._reduce(i)

    @torch.no_grad()
    def _reduce(self, i):
        from labkit.compat import reduce_scatter_tensor
        flat_grad = self.flats[i].new_zeros(self.flats[i].numel())
        for p in self.params[i]:
            if p.grad is not None:
                _, offset = self.where[p]
                flat_grad[offset:offset + p.numel()].copy_(p.grad.flatten())
                p.grad = None
        self._wait_reduce()
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
        for i in range(len(self.units)):
            if not self.reduced[i]:
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
            p.grad = None

    @torch.no_grad()
    def full_state_dict(self):
        for i in range(len(self.units)):
            self._ready(i)
        full = {name: p.detach().clone() for name, p in self.module.named_parameters()}
        for i in range(len(self.units)):
            self._free(i)
        return full


def rank_main(steps: int, repeats: int, warmup: int, show: bool = False) -> dict:
    """Runs on each rank: warm-up, one traced and counted step each, rotating timed blocks."""
    import labkit
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = [(torch.randn(BATCH, WIDTH, generator=gen), torch.randn(BATCH, WIDTH, generator=gen))
               for _ in range(4)]
    runs = {}
    for name in NAMES:
        torch.manual_seed(0)
        net = model()
        if name == "fsdp2":
            mesh = init_device_mesh("cpu", (world,))
            for unit in net:
                if isinstance(unit, nn.Linear):
                    fully_shard(unit, mesh=mesh)
            fully_shard(net, mesh=mesh)
            optimizer = torch.optim.Adam(net.parameters(), lr=LR)
            runs[name] = (net, net, optimizer, optimizer)
        else:
            z = ZeRO3(net, torch.optim.Adam, prefetch=name == "ours-prefetch", lr=LR)
            runs[name] = (net, z, z, z.optim)
    done = dict.fromkeys(NAMES, 0)

    def block(name, n):
        _, forward, optimizer, _ = runs[name]
        for _ in range(n):
            x, y = batches[done[name] % len(batches)]
            nn.functional.mse_loss(forward(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done[name] += 1

    for name in NAMES:
        block(name, warmup)
    measured = {}
    for name in NAMES:
        net, forward, optimizer, owner = runs[name]
        dist.barrier()
        x, y = batches[done[name] % len(batches)]
        with labkit.MemoryTracer(net, owner, timeline=False) as mem, labkit.CommCounter() as comm:
            nn.functional.mse_loss(forward(x), y).backward()
            optimizer.step()
            rest = mem.current
        optimizer.zero_grad(set_to_none=True)
        done[name] += 1
        measured[name] = {"peak": mem.peak_total,
                          "state": rest["params"] + rest["grads"] + rest["optimizer"],
                          "wire": comm.total_wire_bytes(),
                          "ops": {op: row["calls"] for op, row in comm.summary().items()}}
    times = {name: [] for name in NAMES}
    for repeat in _report.progress(range(repeats), desc=f"{world} ranks",
                                   show=show and rank == 0):
        shift = repeat % len(NAMES)
        for name in NAMES[shift:] + NAMES[:shift]:
            dist.barrier()
            start = time.perf_counter()
            block(name, steps)
            times[name].append(time.perf_counter() - start)
    full = {}
    for name in NAMES:
        net, _, optimizer, _ = runs[name]
        params = ({k: p.full_tensor() for k, p in net.named_parameters()} if name == "fsdp2"
                  else optimizer.full_state_dict())
        full[name] = torch.cat([params[k].flatten() for k in sorted(params)])
    diff = max((full[name] - full["fsdp2"]).abs().max().item() for name in NAMES[:2])
    close = all(torch.allclose(full[name], full["fsdp2"], rtol=RTOL, atol=ATOL) for name in NAMES[:2])
    return {"times": times, "measured": measured, "diff": diff, "close": close,
            "steps_done": dict(done)}


def report(world: int, results: list, steps: int, out: _report.Results) -> bool:
    """Print one world size's times, memory and bytes; add them to ``out``; True if met."""
    def block_times(name):  # a block lasts as long as its slowest rank
        return [max(ts) for ts in zip(*(r["times"][name] for r in results))]

    blocks = {name: block_times(name) for name in NAMES}
    print(f"\n== {world} ranks ==")
    print(f"{'':>14} {'ms/step':>8} {'peak B/rank (max)':>18} {'state at rest B':>16} "
          f"{'wire B (ring)':>14}  collectives per step (rank 0)")
    for name in NAMES:
        m = [r["measured"][name] for r in results]
        ms = statistics.median(blocks[name]) * 1000 / steps
        ops = ", ".join(f"{op} {n}" for op, n in m[0]["ops"].items())
        print(f"{name:>14} {ms:>8.1f} {max(x['peak'] for x in m):>18,} {m[0]['state']:>16,} "
              f"{statistics.mean(x['wire'] for x in m):>14,.0f}  {ops}")
    ok = all(r["close"] for r in results)
    for name in NAMES[:2]:
        ratios = [o / t for o, t in zip(blocks[name], blocks["fsdp2"])]
        peak = (max(r["measured"][name]["peak"] for r in results)
                / max(r["measured"]["fsdp2"]["peak"] for r in results))
        median = statistics.median(ratios)
        print(f"{name} / fsdp2: step time median {median:.3f}x (per repeat {min(ratios):.3f}-"
              f"{max(ratios):.3f}; target <= {TARGET}: {'met' if median <= TARGET else 'NOT met'}), "
              f"peak memory {peak:.3f}x")
        ok = ok and median <= TARGET
        case = f"{world} ranks"
        out.add(f"zero3/step_time/{name}/{world}", "step time", case, "ms", name,
                [t * 1000 / steps for t in blocks[name]], "FSDP2",
                [t * 1000 / steps for t in blocks["fsdp2"]], ratios=ratios,
                target=f"ratio <= {TARGET}", met=median <= TARGET)
        out.add(f"zero3/peak_memory/{name}/{world}", "peak memory per rank (max over ranks)",
                case, "B", name, max(r["measured"][name]["peak"] for r in results), "FSDP2",
                max(r["measured"]["fsdp2"]["peak"] for r in results))
    out.check(f"{world} ranks: the three end with equal parameters",
              all(r["close"] for r in results))
    print(f"parameters after {results[0]['steps_done']['fsdp2']} steps each: "
          f"{'equal' if all(r['close'] for r in results) else 'NOT equal'} (allclose rtol {RTOL:g} "
          f"atol {ATOL:g}; max |ours - fsdp2| {max(r['diff'] for r in results):.2g})")
    return ok


def main() -> None:
    args = _paired.arguments(__doc__, repeats=10, quick_warmup=1)
    results = _report.Results("zero3_vs_fsdp2", args.quick, {
        "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup, "ranks": [2, 4]})
    n_params = sum(p.numel() for p in model().parameters())
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, gloo, 1 thread per rank; "
          f"{LAYERS} x Linear({WIDTH}, {WIDTH}), {n_params:,} parameters (float32), {BATCH} "
          f"samples per rank, Adam; {args.warmup} warm-up steps, 1 traced step, then "
          f"{args.repeats} rotating blocks of {args.steps} steps each")
    ok = _paired.each_world(rank_main, args, NAMES, report, results)
    print(f"\ntarget: ours / fsdp2 <= {TARGET} in step time at 2 and 4 ranks, same parameters: "
          f"{'met' if ok else 'NOT met'}")
    results.finish(args.json)


if __name__ == "__main__":
    main()
