"""Notebook 03: overlapped DDP (``OverlappedDDP``), bucketed DDP (``BucketedDDP``) and two
predictions (``bucket_sizes``, ``backward_and_sync_time``).

Both wrappers are built like notebook 02's ``NaiveDDP`` (``.module``, forward delegates, rank 0's
state broadcast at construction) but start the gradient all-reduces DURING backward, from a
``register_post_accumulate_grad_hook``, with ``async_op=True``; ``finish_gradient_sync()``, called
after ``loss.backward()`` and before ``optimizer.step()``, waits for every handle and leaves the
mean gradient in every ``.grad``.

What the checks assert (``_training.py`` trains the wrapper, as for notebook 02), on 2 ranks in
float32 and 4 in float64, five models (plain, BatchNorm buffers, a frozen parameter, tied
weights, a branch some steps do not use), three SGD steps each, fresh weights and data:
* construction and values as in notebook 02 (``nb02_ddp``'s diagnosis, reused): rank 0's state
  broadcast, every parameter and buffer at the end equal to one process on the global batch;
* in every step, only all-reduces after forward, each with ``async_op=True``, their payloads
  adding up to exactly the trainable gradient bytes;
* ``overlapped_ddp``: one all-reduce per trainable parameter;
  ``bucketed_ddp(BucketedDDP)``: for each bucket size (one bucket for the whole model, a few,
  one per parameter), the all-reduces carry exactly the buckets ``reference_buckets`` gives, in
  that order: parameters taken in REVERSE registration order, a bucket closed as soon as it holds
  at least ``bucket_bytes`` (torch's rule: it may overshoot by one tensor), buckets launched in
  bucket order;
* overlap: at least one all-reduce is launched during ``loss.backward()`` (the ``_training``
  ledger per phase), and none of those is waited for inside backward. The second is seen with
  files, not timing: in step 0 of the plain model, rank 0 starts its backward only once every
  other rank has finished its own (or after ``RANK0_WAITS_S``). A rank whose backward returned
  while rank 0 had not started cannot have completed an all-reduce in it; one whose backward
  returned only after rank 0 started waited for its all-reduces inside backward. Likewise a rank
  whose ``finish_gradient_sync()`` returned before rank 0 started never waited at all.

Crashes and hangs are placed in a model and step as in notebook 02.

Predictions (no ranks): ``bucket_sizes(param_bytes, bucket_bytes) -> list`` against
``reference_buckets`` on fixed cases, naming the layout in registration order and the
"never exceed the size" rule; ``backward_and_sync_time(buckets, backward_s, N, alpha, beta)``
against ``reference_sync_time`` (bucket i ready at backward_s times the share of bytes in
buckets 0..i, all-reduces one at a time, each ``theory.collective_time``), naming no overlap,
perfect overlap, only the last bucket, and one all-reduce of everything.
"""
import math
import secrets
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from labkit import models, theory
from labkit.check import _sizes, _training, nb02_ddp
from labkit.check._core import Failed, Ranks, call_here, exercise
from labkit.check._hints import register
from labkit.check.predictions import _compare

SYNC = "finish_gradient_sync"
WORLDS = ((2, torch.float32), (4, torch.float64))
# LABKIT_AUTOGRADE_SIZES=quick under nbgrader (_sizes.py): 3 ranks instead of 4
QUICK_WORLDS = ((2, torch.float32), (3, torch.float64))
KINDS = ("plain", "batchnorm", "frozen", "tied", "unused")
RANK0_WAITS_S = 3.0   # at most this long, once per launch, for the other ranks' backward


# --- the reference layout ------------------------------------------------------------------------

def reference_buckets(param_bytes, bucket_bytes):
    """Bytes of each bucket, in the order they are all-reduced: the parameters in reverse
    registration order, a bucket closed once it holds at least ``bucket_bytes``. That is torch's
    rule (``compute_bucket_assignment_by_size`` in ``torch/csrc/distributed/c10d/reducer.cpp``
    closes a bucket when ``bucket.size >= bucket_size_limit``), so a bucket may overshoot by one
    tensor; notebook 03 sees torch 2.13's own buckets follow it in the ledger."""
    return _layout(list(reversed(list(param_bytes))), bucket_bytes)


def _layout(ordered, cap):
    buckets, size = [], 0
    for b in ordered:
        size += b
        if size >= cap:
            buckets.append(size)
            size = 0
    if size:
        buckets.append(size)
    return buckets


