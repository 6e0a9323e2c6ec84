"""Notebook 07: ZeRO-2, gradient partitioning (``ZeRO2``), and one prediction
(``zero2_state_bytes``).

``ZeRO2(params, optimizer_class, bucket_bytes=..., **kwargs)`` shards the optimizer state as ZeRO-1
does and the gradients too: hooks (``register_post_accumulate_grad_hook``) pack the gradients into
buckets of at most ``bucket_bytes`` as backward produces them (a parameter larger than that is a
bucket of its own), reduce-scatter each full bucket into this rank's gradient shard (synchronous or
``async_op=True``), and free the parameters' .grad once their bucket is reduced; ``step()`` waits
for what is outstanding, divides by N, steps the shard and all-gathers the parameters. The layout
of the shards is the learner's choice (each bucket padded and split N ways, or ZeRO-1's contiguous
shards reduce-scattered bucket by bucket, or a ring of notebook 01).

What ``zero2(ZeRO2)`` asserts (``_sharded.py`` trains the class; fresh weights, the same on every
rank, and fresh data; three steps): on 2 ranks the 30-layer MLP 7-8x29-5 (2125 parameters) with SGD
with momentum in float32 and bucket_bytes of one layer (72 elements), and with Adam in float64 and
bucket_bytes of 40 elements, below a weight's 64; on 4 ranks the 16-layer MLP 7-8x15-5 (1117) with
the optimizers, dtypes and bucket sizes swapped (4 ranks share 2 cores: every collective costs
more there). N divides neither count. On every rank (the ledger in steps 0 and 1, memory in the
last step), in the order the hint names the first problem found:
* ``zero_grad(set_to_none=True)`` leaves no .grad on the model;
* gradient memory. When backward returns, the model's .grad tensors hold at most one bucket
  (B = the larger of bucket_bytes and the largest parameter): a last bucket may wait for
  step(). In the last step (``MemoryTracer`` around backward, no ledger), the largest grads +
  other + comm bytes the tracer saw during backward (what backward touched or made: .grad
  tensors, buckets, the gradient shard, autograd's temporaries; not parameters, optimizer state
  or activations) stay within
      shard + 7·(B + (N-1)·itemsize) + T,
  shard = (ceil(numel / N) + k)·itemsize, the 1/N gradient shard with one padding element per
  rank for each of the step's k reduce-scatters; T = ``_sharded.autograd_temporaries``, what a
  backward that drops every .grad at once holds at its peak (measured by the same tracer in the
  notebook process: 131 elements for both models); and seven buckets' worth for "one bucket in
  flight": the bucket being reduced (its .grad tensors, its flat copy, the padded copy made while
  building it, the reduce-scatter's output when it is not written straight into the shard), the
  previous bucket, still in flight with async_op=True, and up to two finished collectives' buffers
  that gloo has not let go of yet (each of its two worker threads frees a finished op's tensors a
  moment after wait() returns, once it gets the GIL). That is 1,709 to 1,735 elements on 2 ranks,
  where the full gradients are 2125, and 912 to 952 on 4 ranks, where they are 1117. The
  reference implementations of tests/test_nb07_check.py (per-bucket layout sync and async, ZeRO-1's
  layout, a ring) peak at 0.53 to 0.88 of the bound, also with a busy process beside them; keeping
  the full gradients until step() peaks at 1.5 to 1.9 of it. A shard's .grad left from the step
  before (ZeRO-1's zero_grad) is a second gradient shard and is named as such;
* no collective in forward. During backward, reduce-scatters (torch's, or a ring's N-1 sends
  of one chunk each to (r+1)%N), at most one more in step() (a last bucket), none larger than a
  bucket plus padding, together every gradient element once plus at most N-1 padding elements
  each; after backward, all-gathers (one, or one per bucket) of every parameter element once plus
  padding; no all-reduce, nothing else. So a step sends what DDP's all-reduce sends, plus padding;
* every parameter equals one process trained with ``optimizer_class`` over ``model.parameters()``
  on the global batch (``_sharded``'s tolerance and mistakes);
* optimizer state at rest as in notebook 06, allowing per bucket one element of padding per
  rank and, when each bucket's shard is a tensor of its own, its scalar state (Adam's step).
The memory check's first part (full gradients after backward) comes before the ledger, so that a
version that all-reduces and keeps the full gradients hears about its memory; a bucket larger
than bucket_bytes is named (ledger) before the backward peak it causes. Crashes and hangs are
placed in a run and a phase as in notebook 06.

Prediction (no ranks): ``zero2_state_bytes(num_params, world_size, param_bytes, grad_bytes,
state_bytes)`` = param_bytes·num_params + (grad_bytes + state_bytes)·ceil(num_params / N): ZeRO
§5.2's 2Ψ + 14Ψ/N in general form, per rank at rest after the step.
"""
import math
import secrets

