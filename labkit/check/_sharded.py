"""Train a learner's sharded optimizer (ZeRO-1, ZeRO-2) or sharded module wrapper (ZeRO-3) on N
ranks, and the same model in one process; the graders of notebooks 06, 07 and 08 compare the two
and read each rank's ledger and memory.

ZeRO-3 (``train_module_on_rank``) differs in what it trains: a ``Units`` model (an nn.Sequential
of units of unequal sizes, ``UNITS``) wrapped in the learner's class, forward through the
wrapper, the parameters read through its ``full_state_dict()``; hooks of the harness on each unit
place the unit's forward and backward in the ledger and sample the memory there (its docstring).

A ``Run`` is drawn afresh in the notebook for every check run (``fresh_run``): an MLP of
``labkit.models`` whose parameter count N does not divide, its initial state (the same on every
rank: the contract hands every rank the same weights), an optimizer (SGD with momentum or Adam)
and the global batch of each step. Rank r trains on rows r, r + N, ... of each global batch and
drops the rest before the learner's code runs. ``reference`` trains one process from the same
state on the whole global batches with the same optimizer over ``model.parameters()``: the mean
of the N local mean losses is the global mean loss, so reduce-scattering the N local gradients
and dividing by N gives each rank its shard of the global gradient, and an element-wise optimizer
(SGD, Adam) stepping that shard computes exactly what one optimizer over every parameter
computes for those elements.

In each rank ``train_on_rank`` builds the model on the CPU, moves it and the rank's shards of the
batches to the rank's device (``labkit.device()``), builds ``cls(list(model.parameters()),
optimizer_class, **options)`` (with ``bucket_bytes=`` for ZeRO-2) and runs ``STEPS`` steps of:
forward and loss, ``loss.backward()``, ``sharded.step()``, ``sharded.zero_grad(set_to_none=True)``.
In every step but the last, a ``CommCounter`` watches each phase (the construction too), so that a
grader can say where each collective ran. The last step is measured instead: a ``MemoryTracer``
around backward and one around step + zero_grad, and no ledger (the counter keeps each async
collective's future, and with it the op's output tensors, until its ledger is read: that would
count against the learner). Step 0 has made the optimizer state and whatever the class allocates
lazily by then. The tracers are handed the model and every ``torch.optim.Optimizer`` that has
stepped on the rank: torch's global step hook
(``torch.optim.optimizer.register_optimizer_step_pre_hook``) sees them all, the one in
``self.optim`` and any other the class keeps, so the "optimizer" category is every byte of
optimizer state the rank holds, wherever the class hides it. Counting total live bytes instead
could not tell a hidden Adam (2 bytes of state per parameter byte) from two legitimate flat buffers
(a parameter copy and a gradient buffer). Nothing is tagged for the learner: their buffers count as
"other". On a GPU the tracers count the GPU's storages only (``_traced_device``). The measured step
reports
* ``backward_peak``: the largest grads + other + comm bytes during backward (the tracer's
  timeline), counting only what backward touched or made: parameters' .grad, buckets, gradient
  shards, autograd's temporaries; parameters, optimizer state and activations are left out;
* ``grads_at_start``: .grad bytes alive as backward starts (the model's were cleared by
  zero_grad, so the optimizer's shard's);
* ``rest``: bytes by category after step and zero_grad ("at rest"), among what the tracers saw.
Every step reports ``grads_after_backward`` (the bytes of the model's .grad when backward
returned) and ``grads_left`` (after zero_grad). Before each phase a rank writes where it is to a
file of its own (``where`` reads them), so that a crash or a hang can be placed in a run and a
phase even when the rank's results never come back.

Tolerance. The N-rank run and the reference differ only in rounding: the gradient of each
element is the same sum of per-sample terms, grouped differently (N local means, a reduce-scatter
in gloo's order, a division by N; against one mean over N·b samples), so, as derived in
``_training``, each gradient element differs by at most about d = 30·u·T (u = 2^-24 in float32,
2^-53 in float64, T the largest per-sample term, assumed below 10), and a parameter error e
changes a gradient by at most L·e (L the largest curvature, assumed below 10).
SGD with momentum 0.9 moves a parameter by lr times the momentum buffer, a sum of the gradients
with weights 1, 0.9, 0.81: gradient errors of d move it by at most 2.71·lr·d per step.
Adam is not linear in the gradient: its update is lr·m/(sqrt(v) + eps), and with torch's default
eps = 1e-8 a gradient element near zero at the first step (update lr·g/(|g| + eps)) turns a
rounding difference of 1e-7 into a whole step of lr, which no tolerance absorbs. m and v are
averages with weights summing to one, so gradient errors of at most d move m by at most d and
sqrt(v) by at most d (a weighted 2-norm); the update then moves by at most
lr·d/eps·(1 + |m|/sqrt(v)), and |m|/sqrt(v) <= 1.01 in the first three steps with torch's betas
(Cauchy-Schwarz on the two averages' weights): at most 2.01·lr/eps·d.
The checks therefore run SGD with lr = 0.05 and momentum 0.9 (0.136·d per step) and Adam with
lr = 0.01 and eps = 0.1 (0.2·d per step). With the curvature, a parameter error grows by at most
1 + 0.2·L < 3 per step, so three steps stay below 0.2·d·(1 + 3 + 9) = 2.6·d, about 800·u, under
``tolerance`` = 1000·u (``_training.tolerance``, 6e-5 in float32, 1.1e-13 in float64).
tests/test_nb06_check.py and tests/test_nb07_check.py check this on many fresh runs: a correct
sharded optimizer's largest difference stays below 1/20 of the tolerance. Every bug the graders
name moves a parameter by a share of a step, 1e-4 or more.
"""
import math
import re
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

from labkit import models
from labkit.check._core import Failed, call_learner
from labkit.check._training import tolerance
from labkit.comm import CommCounter
from labkit.memory import MemoryTracer
from labkit.placement import device