def _no_overshoot(ordered, cap):
    """The other rule learners pick: start a new bucket before one would exceed the cap."""
    buckets, size = [], 0
    for b in ordered:
        if size and size + b > cap:
            buckets.append(size)
            size = 0
        size += b
    if size:
        buckets.append(size)
    return buckets


def _caps(trainable_bytes):
    """(label, bucket_bytes) for one bucket, several, one per parameter, for one model."""
    params = list(trainable_bytes)
    total = sum(params)
    candidates = sorted({b for b in params} | {a + b for a in params for b in params})

    def telling(cap, strict):
        """Several buckets, unlike the layout in registration order (and, if strict, unlike the
        no-overshoot rule's), so that a wrong order or rule shows in the ledger."""
        got = reference_buckets(params, cap)
        return (2 <= len(got) < len(params) and got != _layout(params, cap)
                and (not strict or got != _no_overshoot(list(reversed(params)), cap)))

    several = next((c for c in candidates if telling(c, True)),
                   next((c for c in candidates if telling(c, False)), max(1, total // 2)))
    return [("one bucket", total + 1), ("several buckets", several), ("one per parameter", 1)]


# --- predictions ---------------------------------------------------------------------------------

register("bucket_sizes", [
    "Which gradients does backward produce first: those of the first layers or of the last? "
    "Fill the buckets in that order, and close a bucket as soon as it is full enough.",
    "Walk the parameter sizes from the LAST to the first, adding each to the current bucket; as "
    "soon as the bucket holds at least bucket_bytes, close it and start a new one (so a bucket "
    "may overshoot by one tensor: torch's rule). A last, partly filled bucket counts too.",
])
register("backward_and_sync_time", [
    "Go bucket by bucket, in order, keeping the time at which the previous all-reduce ended. A "
    "bucket's all-reduce starts when its gradients are ready AND the previous all-reduce has "
    "ended; it then lasts all_reduce_time of its bytes.",
    "Bucket i is ready at backward_s * (bytes in buckets 0..i) / (all bytes). end = 0; for each "
    "bucket: end = max(end, ready_i) + all_reduce_time(bytes_i, N, alpha, beta). Return end.",
])


def _all_reduce_time(s, n, alpha, beta):
    return theory.collective_time("all_reduce", s, n, alpha, beta)


def reference_sync_time(buckets, backward_s, n, alpha, beta):
    """Seconds from the start of backward until the last bucket's all-reduce ends."""
    total, done, end = sum(buckets), 0, 0.0
    for size in buckets:
        done += size
        end = max(end, backward_s * done / total) + _all_reduce_time(size, n, alpha, beta)
    return end


_BUCKET_CASES = [([120, 24, 72, 12], 64), ([120, 24, 72, 12], 1000), ([120, 24, 72, 12], 1),
                 ([4000, 4000, 4000, 4000], 6000), ([100, 300, 50, 50, 500], 350),
                 ([2**20] * 6, 25 * 2**20), ([10, 20, 30], 30)]


def _bucket_list(fn, params, cap):
    value = call_here(fn, list(params), cap, who=f"bucket_sizes({params}, {cap})")
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError):
        raise Failed(f"bucket_sizes({params}, {cap}) returned {value!r:.40}: return a list of "
                     "ints, one per bucket") from None


@exercise("bucket_sizes")
def bucket_sizes(fn):
    """``fn(param_bytes, bucket_bytes) -> list``: each bucket's bytes, in all-reduce order."""
    for params, cap in _BUCKET_CASES:
        got, want = _bucket_list(fn, params, cap), reference_buckets(params, cap)
        if got == want:
            continue
        case = f"bucket_sizes({params}, {cap}) returned {got}"
        if got == _layout(params, cap):
            raise Failed(f"{case}: those buckets are filled in registration order. Backward "
                         "produces the LAST layer's gradients first, so fill from the end")
        if got == _no_overshoot(list(reversed(params)), cap):
            raise Failed(f"{case}: you started a new bucket before one would exceed the size. "
                         "torch closes a bucket once it REACHES the size, so a bucket may "
                         "overshoot by one tensor (and a tensor larger than the size gets a "
                         "bucket of its own)")
        if sum(got) != sum(params):
            raise Failed(f"{case}, {sum(got)} bytes in all; every parameter goes into exactly one "
                         f"bucket, whole ({sum(params)} bytes)")
        if len(got) == math.ceil(sum(params) / cap):
            raise Failed(f"{case}: a parameter is never split between buckets; count tensor by "
                         "tensor")
        raise Failed(f"{case}; the rule gives {len(want)} buckets")
    return "matches torch's bucket rule (reverse order, closed once full) on every case", {}


@exercise("backward_and_sync_time")
def backward_and_sync_time(fn):
    """``fn(buckets, backward_s, N, alpha, beta)``: seconds from the start of backward until the
    last bucket's all-reduce has ended (gradients produced at a constant rate, in bucket order;
    one all-reduce at a time)."""
    cases = [(b, bw, n, a, be) for b in ([4 * 2**20], [2**20] * 4, [2**16] * 64, [1000, 3000])
             for bw in (0.0, 0.01, 0.2) for n in (2, 4) for a, be in ((50e-6, 1e-9), (1e-3, 1e-10))]
    total = lambda b, n, a, be: sum(_all_reduce_time(s, n, a, be) for s in b)   # noqa: E731
    _compare("backward_and_sync_time", fn, cases, reference_sync_time, [
        (lambda b, bw, n, a, be: bw + total(b, n, a, be),
         "that is no overlap: every all-reduce after backward. A bucket's all-reduce can start "
         "as soon as its gradients are ready, while backward goes on"),
        (lambda b, bw, n, a, be: max(bw, total(b, n, a, be)),
         "that is perfect overlap: the last bucket is only ready when backward ends, so its "
         "all-reduce always comes after backward"),
        (lambda b, bw, n, a, be: bw + _all_reduce_time(b[-1], n, a, be),
         "that counts only the last bucket after backward: earlier ones may not have finished "
         "when it is ready (one all-reduce at a time)"),
        (lambda b, bw, n, a, be: reference_sync_time([sum(b)], bw, n, a, be),
         "that is one all-reduce of all the bytes: each bucket pays its own latency")])
    return "matches the overlap model (bucket by bucket, one all-reduce at a time)", {}


# --- the wrapper under test, inside a rank -------------------------------------------------------

class _Factory:
    """Builds the learner's wrapper around a model, behind a thin proxy that sees the phases."""

    def __init__(self, cls, cap, folder, probe):
        self.cls, self.cap, self.folder, self.probe = cls, cap, Path(folder), probe
        self.records = []

    def __call__(self, model):
        inner = self.cls(model) if self.cap is None else self.cls(model, self.cap)
        return _Proxy(inner, self)


class _Proxy:
    def __init__(self, inner, factory):
        self._inner, self._factory, self._step = inner, factory, 0
        self.module = getattr(inner, "module", None)
        if callable(getattr(inner, SYNC, None)):
            self.finish_gradient_sync = self._finish

    def _probing(self):
        return self._factory.probe and self._step == 0

    def __call__(self, *args, **kwargs):
        out = self._inner(*args, **kwargs)
        if self._probing() and dist.get_rank() == 0 and isinstance(out, torch.Tensor) \
                and out.requires_grad:
            out.register_hook(self._rank0_waits)
        return out

    def _rank0_waits(self, grad):
        folder, world = self._factory.folder, dist.get_world_size()
        deadline = time.monotonic() + RANK0_WAITS_S
        while time.monotonic() < deadline and not all(
                (folder / f"backward-done-{r}").exists() for r in range(1, world)):
            time.sleep(0.005)
        (folder / "rank0-started").touch()
        return grad

    def _finish(self):
        if not self._probing() or dist.get_rank() == 0:
            self._step += 1
            return getattr(self._inner, SYNC)()
        folder, rank = self._factory.folder, dist.get_rank()
        started = folder / "rank0-started"
        record = {"backward_before_rank0": not started.exists()}
        (folder / f"backward-done-{rank}").touch()
        try:
            return getattr(self._inner, SYNC)()
        finally:
            record["sync_before_rank0"] = not started.exists()
            self._factory.records.append(record)
            self._step += 1


def _train(cls, jobs, folder, name):
    """In each rank: every (cap, run, probe) in turn; per job the _training result and the
    probe's records."""
    out = []
    for i, (cap, run, probe) in enumerate(jobs):
        probe_folder = Path(folder) / f"probe{i}"
        probe_folder.mkdir(exist_ok=True)
        factory = _Factory(cls, cap, probe_folder, probe)
        result = _training.train_on_rank(factory, [run], SYNC, folder, name)[0]
        out.append((result, factory.records))
    return out


# --- diagnosis, in the notebook ------------------------------------------------------------------

def _rename(text, name):
    return (text.replace("NaiveDDP", name).replace("sync_gradients()", f"{SYNC}()")
            .replace("sync_gradients", SYNC))


def _ledger(run, results, lay, name, buckets, cap):
    """A hint when some step's collectives are not overlapped DDP's, or None. ``buckets``: the
    expected payloads in order, or None for one all-reduce per parameter in any order."""
    trainable = list(lay.trainable.values())
    for rank, result in enumerate(results):
        for step, ledgers in enumerate(result["steps"]):
            at = f"in step {step} on rank {rank}"
            if any(op == "all_reduce" for op, _, _ in ledgers["forward"]):
                return (f"{at}, forward ran an all-reduce: gradients do not exist yet during "
                        "forward. Launch each all-reduce from the gradient hook, in backward")
            calls = [(op, b, a) for op, b, a in ledgers["backward"] + ledgers["sync"]
                     if op != "barrier"]
            others = sorted({op for op, _, _ in calls if op != "all_reduce"})
            if others:
                return (f"{at}, {name} ran {', '.join(others)} after forward; averaging "
                        "gradients takes only all-reduces")
            reduces = [b for _, b, _ in calls]
            if not reduces:
                return (f"{at}, nothing was all-reduced: each rank stepped with its own "
                        f"gradients. The hooks must launch the all-reduces and {SYNC}() wait "
                        "for them")
            if ledgers["frozen_grads"]:
                return (f"{at}, the frozen parameter {nb02_ddp._names(ledgers['frozen_grads'])} "
                        f"had a gradient after {SYNC}(): skip parameters with "
                        "requires_grad=False (register no hook on them)")
            hint = nb02_ddp._payload(sum(reduces), len(reduces), sum(trainable), len(trainable),
                                     lay, run, at)
            if hint and "in pieces" not in hint:
                return hint
            hint = _layout_hint(reduces, trainable, buckets, cap, at)
            if hint:
                return hint
            if not all(a for _, _, a in calls):
                return (f"{at}, {sum(not a for _, _, a in calls)} of the {len(calls)} "
                        "all-reduces were not asynchronous: dist.all_reduce(t) waits until it "
                        "is done, so backward stops at every hook. Pass async_op=True, keep the "
                        f"handle, and wait for it in {SYNC}()")
            in_backward = [b for op, b, _ in ledgers["backward"] if op == "all_reduce"]
            if not in_backward and run.kind == "plain":
                return (f"{at}, every all-reduce was launched in {SYNC}(), after backward "
                        "had ended: nothing overlapped. Launch each one from the gradient "
                        "hook (register_post_accumulate_grad_hook) as soon as its gradient "
                        "(or its bucket) is ready")
    return None


def _layout_hint(reduces, trainable, buckets, cap, at):
    if buckets is None:
        if len(reduces) != len(trainable):
            return (f"{at}, {len(reduces)} all-reduces for the {len(trainable)} trainable "
                    "parameters: launch exactly one per parameter, from its hook (buckets "
                    "come in the next exercise)")
        if sorted(reduces) != sorted(trainable):
            return (f"{at}, the all-reduces carried {sorted(reduces)} bytes, the gradients are "
                    f"{sorted(trainable)}: all-reduce each gradient whole")
        return None
    if reduces == buckets:
        return None
    got = f"{at}, the all-reduces carried {reduces} bytes; the buckets are {buckets}"
    forward = _layout(trainable, cap)
    if reduces == forward and forward != buckets:
        return (f"{got}: you filled the buckets in registration order (module.parameters()). "
                "Backward produces the last layer's gradients first: fill the buckets from the "
                "LAST parameter to the first, so the first bucket is complete first")
    if reduces == _no_overshoot(list(reversed(trainable)), cap):
        return (f"{got}: you started a new bucket before one would exceed bucket_bytes={cap}, "
                f"which makes {len(reduces)} buckets where the size implies {len(buckets)}. "
                "torch closes a bucket once it REACHES the size (it may overshoot by one "
                "tensor); your bucket_sizes prediction gives the layout")
    if len(reduces) != len(buckets):
        if len(reduces) == len(trainable) and len(buckets) < len(trainable):
            return (f"{got}: one all-reduce per parameter; pack the gradients into flat "
                    "buckets of bucket_bytes and all-reduce each bucket once")
        if len(reduces) == 1:
            return (f"{got}: one all-reduce for everything ignores bucket_bytes; a bucket is "
                    "closed as soon as it holds bucket_bytes")
        return (f"{got}: bucket_bytes={cap} implies {len(buckets)} buckets, you made "
                f"{len(reduces)}. Close a bucket as soon as it holds AT LEAST bucket_bytes "
                "(torch's rule: it may overshoot by one tensor); your bucket_sizes prediction "
                "gives the layout")
    if sorted(reduces) == sorted(buckets):
        return (f"{got}: the right buckets in the wrong order. Launch them in bucket order, the "
                "same on every rank: a bucket that completes before an earlier one waits for "
                "it (torch's DDP does the same: 'always running allreduce in the bucket index "
                "order')")
    return f"{got}: each bucket holds whole gradients, in reverse registration order"


def _probe_hint(records, n, name):
    for rank, record in enumerate(records):
        if record is None:
            continue
        if not record["backward_before_rank0"]:
            return (f"on rank {rank}, loss.backward() returned only after rank 0 had started "
                    "its backward: your hooks waited for their all-reduces inside backward, so "
                    "nothing overlapped. Keep the handles and wait for them only in "
                    f"{SYNC}()")
        if record["sync_before_rank0"]:
            return (f"on rank {rank}, {SYNC}() returned before rank 0 had even started its "
                    "backward, so no all-reduce could have finished: call .wait() on every "
                    "handle there (an async all-reduce is done only once its wait() returns) "
                    "before using the gradients")
    return None


def _diagnose(run, results, records, n, name, buckets, cap):
    lay = _training.layout(models.make(run.kind, run.dtype))
    problem = next((r["problem"] for r in results if r["problem"]), None)
    if problem == "module":
        return (f"{name}(model) must keep the model it wraps as self.module, the same object"), None
    if problem == "sync":
        return (f"{name} has no method {SYNC}(): the training loop calls it after backward "
                "and before the optimizer step"), None
    if problem:
        return (f"{problem}: forward must return what self.module(*inputs, **kwargs) "
                "returns"), None
    hint = nb02_ddp._built(run, results, n, lay)
    if hint:
        return _rename(hint, name), None
    hint = _ledger(run, results, lay, name, buckets, cap)
    if hint:
        return hint, None
    hint = _probe_hint(records, n, name)
    if hint:
        return hint, None
    hint, diff = nb02_ddp._values(run, results, n, lay)
    return (_rename(hint, name) if hint else None), diff


def _crash_advice(crash):
    message = crash.message or ""
    if "NoneType" in message:
        return ("a parameter's grad was None: a frozen parameter never gets one (register no "
                "hook on it); a trainable one that this step did not use never fired its hook "
                f"on this rank: in {SYNC}(), give it zeros and all-reduce it anyway, in the "
                "same order as on the other ranks")
    return nb02_ddp._crash_advice(crash)


def _grade(cls, name, exercise_name, caps, timeout):
    """Train ``cls`` on 2 and 4 ranks (2 and 3 under quick sizes); ``caps``: True for the bucket
    sizes, False for none. Returns (the world sizes, the largest difference on each, figures)."""
    ranks = Ranks(exercise_name, timeout=timeout, budget=3 * timeout, crash_advice=_crash_advice)
    figures, worst = {}, {}
    worlds = _sizes.pick(WORLDS, QUICK_WORLDS)
    for n, dtype in worlds:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        jobs, expected = [], []
        for kind in KINDS:
            lay = _training.layout(models.make(kind, dtype))
            trainable = list(lay.trainable.values())
            for label, cap in (_caps(trainable) if caps else [(None, None)]):
                run = _training.fresh_run(kind, n, dtype, generator)
                jobs.append((cap, run, not jobs))
                expected.append((label, cap, reference_buckets(trainable, cap) if caps else None))
        with tempfile.TemporaryDirectory(prefix="labkit-check-") as folder:
            try:
                per_rank = ranks.run(_train, n, cls, jobs, folder, name)
            except Failed as failure:
                raise Failed(_rename(nb02_ddp._stuck(failure, folder, n).hint, name),
                             details=failure.details) from None
        for i, ((cap, run, _), (label, _, buckets)) in enumerate(zip(jobs, expected)):
            results = [per_rank[r][i][0] for r in range(n)]
            records = [None] + [(per_rank[r][i][1] or [None])[0] for r in range(1, n)]
            hint, diff = _diagnose(run, results, records, n, name, buckets, cap)
            if hint:
                where = f", bucket_bytes={cap} ({label})" if label else ""
                raise Failed(f"on {n} ranks ({str(dtype).split('.')[-1]}), with {run.label}"
                             f"{where}: {hint}")
            worst[n] = max(worst.get(n, 0.0), diff)
        first = per_rank[0][0][0]["steps"][0]
        figures[f"{n} ranks: all-reduces launched during backward (plain model, step 0)"] = sum(
            op == "all_reduce" for op, _, _ in first["backward"])
        figures[f"{n} ranks: largest difference from one process"] = worst[n]
    return [n for n, _ in worlds], worst, figures


register("overlapped_ddp", [
    "Start from your NaiveDDP of notebook 02. Instead of all-reducing in a loop after backward, "
    "register a hook on every trainable parameter that fires as soon as its gradient is ready, "
    "and start that gradient's all-reduce there without waiting. finish_gradient_sync() then "
    "waits for all of them.",
    "In __init__: p.register_post_accumulate_grad_hook(self._hook) for every p with "
    "requires_grad. The hook: self.handles.append((p, dist.all_reduce(p.grad, async_op=True))). "
    "finish_gradient_sync: wait for every handle (handle.wait(timeout=...)), divide each grad "
    "by the world size, clear the list. Parameters whose hook did not fire this step (grad None) "
    "need zeros, all-reduced like the others, AFTER the hooked ones (same order on every rank).",
])
register("bucketed_ddp", [
    "Two small classes. A Bucket owns a flat buffer and a view of it for each of its "
    "parameters, and knows how many of its gradients have arrived. A BucketManager splits the "
    "parameters into buckets (your bucket_sizes rule: reverse order, closed once full), and on "
    "each gradient's hook copies the gradient into its slot; when a bucket is complete, and "
    "every earlier bucket has been launched, it launches the bucket's all-reduce with "
    "async_op=True.",
    "finish_gradient_sync: launch, in order, any bucket that never completed (a parameter this "
    "step did not use: zeros in its slot); wait for every handle with a timeout; divide each "
    "buffer by the world size; write each slot back into p.grad (copy, or p.grad = the view); "
    "reset the counters for the next step.",
    "The hook: b = self.bucket_of[p]; b.view[p].copy_(p.grad); b.arrived += 1; then while "
    "self.next < len(self.buckets) and self.buckets[self.next].complete(): launch it "
    "(dist.all_reduce(bucket.buffer, async_op=True)) and self.next += 1.",
])


@exercise("overlapped_ddp", sizes=True)
def overlapped_ddp(cls, *, timeout: float = 20.0):
    """``cls(module)``: an all-reduce per parameter from a gradient hook, waited for in
    ``finish_gradient_sync()`` (module docstring)."""
    (a, b), worst, figures = _grade(cls, "OverlappedDDP", "overlapped_ddp", caps=False,
                                    timeout=timeout)
    return (f"on {a} ranks (float32) and {b} (float64), {len(KINDS)} models x {_training.STEPS} "
            f"steps: equal to one process (largest difference {worst[a]:.1e} and "
            f"{worst[b]:.1e}); one async all-reduce per parameter, launched during backward and "
            f"waited for only in {SYNC}()"), figures


@exercise("bucketed_ddp", sizes=True)
def bucketed_ddp(cls, *, timeout: float = 20.0):
    """``cls(module, bucket_bytes)``: buckets in reverse order, each all-reduced as soon as it is
    complete (module docstring), for one bucket, a few, and one per parameter."""
    (a, b), worst, figures = _grade(cls, "BucketedDDP", "bucketed_ddp", caps=True,
                                    timeout=timeout)
    return (f"on {a} ranks (float32) and {b} (float64), {len(KINDS)} models x 3 bucket sizes x "
            f"{_training.STEPS} steps: equal to one process (largest difference "
            f"{worst[a]:.1e} and {worst[b]:.1e}); the all-reduces carried exactly the buckets "
            "(reverse order, closed once full), each async, launched during backward and waited "
            f"for only in {SYNC}()"), figures
