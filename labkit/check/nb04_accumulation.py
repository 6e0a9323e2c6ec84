"""Notebook 04: gradient accumulation. Three exercises (``accumulation_step``, ``no_sync_ddp``,
``token_accumulation``) and three predictions (``sync_bytes_per_step``,
``activation_memory_ratio``, ``model_state_bytes``).

What the checks assert, on inputs drawn afresh in the notebook for every run:

* ``accumulation_step(fn)``, one process: ``fn(model, optimizer, micro_batches)`` makes one
  optimizer step from k micro-batches. Trained for three steps (k = 2 and 4, float32 and
  float64, the plain, tied and frozen models of ``labkit.models``), every parameter equals one
  process trained on the k-times larger batch (``_training.reference``, same tolerance), and each
  step ran k backward passes (counted by a post-accumulate-grad hook on every trainable
  parameter): one backward of the concatenated or summed batch holds every micro-batch's
  activations at once, which is what accumulation avoids. A wrong result is compared with
  simulations of the usual mistakes (no 1/k, zero_grad inside the loop, no zero_grad between
  steps, a step per micro-batch) and the hint names the one it matches.
* ``no_sync_ddp(cls)``: ``cls(module)`` is the learner's subclass of the notebook's
  ``OverlappedDDP`` with a ``no_sync()`` context manager. Trained on 2 ranks (float32, micro-
  batches of 2) and 4 (float64, micro-batches of 1), k = 3, five models, three steps, the first
  k-1 micro-batches' forward and backward inside ``no_sync()`` (torch's recipe, ground truth
  §5.1.6): no collective inside ``no_sync()``; in the last micro-batch one async all-reduce per
  trainable parameter with exactly the gradient bytes, at least one launched during its backward
  (an all-reduce of everything only in ``finish_gradient_sync`` means the hooks skipped the last
  micro-batch too); every parameter and buffer equal to one process on the whole global batch.
* ``token_accumulation(fn)``: ``fn(ddp, micro_batches)`` runs forward and backward on this rank's
  k micro-batches of tokens, of different lengths on every rank and micro-batch, through the
  check's own correct wrapper, so that after ``finish_gradient_sync()`` the gradient is that of
  the mean token loss over ALL tokens (every micro-batch, every rank). On 2 ranks and 3 (float64,
  the tied language model, three steps), the parameters equal one process on all the tokens; the
  ledger shows no gradient all-reduce before the last micro-batch and exactly one small
  all-reduce (the token count) per step. Tolerance ``TOKEN_TOL`` (1e-6: a token count in float32
  is fine); the draws are redrawn until the mean of per-micro-batch means is off by at least 1000
  times that, and wrong values are matched against the
  usual mistakes (mean of means, this rank's count only, no factor N for the wrapper's average).

Predictions (no ranks) compare with ``labkit.theory`` and name the usual mistake.
"""
import contextlib
import math
import secrets
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from labkit import models, theory
from labkit.check import _sizes, _training, nb02_ddp, nb03_buckets
from labkit.check._core import Failed, Ranks, call_here, call_learner, exercise
from labkit.check._hints import register
from labkit.check.predictions import _compare
from labkit.comm import CommCounter
from labkit.placement import device, to_device

SYNC = "finish_gradient_sync"
K = 3
SYNC_WORLDS = ((2, torch.float32, 2), (4, torch.float64, 1))   # (N, dtype, micro-batch size)
# LABKIT_AUTOGRADE_SIZES=quick under nbgrader (_sizes.py): 3 ranks instead of 4
QUICK_SYNC_WORLDS = ((2, torch.float32, 2), (3, torch.float64, 1))
SYNC_KINDS = ("plain", "batchnorm", "frozen", "tied", "unused")
TOKEN_WORLDS = (2, 3)
WAIT_S = 10.0
INSIDE = "communicated inside no_sync"
# token_accumulation runs in float64, but a learner may count tokens in float32: N / T rounded to
# 2^-24 relative moves a parameter by about lr * |grad| * 6e-8 per step, far below TOKEN_TOL;
# every mistake the check names moves one by 1e-3 or more (the draws are redrawn until the mean of
# means is off by 1000 * TOKEN_TOL).
TOKEN_TOL = 1e-6


# --- predictions ---------------------------------------------------------------------------------