STEPS = 3
LOCAL_BATCH = 2
OPTIMIZERS = {"SGD": {"lr": 0.05, "momentum": 0.9}, "Adam": {"lr": 0.01, "eps": 0.1}}
OPTIMIZER_LABELS = {"SGD": "SGD with momentum", "Adam": "Adam"}

# Widths of the MLPs (``labkit.models.MLP``). Their parameter counts divide by none of 2, 3, 4.
SMALL = (7, 12, 5)                   # 161 = 84 + 12 + 60 + 5
THREE = (7, 12, 9, 5)                # 263 = 84 + 12 + 108 + 9 + 45 + 5
DEEP = (7,) + (8,) * 29 + (5,)       # 2125: 30 layers of at most 72 elements (ZeRO-2, 2 ranks)
MID = (7,) + (8,) * 15 + (5,)        # 1117: 16 of them (ZeRO-2, 4 ranks: collectives cost more)


# ZeRO-3 (notebook 08) trains a ``Units`` model instead: an nn.Sequential whose children are the
# units that are gathered one at a time. A unit is a tuple of Linear layers (in, out, bias), each
# followed by tanh but the model's last. Nine units of unequal sizes, every one odd (no N of 2 or
# 4 divides it), and distinct once padded to a multiple of 2 or of 4, so that a collective's
# payload names its unit: 63, 99, 143, 91, 153 (two layers, three tensors), 135, 165, 77, 35.
UNITS = (((6, 9, True),), ((9, 11, False),), ((11, 13, False),), ((13, 7, False),),
         ((7, 9, False), (9, 9, True)), ((9, 15, False),), ((15, 11, False),),
         ((11, 7, False),), ((7, 5, False),))


class Units(torch.nn.Sequential):
    """The ZeRO-3 model: ``units`` as above, a regression of mean squared error (as the MLPs)."""

    def __init__(self, units):
        layers = [layer for unit in units for layer in unit]
        built, k = [], 0
        for unit in units:
            modules = []
            for a, b, bias in unit:
                k += 1
                modules.append(torch.nn.Linear(a, b, bias=bias))
                if k < len(layers):
                    modules.append(torch.nn.Tanh())
            built.append(torch.nn.Sequential(*modules))
        super().__init__(*built)

    def batch(self, n, generator, dtype=torch.float32):
        first, last = self[0][0].in_features, self[-1][-1].out_features
        return (torch.randn(n, first, generator=generator, dtype=dtype),
                torch.randn(n, last, generator=generator, dtype=dtype))

    @staticmethod
    def loss(output, target):
        return torch.nn.functional.mse_loss(output, target)


def is_units(widths) -> bool:
    """True for a ``Units`` spec (tuples of layers), False for an MLP's widths."""
    return bool(widths) and isinstance(widths[0], tuple)


def unit_sizes(units) -> list:
    """Elements of each unit of a ``Units`` spec."""
    return [sum(a * b + b * bias for a, b, bias in unit) for unit in units]


def numel(widths) -> int:
    """Parameters of ``models.MLP(*widths)``, or of ``Units(widths)``."""
    if is_units(widths):
        return sum(unit_sizes(widths))
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def tensor_sizes(widths) -> list:
    """Elements of each parameter tensor, in ``model.parameters()`` order."""
    if is_units(widths):
        return [k for unit in widths for a, b, bias in unit
                for k in ((a * b, b) if bias else (a * b,))]
    return [k for a, b in zip(widths, widths[1:]) for k in (a * b, b)]


def make(widths, dtype):
    if is_units(widths):
        return Units(widths).to(dtype)
    return models.MLP(*widths).to(dtype)


def padded(num: int, n: int) -> int:
    """``num`` rounded up to a multiple of ``n``: the flat buffer's elements."""
    return math.ceil(num / n) * n


class Run(NamedTuple):
    """One model, trained for ``len(batches)`` steps on ``world_size`` ranks (plain data: it
    pickles, and every rank gets it as a launch argument)."""
    widths: tuple
    dtype: torch.dtype
    world_size: int
    optimizer: str          # a name in OPTIMIZERS (torch.optim.<name>)
    options: dict           # its keyword arguments
    init: dict              # the state_dict every rank starts from
    batches: list           # (inputs, targets) of each step's global batch
    bucket_bytes: Optional[int] = None   # ZeRO-2 only

    @property
    def label(self) -> str:
        """"the MLP 7-12-5 (161 parameters, float32) with SGD with momentum"."""
        dtype = str(self.dtype).split(".")[-1]
        if is_units(self.widths):
            sizes = ", ".join(map(str, unit_sizes(self.widths)))
            return (f"the Sequential of {len(self.widths)} units ({sizes} parameters, "
                    f"{dtype}) with {OPTIMIZER_LABELS[self.optimizer]}")
        layers = "-".join(map(str, _short_widths(self.widths)))
        return (f"the MLP {layers} ({numel(self.widths)} parameters, {dtype}) with "
                f"{OPTIMIZER_LABELS[self.optimizer]}")


def _short_widths(widths):
    """7-8x29-5 reads better than twenty-nine 8s."""
    inner = widths[1:-1]
    if len(inner) > 3 and len(set(inner)) == 1:
        return (widths[0], f"{inner[0]}x{len(inner)}", widths[-1])
    return widths


def fresh_run(widths, world_size, dtype, optimizer, generator, bucket_bytes=None,
              steps=STEPS, local_batch=LOCAL_BATCH) -> Run:
    """A ``Run`` drawn from ``generator`` (seed it from the OS for every check run)."""
    model = models.fill(make(widths, dtype), generator)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batches = [model.batch(world_size * local_batch, generator, dtype) for _ in range(steps)]
    return Run(tuple(widths), dtype, world_size, optimizer, dict(OPTIMIZERS[optimizer]), init,
               batches, bucket_bytes)


def names(widths) -> list:
    return [n for n, _ in make(widths, torch.float32).named_parameters()]


def flat(state: dict, widths) -> torch.Tensor:
    """The parameters of a snapshot as one vector, in ``model.parameters()`` order."""
    return torch.cat([state[n].reshape(-1) for n in names(widths)])


