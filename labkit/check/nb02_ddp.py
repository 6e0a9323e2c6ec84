"""Notebook 02: sharded data (``shard_indices``) and a naive DDP wrapper (``NaiveDDP``).

``shard_indices(dataset_size, rank, world_size) -> list[int]``: the sample indices rank ``rank``
trains on. The reference is torch's own ``DistributedSampler(range(dataset_size),
num_replicas=world_size, rank=rank, shuffle=False)`` (torch 2.13:
``torch/utils/data/distributed.py``): the indices padded, by repeating them from the start, to
the next multiple of N, then dealt round robin (rank r gets positions r, r + N, ...). Checked in
the notebook's process on fixed cases (N divides the size, N does not, fewer samples than ranks,
one rank) and two drawn afresh for every run; the usual mistakes (every rank the whole dataset,
no padding, dropping the tail, contiguous blocks) are named.

``NaiveDDP(module)``: an ``nn.Module`` whose ``.module`` is the model it wraps, whose forward
delegates, and whose ``sync_gradients()`` the training loop calls after ``loss.backward()`` and
before ``optimizer.step()``. What the check asserts (``_training.py`` runs it), on 2 ranks in
float32 and 4 ranks in float64, for five models (``labkit.models``: plain, BatchNorm on running
statistics, a frozen parameter, tied weights, a branch unused in some steps: on every rank at
step 1, on every rank but 0 at step 2), three SGD steps each, with fresh weights (different on
every rank) and data:
* after ``NaiveDDP(model)`` every rank holds rank 0's parameters (frozen ones too) and buffers,
  exactly;
* forward makes no collective but a broadcast of buffers (what torch's DDP does there), never of
  parameters;
* in each step, backward and ``sync_gradients()`` together make only all-reduces, whose payloads
  add up to exactly the trainable gradient bytes (each Parameter once, frozen ones not at all,
  a parameter without a gradient included: its zeros), in at most one all-reduce per trainable
  tensor: one per tensor, one flat all-reduce, or buckets in between. Hooks or an explicit loop
  in ``sync_gradients``, synchronous or async and waited for, are all fine;
* no frozen parameter has a gradient after ``sync_gradients()``;
* at the end, every parameter and buffer on every rank equals one process trained on the whole
  global batch, within ``_training.tolerance`` (derived in ``_training``'s docstring).
A crash or hang becomes a hint that names the model and step it happened in (from the ranks'
progress files); at the step where only rank 0 uses a branch, that is nearly always a parameter
skipped because its grad was None on the other ranks.
"""
import secrets
import tempfile

import torch
from torch.utils.data import DistributedSampler

from labkit import models
from labkit.check import _sizes, _training
from labkit.check._core import Failed, Ranks, call_here, exercise
from labkit.check._hints import register

# --- shard_indices ------------------------------------------------------------------------------

register("shard_indices", [
    "Every rank must get the same number of indices (a rank with fewer batches would stop early "
    "and leave the others waiting in an all-reduce), and together the ranks must cover the whole "
    "dataset. Deal the indices out like cards, one to each rank in turn.",
    "First pad the list 0 ... size-1 to the next multiple of N by repeating indices from its "
    "start (the padding can be longer than the dataset when size < N: repeat the list as often "
    "as needed). Then rank r takes every N-th index, starting at position r.",
    "total = math.ceil(size / N) * N; indices = list(range(size)); "
    "indices = (indices * math.ceil(total / size))[:total]; return indices[rank:total:N]",
])

# (size, N): N divides the size first; then uneven sizes, fewer samples than ranks, one rank.
_SHARD_CASES = [(12, 4), (8, 2), (10, 4), (7, 3), (13, 5), (1, 4), (3, 8), (5, 1)]


def _sampler(size: int, rank: int, n: int, drop_last: bool = False) -> list:
    return list(DistributedSampler(range(size), num_replicas=n, rank=rank, shuffle=False,
                                   drop_last=drop_last))


def _indices(fn, size, rank, n) -> list:
    args = (size, rank, n)
    value = call_here(fn, *args, who=f"shard_indices{args}")
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    try:
        out = [int(i) for i in value]
    except (TypeError, ValueError):
        raise Failed(f"shard_indices{args} returned {type(value).__name__} {value!r:.40}: "
                     "return a list of ints") from None
    if any(float(i) != i for i in value if not isinstance(i, int)):
        raise Failed(f"shard_indices{args} returned {value!r:.60}: indices are whole numbers")
    return out