def reference_sync_bytes(grad_bytes, k, n, no_sync):
    """Bytes one rank sends for the gradient all-reduces of one optimizer step of k micro-batches
    (ring all-reduce, ``theory.wire_bytes``): one all-reduce of the gradients with no_sync, k
    without."""
    return (1 if no_sync else k) * theory.wire_bytes("all_reduce", grad_bytes, n)


register("sync_bytes_per_step", [
    "Start from one all-reduce of grad_bytes on N ranks (your ring_bytes_per_rank of notebook "
    "01). How many of them does one optimizer step make, with and without no_sync?",
    "Without no_sync every micro-batch's backward all-reduces the gradients: k all-reduces per "
    "step. With no_sync only the last one does. Each costs 2(N-1)/N * grad_bytes per rank.",
])
register("activation_memory_ratio", [
    "What do the saved activations of a forward pass scale with: the parameters, or the samples "
    "in flight?",
    "Every layer saves its input (or output) for backward: one row per sample. Only one "
    "micro-batch is in flight at a time.",
])
register("model_state_bytes", [
    "List what lives for the whole step whatever the batch: parameters, gradients, Adam's two "
    "moments. Which of them depends on how the batch is cut into micro-batches?",
    "float32: 4 bytes of parameter, 4 of gradient (one .grad, accumulated in place), 8 of Adam "
    "state (exp_avg, exp_avg_sq) per parameter. k does not appear.",
])


@exercise("sync_bytes_per_step")
def sync_bytes_per_step(fn):
    """``fn(grad_bytes, k, N, no_sync) -> bytes`` one rank sends per optimizer step."""
    cases = [(s, k, n, ns) for s in (4 * 10**6, 1000) for k in (1, 2, 4, 8) for n in (2, 3, 8)
             for ns in (True, False)]
    wire = lambda s, n: theory.wire_bytes("all_reduce", s, n)   # noqa: E731
    _compare("sync_bytes_per_step", fn, cases, reference_sync_bytes, [
        (lambda s, k, n, ns: k * wire(s, n),
         "that is k all-reduces per step even with no_sync: inside no_sync() the hooks do not "
         "communicate, so only the last micro-batch all-reduces"),
        (lambda s, k, n, ns: wire(s, n),
         "that is one all-reduce per step even without no_sync: without it, every micro-batch's "
         "backward all-reduces the gradients"),
        (lambda s, k, n, ns: (1 if ns else k - 1) * wire(s, n),
         "without no_sync every one of the k micro-batches all-reduces, the last included"),
        (lambda s, k, n, ns: (1 if ns else k) * s,
         "that counts grad_bytes per all-reduce; a ring all-reduce sends 2(N-1)/N of them per "
         "rank (notebook 01)"),
        (lambda s, k, n, ns: (1 if ns else k) * 2 * s,
         "a ring all-reduce sends 2(N-1)/N * S per rank, not 2S (notebook 01)"),
        (lambda s, k, n, ns: (1 / k if ns else 1) * wire(s, n),
         "that divides the bytes by k: one all-reduce still carries every gradient, whole"),
    ])
    return "matches the ring model: k all-reduces per step without no_sync, one with it", {}


@exercise("activation_memory_ratio")
def activation_memory_ratio(fn):
    """``fn(micro_batch, batch) -> float``: a step's peak activation memory with micro-batches of
    ``micro_batch`` samples over that of one batch of ``batch`` samples (activations per sample,
    no fixed part)."""
    cases = [(m, b) for b in (8, 32, 96) for m in (1, 2, 8) if b % m == 0]
    _compare("activation_memory_ratio", fn, cases, lambda m, b: m / b, [
        (lambda m, b: 1.0, "accumulation changes the number of samples in flight at once, and "
                           "the saved activations hold one row per sample in flight"),
        (lambda m, b: b / m, "that is upside down: the smaller micro-batch needs less"),
        (lambda m, b: 1.0 - m / b, "the micro-batch's activations are a share of the batch's, "
                                   "not what is saved"),
    ])
    return "matches: activations scale with the micro-batch, micro_batch / batch", {}


def reference_model_state(num_params, k):
    """float32 parameters + gradients + Adam's two moments: 16 bytes per parameter, any k."""
    return 16 * num_params