def reference(run: Run, grad_scale: float = 1.0, steps: Optional[int] = None) -> dict:
    """One process, the whole global batches, ``optimizer(model.parameters())``: the parameters
    after ``steps`` steps (all of them by default). ``grad_scale`` multiplies every gradient
    before the step (N: what forgetting the division by N does)."""
    model = make(run.widths, run.dtype)
    model.load_state_dict(run.init)
    optimizer = getattr(torch.optim, run.optimizer)(model.parameters(), **run.options)
    for x, y in run.batches[:steps]:
        optimizer.zero_grad(set_to_none=True)
        model.loss(model(x), y).backward()
        if grad_scale != 1.0:
            for p in model.parameters():
                p.grad.mul_(grad_scale)
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def first_gradient(run: Run) -> torch.Tensor:
    """The global mean gradient of step 0, flat, in ``model.parameters()`` order."""
    model = make(run.widths, run.dtype)
    model.load_state_dict(run.init)
    x, y = run.batches[0]
    model.loss(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def one_step(run: Run, params: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``params`` after one step of a fresh optimizer with gradient ``grad``."""
    p = torch.nn.Parameter(params.clone())
    p.grad = grad.clone()
    getattr(torch.optim, run.optimizer)([p], **run.options).step()
    return p.detach()


def state_bytes(optimizer: str, options: dict, num: int, dtype) -> int:
    """Bytes of optimizer state that ``torch.optim.<optimizer>(**options)`` keeps for one
    parameter of ``num`` elements once it has stepped (storages counted once): Adam's exp_avg,
    exp_avg_sq and step, SGD's momentum buffer."""
    p = torch.nn.Parameter(torch.zeros(num, dtype=dtype))
    p.grad = torch.ones(num, dtype=dtype)
    opt = getattr(torch.optim, optimizer)([p], **options)
    opt.step()
    storages = {}
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
    return sum(storages.values())


def close(a, b, dtype) -> bool:
    tol = tolerance(dtype)
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol))


def max_difference(state: dict, ref: dict) -> float:
    return max(((state[n].double() - ref[n].double()).abs().max().item() for n in ref),
               default=0.0)


def differing(state: dict, ref: dict, dtype) -> list:
    return [n for n in ref if not close(state[n], ref[n], dtype)]


# --- inside a rank --------------------------------------------------------------------------------

def ledger(comm) -> list:
    """(op, payload bytes, async_op, peer) per call (none in the step without a counter)."""
    return [(c.op, c.payload_bytes, c.async_op, c.peer) for c in comm.calls]


def train_on_rank(cls, runs: list, folder: str, name: str) -> list:
    """In each rank: every run in turn (module docstring); one dict per run.

    Keys: ``built`` (the ledger of the construction), ``steps`` (per step: ``counted`` (False
    for the measured last step), the ``forward``, ``backward`` and ``step`` ledgers (empty when
    not counted), ``grads_after_backward`` and ``grads_left`` (bytes of the model's .grad after
    backward, and after zero_grad), ``memory`` (None but in the last step: ``backward_peak``,
    ``backward_event``, ``grads_at_start``, ``rest``)), ``after_first`` (the flat parameters
    after step 0), ``final`` (name -> parameter), ``optimizers`` (per torch optimizer that
    stepped: its class name and its parameters' sizes), and ``problem`` (None, or why training
    stopped). A run's ``bucket_bytes``, when it has one, is passed to ``cls`` too."""
    rank = dist.get_rank()
    progress = Path(folder) / f"rank{rank}"
    return [_train(cls, i, run, progress, rank, dist.get_world_size(), name)
            for i, run in enumerate(runs)]


def _grad_bytes(model) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
               if p.grad is not None)


def _backward_peak(timeline) -> tuple:
    """(bytes, event): the largest grads + other + comm in a tracer's timeline."""
    best, event = 0, None
    for what, _, by in timeline:
        value = by["grads"] + by["other"] + by["comm"]
        if value > best:
            best, event = value, what
    return best, event


def _on_device(run, rank, world):
    """The run's model and this rank's shards of its batches, built and drawn on the CPU (the
    notebook's reference is), moved to this rank's device."""
    model = make(run.widths, run.dtype)
    model.load_state_dict(run.init)
    model.to(device())
    shards = [(x[rank::world].clone().to(device()), y[rank::world].clone().to(device()))
              for x, y in run.batches]
    return model, shards


def _traced_device():
    """What the rank's ``MemoryTracer`` counts: every device on the CPU (as always), only the
    GPU's storages on a GPU, where the CPU holds none of the learner's state but may hold
    copies in transit (gloo stages point-to-point through host memory when ranks share a GPU)."""
    where = device().type
    return None if where == "cpu" else where


