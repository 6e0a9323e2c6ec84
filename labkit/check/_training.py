"""Train a learner's data-parallel wrapper on N ranks, and the same model in one process on the
global batch; the graders of the DDP notebooks compare the two.

A ``Run`` is drawn afresh in the notebook for every check run (``fresh_run``): a grading model
from ``labkit.models``, one initial state per rank (rank 0's is the model's; every other rank's
is drawn independently, so only a broadcast from rank 0 can make them equal), and the global
batch of each step, N·b samples. Rank r trains on rows r, r + N, r + 2N, ... of each global batch
(``torch.utils.data.DistributedSampler``'s round robin), and drops the rest before the learner's
code runs. ``reference`` trains one process from rank 0's state on the whole global batches with
the same plain SGD, which is the definition of what data parallelism must reproduce: the mean of
N local mean losses over N equal shards is the mean loss of the global batch, so the mean of the
N local gradients is the global gradient.

In each rank ``train_on_rank`` builds the model on the CPU, moves it and its shards of the
batches to the rank's device (``labkit.device()``), builds the wrapper around it and runs the
usual loop: ``zero_grad``, ``out = wrapper(x)``, ``loss.backward()``, ``wrapper.<sync>()``,
``optimizer.step``, with a ``CommCounter`` around each phase (building the wrapper, forward,
backward, sync), so that a grader can say where each collective ran. It returns the state right
after the wrapper was built, the state at the end, and the ledgers (tensors come back to the
notebook on the CPU). Before each phase it writes where it is to a file of its own
(``progress``), so that a crash or a hang can be placed in a model and a step even when the
rank's results never come back.

Tolerance. The N-rank run and the reference add the same per-sample gradient terms in different
orders and groupings (N local means, an all-reduce, a division by N; against one mean over N·b
samples). With N·b <= 12 samples per step, each gradient element computed either way is within
about (N·b + 2)·u·max|t| of its exact value (u = 2^-24 for float32, 2^-53 for float64; t the
per-sample terms), so the two differ by at most about 30·u·T per step, T = max|t|. An SGD step
moves that difference by lr (0.1), and later steps amplify what is already there by at most
1 + lr·L, L the largest curvature of the loss. Assuming T and L below 10 (small tanh models,
standard-normal inputs, weights of scale 1/sqrt(fan_in)), 1 + lr·L < 2 and three steps give at
most 0.1·30·u·10·(1 + 2 + 4), about 200·u. ``RTOL = ATOL = 1000·u`` (6e-5 in float32, 1.1e-13 in
float64) leaves a factor of five over that; tests/test_nb02_check.py checks the assumption on
many fresh runs, where a correct wrapper's largest difference stays below 1/20 of the tolerance
(a few u in practice). Every bug the graders name moves a parameter by about lr times a gradient,
1e-3 or more (a float32 buffer in a float64 run: about 1e-9): far outside. Buffers and frozen
parameters are copied, never computed: a correct wrapper leaves them bitwise equal.
"""
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from labkit import models
from labkit.check._core import call_learner
from labkit.comm import CommCounter
from labkit.placement import device

LR = 0.1
STEPS = 3
LOCAL_BATCH = 3


def tolerance(dtype) -> float:
    """RTOL = ATOL for comparing a trained parameter with the reference (module docstring)."""
    return 1000 * torch.finfo(dtype).eps / 2


class Run(NamedTuple):
    """One model, trained for ``len(batches)`` steps on ``world_size`` ranks (plain data: it
    pickles, and every rank gets it as a launch argument)."""
    kind: str              # a name in labkit.models.GRADING
    label: str             # how a hint names it: "the model with tied weights"
    dtype: torch.dtype
    world_size: int
    init: list             # state_dict per rank; rank 0's is the model's
    batches: list          # (inputs, targets) of each step's global batch
    lr: float = LR


