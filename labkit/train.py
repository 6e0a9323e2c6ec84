"""The lab's data-parallel strategies on a real cluster: ``python -m labkit.train`` under torchrun.

    torchrun --standalone --nproc-per-node 2 -m labkit.train --strategy zero2
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m labkit.train --strategy zero3 --width 4096 --depth 8 --steps 20

Trains a small MLP with one strategy: DDP or ZeRO-1/2/3 as the course's reference implementation
(``labkit.stages``, the algorithms of notebooks 02 and 06-08), or the learner's own class from
the notebooks, exported to a module next to where torchrun runs (``--impl mylab:ZeRO2``), used
exactly as the notebook's training loop uses it:

    ddp    NaiveDDP(model) (02) or BucketedDDP(model, bucket_bytes) (03): forward through it,
           then sync_gradients() / finish_gradient_sync() after backward; a torch optimizer
    zero1  ZeRO1(params, optimizer_class, **options) (06): an optimizer: zero_grad(), step()
    zero2  ZeRO2(params, optimizer_class, bucket_bytes, **options) (07): the same
    zero3  ZeRO3(model, optimizer_class, **options) (08): forward through it, step(),
           zero_grad(), full_state_dict()

Every rank draws the same global batch each step and trains on its own slice of it. Rank 0 prints,
per rank, the memory by category at rest after the last step and at its peak
(``labkit.MemoryTracer``), the bytes sent per step (``labkit.CommCounter``) beside the formula,
and with ``--check`` the largest difference from the same training in one process on the whole
batch. ``--save`` writes the final parameters (gathered) from rank 0.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; this module calls
``init_process_group`` itself: NCCL when each rank has a GPU of its own, gloo otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import os
import sys

import torch
import torch.distributed as dist

from labkit import stages, theory
from labkit.comm import CommCounter
from labkit.memory import MemoryTracer
from labkit.models import Blocks
from labkit.placement import enter, plan

STRATEGIES = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}
OPTIMIZERS = {"adam": (torch.optim.Adam, {"lr": 1e-3}),
              "sgd": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9})}


def parse(argv=None):
    parser = argparse.ArgumentParser(prog="python -m labkit.train",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp")
    parser.add_argument("--impl", metavar="MODULE:CLASS",
                        help="your own class instead of labkit.stages' (e.g. mylab:ZeRO2)")
    parser.add_argument("--width", type=int, default=256, help="the MLP's hidden width")
    parser.add_argument("--depth", type=int, default=4, help="the MLP's number of Linear layers")
    parser.add_argument("--batch", type=int, default=32,
                        help="global batch per step (a multiple of the world size)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: a GPU per rank under NCCL, a shared GPU under gloo when there "
                             "are fewer GPUs than ranks on a node, else the CPU")
    parser.add_argument("--check", action="store_true",
                        help="also train in one process on rank 0 and print the largest difference")
    parser.add_argument("--save", metavar="PATH", help="rank 0 writes the final parameters here")
    parser.add_argument("--timeout", type=float, default=300, metavar="SECONDS",
                        help="how long a collective may wait for the other ranks (default 300 s; "
                             "torch's own default is 10 min for NCCL, 30 for gloo)")
    args = parser.parse_args(argv)
    if args.width < 1 or args.depth < 1 or args.steps < 1 or args.batch < 1:
        parser.error("--width, --depth, --steps and --batch must be positive")
    return args


def build_model(args) -> Blocks:
    """The same initial model on every rank and in the one-process reference (seeded)."""
    torch.manual_seed(args.seed)
    widths = [args.width] * (args.depth + 1)
    return Blocks(*widths).to(getattr(torch, args.dtype))


def global_batch(model: Blocks, args, step: int, device):
    """Step ``step``'s whole batch, the same on every rank (seeded by the step)."""
    generator = torch.Generator().manual_seed(args.seed * 100_003 + step)
    x, y = model.batch(args.batch, generator, dtype=getattr(torch, args.dtype))
    return x.to(device), y.to(device)