def _train(cls, index, run, progress, rank, world, name):
    model, shards = _on_device(run, rank, world)
    run.init.clear()      # other ranks' samples, gone from this rank's copy of the arguments
    run.batches.clear()
    out = {"built": [], "steps": [], "after_first": None, "final": None, "optimizers": [],
           "problem": None}
    seen = []

    def stepped(optimizer, args, kwargs):
        if all(o is not optimizer for o in seen):
            seen.append(optimizer)

    hook = register_optimizer_step_pre_hook(stepped)
    try:
        progress.write_text(f"{index} build")
        optimizer_class = getattr(torch.optim, run.optimizer)
        options = dict(run.options)
        if run.bucket_bytes is not None:
            options["bucket_bytes"] = run.bucket_bytes
        case = f"{run.label}: {name}(params, torch.optim.{run.optimizer}, ...)"
        with CommCounter() as comm:
            sharded = call_learner(lambda: cls(list(model.parameters()), optimizer_class,
                                               **options), case=case)
        out["built"] = ledger(comm)
        for method in ("step", "zero_grad"):
            if not callable(getattr(sharded, method, None)):
                out["problem"] = f"no {method}"
                return out
        for step in range(len(shards)):
            out["steps"].append(_step(model, sharded, shards, step, run, progress, index, seen))
            if step == 0:
                out["after_first"] = torch.cat([p.detach().reshape(-1).clone()
                                                for p in model.parameters()])
        progress.write_text(f"{index} done")
        out["final"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        out["optimizers"] = [(type(o).__name__, [p.numel() for g in o.param_groups
                                                 for p in g["params"]]) for o in seen]
        return out
    finally:
        hook.remove()


def _step(model, sharded, shards, step, run, progress, index, seen):
    """One step: the ledgers of its phases, or (the last step) its memory."""
    case = f"{run.label}, step {step}"
    measured = step == len(shards) - 1
    record = {"memory": None, "counted": not measured, "forward": [], "backward": [],
              "step": []}
    x, y = shards[step]
    shards[step] = None     # the graph keeps them while backward needs them, no longer
    progress.write_text(f"{index} step {step}: forward")
    with _ledger_unless(measured) as comm:
        loss = model.loss(model(x), y)
    del x, y
    record["forward"] = ledger(comm)
    progress.write_text(f"{index} step {step}: backward")
    with _ledger_unless(measured) as comm:
        if measured:
            with MemoryTracer(model, list(seen), device=_traced_device()) as mem:
                call_learner(loss.backward, case=case)
            record["memory"] = dict(zip(("backward_peak", "backward_event"),
                                        _backward_peak(mem.timeline)))
            # .grad bytes alive as backward starts (the model's were cleared: the shard's)
            record["memory"]["grads_at_start"] = mem.timeline[0][2]["grads"]
        else:
            call_learner(loss.backward, case=case)
    del loss
    record["backward"] = ledger(comm)
    record["grads_after_backward"] = _grad_bytes(model)
    progress.write_text(f"{index} step {step}: in step()")
    with _ledger_unless(measured) as comm:
        if measured:
            with MemoryTracer(model, list(seen), timeline=False,
                              device=_traced_device()) as mem:
                call_learner(sharded.step, case=case)
                call_learner(lambda: sharded.zero_grad(set_to_none=True), case=case)
            record["memory"]["rest"] = mem.current
        else:
            call_learner(sharded.step, case=case)
            call_learner(lambda: sharded.zero_grad(set_to_none=True), case=case)
    record["step"] = ledger(comm)
    record["grads_left"] = _grad_bytes(model)
    return record


class _NoLedger:
    calls = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _ledger_unless(measured):
    """A CommCounter, except in the step whose memory is measured: the counter keeps each async
    collective's future, and with it the op's output tensors, until its ledger is read, which
    would count against the learner's memory."""
    return _NoLedger() if measured else CommCounter()


def where(folder: str, world_size: int) -> dict:
    """rank -> (run index, "build" / "step k: forward" / ... / "done") from the progress files."""
    places = {}
    for rank in range(world_size):
        path = Path(folder) / f"rank{rank}"
        if path.exists():
            index, _, phase = path.read_text().partition(" ")
            places[rank] = (int(index), phase)
    return places


# --- ZeRO-3: a module wrapper, trained on N ranks -------------------------------------------------

def train_module_on_rank(cls, runs: list, folder: str, name: str, prefetch: bool) -> list:
    """In each rank: every run in turn, each a ``Units`` model wrapped in
    ``cls(model, optimizer_class, prefetch=prefetch, **options)``; one dict per run.

    As ``train_on_rank``, with: forward is ``wrapper(x)``; ``built_state`` (the flat
    ``full_state_dict()`` right after construction, or why it could not be read) and ``optim``
    (the sizes of ``wrapper.optim``'s parameters, or None); ``after_first`` and ``final`` come from
    ``full_state_dict()``. Each counted step also has ``marks``: (unit, what, position) with
    position the length of the phase's ledger when unit ``unit`` "starts" (its forward pre-hook,
    after the wrapper's own), "ends" (its forward hook, before the wrapper's own) or "backward"
    (its full backward pre-hook, before the wrapper's own). In the measured step, ``samples``:
    (unit, what, bytes by category) read at those moments and once more "gathered" (after the
    wrapper's backward pre-hooks), the bytes exact (``MemoryTracer.current`` re-reads every
    size, storages resized to 0 included), and ``rest`` as in ``train_on_rank``."""
    rank = dist.get_rank()
    progress = Path(folder) / f"rank{rank}"
    return [_train_module(cls, i, run, progress, rank, dist.get_world_size(), name, prefetch)
            for i, run in enumerate(runs)]


class _Watch:
    """The harness's hooks on the units: ledger positions and memory samples."""

    def __init__(self, units):
        # a unit whose input needs no gradient (the first) makes torch warn about its hooks
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        self.comm = self.mem = None
        self.marks, self.samples = [], []
        self.handles = []
        for i, unit in enumerate(units):
            self.handles += [
                unit.register_forward_pre_hook(lambda m, a, i=i: self.note(i, "start")),
                unit.register_forward_hook(lambda m, a, o, i=i: self.note(i, "end"),
                                           prepend=True),
                unit.register_full_backward_pre_hook(
                    lambda m, g, i=i: self.note(i, "backward"), prepend=True),
                unit.register_full_backward_pre_hook(
                    lambda m, g, i=i: self.note(i, "gathered"))]

    def note(self, unit, what):
        if self.comm is not None and what != "gathered":
            self.marks.append((unit, what, len(self.comm.calls)))
        if self.mem is not None:
            with warnings.catch_warnings():   # reading .grad of a non-leaf a wrapper swapped in
                warnings.simplefilter("ignore")
                self.samples.append((unit, what, self.mem.current))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _flat_state(state, widths) -> torch.Tensor:
    """A ``full_state_dict()`` as one vector in ``model.parameters()`` order; a ``ValueError``
    that says what is wrong with it."""
    if not isinstance(state, dict):
        raise ValueError(f"full_state_dict() returned {type(state).__name__}, not a dict of "
                         "name -> tensor")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    model = make(widths, torch.float32)
    pieces = []
    for key, p in model.named_parameters():
        value = state.get(key)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"full_state_dict() has no tensor for {key!r} (keys: "
                             f"{', '.join(list(state)[:4])}...): name each parameter as "
                             "module.named_parameters() does")
        if value.numel() != p.numel():
            raise ValueError(f"full_state_dict()[{key!r}] has {value.numel()} elements, the "
                             f"parameter {p.numel()} (shape {tuple(p.shape)}): gather the whole "
                             "unit and cut each parameter out of it")
        pieces.append(value.detach().reshape(-1).clone())
    return torch.cat(pieces)