import torch

from labkit import theory
from labkit.check import _sharded, _sizes
from labkit.check._core import Failed, Ranks, attempted, exercise
from labkit.check._hints import register
from labkit.check._sharded import DEEP, MID
from labkit.check.predictions import _compare

NAME = "ZeRO2"
IN_FLIGHT = 7   # buckets' bytes allowed besides the shard and autograd's own (module docstring)
LAYER, BELOW_A_WEIGHT = 72, 40   # bucket_bytes in elements: one layer (64 + 8), less than 64
WORLDS = ((2, ((DEEP, torch.float32, "SGD", LAYER), (DEEP, torch.float64, "Adam", BELOW_A_WEIGHT))),
          (4, ((MID, torch.float64, "SGD", BELOW_A_WEIGHT), (MID, torch.float32, "Adam", LAYER))))
# LABKIT_AUTOGRADE_SIZES=quick under nbgrader (_sizes.py): the same runs on 3 ranks, not 4
QUICK_WORLDS = (WORLDS[0], (3, WORLDS[1][1]))
PREDICTION = "zero2_state_bytes"


# --- prediction ----------------------------------------------------------------------------------

def reference_state_bytes(num_params, world_size, param_bytes, grad_bytes, state_bytes):
    """Model state per rank at rest: every parameter, and one shard of gradients and state."""
    return param_bytes * num_params + (grad_bytes + state_bytes) * math.ceil(num_params /
                                                                            world_size)


register("zero2_state_bytes", [
    "Three kinds of model state: parameters, gradients, optimizer state. Which of them does "
    "ZeRO-2 keep whole on every rank, and which only for the rank's own shard?",
    "Every rank keeps all the parameters (forward needs them); gradients and optimizer state "
    "only for its shard of ceil(num_params / N) elements, padding included.",
])

_CASES = [(p, n, pb, gb, sb) for p in (10**6, 1117, 7) for n in (1, 2, 3, 8)
          for pb, gb, sb in ((4, 4, 8), (2, 2, 12), (8, 8, 8))]


@exercise("zero2_state_bytes")
def zero2_state_bytes(fn):
    """``fn(num_params, world_size, param_bytes, grad_bytes, state_bytes) -> int``: bytes of
    parameters, gradients and optimizer state on one rank of ZeRO-2 after the step."""
    up = lambda p, n: math.ceil(p / n)   # noqa: E731
    _compare("zero2_state_bytes", fn, _CASES, reference_state_bytes, [
        (lambda p, n, pb, gb, sb: pb * p + (gb + sb) * p / n,
         "that divides the parameters exactly; a shard is num_params / N rounded UP (the flat "
         "vector is padded to a multiple of N)"),
        (lambda p, n, pb, gb, sb: (pb + gb) * p + sb * up(p, n),
         "that is ZeRO-1: ZeRO-2 shards the gradients too"),
        (lambda p, n, pb, gb, sb: (pb + gb + sb) * up(p, n),
         "that shards the parameters too (ZeRO-3); in ZeRO-2 every rank keeps them all, forward "
         "needs them"),
        (lambda p, n, pb, gb, sb: (pb + gb + sb) * p,
         "that is DDP: every rank keeps everything"),
        (lambda p, n, pb, gb, sb: (gb + sb) * up(p, n),
         "that leaves out the parameters, which every rank keeps whole"),
        (lambda p, n, pb, gb, sb: pb * up(p, n) * n + (gb + sb) * up(p, n),
         "the model's parameters are not padded: the padding lives in the shards"),
        (lambda p, n, pb, gb, sb: pb * p + sb * up(p, n),
         "that leaves out the gradient shard, which stays allocated for the next step"),
    ])
    return ("matches: all the parameters, one shard of gradients and of optimizer state "
            "(ZeRO §5.2: 2Ψ + 14Ψ/N in mixed precision)"), {}