def _shard_mistake(size, n, got, want):
    """A hint for the case (size, n) when the ranks got ``got`` instead of ``want``, or None."""
    if got == want:
        return None
    everything = list(range(size))
    lengths = [len(g) for g in got]
    case = f"with {size} samples on {n} ranks"
    if n > 1 and all(g == everything for g in got):
        return (f"{case} every rank got the whole dataset: each rank would train on the "
                "full global batch, N times the work, and averaging N identical gradients "
                "gives the right parameters with no data parallelism at all. Give each rank "
                "its own share")
    if n > 1 and all(g == got[0] for g in got):
        return f"{case} every rank got the same indices {got[0][:8]}: use `rank`"
    if sorted(sum(got, [])) == everything and len(set(lengths)) > 1:
        return (f"{case} the ranks got {lengths} indices: every index once, but not the same "
                "number on every rank. A rank with fewer batches finishes first and the others "
                "wait forever in their next all-reduce. DistributedSampler pads to the next "
                "multiple of N by repeating indices from the start")
    if got == [_sampler(size, r, n, drop_last=True) for r in range(n)]:
        return (f"{case} you dropped the last samples: that is DistributedSampler(..., "
                "drop_last=True). The default (drop_last=False) keeps every sample and pads "
                "by repeating indices from the start")
    k = len(want[0])
    order = [want[r][j] for j in range(k) for r in range(n)]   # the padded list, in order
    if got == [order[r * k:(r + 1) * k] for r in range(n)]:
        return (f"{case} rank r got a contiguous block; that splits the data too, but "
                "DistributedSampler deals the indices round robin: rank r gets positions "
                "r, r + N, r + 2N, ... (the rest of the course assumes its order)")
    real = [(r, j) for r in range(n) for j in range(k) if j * n + r < size]
    if lengths == [k] * n and all(got[r][j] == want[r][j] for r, j in real):
        pads = [got[r][j] for r in range(n) for j in range(k) if j * n + r >= size]
        return (f"{case} the padding is wrong: you padded with {_short(pads)}; pad with "
                "indices from the start of the dataset (0, 1, ...), repeating it when it is "
                "shorter than the padding, as DistributedSampler does")
    rank = next(r for r in range(n) if got[r] != want[r])
    return (f"shard_indices({size}, {rank}, {n}) returned {_short(got[rank])}; DistributedSampler "
            f"(shuffle=False) gives {_short(want[rank])}")


def _short(values) -> str:
    return str(values) if len(values) <= 10 else f"{values[:10]}... ({len(values)} indices)"


@exercise("shard_indices")
def shard_indices(fn):
    """``fn(dataset_size, rank, world_size)``: rank's indices, as DistributedSampler(shuffle=False)
    gives them, on the fixed cases and two fresh ones (module docstring)."""
    fresh = [(secrets.randbelow(60) + 1, secrets.randbelow(5) + 2) for _ in range(2)]
    for size, n in _SHARD_CASES + fresh:
        want = [_sampler(size, r, n) for r in range(n)]
        got = [_indices(fn, size, r, n) for r in range(n)]
        hint = _shard_mistake(size, n, got, want)
        if hint:
            raise Failed(hint)
    shown = ", ".join(f"{s} on {n}" for s, n in _SHARD_CASES[:6])
    return (f"matches DistributedSampler(shuffle=False) on every case ({shown}, ... and "
            f"{', '.join(f'{s} on {n}' for s, n in fresh)} drawn this run)"), {}


# --- NaiveDDP -----------------------------------------------------------------------------------