def _unflat(vector, widths) -> dict:
    model = make(widths, torch.float32)
    out, offset = {}, 0
    for key, p in model.named_parameters():
        out[key] = vector[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
    return out


def _train_module(cls, index, run, progress, rank, world, name, prefetch):
    model, shards = _on_device(run, rank, world)
    run.init.clear()
    run.batches.clear()
    out = {"built": [], "steps": [], "after_first": None, "final": None, "optimizers": [],
           "problem": None, "built_state": None, "optim": None}
    seen = []

    def stepped(optimizer, args, kwargs):
        if all(o is not optimizer for o in seen):
            seen.append(optimizer)

    hook = register_optimizer_step_pre_hook(stepped)
    units = list(model.children())
    watch = None
    try:
        progress.write_text(f"{index} build")
        optimizer_class = getattr(torch.optim, run.optimizer)
        case = f"{run.label}: {name}(model, torch.optim.{run.optimizer}, prefetch={prefetch})"
        with CommCounter() as comm:
            wrapper = call_learner(lambda: cls(model, optimizer_class, prefetch=prefetch,
                                               **run.options), case=case)
        out["built"] = ledger(comm)
        for method in ("step", "zero_grad", "full_state_dict"):
            if not callable(getattr(wrapper, method, None)):
                out["problem"] = f"no {method}"
                return out
        optim = getattr(wrapper, "optim", None)
        if isinstance(optim, torch.optim.Optimizer):
            out["optim"] = [p.numel() for g in optim.param_groups for p in g["params"]]
        progress.write_text(f"{index} full_state_dict")
        state = call_learner(wrapper.full_state_dict, case=f"{case}.full_state_dict()")
        try:
            out["built_state"] = _flat_state(state, run.widths)
        except ValueError as error:
            out["problem"] = str(error)
            return out
        watch = _Watch(units)
        for step in range(len(shards)):
            out["steps"].append(_module_step(model, wrapper, shards, step, run, progress, index,
                                             seen, watch))
            if step == 0:
                progress.write_text(f"{index} full_state_dict")
                out["after_first"] = _flat_state(call_learner(wrapper.full_state_dict,
                                                              case=case), run.widths)
        progress.write_text(f"{index} full_state_dict")
        final = _flat_state(call_learner(wrapper.full_state_dict, case=case), run.widths)
        progress.write_text(f"{index} done")
        out["final"] = _unflat(final, run.widths)
        out["optimizers"] = [(type(o).__name__, [p.numel() for g in o.param_groups
                                                 for p in g["params"]]) for o in seen]
        return out
    finally:
        hook.remove()
        if watch is not None:
            watch.remove()


def _all_grads(model, wrapper) -> int:
    """.grad bytes of the model's parameters and of the optimizer's (the shards)."""
    params = {id(p): p for p in model.parameters()}
    optim = getattr(wrapper, "optim", None)
    if isinstance(optim, torch.optim.Optimizer):
        params.update((id(p), p) for g in optim.param_groups for p in g["params"])
    return sum(p.grad.numel() * p.grad.element_size() for p in params.values()
               if p.grad is not None)


def _module_step(model, wrapper, shards, step, run, progress, index, seen, watch):
    case = f"{run.label}, step {step}"
    measured = step == len(shards) - 1
    record = {"memory": None, "counted": not measured, "forward": [], "backward": [],
              "step": []}
    x, y = shards[step]
    shards[step] = None
    optimizers = list(seen) + ([wrapper.optim] if isinstance(getattr(wrapper, "optim", None),
                                                              torch.optim.Optimizer) else [])
    tracer = (MemoryTracer([wrapper, model], optimizers, timeline=False,
                           device=_traced_device()) if measured else None)
    if tracer is not None:
        tracer.__enter__()
        watch.mem, watch.samples = tracer, []
    try:
        progress.write_text(f"{index} step {step}: forward")
        with _ledger_unless(measured) as comm:
            watch.comm = comm if not measured else None
            watch.marks = []
            loss = model.loss(call_learner(wrapper, x, case=case), y)
            record["forward_marks"] = list(watch.marks)
        del x, y
        record["forward"] = ledger(comm)
        progress.write_text(f"{index} step {step}: backward")
        with _ledger_unless(measured) as comm:
            watch.comm = comm if not measured else None
            watch.marks = []
            call_learner(loss.backward, case=case)
            record["backward_marks"] = list(watch.marks)
        del loss
        record["backward"] = ledger(comm)
        watch.comm = None
    finally:
        if tracer is not None:
            watch.mem = None
            tracer.__exit__(None, None, None)
    record["grads_after_backward"] = _grad_bytes(model)
    if measured:
        record["memory"] = {"samples": [(u, what, dict(by)) for u, what, by in watch.samples]}
    progress.write_text(f"{index} step {step}: in step()")
    with _ledger_unless(measured) as comm:
        if measured:
            with MemoryTracer([wrapper, model], optimizers, timeline=False,
                              device=_traced_device()) as mem:
                call_learner(wrapper.step, case=case)
                call_learner(lambda: wrapper.zero_grad(set_to_none=True), case=case)
            record["memory"]["rest"] = mem.current
        else:
            call_learner(wrapper.step, case=case)
            call_learner(lambda: wrapper.zero_grad(set_to_none=True), case=case)
    record["step"] = ledger(comm)
    record["grads_left"] = _all_grads(model, wrapper)
    return record


_HIDDEN = {}


def plain_hidden(units, dtype, batch=LOCAL_BATCH) -> int:
    """What an unsharded ``Units`` model holds besides its parameters and gradients (activations
    and autograd's temporaries: bytes of activations + other + comm) at the moments the harness
    samples a sharded one (``_Watch``), at most; measured once per model in this process, by the
    same tracer."""
    key = (tuple(units), dtype, batch)
    if key not in _HIDDEN:
        model = make(units, dtype)
        x, y = model.batch(batch, torch.Generator().manual_seed(0), dtype)
        watch = _Watch(list(model.children()))
        with MemoryTracer(model, timeline=False) as mem:
            watch.mem = mem
            loss = model.loss(model(x), y)
            del x, y
            loss.backward()
            del loss
        watch.remove()
        _HIDDEN[key] = max(by["activations"] + by["other"] + by["comm"]
                           for _, _, by in watch.samples)
    return _HIDDEN[key]


# --- reading the ledger, in the notebook ----------------------------------------------------------

class Traffic(NamedTuple):
    """One rank's calls in one or more phases, sorted by what they are."""
    reduce_scatter: list   # payload bytes of each of torch's reduce-scatters, in order
    all_gather: list       # the same for all-gathers
    all_reduce: list
    others: list           # any other collective's name (broadcast, reduce, ...), in order
    sends: list            # (bytes, peer) of each send, in order
    recvs: list            # (bytes, peer) of each receive


def traffic(*ledgers) -> Traffic:
    out = Traffic([], [], [], [], [], [])
    for calls in ledgers:
        for op, payload, _, peer in calls:
            if op in ("reduce_scatter", "all_gather", "all_reduce"):
                getattr(out, op).append(payload)
            elif op in ("send", "recv"):
                (out.sends if op == "send" else out.recvs).append((payload, peer))
            elif op != "barrier":
                out.others.append(op)
    return out


def ring_passes(sends, n) -> list:
    """A learner's ring, read as collectives: each N-1 sends in a row are one ring reduce-scatter
    or all-gather (notebook 01's ``ring_reduce_scatter``/``ring_all_gather``), of a buffer of
    N/(N-1) times their bytes. None when the count is not a multiple of N-1."""
    if len(sends) % (n - 1):
        return None
    sizes = [b for b, _ in sends]
    return [sum(sizes[i:i + n - 1]) * n // (n - 1) for i in range(0, len(sizes), n - 1)]


def counted(result) -> list:
    """(step, ledgers) of the steps a ``CommCounter`` watched (all but the measured one)."""
    return [(step, ledgers) for step, ledgers in enumerate(result["steps"]) if ledgers["counted"]]


def measured(result) -> dict:
    """The memory figures of the last step."""
    return result["steps"][-1]["memory"]


def ring_problem(results, n, phases=("backward", "step")) -> Optional[str]:
    """A hint when some rank's sends and receives do not follow notebook 01's ring, or None."""
    for rank, result in enumerate(results):
        for step, ledgers in counted(result):
            t = traffic(*(ledgers[p] for p in phases))
            right, left = (rank + 1) % n, (rank - 1) % n
            wrong = sorted({p for _, p in t.sends if p != right})
            if wrong:
                return (f"in step {step} on {n} ranks, rank {rank} sent to rank {wrong[0]}: with "
                        f"your ring of notebook 01, rank r sends only to (r + 1) % N (here rank "
                        f"{right}) and receives only from (r - 1) % N")
            wrong = sorted({p for _, p in t.recvs if p != left})
            if wrong:
                return (f"in step {step} on {n} ranks, rank {rank} received from rank "
                        f"{wrong[0]}: with your ring of notebook 01, rank r receives only from "
                        f"(r - 1) % N (here rank {left}) and sends only to (r + 1) % N")
            if len(t.sends) != len(t.recvs):
                return (f"in step {step} on {n} ranks, rank {rank} made {len(t.sends)} sends and "
                        f"{len(t.recvs)} receives: in a ring each step is one send and one "
                        "receive")
            if t.sends and ring_passes(t.sends, n) is None:
                return (f"in step {step} on {n} ranks, rank {rank} made {len(t.sends)} sends: a "
                        f"ring reduce-scatter or all-gather takes N-1 = {n - 1} sends, so a "
                        f"step's sends come in multiples of {n - 1}")
    return None


def loop_hint(results, name) -> Optional[str]:
    """A hint when the training loop could not run the class (a missing method, a
    ``full_state_dict()`` of the wrong form) or when ``zero_grad(set_to_none=True)`` left a
    .grad behind, or None: what every sharded grader checks first."""
    problem = next((r["problem"] for r in results if r["problem"]), None)
    if problem and problem.startswith("no "):
        method = problem.split()[-1]
        return (f"{name} has no method {method}(): the training loop calls step() after "
                "loss.backward() and zero_grad(set_to_none=True) after step()"
                + (", and the grader reads the parameters through full_state_dict()"
                   if method == "full_state_dict" else ""))
    if problem:
        return problem
    for rank, result in enumerate(results):
        for step, ledgers in enumerate(result["steps"]):
            if ledgers["grads_left"]:
                return (f"in step {step} on rank {rank}, the model still had gradients after "
                        "zero_grad(set_to_none=True): clear every parameter's .grad there "
                        "(p.grad = None), or the next backward adds to them")
    return None


# --- values ---------------------------------------------------------------------------------------

def _chunks(vector, n, s):
    """The N shards of a flat vector padded with zeros to N·s elements."""
    full = torch.cat([vector, vector.new_zeros(n * s - vector.numel())])
    return list(full.split(s))


def _shard_swap(run, got, n) -> Optional[str]:
    """After step 0, a shard that holds shard a's parameters stepped with shard b's gradient
    (a or b not its own), on ZeRO-1's contiguous layout; the hint, or None."""
    num = numel(run.widths)
    s = math.ceil(num / n)
    params = _chunks(flat(run.init, run.widths), n, s)
    grads = _chunks(first_gradient(run), n, s)
    here = _chunks(got, n, s)
    for j in range(n):
        real = max(0, min(s, num - j * s))
        if real == 0:
            continue

        def matches(a, b):
            return close(here[j][:real], one_step(run, params[a], grads[b])[:real], run.dtype)
        if matches(j, j):
            continue
        found = next(((a, b) for a in range(n) for b in range(n) if matches(a, b)), None)
        if found is None:
            return None
        a, b = found
        where = f"after the first step, shard {j} (elements {j * s} to {j * s + real - 1})"
        if a == j:
            return (f"{where} held its own parameters stepped with shard {b}'s gradient: rank r "
                    "must step shard r with shard r of the summed gradients, which is what the "
                    "reduce-scatter leaves on rank r (its output is rank r's slice of the input)")
        if b == j:
            return (f"{where} held shard {a}'s parameters stepped with its own gradient: rank r's "
                    f"optimizer must own the parameters of shard r, elements r·{s} to "
                    f"(r+1)·{s} - 1 of the padded flat vector")
        if a == b:
            return (f"{where} held shard {a}'s updated parameters: the all-gather puts rank r's "
                    "input at position r of its output, so rank r must own and step shard r")
        return (f"{where} held shard {a}'s parameters stepped with shard {b}'s gradient: rank r "
                "owns shard r of the flat vector, gets shard r of the summed gradients from the "
                "reduce-scatter, and the all-gather puts it back at position r")
    return None


def values_hint(run, results, n, contiguous=True) -> tuple:
    """(hint or None, largest difference from one process) for the trained parameters.
    ``contiguous``: the shards are ZeRO-1's (rank r owns elements r·s to (r+1)·s - 1 of the
    padded flat vector), so a swapped shard can be named."""
    want = reference(run)
    finals = [r["final"] for r in results]
    if all(not differing(f, want, run.dtype) for f in finals):
        return None, max(max_difference(f, want) for f in finals)
    num, steps = numel(run.widths), len(run.batches)
    init = flat(run.init, run.widths)
    after_one = flat(reference(run, steps=1), run.widths)
    moved = after_one != init
    firsts = [r["after_first"] for r in results]
    stale = [(f == init) & moved for f in firsts]
    # the last num % N elements never change on any rank, the rest is right: no padding
    tail = num % n
    if tail and all(bool(x[num - tail:].all()) for x in stale) and \
            all(close(f[:num - tail], after_one[:num - tail], run.dtype) for f in firsts):
        return (f"the last {tail} of the {num} parameters never changed: {num} elements do not "
                f"split into {n} equal shards, and cutting shards of {num} // {n} = {num // n} "
                f"drops them. Pad the flat vector with zeros to a multiple of N "
                f"({padded(num, n)} here) so that every element belongs to a shard of "
                f"ceil({num} / {n}) = {math.ceil(num / n)}"), None
    for rank, x in enumerate(stale):
        if bool(x.any()):
            s = math.ceil(num / n)
            own = torch.zeros(num, dtype=torch.bool)
            own[rank * s:(rank + 1) * s] = True
            outside = " outside its own shard" if contiguous and not bool((x & own).any()) else ""
            return (f"after the first step, {int(x.sum())} of rank {rank}'s parameters"
                    f"{outside} were still the initial ones: each rank updates only its shard, "
                    "so the other ranks' updated shards must come back through the all-gather, "
                    "and its output must be written into the model's parameters (copy each "
                    "parameter's slice of the gathered flat vector into it, under "
                    "torch.no_grad())"), None
    for rank in range(1, n):
        apart = differing(finals[rank], finals[0], run.dtype)
        if apart:
            return (f"after {steps} steps rank {rank}'s {_names(apart)} differed from rank 0's: "
                    "after step() every rank must hold the same parameters, the all-gather of "
                    "every rank's updated shard"), None
    if not differing(finals[0], reference(run, grad_scale=n), run.dtype):
        return (f"the parameters moved as if the gradients were {n} times too large: the "
                "reduce-scatter SUMS the ranks' gradients; divide your gradient shard by the "
                "world size to get the mean over all ranks"), None
    if not differing(finals[0], reference(run, grad_scale=1 / n), run.dtype):
        return (f"the parameters moved as if the gradients were {n} times too small: divide "
                "the reduce-scattered sum by N once (each rank's loss is already the mean over "
                "its own batch)"), None
    if contiguous:
        hint = _shard_swap(run, firsts[0], n)
        if hint:
            return hint, None
    first_right = close(firsts[0], after_one, run.dtype)
    wrong = differing(finals[0], want, run.dtype)
    if first_right:
        return (f"the first step was right, but after {steps} steps {_names(wrong)} differ from "
                "one process: something carries over between steps (a gradient buffer that is "
                "added to and never cleared, an optimizer rebuilt every step, a shard copied from "
                "stale parameters)"), None
    return (f"after {steps} steps {_names(wrong)} differ from one process trained on the whole "
            "batch (already after the first step): step() must reduce-scatter the gradients, "
            "divide by N, step this rank's shard, and all-gather the shards back into the "
            "parameters"), None


def _names(names) -> str:
    names = list(names)
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


# --- optimizer state ------------------------------------------------------------------------------

def optimizer_bytes(results) -> list:
    """Per rank: the optimizer state at rest after the measured step."""
    return [measured(result)["rest"]["optimizer"] for result in results]


def _stepped(result) -> str:
    return " and ".join(f"{name} over {len(sizes)} tensor{'s' * (len(sizes) != 1)} "
                        f"({sum(sizes)} elements)" for name, sizes in result["optimizers"])


def optimizer_hint(run, results, n, buckets=0) -> Optional[str]:
    """A hint when a rank's optimizer state is not 1/N of the unsharded state, or None.

    Between the state of floor(num / N) elements and that of ceil(num / N) elements, the same on
    every rank. With ZeRO-2's ``buckets`` (one per reduce-scatter), each bucket's padding may add
    one element per rank, and each bucket may be a shard tensor of its own, with its own scalar
    state (Adam's step): the notebook's solution keeps one per bucket."""
    num = numel(run.widths)
    got = optimizer_bytes(results)
    low = state_bytes(run.optimizer, run.options, num // n, run.dtype)
    high = (state_bytes(run.optimizer, run.options, math.ceil(num / n) + buckets, run.dtype)
            + buckets * state_bytes(run.optimizer, run.options, 0, run.dtype))
    full = sum(state_bytes(run.optimizer, run.options, k, run.dtype)
               for k in tensor_sizes(run.widths))
    for rank, b in enumerate(got):
        if b > high:
            return (f"rank {rank} kept {b:,} bytes of optimizer state; one shard's is "
                    f"{high:,} and a whole model's {full:,}. Counted: every torch optimizer that "
                    f"stepped on the rank ({_stepped(results[rank])}). Each rank must keep state "
                    "for its own shard only: build ONE optimizer, over the shard, "
                    "optimizer_class([shard], **kwargs), and no optimizer over "
                    "model.parameters()")
    for rank, b in enumerate(got):
        if b < low:
            return (f"rank {rank} kept {b:,} bytes of optimizer state, less than one shard's "
                    f"({low:,}): step the shard with self.optim = optimizer_class([shard], "
                    "**kwargs), a torch optimizer, so that its state is the optimizer's")
    if len(set(got)) > 1:
        per = ", ".join(f"{b:,}" for b in got)
        return (f"the ranks kept different amounts of optimizer state ({per} bytes): an uneven "
                f"partition. Pad the flat vector with zeros to a multiple of N "
                f"({padded(num, n)} here) and give every rank the same "
                f"ceil({num} / {n}) = {math.ceil(num / n)} elements, so that the memory and the "
                "work are shared equally (and the tensor collectives get equal pieces)")
    return None


# --- crashes and hangs ----------------------------------------------------------------------------

_SIZES = re.compile(r"outputShape\[0\] \* worldSize == inputShape\[0\] \((\d+) vs\. (\d+)\)")


def crash_advice(crash) -> Optional[str]:
    message = crash.message or ""
    sizes = _SIZES.search(message)
    if sizes:
        want, got = int(sizes[1]), int(sizes[2])
        return (f"The reduce-scatter's input had {got} elements but N x its output is {want}: "
                "the input must be exactly N shards. Pad the flat gradient vector with zeros to "
                "a multiple of N, ceil(numel / N) * N, and make every shard ceil(numel / N)")
    if "allgather: invalid tensor size" in message:
        return ("The all-gather got pieces of different sizes: every rank's shard must have the "
                "same number of elements (pad the flat vector to a multiple of N), and the "
                "output must be N times a shard")
    if "a leaf Variable that requires grad" in message:
        return ("Writing into a parameter (copy_, +=) is an in-place change autograd refuses on "
                "a leaf that requires grad: do it inside `with torch.no_grad():`")
    if "can't optimize a non-leaf Tensor" in message:
        return ("The optimizer needs a leaf tensor: wrap the shard in torch.nn.Parameter (of a "
                "clone, or of a slice of a flat buffer that does not require grad)")
    if "NoneType" in message:
        return ("A .grad was None: every parameter of these models gets a gradient in every "
                "backward, so a None means your code freed it (or read it) too early")
    if "expected scalar type" in message or "dtype" in message.lower():
        return ("A dtype mismatch: make the flat buffers and the shard in the parameters' dtype "
                "(torch.zeros(k) is float32 whatever the model is; pass dtype=p.dtype)")
    return None


def hang_advice(waits, n) -> str:
    if waits and {w.op for w in waits} <= {"send", "recv", "wait"}:
        from labkit.check import _ring
        return _ring.hang_advice(waits, n)
    return ("every rank must make the same collectives in the same order and with the same "
            "sizes: a reduce-scatter or all-gather that one rank skips (or calls once more) "
            "waits forever for it")


def train_everywhere(ranks, worker, n, cls, runs, name, *extra):
    """Every run on n ranks in one launch of ``worker`` (``train_on_rank`` or
    ``train_module_on_rank``); per run, the list of the ranks' results. A crash or a hang
    becomes one ``Failed``, placed in its run and phase (``stuck``)."""
    with tempfile.TemporaryDirectory(prefix="labkit-check-") as folder:
        try:
            per_rank = ranks.run(worker, n, cls, runs, folder, name, *extra)
        except Failed as failure:
            raise stuck(failure, folder, n, runs, name) from None
    return [[per_rank[r][i] for r in range(n)] for i in range(len(runs))]


def stuck(failure, folder, n, runs, name):
    """A crash or hang, placed in a run and a phase by the ranks' progress files."""
    places = where(folder, n)
    crash = failure.crash
    raised = crash is not None and bool(crash.case) and crash.type not in ("NativeError",
                                                                          "RankDied")
    if raised or not places:
        return Failed(f"on {n} ranks, {failure.hint}", details=failure.details)
    index, phase = places[min(places)]
    if phase == "build":
        return Failed(f"on {n} ranks, {failure.hint}; it happened in {name}(...) with "
                      f"{runs[index].label}: every rank must make the same calls at "
                      "construction (a broadcast, if you make one, on every rank)",
                      details=failure.details)
    label = runs[index].label if index < len(runs) else "a run"
    return Failed(f"on {n} ranks, {failure.hint} (with {label}, {phase})",
                  details=failure.details)


# --- gradient memory (ZeRO-2) ---------------------------------------------------------------------

_TEMPORARIES = {}


def autograd_temporaries(widths, dtype, batch=LOCAL_BATCH) -> int:
    """Bytes that backward itself holds at its peak besides kept gradients: measured with the
    same tracer on a backward of the same model and batch size whose hooks drop every .grad as
    soon as it is accumulated. That is autograd's temporaries (gradients of activations, of
    matrix products) plus the gradients a layer has computed but not yet handed to their hooks;
    it depends only on the model, the dtype and the batch (computed once, in this process)."""
    key = (tuple(widths), dtype, batch)
    if key not in _TEMPORARIES:
        model = make(widths, dtype)
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        x, y = model.batch(batch, torch.Generator().manual_seed(0), dtype)
        loss = model.loss(model(x), y)
        del x, y
        with MemoryTracer(model) as mem:
            loss.backward()
        _TEMPORARIES[key] = _backward_peak(mem.timeline)[0]
    return _TEMPORARIES[key]