# --- the exercise ---------------------------------------------------------------------------------

register("zero2", [
    "Start from your ZeRO1: same shards, same optimizer over this rank's shard, same all-gather "
    "at the end of step(). What changes is WHEN the gradients are reduce-scattered and how long "
    "the full .grad tensors live: ZeRO-2 never holds them all at once. Which hook fires as soon "
    "as one parameter's gradient is ready? What can you free once a bucket has been "
    "reduce-scattered into your gradient shard?",
    "Split the parameters, in REVERSE order (backward's order), into buckets of at most "
    "bucket_bytes (a larger parameter alone). Give every bucket its slice of this rank's "
    "gradient shard: e.g. pad each bucket to a multiple of N, rank r owns slice r of each, and "
    "the shard is those slices end to end. register_post_accumulate_grad_hook on every "
    "parameter: count arrivals; when a bucket is complete, flatten its grads (padded), "
    "reduce-scatter into the bucket's slice of the gradient shard, and set each of its "
    "parameters' .grad to None.",
    "hook(p): b = self.bucket_of[p]; self.arrived[b] += 1; if complete: flat = torch.cat([q.grad."
    "reshape(-1) for q in bucket] + [zeros(pad)]); dist.reduce_scatter_single(self.grad_shard["
    "off:off + k], flat) (with async_op=True: wait for the previous bucket's handle first and "
    "drop that bucket, so that only one is in flight); for q in bucket: q.grad = None. step(): "
    "wait for the last handle; self.shard.grad = self.grad_shard / N; self.optim.step(); for "
    "each bucket all-gather its slice of self.shard into a flat buffer and copy it into its "
    "parameters; reset the counters.",
])


def _limits(run, n, k):
    """(B + padding, the backward peak allowed, shard bytes) for a step of k reduce-scatters."""
    num = _sharded.numel(run.widths)
    es = torch.empty((), dtype=run.dtype).element_size()
    bucket = max(run.bucket_bytes, max(_sharded.tensor_sizes(run.widths)) * es) + (n - 1) * es
    shard = (math.ceil(num / n) + k) * es
    allowed = shard + IN_FLIGHT * bucket + _sharded.autograd_temporaries(run.widths, run.dtype)
    return bucket, allowed, shard


def _reduce_scatters(ledgers, n, num, es):
    """(payloads during backward, payloads in step(), all-gather payloads in step()), each
    torch's or a ring's: a ring phase in step() is a reduce-scatter until every gradient
    element has been covered, an all-gather after that."""
    back, in_step = _sharded.traffic(ledgers["backward"]), _sharded.traffic(ledgers["step"])
    rs_back = back.reduce_scatter + (_sharded.ring_passes(back.sends, n) or [])
    rs_step, ag = list(in_step.reduce_scatter), list(in_step.all_gather)
    covered = sum(rs_back) + sum(rs_step)
    for payload in _sharded.ring_passes(in_step.sends, n) or []:
        if covered < num * es:
            rs_step.append(payload)
            covered += payload
        else:
            ag.append(payload)
    return rs_back, rs_step, ag


def _step_shape(ledgers_list, n, num, es):
    """(reduce-scatters per step at most, whether any ran with async_op=True, whether any
    all-reduce ran) over the counted steps of one rank."""
    most, asynchronous, reduced = 0, False, False
    for ledgers in ledgers_list:
        rs_back, rs_step, _ = _reduce_scatters(ledgers, n, num, es)
        most = max(most, len(rs_back) + len(rs_step))
        calls = ledgers["backward"] + ledgers["step"]
        asynchronous |= any(a for op, _, a, _ in calls if op == "reduce_scatter")
        reduced |= any(op == "all_reduce" for op, *_ in calls)
    return most, asynchronous, reduced