LABELS = {"plain": "the plain two-layer model",
          "batchnorm": "the model with BatchNorm (running statistics as buffers)",
          "frozen": "the model with a frozen parameter",
          "tied": "the model with tied embedding and output weights",
          "unused": "the model whose extra branch some steps do not use"}


class Layout(NamedTuple):
    """What a grader needs to know about a model's tensors, by name (shared Parameters once)."""
    params: dict      # name -> bytes, every parameter
    trainable: dict   # name -> bytes, requires_grad
    frozen: dict      # name -> bytes, requires_grad=False
    buffers: dict     # name -> bytes
    tied: dict        # name -> bytes, a Parameter that appears under more than one name
    tensors: dict     # name -> (numel, dtype), parameters and buffers


def layout(model) -> Layout:
    params = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    every = dict(model.named_parameters(remove_duplicate=False))
    counts = {}
    for p in every.values():
        counts[id(p)] = counts.get(id(p), 0) + 1
    named = dict(model.named_parameters())
    tensors = {n: (t.numel(), t.dtype) for n, t in [*named.items(), *model.named_buffers()]}
    return Layout(params=params,
                  trainable={n: b for n, b in params.items() if named[n].requires_grad},
                  frozen={n: b for n, b in params.items() if not named[n].requires_grad},
                  buffers={n: b.numel() * b.element_size() for n, b in model.named_buffers()},
                  tied={n: b for n, b in params.items() if counts[id(named[n])] > 1},
                  tensors=tensors)


def snapshot(model) -> dict:
    """name -> a copy of every parameter (shared ones once) and buffer."""
    return {n: t.detach().clone() for n, t in [*model.named_parameters(),
                                               *model.named_buffers()]}


def fresh_run(kind: str, world_size: int, dtype, generator, steps: int = STEPS,
              local_batch: int = LOCAL_BATCH) -> Run:
    """A ``Run`` of the model ``kind`` on ``world_size`` ranks, all of it drawn from
    ``generator`` (seed it from the OS for every check run). The ``unused`` model's gates: on
    in some samples of every rank at step 0, off everywhere at step 1, on only in some of rank
    0's samples at every later step."""
    init = [_state(models.fill(models.make(kind, dtype), generator)) for _ in range(world_size)]
    model, n = models.make(kind, dtype), world_size * local_batch
    batches = []
    for step in range(steps):
        if kind == "unused":
            gate = _gates(step, world_size, local_batch, generator)
            batches.append(model.batch(n, generator, dtype, gate=gate))
        else:
            batches.append(model.batch(n, generator, dtype))
    return Run(kind, LABELS[kind], dtype, world_size, init, batches)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _gates(step, world_size, local_batch, generator):
    n = world_size * local_batch
    if step == 1:
        return torch.zeros(n, dtype=torch.long)
    gate = torch.randint(2, (n,), generator=generator)
    if step == 0:
        gate[:world_size] = 1                    # row r belongs to rank r: every rank uses it
        return gate
    on_rank0 = torch.arange(n) % world_size == 0
    gate = gate * on_rank0
    gate[0] = 1
    return gate


def shard(tensor, rank: int, world_size: int):
    """Rank ``rank``'s rows of a global batch: rank, rank + N, ... (DistributedSampler's order)."""
    return tensor[rank::world_size]


PARTIAL_STEP = 2   # the step at which only rank 0 uses the unused model's branch