register("naive_ddp", [
    "Two jobs. In __init__, every rank must end up with rank 0's parameters and buffers: which "
    "collective copies one rank's tensor to all the others? In sync_gradients, every rank must "
    "end up with the MEAN of all ranks' gradients: which collective, and what comes after it? "
    "Then think about the parameters that have no gradient: frozen ones (requires_grad=False) "
    "and ones this step did not use (grad is None).",
    "__init__: for every tensor of module.parameters() and module.buffers(), "
    "dist.broadcast(tensor.data, src=0) (parameters() gives a shared Parameter once). "
    "sync_gradients: for every p in module.parameters() with p.requires_grad: if p.grad is None, "
    "give it zeros (another rank may have a gradient for it, and every rank must make the same "
    "all-reduces in the same order); then dist.all_reduce(p.grad) and divide by the world size "
    "(or all-reduce with op=dist.ReduceOp.AVG, which torch's gloo backend runs as a SUM and a "
    "division).",
    "def __init__(self, module):\n    super().__init__(); self.module = module\n"
    "    for t in [*module.parameters(), *module.buffers()]:\n"
    "        dist.broadcast(t.data, src=0)\n"
    "def sync_gradients(self):\n    world = dist.get_world_size()\n"
    "    for p in self.module.parameters():\n        if not p.requires_grad: continue\n"
    "        if p.grad is None: p.grad = torch.zeros_like(p)\n"
    "        dist.all_reduce(p.grad); p.grad /= world",
])

WORLDS = ((2, torch.float32), (4, torch.float64))
# LABKIT_AUTOGRADE_SIZES=quick under nbgrader (_sizes.py): 3 ranks instead of 4
QUICK_WORLDS = ((2, torch.float32), (3, torch.float64))
KINDS = ("plain", "batchnorm", "frozen", "tied", "unused")
SYNC = "sync_gradients"


def _crash_advice(crash):
    message = crash.message or ""
    if "NoneType" in message:
        return ("a parameter's grad was None: a frozen parameter (requires_grad=False) never "
                "gets one, so skip it; a trainable one that this step did not use has none on "
                "this rank but maybe one on another, so give it zeros and all-reduce it anyway")
    if "a leaf Variable that requires grad" in message:
        return ("writing into a parameter (copy_, +=) is an in-place change autograd refuses "
                "on a leaf that requires grad: do it inside `with torch.no_grad():` (or on "
                "p.data)")
    return None


_SKIPPED = ("at step {step} of {label}, only rank 0's samples used the extra branch, so on the "
            "other ranks extra.weight.grad was None; the ranks then made different all-reduces "
            "(rank 0 one more), which deadlocks or mixes up tensors. Every rank must all-reduce "
            "every trainable parameter in the same order: where grad is None, use zeros. torch's "
            "DDP does the same with find_unused_parameters=True: it marks the parameter ready and "
            "reduces its slot of the bucket anyway")


def _stuck(failure: Failed, folder: str, n: int) -> Failed:
    """A crash or hang, placed in a model and step by the ranks' progress files."""
    places = _training.where(folder, n)
    crash = failure.crash
    raised = crash is not None and bool(crash.case) and crash.type not in ("NativeError",
                                                                          "RankDied")
    partial = any(kind == "unused" and phase == f"step {_training.PARTIAL_STEP}"
                  for kind, phase in places.values())
    if partial and not (raised and _crash_advice(crash)):
        hint = _SKIPPED.format(step=_training.PARTIAL_STEP, label=_training.LABELS["unused"])
        return Failed(f"on {n} ranks, {hint}", details=failure.details)
    if raised or not places:
        return failure      # the hint already names the model and step (call_learner's case)
    if any(phase == "build" for _, phase in places.values()):
        return Failed(f"on {n} ranks, {failure.hint}; it happened in NaiveDDP(model): every "
                      "rank must make the same broadcasts in the same order (rank 0 sends, the "
                      "others receive: all of them call dist.broadcast(t, src=0))",
                      details=failure.details)
    kind, phase = places[min(places)]
    return Failed(f"on {n} ranks, {failure.hint} (while training {_training.LABELS[kind]}, "
                  f"{phase})", details=failure.details)