def learner_class(spec: str):
    module_name, _, class_name = spec.partition(":")
    if not class_name:
        raise SystemExit(f"--impl {spec!r}: write MODULE:CLASS, e.g. mylab:ZeRO2")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise SystemExit(f"--impl {spec!r}: {error} (is the module on PYTHONPATH, next to "
                         "where you run torchrun?)") from None


class Trainer:
    """One strategy behind one interface: ``forward(x)``, ``after_backward()``, ``step()``,
    ``zero_grad()``, ``full_parameters()``, and ``optimizers`` for the tracer."""

    def __init__(self, args, model, tag):
        self.model, self.strategy = model, args.strategy
        optimizer_class, options = OPTIMIZERS[args.optimizer]
        stage = STRATEGIES[args.strategy]
        self.learner = bool(args.impl)
        self.forward, self.after_backward, self.full = model, (lambda: None), None
        if not args.impl:                                   # the reference, labkit.stages
            self.impl = stages.STAGES[stage](model, optimizer_class, tag=tag, **options)
            self.optimizers = [self.impl.optim]
            self.step, self.zero_grad = self.impl.step, self.impl.zero_grad
            if stage == 3:
                self.full = self._gather_reference_units
            return
        cls = learner_class(args.impl)
        if stage == 0:
            takes = inspect.signature(cls).parameters
            self.impl = cls(model, 25 * 2**20) if "bucket_bytes" in takes else cls(model)
            sync = next((m for m in ("finish_gradient_sync", "sync_gradients")
                         if callable(getattr(self.impl, m, None))), None)
            if sync is None:
                raise SystemExit(f"{args.impl}: no sync_gradients() or finish_gradient_sync()")
            optimizer = optimizer_class(model.parameters(), **options)
            self.forward, self.after_backward = self.impl, getattr(self.impl, sync)
            self.optimizers, self.step = [optimizer], optimizer.step
            self.zero_grad = lambda: optimizer.zero_grad(set_to_none=True)
        elif stage in (1, 2):
            self.impl = cls(list(model.parameters()), optimizer_class, **options)
            self.optimizers = [self.impl.optim] if hasattr(self.impl, "optim") else []
            self.step, self.zero_grad = self.impl.step, self.impl.zero_grad
        else:
            self.impl = cls(model, optimizer_class, **options)
            self.optimizers = [self.impl.optim] if hasattr(self.impl, "optim") else []
            self.forward, self.step, self.zero_grad = self.impl, self.impl.step, self.impl.zero_grad
            self.full = self.impl.full_state_dict

    def _gather_reference_units(self) -> dict:
        for i in range(len(self.impl.pieces)):
            self.impl._all_gather(i)
        return dict(self.model.named_parameters())

    def full_parameters(self) -> dict:
        """The full parameters by name, on CPU (ZeRO-3 gathers them first)."""
        state = self.full() if self.full is not None else dict(self.model.named_parameters())
        return {name: t.detach().cpu().clone() for name, t in state.items()}