@exercise("model_state_bytes")
def model_state_bytes(fn):
    """``fn(num_params, k) -> bytes`` of parameters, gradients and Adam state (float32) on one
    rank of DDP with k micro-batches per step."""
    cases = [(p, k) for p in (1000, 10**6, 7 * 10**9) for k in (1, 2, 4, 16)]
    _compare("model_state_bytes", fn, cases, reference_model_state, [
        (lambda p, k: 16 * p / k,
         "that divides the model state by k: accumulation cuts the batch, not the model. Every "
         "rank still holds all parameters, one full .grad and all of Adam's state (ZeRO saves "
         "model-state memory by partitioning it across ranks, not by accumulating)"),
        (lambda p, k: (4 + 4 * k + 8) * p,
         "that keeps a gradient per micro-batch: backward adds into the one .grad in place"),
        (lambda p, k: 12 * p,
         "that leaves out one of the three (4 bytes of parameter, 4 of gradient, 8 of Adam)"),
        (lambda p, k: 8 * p, "that leaves out Adam's state: two float32 moments per parameter"),
        (lambda p, k: 4 * p, "that counts the parameters only"),
    ])
    return "matches: 16 bytes per parameter (4 + 4 + 8), whatever k", {}


# --- exercise 1: accumulation in one process -----------------------------------------------------

ACC_CASES = ((2, torch.float32, "plain"), (4, torch.float64, "tied"), (4, torch.float32, "frozen"))
MICRO = 3


def _micro(x, y, k):
    return list(zip(torch.tensor_split(x, k), torch.tensor_split(y, k)))