def _names(names) -> str:
    names = list(names)
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _built(run, results, n, lay):
    """A hint when some rank does not hold rank 0's state after NaiveDDP(model), or None."""
    start = [_snapshot_of(run.init[r], lay) for r in range(n)]
    want = start[0]
    for rank, result in enumerate(results):
        got = result["after_build"]
        wrong = [k for k in want if not torch.equal(got[k], want[k])]
        if not wrong:
            continue
        if rank == 0:
            floats = [k for k in wrong if want[k].is_floating_point()]
            if floats and all(torch.allclose(got[k].double(),
                                             sum(s[k].double() for s in start) / n)
                              for k in floats):
                return ("after NaiveDDP(model), rank 0's own parameters had changed to the "
                        "average of every rank's: that is an all-reduce. Copy rank 0's tensors "
                        "to the others with dist.broadcast(t, src=0), which leaves rank 0's as "
                        "they are")
            return (f"after NaiveDDP(model), rank 0's {_names(wrong)} had changed: the "
                    "construction must leave rank 0's state as it is and copy it to the others")
        source = next((s for s in range(1, n) if all(torch.equal(got[k], start[s][k])
                                                      for k in wrong)), None)
        if source is not None and source != rank:
            return (f"after NaiveDDP(model), every rank held rank {source}'s {_names(wrong)}: "
                    "broadcast from rank 0 (src=0), as torch's DDP does")
        if all(torch.equal(got[k], start[rank][k]) for k in wrong):
            kinds = {("buffer" if k in lay.buffers else
                      "frozen" if k in lay.frozen else "trainable") for k in wrong}
            if kinds == {"buffer"}:
                return (f"after NaiveDDP(model), rank {rank}'s buffers ({_names(wrong)}) were "
                        "still its own; the parameters were rank 0's. Buffers are state too "
                        "(BatchNorm's running statistics decide its output): broadcast "
                        "module.buffers() from rank 0 as well, as torch's DDP does at "
                        "construction")
            if kinds == {"frozen"}:
                return (f"after NaiveDDP(model), rank {rank}'s frozen parameter "
                        f"({_names(wrong)}, requires_grad=False) was still its own. It never "
                        "gets a gradient, but it is used in forward: broadcast every "
                        "parameter at construction, trainable or not (torch's DDP broadcasts "
                        "them all)")
            return (f"after NaiveDDP(model), rank {rank} still had its own initial "
                    f"{_names(wrong)}: the ranks start from different random weights, so "
                    "NaiveDDP must copy rank 0's parameters and buffers to every rank at "
                    "construction (dist.broadcast(t, src=0)). Averaging gradients keeps equal "
                    "parameters equal; it cannot make different ones equal")
        return (f"after NaiveDDP(model), rank {rank}'s {_names(wrong)} were neither its own nor "
                "rank 0's: broadcast each parameter and buffer from rank 0 into that same "
                "tensor (dist.broadcast(t.data, src=0))")
    if not any(op == "broadcast" for result in results for op, _, _ in result["built"]):
        return ("NaiveDDP(model) gave every rank rank 0's state, but without a broadcast: "
                "copying one rank's tensors to all the others is what dist.broadcast(t, src=0) "
                "is for (torch's DDP broadcasts them too)")
    return None


def _snapshot_of(state_dict: dict, lay) -> dict:
    return {k: state_dict[k] for k in lay.tensors}


_OTHER_OPS = {
    "all_gather": ("gathered every rank's gradients (all_gather) and combined them locally: the "
                   "values can be right, but every rank then holds N copies of every gradient, "
                   "and for N > 2 a ring sends more bytes ((N-1)·S per rank, against "
                   "2(N-1)/N·S for an all-reduce). One all_reduce per gradient, then a division "
                   "by N, is the collective for a mean"),
    "reduce": ("used reduce, which gives the sum to one rank only; all_reduce gives it to every "
               "rank in one collective"),
    "broadcast": ("broadcast after backward: parameters are broadcast once, at construction; "
                  "after that, averaged gradients keep them equal (torch's DDP docstring: "
                  "'Parameters are never broadcast between processes')"),
    "send": ("sent gradients point to point; your ring from notebook 01 would work, but use "
             "dist.all_reduce here: the check and the measurements below read the all-reduces "
             "from the ledger"),
    "recv": ("received gradients point to point; use dist.all_reduce here (the check and the "
             "measurements read the all-reduces from the ledger)"),
}