def _kept_hint(run, results, n):
    """A hint when a rank still held more than a bucket of .grad when backward returned."""
    num = _sharded.numel(run.widths)
    es = torch.empty((), dtype=run.dtype).element_size()
    whole = num * es
    for rank, result in enumerate(results):
        counted = [ledgers for _, ledgers in _sharded.counted(result)]
        k, _, reduced = _step_shape(counted, n, num, es)
        bucket, _, _ = _limits(run, n, k)
        also = (" (and all-reducing them gave every rank every summed gradient, where rank r "
                "needs only its shard: reduce-scatter each bucket instead)" if reduced else "")
        during = any(_reduce_scatters(ledgers, n, num, es)[0] for ledgers in counted)
        for step, ledgers in enumerate(result["steps"]):
            kept = ledgers["grads_after_backward"]
            if kept > bucket and during:
                return (f"in step {step} on rank {rank}, your reduce-scatters ran during "
                        f"backward, but the .grad tensors were never freed: {kept:,} bytes of "
                        f"them (the model's gradients are {whole:,}) were still there when "
                        "backward returned. Once a bucket is reduce-scattered its gradients "
                        "live on in this rank's shard: set each of its parameters' .grad to "
                        "None, so that no rank ever holds the full gradients")
            if kept > bucket:
                return (f"in step {step} on rank {rank}, when loss.backward() returned the "
                        f"model's .grad tensors still held {kept:,} bytes (all of its "
                        f"gradients: {whole:,}): ZeRO-2 frees each parameter's .grad "
                        "(p.grad = None) as soon as its bucket has been reduce-scattered into "
                        "this rank's gradient shard, during backward, so that the full "
                        "gradients never exist at once; keeping them until step() is ZeRO-1's "
                        f"memory{also}")
    return None


def _peak_hint(run, results, n):
    """A hint when a rank held more than its gradient shard and one bucket in flight during
    backward, or None."""
    num = _sharded.numel(run.widths)
    es = torch.empty((), dtype=run.dtype).element_size()
    for rank, result in enumerate(results):
        counted = [ledgers for _, ledgers in _sharded.counted(result)]
        k, asynchronous, _ = _step_shape(counted, n, num, es)
        bucket, allowed, shard = _limits(run, n, k)
        at = f"in step {len(result['steps']) - 1} on rank {rank}"
        peak = _sharded.measured(result)["backward_peak"]
        stale = _sharded.measured(result)["grads_at_start"]
        if peak <= allowed:
            continue
        if stale:
            return (f"{at}, backward held up to {peak:,} bytes of gradients and buffers, more "
                    f"than ZeRO-2 needs ({allowed:,}): the shard's .grad from the step before "
                    f"({stale:,} bytes) was still alive, a second gradient shard beside the one "
                    "your reduce-scatters fill. Keep one: clear the shard's .grad in zero_grad "
                    "(self.shard.grad = None), or make it that very buffer, divided in place "
                    "(grad_shard.div_(N); self.shard.grad = grad_shard)")
        advice = ("a reduce-scatter launched with async_op=True keeps its input bucket alive "
                  "until it is waited for: wait for each bucket's handle before launching the "
                  "next one (or soon after) and drop that bucket, so that one is in flight, not "
                  "all of them" if asynchronous else
                  "drop each bucket, and its parameters' .grad, as soon as it has been "
                  "reduce-scattered, and keep no full-size gradient buffer")
        return (f"{at}, backward held up to {peak:,} bytes of gradients and buffers; ZeRO-2 "
                f"needs this rank's gradient shard ({shard:,}), one bucket in flight "
                f"({IN_FLIGHT} x {bucket:,}, labkit/check/nb07_zero2.py says why) and "
                f"autograd's own temporaries: {allowed:,} in all, where the whole model's "
                f"gradients are {num * es:,}. {advice[0].upper()}{advice[1:]}")
    return None