def simulate(run, k, scale=True, zero="step", step_each=False):
    """One process, rank 0's state, each step's batch cut into k micro-batches, with the given
    mistakes: ``scale`` False drops 1/k; ``zero`` is where zero_grad runs ("step", "micro",
    "never"); ``step_each`` steps the optimizer after every micro-batch."""
    model = models.make(run.kind, run.dtype)
    model.load_state_dict(run.init[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)
    for x, y in run.batches:
        if zero == "step":
            optimizer.zero_grad(set_to_none=True)
        for xb, yb in _micro(x, y, k):
            if zero == "micro":
                optimizer.zero_grad(set_to_none=True)
            loss = model.loss(model(xb), yb)
            (loss / k if scale else loss).backward()
            if step_each:
                optimizer.step()
        if not step_each:
            optimizer.step()
    return _training.snapshot(model)


_ACC_MISTAKES = [
    (dict(scale=False),
     "the parameters moved k times too far: each micro-batch's mean loss must be divided by k, "
     "so that the k backward passes add up to the mean over the whole batch"),
    (dict(zero="micro"),
     "only the last micro-batch's gradient survived: zero_grad() ran inside the loop. Zero the "
     "gradients once per optimizer step; backward ADDS into .grad, which is what accumulates"),
    (dict(zero="micro", scale=False),
     "only the last micro-batch's gradient survived (zero_grad() inside the loop), and unscaled"),
    (dict(zero="never"),
     "the first step was right, the later ones not: the gradients of earlier optimizer steps "
     "were still in .grad. Call optimizer.zero_grad() once per optimizer step, before its first "
     "micro-batch (or after optimizer.step())"),
    (dict(zero="never", scale=False),
     "no 1/k scaling, and no zero_grad() between optimizer steps"),
    (dict(step_each=True),
     "the optimizer stepped after every micro-batch: accumulate the k gradients, then step ONCE"),
    (dict(step_each=True, zero="micro"),
     "that is k small steps: zero_grad() and step() belong outside the micro-batch loop"),
]


def _accumulate_here(fn, run, k):
    """Train with the learner's step; (final snapshot, backward passes per step)."""
    model = models.make(run.kind, run.dtype)
    model.load_state_dict(run.init[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)
    fired = {}
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(
                lambda p: fired.__setitem__(id(p), fired.get(id(p), 0) + 1))
    backwards = []
    for step, (x, y) in enumerate(run.batches):
        fired.clear()
        call_here(fn, model, optimizer, _micro(x.clone(), y.clone(), k),
                  who=f"with {run.label}, k={k}, step {step}: accumulation_step")
        backwards.append(max(fired.values(), default=0))
    return _training.snapshot(model), backwards


register("accumulation_step", [
    "backward() adds into .grad; it never replaces it. So running backward on k micro-batches "
    "in a row leaves the SUM of their gradients. What must each loss be multiplied by so that "
    "the sum is the gradient of the big batch's mean loss?",
    "optimizer.zero_grad(); then for each (x, y): loss = model.loss(model(x), y) / k; "
    "loss.backward(); and after the loop one optimizer.step().",
])


@exercise("accumulation_step")
def accumulation_step(fn):
    """``fn(model, optimizer, micro_batches)``: one optimizer step from k micro-batches (see the
    module docstring)."""
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    worst = 0.0
    for k, dtype, kind in ACC_CASES:
        run = _training.fresh_run(kind, 1, dtype, generator, local_batch=k * MICRO)
        got, backwards = _accumulate_here(fn, run, k)
        want = _training.reference(run)
        at = f"with {run.label} ({str(dtype).split('.')[-1]}), k={k}"
        wrong = _training.differing(got, want, dtype)
        if wrong:
            if not _training.differing(got, _snapshot_init(run), dtype):
                raise Failed(f"{at}: the parameters never changed: call optimizer.step() once "
                             "the k gradients are accumulated")
            for options, meaning in _ACC_MISTAKES:
                if not _training.differing(got, simulate(run, k, **options), dtype):
                    raise Failed(f"{at}: {meaning}")
            raise Failed(f"{at}: after {len(run.batches)} steps {nb02_ddp._names(wrong)} differ "
                         "from one process trained on the whole batch; each step must be "
                         "zero_grad, k x (forward, loss / k, backward), one optimizer step")
        if any(b != k for b in backwards):
            b = next(b for b in backwards if b != k)
            raise Failed(f"{at}: the values are right, but a step ran {b} backward pass(es), not "
                         f"one per micro-batch ({k}). One backward over all micro-batches keeps "
                         "every micro-batch's activations alive at once: that is the big batch, "
                         "and its memory. Run forward and backward on each micro-batch in turn")
        worst = max(worst, _training.max_difference(got, want))
    return (f"equal to one process on the whole batch (k = 2, 4; float32, float64; largest "
            f"difference {worst:.1e}), one backward per micro-batch"), {
        "largest difference from the big batch": worst}


def _snapshot_init(run):
    model = models.make(run.kind, run.dtype)
    model.load_state_dict(run.init[0])
    return _training.snapshot(model)


# --- exercise 2: no_sync -------------------------------------------------------------------------

def _ledger(comm):
    return [(c.op, c.payload_bytes, c.async_op) for c in comm.calls]


def _train_sync(cls, runs, k, folder):
    """In each rank: train ``cls`` on each run, the first k-1 micro-batches of every step inside
    ``no_sync()``. One dict per run: after_build, final, built, steps (per step: ``inside``, the
    ledger of the no_sync micro-batches; ``forward``, ``backward``, ``sync`` of the last one;
    ``frozen_grads``), problem."""
    rank, world = dist.get_rank(), dist.get_world_size()
    progress = Path(folder) / f"rank{rank}"
    out = []
    for run in runs:
        out.append(_train_one(cls, run, k, progress, rank, world))
        if out[-1]["problem"] == INSIDE:   # the unused model would then deadlock: stop here
            break
    return out


def _train_one(cls, run, k, progress, rank, world):
    # built and drawn on the CPU (the notebook's reference is), trained on this rank's device
    model = models.make(run.kind, run.dtype)
    model.load_state_dict(run.init[rank])
    model.to(device())
    shards = [(_training.shard(x, rank, world).to(device()),
               _training.shard(y, rank, world).to(device())) for x, y in run.batches]
    run.init.clear()
    run.batches.clear()
    out = {"after_build": None, "final": None, "built": [], "steps": [], "problem": None}
    progress.write_text(f"{run.kind} build")
    with CommCounter() as comm:
        ddp = call_learner(cls, model, case=f"{run.label}: AccumulatingDDP(model)")
    out["built"], out["after_build"] = _ledger(comm), _training.snapshot(model)
    if getattr(ddp, "module", None) is not model:
        out["problem"] = "module"
        return out
    for method in ("no_sync", SYNC):
        if not callable(getattr(ddp, method, None)):
            out["problem"] = method
            return out
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)
    for step, (x, y) in enumerate(shards):
        case = f"{run.label}, step {step}"
        progress.write_text(f"{run.kind} step {step}")
        optimizer.zero_grad(set_to_none=True)
        ledgers = {}
        micro = _micro(x, y, k)
        with CommCounter() as comm:
            for xb, yb in micro[:-1]:
                context = call_learner(ddp.no_sync, case=case)
                if not (hasattr(context, "__enter__") and hasattr(context, "__exit__")):
                    out["problem"] = f"no_sync returned {type(context).__name__}"
                    return out
                call_learner(context.__enter__, case=case)
                loss = model.loss(call_learner(ddp, xb, case=case), yb) / k
                call_learner(loss.backward, case=case)
                call_learner(context.__exit__, None, None, None, case=case)
        ledgers["inside"] = _ledger(comm)
        xb, yb = micro[-1]
        with CommCounter() as comm:
            output = call_learner(ddp, xb, case=case)
        ledgers["forward"] = _ledger(comm)
        with CommCounter() as comm:
            call_learner((model.loss(output, yb) / k).backward, case=case)
        ledgers["backward"] = _ledger(comm)
        with CommCounter() as comm:
            call_learner(getattr(ddp, SYNC), case=case)
        ledgers["sync"] = _ledger(comm)
        ledgers["frozen_grads"] = [n for n, p in model.named_parameters()
                                   if not p.requires_grad and p.grad is not None]
        optimizer.step()
        out["steps"].append(ledgers)
        if any(op != "barrier" for op, _, _ in ledgers["inside"]):
            out["problem"] = INSIDE
            return out
    progress.write_text(f"{run.kind} done")
    out["final"] = _training.snapshot(model)
    return out


def _sync_hint(run, results, lay, k):
    """A hint about where the all-reduces ran, or None."""
    trainable = len(lay.trainable)
    for rank, result in enumerate(results):
        for step, ledgers in enumerate(result["steps"]):
            at = f"in step {step} on rank {rank}"
            inside = [c for c in ledgers["inside"] if c[0] != "barrier"]
            if inside:
                return (f"{at}, {len(inside)} collectives ran inside no_sync() (the first {k - 1} "
                        f"micro-batches): no_sync() still communicates. While the context is "
                        "active the hooks must not launch any all-reduce; backward just adds "
                        "each micro-batch's gradient into .grad")
            last = [c for c in ledgers["backward"] + ledgers["sync"] if c[0] == "all_reduce"]
            if not last:
                return (f"{at}, nothing was all-reduced in the last micro-batch either: the "
                        "ranks stepped with their own gradients. After the with block the hooks "
                        "must communicate again: restore the flag when the context exits")
            in_backward = [c for c in ledgers["backward"] if c[0] == "all_reduce"]
            if not in_backward and run.kind != "unused" and trainable:
                return (f"{at}, no all-reduce started during the last micro-batch's backward: "
                        "the hooks still skipped communication after no_sync() had exited, and "
                        f"{SYNC}() all-reduced everything after backward, with nothing "
                        "overlapped. Restore the flag as the context exits (in a finally:), so "
                        "that the first backward outside it communicates")
    return None


def _sync_diagnose(run, results, n, k):
    lay = _training.layout(models.make(run.kind, run.dtype))
    name = "AccumulatingDDP"
    problem = next((r["problem"] for r in results if r["problem"]), None)
    if problem == "module":
        return f"{name}(model) must keep the model as self.module: call super().__init__(module)", \
            None
    if problem == "no_sync":
        return (f"{name} has no method no_sync(): the training loop runs the first k-1 "
                "micro-batches inside `with ddp.no_sync():`"), None
    if problem == INSIDE:
        return _sync_hint(run, results, lay, k), None
    if problem == SYNC:
        return f"{name} has no method {SYNC}(): keep OverlappedDDP's", None
    if problem:
        return (f"{problem}, not a context manager: decorate no_sync with "
                "@contextlib.contextmanager and yield inside it"), None
    hint = nb02_ddp._built(run, results, n, lay)
    if hint:
        return nb03_buckets._rename(hint, name) + " (did your __init__ call super().__init__?)", \
            None
    hint = _sync_hint(run, results, lay, k)
    if hint:
        return hint, None
    hint = nb03_buckets._ledger(run, results, lay, name, None, None)
    if hint:
        return hint.replace("in step", "in the last micro-batch of step"), None
    hint, diff = nb02_ddp._values(run, results, n, lay)
    return (nb03_buckets._rename(hint, name) if hint else None), diff


register("no_sync_ddp", [
    "torch's DDP keeps a flag, require_backward_grad_sync; no_sync() sets it to False for the "
    "duration of the with block, and the hooks look at it. What must your _hook do when the flag "
    "says not to synchronise? And what is in p.grad when the hook fires on the last micro-batch?",
    "A class attribute require_sync = True. _hook(self, p): if self.require_sync, do what "
    "OverlappedDDP._hook does (super()._hook(p)); otherwise nothing. no_sync: a "
    "@contextlib.contextmanager that saves the flag, sets it False, yields inside try:, and "
    "restores it in finally:.",
])


@exercise("no_sync_ddp", sizes=True)
def no_sync_ddp(cls, *, timeout: float = 20.0):
    """``cls(module)`` with ``no_sync()``: see the module docstring."""
    ranks = Ranks("no_sync_ddp", timeout=timeout, budget=3 * timeout,
                  crash_advice=nb03_buckets._crash_advice)
    figures, worst = {}, {}
    worlds = _sizes.pick(SYNC_WORLDS, QUICK_SYNC_WORLDS)
    for n, dtype, micro in worlds:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        runs = [_training.fresh_run(kind, n, dtype, generator, local_batch=K * micro)
                for kind in SYNC_KINDS]
        with tempfile.TemporaryDirectory(prefix="labkit-check-") as folder:
            try:
                per_rank = ranks.run(_train_sync, n, cls, runs, K, folder)
            except Failed as failure:
                raise Failed(nb03_buckets._rename(nb02_ddp._stuck(failure, folder, n).hint,
                                                  "AccumulatingDDP"),
                             details=failure.details) from None
        for i, run in enumerate(runs):
            results = [per_rank[r][i] for r in range(n)]
            hint, diff = _sync_diagnose(run, results, n, K)
            if hint:
                raise Failed(f"on {n} ranks ({str(dtype).split('.')[-1]}), k={K}, with "
                             f"{run.label}: {hint}")
            worst[n] = max(worst.get(n, 0.0), diff)
        first = per_rank[0][0]["steps"][0]
        figures[f"{n} ranks: all-reduces per optimizer step, plain model (k={K})"] = sum(
            op == "all_reduce" for op, _, _ in first["inside"] + first["backward"] + first["sync"])
        figures[f"{n} ranks: largest difference from one process"] = worst[n]
    (a, *_), (b, *_) = worlds
    return (f"on {a} ranks (float32) and {b} (float64), k={K}, {len(SYNC_KINDS)} models x "
            f"{_training.STEPS} steps: equal to one process on the global batch (largest "
            f"difference {worst[a]:.1e} and {worst[b]:.1e}); nothing communicated inside "
            "no_sync(), one all-reduce per parameter in the last micro-batch, launched during "
            "its backward"), figures


# --- exercise 3: tokens --------------------------------------------------------------------------

class ReferenceDDP(torch.nn.Module):
    """The check's own overlapped DDP with no_sync (the notebook's OverlappedDDP plus a correct
    no_sync), so that ``token_accumulation`` grades the loss normalisation alone."""
    require_sync = True

    def __init__(self, module):
        super().__init__()
        self.module = module
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t, src=0)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.handles, self.launched = [], set()
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _hook(self, p):
        if self.require_sync:
            self.launched.add(p)
            self.handles.append(dist.all_reduce(p.grad, async_op=True))

    @contextlib.contextmanager
    def no_sync(self):
        before, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = before

    def finish_gradient_sync(self):
        import datetime
        for p in self.params:
            if p not in self.launched:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.handles.append(dist.all_reduce(p.grad, async_op=True))
        for handle in self.handles:
            handle.wait(timeout=datetime.timedelta(seconds=WAIT_S))
        for p in self.params:
            p.grad /= dist.get_world_size()
        self.handles, self.launched = [], set()