def _step_ledger(run, results, n, lay):
    """A hint when some rank's collectives in some step are not DDP's, or None."""
    trainable = sum(lay.trainable.values())
    tensors = len(lay.trainable)
    for rank, result in enumerate(results):
        for step, ledgers in enumerate(result["steps"]):
            at = f"in step {step} on rank {rank}"
            forward = [(op, b) for op, b, _ in ledgers["forward"] if op != "barrier"]
            not_broadcast = sorted({op for op, _ in forward if op != "broadcast"})
            if not_broadcast:
                return (f"{at}, forward ran {', '.join(not_broadcast)}. Gradients do not exist "
                        "during forward, so there is nothing to average yet; averaging "
                        "parameters instead would break with any optimizer that keeps state "
                        "(Adam). Forward only calls self.module; the all-reduces belong after "
                        "backward")
            sent = sum(b for _, b in forward)
            if sent > sum(lay.buffers.values()):
                return (f"{at}, forward broadcast {sent:,} bytes, more than the model's "
                        f"buffers ({sum(lay.buffers.values()):,}): DDP broadcasts parameters "
                        "once, at construction; after that the averaged gradients keep them "
                        "equal (torch's note: 'Parameters are never broadcast between "
                        "processes'; it re-broadcasts only buffers in forward)")
            calls = [(op, b) for op, b, _ in ledgers["backward"] + ledgers["sync"]
                     if op != "barrier"]
            others = sorted({op for op, _ in calls if op != "all_reduce"})
            if others:
                return f"{at}, NaiveDDP " + _OTHER_OPS.get(
                    others[0], f"ran {', '.join(others)}; only all-reduces belong here")
            reduces = [b for op, b in calls if op == "all_reduce"]
            if not reduces:
                return (f"{at}, nothing was all-reduced after backward: each rank stepped with "
                        "the gradient of its own shard only, so the ranks drift apart. After "
                        "loss.backward(), sync_gradients() must all-reduce every gradient and "
                        "divide it by the world size")
            if ledgers["frozen_grads"]:
                return (f"{at}, the frozen parameter {_names(ledgers['frozen_grads'])} "
                        "(requires_grad=False) had a gradient after sync_gradients(): it must "
                        "have none (no gradient, no communication). Skip parameters with "
                        "requires_grad=False")
            hint = _payload(sum(reduces), len(reduces), trainable, tensors, lay, run, at)
            if hint:
                return hint
    return None


def _payload(got, calls, trainable, tensors, lay, run, at):
    """A hint when one step's all-reduce payload is not the trainable gradient bytes, or None."""
    if got == trainable:
        if calls > tensors:
            return (f"{at}, {calls} all-reduces carried the model's {tensors} gradient tensors: "
                    "all-reduce each gradient whole (or all of them flattened into one), not "
                    "in pieces; every collective costs a latency")
        return None
    extra, missing = got - trainable, trainable - got
    where = f"{at}, the all-reduces carried {got:,} bytes; the trainable gradients are " \
            f"{trainable:,} bytes"
    if lay.frozen and extra == sum(lay.frozen.values()):
        return (f"{where}, and the extra {extra:,} are the frozen {_names(lay.frozen)} "
                "(requires_grad=False): it has no gradient to average. Skip frozen parameters: "
                "no gradient, no communication")
    if lay.tied and extra == sum(lay.tied.values()):
        return (f"{where}, and the extra {extra:,} are the tied weight {_names(lay.tied)}: one "
                "Parameter used twice (embedding and output layer) was all-reduced twice. "
                "module.parameters() yields a shared Parameter once; iterating over modules, "
                "state_dict() or named_parameters(remove_duplicate=False) yields it twice")
    unused = {n: b for n, b in lay.trainable.items() if n.startswith("extra.")}
    if run.kind == "unused" and missing == sum(unused.values()):
        return (f"{where}: {_names(unused)} ({missing:,} bytes) was skipped because its grad "
                "was None (no sample used the branch this step). That only works when it is "
                "None on EVERY rank, which no rank can know without asking; in another step it "
                "was None on some ranks only. Give it zeros and all-reduce it on every rank")
    if run.dtype == torch.float64 and 2 * got == trainable:
        return (f"{where}: half, as if the gradients went through a float32 buffer. "
                "torch.zeros(n) and torch.empty(n) are float32 whatever the model is; make the "
                "flat buffer with torch.cat of the gradients, or dtype=p.grad.dtype")
    if run.dtype == torch.float32 and got == 2 * trainable:
        return (f"{where}: double, as if the gradients went through a float64 buffer: make the "
                "flat buffer in the gradients' dtype (torch.cat of the gradients)")
    return (f"{where} ({', '.join(f'{n} {b:,}' for n, b in lay.trainable.items())}): "
            "all-reduce every trainable gradient exactly once per step")