def _ledger_hint(run, results, n):
    num = _sharded.numel(run.widths)
    es = torch.empty((), dtype=run.dtype).element_size()
    for rank, result in enumerate(results):
        for step, ledgers in _sharded.counted(result):
            at = f"in step {step} on rank {rank}"
            forward = _sharded.traffic(ledgers["forward"])
            if forward.reduce_scatter + forward.all_gather + forward.all_reduce or \
                    forward.others or forward.sends:
                return (f"{at}, something was communicated during forward: ZeRO-2 keeps full "
                        "parameters, so forward is the model's own; gradients exist only "
                        "from backward on")
            t = _sharded.traffic(ledgers["backward"], ledgers["step"])
            if t.all_reduce:
                return (f"{at}, {NAME} ran an all-reduce: every rank then receives every summed "
                        "gradient, where rank r needs only its shard. Reduce-scatter each "
                        "bucket into this rank's gradient shard: half an all-reduce's traffic, "
                        "and the all-gather of the parameters makes up the other half")
            if t.others:
                return (f"{at}, {NAME} ran {t.others[0]}: ZeRO-2 needs only reduce-scatters of "
                        "the gradient buckets and all-gathers of the parameters")
            if _sharded.traffic(ledgers["backward"]).all_gather:
                return (f"{at}, an all-gather ran during backward: the parameters change only "
                        "in step(), so gather them there, after the optimizer step")
    hint = _sharded.ring_problem(results, n)
    if hint:
        return hint
    for rank, result in enumerate(results):
        for step, ledgers in _sharded.counted(result):
            at = f"in step {step} on rank {rank}"
            t = _sharded.traffic(ledgers["backward"], ledgers["step"])
            phases = [{b for b, _ in t.sends[i:i + n - 1] + t.recvs[i:i + n - 1]}
                      for i in range(0, len(t.sends), n - 1)]
            uneven = next((sorted(sizes) for sizes in phases if len(sizes) > 1), None)
            if uneven:
                return (f"{at}, one phase of your ring moved chunks of {uneven} bytes: a bucket "
                        "whose size N does not divide splits into unequal chunks, and the ranks "
                        "get unequal shards. Pad each bucket to a multiple of N with zeros, so "
                        "that every rank owns the same slice of every bucket")
            rs_back, rs_step, ag = _reduce_scatters(ledgers, n, num, es)
            hint = _bucket_hint(run, n, num, es, rs_back, rs_step, ag, at)
            if hint:
                return hint
    return None


def _bucket_hint(run, n, num, es, rs_back, rs_step, ag, at):
    bucket, _, _ = _limits(run, n, 0)
    rs = rs_back + rs_step
    if not rs:
        return (f"{at}, nothing was reduce-scattered: each rank stepped with its own gradients. "
                "Reduce-scatter each bucket into this rank's gradient shard as it fills")
    if not rs_back:
        return (f"{at}, every reduce-scatter ran in step(), after backward: launch each "
                "bucket's reduce-scatter from the gradient hooks as soon as the bucket is "
                "complete, so that its gradients can be freed during backward")
    if len(rs_step) > 1:
        return (f"{at}, {len(rs_step)} reduce-scatters ran in step(): only a last bucket may "
                "wait until then; launch the others from the hooks, during backward")
    big = max(rs)
    if big > bucket:
        return (f"{at}, a reduce-scatter carried {big:,} bytes, more than a bucket: "
                f"bucket_bytes={run.bucket_bytes:,} (a single larger parameter is a bucket of "
                f"its own, here at most {bucket:,} bytes with padding). Pack the gradients into "
                "buckets of at most bucket_bytes and reduce-scatter each as soon as it is "
                "complete")
    low, high = num * es, (num + len(rs) * (n - 1)) * es
    if not low <= sum(rs) <= high:
        return (f"{at}, the reduce-scatters carried {sum(rs):,} bytes in all; the gradients are "
                f"{low:,} ({num} elements of {es} bytes), plus at most N-1 elements of padding "
                "per reduce-scatter: reduce-scatter every gradient exactly once per step")
    if not ag:
        return (f"{at}, no all-gather: each rank updated only its own shard, and the other "
                "ranks' shards of the parameters stay stale. In step(), after the optimizer "
                "step, all-gather the updated shard(s) back into the parameters")
    high = (num + len(ag) * (n - 1)) * es
    if not low <= sum(ag) <= high:
        return (f"{at}, the all-gathers carried {sum(ag):,} bytes in all; the parameters are "
                f"{low:,}, plus at most N-1 elements of padding per all-gather: all-gather "
                "every parameter exactly once per step")
    return None