class TokenRun(NamedTuple):
    world_size: int
    dtype: torch.dtype
    init: list      # state_dict per rank
    steps: list     # per step, per rank, per micro-batch: (tokens, targets)
    lr: float = _training.LR


def _token_run(n, generator, steps=_training.STEPS, k=K):
    dtype = torch.float64
    init = [_training._state(models.fill(models.make("tied", dtype), generator))
            for _ in range(n)]
    data = []
    for _ in range(steps):
        per_rank = []
        for _ in range(n):
            lengths = torch.randint(1, 13, (k,), generator=generator).tolist()
            lengths[int(torch.randint(k, (1,), generator=generator))] = 1   # one very short
            per_rank.append([(torch.randint(models.Tied.VOCAB, (m,), generator=generator),
                              torch.randint(models.Tied.VOCAB, (m,), generator=generator))
                             for m in lengths])
        data.append(per_rank)
    return TokenRun(n, dtype, init, data)


def token_reference(run):
    """One process on all the tokens of each step: mean cross-entropy, SGD."""
    model = models.make("tied", run.dtype)
    model.load_state_dict(run.init[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)
    for per_rank in run.steps:
        x = torch.cat([t for micro in per_rank for t, _ in micro])
        y = torch.cat([t for micro in per_rank for _, t in micro])
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return _training.snapshot(model)


def token_simulate(run, weight):
    """One process; each step's gradient is (1/N) sum over ranks r and micro-batches i of
    weight(n_ri, T_r, T, k, N) times the gradient of micro-batch ri's SUMMED token loss: what N
    ranks compute with that normalisation and a wrapper that averages."""
    model = models.make("tied", run.dtype)
    model.load_state_dict(run.init[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)
    n = run.world_size
    for per_rank in run.steps:
        optimizer.zero_grad(set_to_none=True)
        total = sum(len(t) for micro in per_rank for t, _ in micro)
        for micro in per_rank:
            local = sum(len(t) for t, _ in micro)
            for t, y in micro:
                w = weight(len(t), local, total, len(micro), n)
                (F.cross_entropy(model(t), y, reduction="sum") * w / n).backward()
        optimizer.step()
    return _training.snapshot(model)


_TOKEN_MISTAKES = [
    (lambda m, local, total, k, n: 1 / (k * m),
     "that is the mean of the per-micro-batch means (each micro-batch's mean loss / k): a token "
     "in a short micro-batch then weighs more than one in a long one. Sum the token losses and "
     "divide by the number of tokens in the whole step (Hugging Face, 'Fixing Gradient "
     "Accumulation', 2024)"),
    (lambda m, local, total, k, n: 1 / m,
     "that is each micro-batch's mean loss, not even divided by k; sum the token losses and "
     "divide by the step's total token count"),
    (lambda m, local, total, k, n: 1 / local,
     "you divided by this rank's own token count. The ranks hold different numbers of tokens, "
     "so the wrapper's average of their gradients is again a mean of means: divide by the "
     "token count of ALL ranks (one dist.all_reduce of the count)"),
    (lambda m, local, total, k, n: 1 / total,
     "every parameter moved N times too little: you divided by all the tokens of all ranks, but "
     "the wrapper then averages over the N ranks (finish_gradient_sync divides by N). Multiply "
     "by the world size (or divide by the mean token count per rank)"),
    (lambda m, local, total, k, n: 1 / (n * local),
     "you divided by this rank's token count times N; the ranks hold different numbers of "
     "tokens: all-reduce the count"),
]


def _token_rank(fn, run, k, folder):
    rank = dist.get_rank()
    # built and drawn on the CPU (the notebook's reference is), trained on this rank's device
    model = models.make("tied", run.dtype)
    model.load_state_dict(run.init[rank])
    model.to(device())
    mine = to_device([per_rank[rank] for per_rank in run.steps])
    run.init.clear()
    run.steps.clear()
    ddp = ReferenceDDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)
    steps = []
    for step, micro in enumerate(mine):
        Path(folder, f"rank{rank}").write_text(f"tied step {step}")
        optimizer.zero_grad(set_to_none=True)
        with CommCounter() as comm:
            call_learner(fn, ddp, micro, case=f"the tied language model, step {step}")
        steps.append(_ledger(comm))
        ddp.finish_gradient_sync()
        optimizer.step()
    Path(folder, f"rank{rank}").write_text("tied done")
    return {"steps": steps, "final": _training.snapshot(model)}


def _token_differing(state, ref):
    return [n for n in ref if not torch.allclose(state[n], ref[n], rtol=TOKEN_TOL,
                                                 atol=TOKEN_TOL)]


def _token_diagnose(run, results, k):
    lay = _training.layout(models.make("tied", run.dtype))
    grad_sizes = set(lay.trainable.values())
    for rank, result in enumerate(results):
        for step, calls in enumerate(result["steps"]):
            at = f"in step {step} on rank {rank}"
            reduces = [b for op, b, _ in calls if op == "all_reduce"]
            grads = [b for b in reduces if b in grad_sizes]
            if len(grads) > len(lay.trainable):
                return (f"{at}, the gradients were all-reduced {len(grads)} times "
                        f"({len(grads) // len(lay.trainable)} per parameter) for {k} "
                        "micro-batches: run all but the last micro-batch inside "
                        "`with ddp.no_sync():`, so that only the last backward communicates"), None
    want = token_reference(run)
    finals = [r["final"] for r in results]
    wrong = _token_differing(finals[0], want)
    if wrong:
        for weight, meaning in _TOKEN_MISTAKES:
            if not _token_differing(finals[0], token_simulate(run, weight)):
                return meaning, None
        return (f"after {len(run.steps)} steps {nb02_ddp._names(wrong)} differ from one "
                "process on all the tokens: each micro-batch's loss must be its SUMMED token "
                "loss times N / (all tokens of this step on all ranks)"), None
    for rank, result in enumerate(results):
        for step, calls in enumerate(result["steps"]):
            counts = [b for op, b, _ in calls if op == "all_reduce" and b not in grad_sizes]
            others = sorted({op for op, _, _ in calls if op not in ("all_reduce", "barrier")})
            if others or len(counts) > 1:
                return (f"in step {step} on rank {rank}, {len(counts)} all-reduces besides the "
                        f"gradients{' and ' + ', '.join(others) if others else ''}: add up your "
                        "micro-batches' token counts first, then ONE all-reduce gives the "
                        "step's total"), None
    return None, max(_training.max_difference(f, want) for f in finals)


register("token_accumulation", [
    "The big batch's loss is (sum of every token's loss) / (number of tokens in the big batch). "
    "Which of the two can a micro-batch compute alone? Which one needs the other micro-batches, "
    "and the other ranks?",
    "Count this rank's tokens over all its micro-batches, then one dist.all_reduce of that count "
    "gives T, the step's total. Each micro-batch's loss is its summed token loss "
    "(F.cross_entropy(..., reduction='sum')) divided by T, times the world size, because "
    "finish_gradient_sync divides by N.",
    "total = torch.tensor(float(sum(len(t) for t, _ in micro_batches)), "
    "device=labkit.device()); dist.all_reduce(total); "
    "then for each micro-batch but the last, inside `with ddp.no_sync():`, and for the last "
    "outside it: loss = F.cross_entropy(ddp(t), y, reduction='sum') * N / total; loss.backward().",
])


@exercise("token_accumulation")
def token_accumulation(fn, *, timeout: float = 15.0):
    """``fn(ddp, micro_batches)``: see the module docstring."""
    ranks = Ranks("token_accumulation", timeout=timeout, budget=3 * timeout)
    figures, worst, gap = {}, {}, math.inf
    for n in TOKEN_WORLDS:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        for _ in range(5):   # a case where the mean of means is clearly wrong
            run = _token_run(n, generator)
            off = _training.max_difference(token_simulate(run, _TOKEN_MISTAKES[0][0]),
                                           token_reference(run))
            if off > 1000 * TOKEN_TOL:
                break
        gap = min(gap, off)
        with tempfile.TemporaryDirectory(prefix="labkit-check-") as folder:
            try:
                results = ranks.run(_token_rank, n, fn, run, K, folder)
            except Failed as failure:
                raise Failed(nb02_ddp._stuck(failure, folder, n).hint,
                             details=failure.details) from None
        hint, diff = _token_diagnose(run, results, K)
        if hint:
            raise Failed(f"on {n} ranks, k={K}, micro-batches of different lengths: {hint}")
        worst[n] = diff
        figures[f"{n} ranks: largest difference from one process"] = diff
    figures["mean of means: its difference from one process"] = gap
    return (f"on {', '.join(map(str, TOKEN_WORLDS))} ranks, k={K}, micro-batches of 1 to 12 "
            f"tokens: equal to one process on all the tokens (largest difference "
            f"{max(worst.values()):.1e}; the mean of means is off by {gap:.1e}); one all-reduce "
            "of the token count per step, gradients all-reduced in the last micro-batch only"), \
        figures