def reference(run: Run, lr: float = None) -> dict:
    """One process, rank 0's initial state, the whole global batches: the state at the end."""
    model = models.make(run.kind, run.dtype)
    model.load_state_dict(run.init[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr if lr is None else lr)
    for x, y in run.batches:
        optimizer.zero_grad(set_to_none=True)
        model.loss(model(x), y).backward()
        optimizer.step()
    return snapshot(model)


def _ledger(comm) -> list:
    """(op, payload bytes, async_op) per call."""
    return [(c.op, c.payload_bytes, c.async_op) for c in comm.calls]


def train_on_rank(wrapper, runs: list, sync: str, folder: str, name: str = "the wrapper") -> list:
    """In each rank: every run in turn (see the module docstring); one dict per run.

    Keys: ``after_build`` and ``final`` (``snapshot``), ``built`` (the ledger of building the
    wrapper), ``steps`` (per step: the ``forward``, ``backward`` and ``sync`` ledgers and the
    names of frozen parameters that had a grad after sync), and ``problem`` (None, or what made
    training stop: the wrapper has no ``.module``, no ``sync`` method, or forward returned no
    tensor)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    progress = Path(folder) / f"rank{rank}"
    return [_train(wrapper, run, sync, progress, rank, world, name) for run in runs]


def _train(wrapper, run, sync, progress, rank, world, name):
    # built and drawn on the CPU (the notebook's reference is), trained on this rank's device
    model = models.make(run.kind, run.dtype)
    model.load_state_dict(run.init[rank])
    model.to(device())
    shards = [(shard(x, rank, world).to(device()), shard(y, rank, world).to(device()))
              for x, y in run.batches]
    run.init.clear()      # the other ranks' weights and samples, gone from this rank's copy
    run.batches.clear()   # of the launch's arguments before the learner's code runs
    out = {"after_build": None, "final": None, "built": [], "steps": [], "problem": None}
    progress.write_text(f"{run.kind} build")
    with CommCounter() as comm:
        ddp = call_learner(wrapper, model, case=f"{run.label}: {name}(model)")
    out["built"], out["after_build"] = _ledger(comm), snapshot(model)
    if getattr(ddp, "module", None) is not model:
        out["problem"] = "module"
        return out
    if not callable(getattr(ddp, sync, None)):
        out["problem"] = "sync"
        return out
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    named = dict(model.named_parameters())
    for step, (x, y) in enumerate(shards):
        case = f"{run.label}, step {step}"
        progress.write_text(f"{run.kind} step {step}")
        optimizer.zero_grad(set_to_none=True)
        ledgers = {}
        with CommCounter() as comm:
            output = call_learner(ddp, x, case=case)
        ledgers["forward"] = _ledger(comm)
        if not isinstance(output, torch.Tensor):
            out["problem"] = f"forward returned {type(output).__name__}"
            return out
        loss = model.loss(output, y)
        with CommCounter() as comm:
            call_learner(loss.backward, case=case)
        ledgers["backward"] = _ledger(comm)
        with CommCounter() as comm:
            call_learner(getattr(ddp, sync), case=case)
        ledgers["sync"] = _ledger(comm)
        ledgers["frozen_grads"] = [n for n in frozen if named[n].grad is not None]
        optimizer.step()
        out["steps"].append(ledgers)
    progress.write_text(f"{run.kind} done")
    out["final"] = snapshot(model)
    return out


def where(folder: str, world_size: int) -> dict:
    """rank -> (model kind, "build" / "step k" / "done") from the progress files, for the ranks
    that wrote one."""
    places = {}
    for rank in range(world_size):
        path = Path(folder) / f"rank{rank}"
        if path.exists():
            kind, _, phase = path.read_text().partition(" ")
            places[rank] = (kind, phase)
    return places


def close(a, b, dtype) -> bool:
    tol = tolerance(dtype)
    if not a.is_floating_point():
        return torch.equal(a, b)
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol))


def max_difference(state: dict, ref: dict) -> float:
    """The largest |difference| over every floating-point tensor of two snapshots."""
    return max(((state[n].double() - ref[n].double()).abs().max().item()
                for n in ref if ref[n].is_floating_point() and ref[n].numel()), default=0.0)


def differing(state: dict, ref: dict, dtype) -> list:
    """Names whose tensors differ beyond the tolerance (or at all, for integer buffers)."""
    return [n for n in ref if not close(state[n], ref[n], dtype)]