def _values(run, results, n, lay):
    """A hint when the trained parameters are not one process's on the global batch, or None."""
    want = _training.reference(run)
    finals = [r["final"] for r in results]
    if all(not _training.differing(f, want, run.dtype) for f in finals):
        return None, max(_training.max_difference(f, want) for f in finals)
    for rank in range(1, n):
        apart = _training.differing(finals[rank], finals[0], run.dtype)
        if apart:
            return (f"after {len(run.batches)} steps, rank {rank}'s {_names(apart)} differed from "
                    "rank 0's: the ranks did not step with the same gradient. After "
                    "sync_gradients() every rank's p.grad must hold the same mean of all "
                    "ranks' gradients (all-reduce p.grad itself, in place, then divide)"), None
    wrong = _training.differing(finals[0], want, run.dtype)
    if not _training.differing(finals[0], _training.reference(run, lr=run.lr * n), run.dtype):
        return (f"every rank's parameters moved {n} times too far: the gradients were summed "
                "over the ranks but not averaged. all_reduce sums; divide each gradient by "
                "dist.get_world_size() (torch's DDP averages too: allreduce_hook divides by the "
                "group size)"), None
    if not _training.differing(finals[0], _training.reference(run, lr=run.lr / n), run.dtype):
        return (f"every rank's parameters moved {n} times too little: the gradients were "
                "divided by the world size twice (or averaged and then divided again)"), None
    worst = max((finals[0][k].double() - want[k].double()).abs().max().item() for k in wrong)
    return (f"after {len(run.batches)} steps the parameters {_names(wrong)} differ from one "
            f"process trained on the global batch by up to {worst:.2g} (tolerance "
            f"{_training.tolerance(run.dtype):.1g}), though the ranks agree with each other"), None


def _diagnose(run, results, n):
    """(hint or None, largest difference from the reference)."""
    lay = _training.layout(models.make(run.kind, run.dtype))
    problem = next((r["problem"] for r in results if r["problem"]), None)
    if problem == "module":
        return ("NaiveDDP(model) must keep the model it wraps as self.module, the same object "
                "(torch's DDP does: ddp.module is model)"), None
    if problem == "sync":
        return f"NaiveDDP has no method {SYNC}(): the training loop calls it after backward", None
    if problem:
        return (f"{problem}: forward must return what self.module(*inputs, **kwargs) "
                "returns"), None
    hint = _built(run, results, n, lay) or _step_ledger(run, results, n, lay)
    if hint:
        return hint, None
    return _values(run, results, n, lay)


@exercise("naive_ddp", sizes=True)
def naive_ddp(wrapper, *, timeout: float = 10.0):
    """``wrapper(module)``: the learner's NaiveDDP class, trained with ``sync_gradients()`` on 2
    ranks (float32) and 4 (float64), five models each (module docstring). ``timeout``: seconds
    per launch."""
    if isinstance(wrapper, torch.nn.Module):
        raise Failed("pass the class itself, labkit.check.naive_ddp(NaiveDDP), not an instance: "
                     "the check builds one around each of its models on every rank")
    ranks = Ranks("naive_ddp", timeout=timeout, crash_advice=_crash_advice)
    figures, worst = {}, {}
    worlds = _sizes.pick(WORLDS, QUICK_WORLDS)
    for n, dtype in worlds:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        runs = [_training.fresh_run(kind, n, dtype, generator) for kind in KINDS]
        with tempfile.TemporaryDirectory(prefix="labkit-check-") as folder:
            try:
                per_rank = ranks.run(_training.train_on_rank, n, wrapper, runs, SYNC, folder,
                                     "NaiveDDP")
            except Failed as failure:
                raise _stuck(failure, folder, n) from None
        for i, run in enumerate(runs):
            hint, diff = _diagnose(run, [results[i] for results in per_rank], n)
            if hint:
                raise Failed(f"on {n} ranks ({str(dtype).split('.')[-1]}), with {run.label}: "
                             f"{hint}")
            worst[n] = max(worst.get(n, 0.0), diff)
        plain = per_rank[0][0]["steps"][0]
        figures[f"{n} ranks: all-reduce payload per step (plain model), bytes"] = sum(
            b for op, b, _ in plain["backward"] + plain["sync"] if op == "all_reduce")
        figures[f"{n} ranks: largest difference from one process"] = worst[n]
    (a, _), (b, _) = worlds
    return (f"on {a} ranks (float32) and {b} (float64), {len(KINDS)} models x "
            f"{_training.STEPS} steps: every parameter and buffer equals one process on the "
            f"global batch (largest difference {worst[a]:.1e} and {worst[b]:.1e}); rank 0's "
            "state broadcast at construction; each step all-reduced exactly the trainable "
            "gradient bytes, nothing in forward"), figures