def _diagnose(run, results, n):
    hint = _sharded.loop_hint(results, NAME)
    if hint:
        return hint, None
    hint = _kept_hint(run, results, n) or _ledger_hint(run, results, n) or \
        _peak_hint(run, results, n)
    if hint:
        return hint, None
    hint, diff = _sharded.values_hint(run, results, n, contiguous=False)
    if hint:
        return hint, None
    num = _sharded.numel(run.widths)
    es = torch.empty((), dtype=run.dtype).element_size()
    buckets = max(_step_shape([l for _, l in _sharded.counted(r)], n, num, es)[0]
                  for r in results)
    return _sharded.optimizer_hint(run, results, n, buckets=buckets), diff


@exercise("zero2", sizes=True)
def zero2(cls, *, timeout: float = 20.0):
    """``cls(params, optimizer_class, bucket_bytes=..., **kwargs)``: ZeRO-2 (module docstring)."""
    ranks = Ranks("zero2", timeout=timeout, budget=2.5 * timeout,
                  crash_advice=_sharded.crash_advice, hang_advice=_sharded.hang_advice)
    figures, worst, shown = {}, {}, None
    worlds = _sizes.pick(WORLDS, QUICK_WORLDS)
    (a, _), (b, _) = worlds
    for n, cases in worlds:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        runs = []
        for widths, dtype, optimizer, cap in cases:
            es = torch.empty((), dtype=dtype).element_size()
            runs.append(_sharded.fresh_run(widths, n, dtype, optimizer, generator,
                                           bucket_bytes=cap * es))
        trained = _sharded.train_everywhere(ranks, _sharded.train_on_rank, n, cls, runs, NAME)
        for run, results in zip(runs, trained):
            hint, diff = _diagnose(run, results, n)
            if hint:
                raise Failed(f"on {n} ranks, with {run.label} and "
                             f"bucket_bytes={run.bucket_bytes}: {hint}")
            worst[n] = max(worst.get(n, 0.0), diff)
            key = f"{n} ranks, {run.label}, bucket_bytes={run.bucket_bytes}"
            num = _sharded.numel(run.widths)
            es = torch.empty((), dtype=run.dtype).element_size()
            peak = max(_sharded.measured(r)["backward_peak"] for r in results)
            rest = _sharded.measured(results[0])["rest"]
            last = _sharded.counted(results[0])[-1][1]
            rs_back, rs_step, ag = _reduce_scatters(last, n, num, es)
            sent = sum(theory.wire_bytes("reduce_scatter", b, n) for b in rs_back + rs_step) + \
                sum(theory.wire_bytes("all_gather", b, n) for b in ag)
            figures[f"{key}: reduce-scatters during backward"] = len(rs_back)
            figures[f"{key}: peak gradient bytes during backward"] = peak
            figures[f"{key}: full gradient bytes"] = num * es
            figures[f"{key}: model state bytes per rank at rest"] = (
                rest["params"] + rest["grads"] + rest["optimizer"] + rest["other"])
            figures[f"{key}: bytes sent per rank per step"] = sent
            figures[f"{key}: DDP's all-reduce, bytes sent per rank"] = theory.wire_bytes(
                "all_reduce", num * es, n)
            if n == a and run.optimizer == "SGD":
                shown = (n, num, peak, num * es, len(rs_back), sent,
                         theory.wire_bytes("all_reduce", num * es, n))
        figures[f"{n} ranks: largest difference from one process"] = worst[n]
    summary = (f"on {a} ranks (MLP of 2125 parameters) and {b} (1117), SGD with momentum and "
               f"Adam, float32 and float64, two bucket sizes, {_sharded.STEPS} steps: equal to "
               f"one process (largest difference {worst[a]:.1e} and {worst[b]:.1e}); "
               "reduce-scatters during backward, each at most a bucket, .grad freed as they go; "
               "one all-gather's worth after; no all-reduce; gradients and optimizer state 1/N "
               "per rank")
    if shown and attempted(PREDICTION):
        n, num, peak, full, count, sent, ddp = shown
        summary += (f"; on {n} ranks ({num} float32 parameters): gradient memory peaked at "
                    f"{peak:,} bytes against {full:,} of full gradients, {count} "
                    f"reduce-scatters in backward, {sent:,.0f} bytes sent per rank per step "
                    f"(DDP: {ddp:,.0f})")
    elif shown:
        summary += f"; the measured bytes per rank show here once you have predicted them " \
                   f"({PREDICTION})"
    return summary, figures