def init_distributed(timeout_s: float = 300, device: str = "auto"):
    """init_process_group from torchrun's environment; returns the device this rank uses.

    The rule of ``labkit.placement`` on this node: NCCL with a GPU per local rank, gloo with
    ranks sharing the node's GPUs when there are fewer GPUs than local ranks, gloo on the CPU
    without a GPU (or with ``--device cpu``).
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not set: run this under torchrun, e.g. "
                         "`torchrun --standalone --nproc-per-node 2 -m labkit.train`")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    try:
        placement = plan(local_world, device=device)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    where = placement.devices[local_rank]
    enter(where, placement.backend)            # before init: NCCL uses the current GPU
    timeout = datetime.timedelta(seconds=timeout_s)
    if placement.backend == "nccl":
        dist.init_process_group("nccl", device_id=torch.device(where), timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return torch.device(where)


def train(args, device) -> dict:
    """Train on this rank; returns what rank 0 prints for it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not divide by the world size {world}")
    model = build_model(args).to(device)
    mem = MemoryTracer(model, timeline=False)
    trainer = Trainer(args, model, mem.tag)
    mem.optimizers = trainer.optimizers
    local = args.batch // world
    bytes_per_step = []
    with mem:
        for step in range(args.steps):
            x, y = global_batch(model, args, step, device)
            x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
            with CommCounter() as comm:
                trainer.zero_grad()
                model.loss(trainer.forward(x), y).backward()
                trainer.after_backward()
                trainer.step()
            bytes_per_step.append((comm.total_payload_bytes(), comm.total_wire_bytes()))
            del x, y                 # views of the global batch: not state to report at rest
    params = trainer.full_parameters()
    return {"rank": rank, "device": str(device), "rest": mem.current, "peak": dict(mem.peak),
            "peak_total": mem.peak_total, "payload": bytes_per_step[-1][0],
            "wire": bytes_per_step[-1][1], "params": params if rank == 0 else None,
            "num_params": sum(p.numel() for p in params.values())}


def train_one_process(args) -> dict:
    """The reference: the same model, data and optimizer in one process on the whole batch."""
    model = build_model(args)
    optimizer_class, options = OPTIMIZERS[args.optimizer]
    optimizer = optimizer_class(model.parameters(), **options)
    for step in range(args.steps):
        x, y = global_batch(model, args, step, "cpu")
        optimizer.zero_grad()
        model.loss(model(x), y).backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:9.4g}"


def report(args, rows: list, world: int) -> list[str]:
    """Rank 0's printout: memory by category per rank, bytes per step beside the formula."""
    stage = STRATEGIES[args.strategy]
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    psi = rows[0]["num_params"]
    formula = (theory.ddp_bytes_per_step(psi, world, grad_bytes=element) if stage == 0 else
               theory.zero_bytes_per_step(psi, world, stage, grad_bytes=element,
                                          param_bytes=element))
    name = args.impl or f"labkit.stages.{stages.STAGES[stage].__name__}"
    lines = [f"{args.strategy} ({name}) on {world} ranks, {rows[0]['device'].split(':')[0]}: "
             f"{psi:,} parameters ({args.dtype}), {args.optimizer}, {args.steps} steps, "
             f"global batch {args.batch}",
             "rank   at rest MB: params    grads  optimizer      other     peak MB   "
             "sent per step MB: payload   wire   wire (formula)"]
    for row in rows:
        rest = row["rest"]
        other = sum(rest.values()) - rest["params"] - rest["grads"] - rest["optimizer"]
        lines.append(f"{row['rank']:>4} {mb(rest['params'])} {mb(rest['grads'])} "
                     f"{mb(rest['optimizer'])} {mb(other)} {mb(row['peak_total'])}   "
                     f"{mb(row['payload'])} {mb(row['wire'])} {mb(formula)}")
    return lines


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    device = init_distributed(args.timeout, args.device)
    try:
        mine = train(args, device)
        rows = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object({k: v for k, v in mine.items() if k != "params"}, rows, dst=0)
        if dist.get_rank() == 0:
            print("\n".join(report(args, rows, dist.get_world_size())), flush=True)
            if args.check:
                reference = train_one_process(args)
                worst = max(float((mine["params"][k] - reference[k]).abs().max())
                            for k in reference)
                print(f"largest |difference| from one process on the whole batch: {worst:.3g}",
                      flush=True)
            if args.save:
                torch.save(mine["params"], args.save)
                print(f"parameters written to {args.save}", flush=True)
        # Leave together: a rank that tears gloo down while rank 0 still checks or saves can
        # abort in gloo's threads ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's teardown: gloo's threads can still hold work objects with
    # Python references, and destroying them while the interpreter finalizes aborts the rank
    # ("terminate called without an active exception"; the mechanism is described in
    # pytorch/pytorch PR #179291). Seen here after the barrier and destroy_process_group.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
