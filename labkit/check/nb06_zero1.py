"""Notebook 06: ZeRO-1, optimizer-state partitioning (``ZeRO1``), and two predictions
(``zero1_optimizer_bytes``, ``zero1_wire_bytes``).

``ZeRO1(params, optimizer_class, **kwargs)`` is built like torch's ZeroRedundancyOptimizer on
every rank: it flattens the parameters into one vector, pads it with zeros to a multiple of N, and
rank r owns the r-th of N equal contiguous shards; ``self.optim = optimizer_class([shard],
**kwargs)`` steps that shard only. ``step()``, after ``loss.backward()``, reduce-scatters the
flat gradients into the shard, divides by N, steps the shard and all-gathers the shards back into
the parameters; ``zero_grad(set_to_none=True)`` clears the model's gradients.

What ``zero1(ZeRO1)`` asserts (``_sharded.py`` trains the class: fresh weights, the same on every
rank, and fresh data for every run; three steps), on 2 ranks (SGD with momentum in float32 on the
MLP 7-12-5, Adam in float64 on the MLP 7-12-9-5) and on 4 ranks (the same two models with the
optimizers and dtypes swapped); N divides neither parameter count (161 and 263). The hint
names the first problem found, in this order:
* ``zero_grad(set_to_none=True)`` leaves no .grad on the model;
* no collective during forward; in each step the ledger watches (all but the last, which is
  measured), backward and ``step()`` together make one
  reduce-scatter and one all-gather, each of the padded flat buffer (ceil(numel/N)·N elements of
  the parameters' dtype), and nothing else (no all-reduce, no broadcast). A learner's ring of
  notebook 01 counts the same: send/recv only to (r+1)%N and from (r-1)%N, every message one shard,
  2(N-1) sends per step (N-1 for each of the two ring phases);
* every parameter on every rank equals one process trained with ``optimizer_class`` over
  ``model.parameters()`` on the global batch, within ``_sharded``'s tolerance (derived there;
  Adam runs with eps = 0.1 so that rounding cannot be amplified). Wrong values are matched with
  the usual mistakes: elements that never change (the tail cut off without padding, shards of
  other ranks never written back), no division by N (or two), a shard stepped with another
  shard's gradient or put back in the wrong place (one optimizer step of every shard with every
  shard's gradient is tried), something carried over between steps;
* optimizer state at rest after the last step (a ``MemoryTracer`` handed every torch optimizer
  that stepped on the rank, so that state kept by a second, hidden optimizer counts too): between
  the state of floor(numel/N) and of ceil(numel/N) elements (``_sharded.state_bytes``: Adam
  2·s·itemsize + 4, SGD's momentum s·itemsize), the same on every rank (unequal state is an
  uneven partition).
Crashes and hangs are placed in a run and a phase (construction, a step's forward, backward or
step) from the ranks' progress files.

Predictions (no ranks): ``zero1_optimizer_bytes(num_params, world_size, state_bytes_per_param)``
= ceil(num_params / N) · state_bytes_per_param, and ``zero1_wire_bytes(num_params, world_size,
elem_bytes)`` = 2(N-1)/N · padded · elem_bytes with padded = ceil(num_params / N) · N: one ring
reduce-scatter and one ring all-gather of the padded buffer (ZeRO §7.2.1; ``labkit.theory``'s ring
model), each compared on a grid with the usual mistakes named.
"""
import math
import secrets

import torch

from labkit import theory
from labkit.check import _sharded, _sizes
from labkit.check._core import Failed, Ranks, attempted, exercise
from labkit.check._hints import register
from labkit.check._sharded import SMALL, THREE
from labkit.check.predictions import _compare

NAME = "ZeRO1"
WORLDS = ((2, ((SMALL, torch.float32, "SGD"), (THREE, torch.float64, "Adam"))),
          (4, ((THREE, torch.float64, "SGD"), (SMALL, torch.float32, "Adam"))))
# LABKIT_AUTOGRADE_SIZES=quick under nbgrader (_sizes.py): the same runs on 3 ranks, not 4
QUICK_WORLDS = (WORLDS[0], (3, WORLDS[1][1]))
PREDICTIONS = ("zero1_optimizer_bytes", "zero1_wire_bytes")


# --- predictions ---------------------------------------------------------------------------------

def reference_optimizer_bytes(num_params, world_size, state_bytes_per_param):
    """Optimizer state per rank: one shard of the padded flat vector."""
    return math.ceil(num_params / world_size) * state_bytes_per_param


def reference_wire_bytes(num_params, world_size, elem_bytes):
    """Bytes one rank sends per step: a ring reduce-scatter of the padded flat gradients and a
    ring all-gather of the padded flat parameters, (N-1)/N of the buffer each."""
    size = math.ceil(num_params / world_size) * world_size * elem_bytes
    return (theory.wire_bytes("reduce_scatter", size, world_size)
            + theory.wire_bytes("all_gather", size, world_size))


register("zero1_optimizer_bytes", [
    "Which elements' optimizer state does one rank keep? How many elements is that, once the "
    "flat vector is padded so that it splits into N equal shards?",
    "One shard: the padded flat vector has ceil(num_params / N) * N elements, a rank owns 1/N "
    "of them, and each element costs state_bytes_per_param bytes of state.",
])
register("zero1_wire_bytes", [
    "Which two collectives does one step of ZeRO-1 run, and on how big a buffer? Your "
    "ring_bytes_per_rank of notebook 01 counted one all-reduce; how does it split into phases?",
    "A reduce-scatter of the padded flat gradients, then an all-gather of the padded flat "
    "parameters: each sends (N-1)/N of the buffer per rank on a ring. The buffer is "
    "ceil(num_params / N) * N elements of elem_bytes bytes.",
])

_N_P_B = [(p, n, b) for p in (10**6, 1001, 161, 7) for n in (1, 2, 3, 4, 8) for b in (4, 8, 12)]


@exercise("zero1_optimizer_bytes")
def zero1_optimizer_bytes(fn):
    """``fn(num_params, world_size, state_bytes_per_param) -> int``: optimizer-state bytes on one
    rank of ZeRO-1, padding included."""
    _compare("zero1_optimizer_bytes", fn, _N_P_B, reference_optimizer_bytes, [
        (lambda p, n, b: p / n * b,
         "that divides the parameters exactly; the flat vector is padded to a multiple of N, so "
         "a rank's shard is num_params / N rounded UP"),
        (lambda p, n, b: p // n * b,
         "rounded down: the padding makes every shard num_params / N rounded UP"),
        (lambda p, n, b: p * b,
         "that is the whole model's optimizer state: in ZeRO-1 each rank keeps it only for its "
         "own shard"),
        (lambda p, n, b: math.ceil(p / n) * n * b,
         "that is the state of the whole padded vector, on all ranks together; one rank keeps "
         "1/N of it"),
        (lambda p, n, b: math.ceil(p / n),
         "that counts elements: multiply by the bytes of state per element"),
    ])
    return "matches: one shard of the padded flat vector, ceil(num_params / N) elements", {}


@exercise("zero1_wire_bytes")
def zero1_wire_bytes(fn):
    """``fn(num_params, world_size, elem_bytes) -> float``: bytes one rank sends per step of
    ZeRO-1 (ring model)."""
    pad = lambda p, n: math.ceil(p / n) * n   # noqa: E731
    _compare("zero1_wire_bytes", fn, _N_P_B, reference_wire_bytes, [
        (lambda p, n, b: 2 * (n - 1) / n * p * b,
         "that leaves out the padding: both collectives move the flat buffer padded to a "
         "multiple of N"),
        (lambda p, n, b: 4 * (n - 1) / n * pad(p, n) * b,
         "that counts 2(N-1)/N for each collective: that is an all-reduce's factor. A "
         "reduce-scatter and an all-gather each send (N-1)/N of the buffer; together they send "
         "what ONE all-reduce sends (ZeRO §7.2.1)"),
        (lambda p, n, b: 2 * pad(p, n) * b,
         "that is the payload (N = 1 sends nothing at all) or N where N-1 belongs: on a ring "
         "each rank sends N-1 of the N shards in each phase"),
        (lambda p, n, b: (n - 1) / n * pad(p, n) * b,
         "that is one collective; a step runs two: the reduce-scatter of the gradients and the "
         "all-gather of the parameters"),
        (lambda p, n, b: 2 * (n - 1) / n * pad(p, n),
         "that counts elements: multiply by elem_bytes"),
        (lambda p, n, b: 2 * (n - 1) * pad(p, n) * b,
         "that sends the whole buffer at every ring step; a ring step sends one shard"),
        (lambda p, n, b: 3 * (n - 1) / n * pad(p, n) * b,
         "that is an all-reduce plus an all-gather (DeepSpeed's first ZeRO-1, torch's "
         "ZeroRedundancyOptimizer with DDP: 1.5x DDP); a reduce-scatter is enough for the "
         "gradients"),
    ])
    return "matches: 2(N-1)/N of the padded flat buffer, the same as DDP's all-reduce", {}


# --- the exercise ---------------------------------------------------------------------------------

register("zero1", [
    "Picture one flat vector of every parameter, padded with zeros so that it cuts into N equal "
    "shards; rank r owns shard r and keeps optimizer state for it alone. After backward, what "
    "does rank r need from the others: all their gradients, or only the sum of their gradients "
    "for ITS shard? Which collective gives exactly that? And after rank r has stepped its "
    "shard, which collective gives every rank every updated shard?",
    "__init__: params = list(params); the flat vector torch.cat([p.detach().reshape(-1) ...]) "
    "padded with zeros to s * N elements, s = ceil(numel / N); self.shard = "
    "torch.nn.Parameter(flat[r*s:(r+1)*s].clone()); self.optim = optimizer_class([self.shard], "
    "**kwargs). step(): the flat gradient in the same layout (padded too), a reduce-scatter "
    "into a buffer of s elements, divided by N, as self.shard.grad; self.optim.step(); an "
    "all-gather of self.shard into a flat buffer of s * N, and each parameter's slice copied "
    "back into it.",
    "step(): g = torch.cat([p.grad.reshape(-1) for p in self.params]); g = torch.cat([g, "
    "g.new_zeros(self.s * N - g.numel())]); mine = g.new_empty(self.s); "
    "dist.reduce_scatter_single(mine, g) (or labkit.compat.reduce_scatter_tensor, or your "
    "ring_reduce_scatter(g) and mine = g[r*s:(r+1)*s]); self.shard.grad = mine / N; "
    "self.optim.step(); full = g.new_empty(self.s * N); "
    "dist.all_gather_single(full, self.shard.detach()); then with torch.no_grad(), for each p: "
    "p.copy_(full[offset:offset + p.numel()].view_as(p)). zero_grad: p.grad = None for each p.",
])


def _ledger_hint(run, results, n):
    """A hint when some step's communication is not one reduce-scatter and one all-gather of
    the padded flat buffer, or None."""
    num = _sharded.numel(run.widths)
    es = torch.empty((), dtype=run.dtype).element_size()
    s = math.ceil(num / n)
    buffer = s * n * es
    for rank, result in enumerate(results):
        for step, ledgers in _sharded.counted(result):
            at = f"in step {step} on rank {rank}"
            forward = _sharded.traffic(ledgers["forward"])
            used = forward.reduce_scatter + forward.all_gather + forward.all_reduce
            if used or forward.others or forward.sends:
                return (f"{at}, something was communicated during forward: ZeRO-1 keeps full "
                        "parameters on every rank, so forward is the model's own; the "
                        "collectives belong in step()")
            t = _sharded.traffic(ledgers["backward"], ledgers["step"])
            if t.all_reduce:
                return (f"{at}, {NAME} ran an all-reduce: every rank then holds every summed "
                        "gradient, but rank r steps only shard r. A reduce-scatter leaves each "
                        "rank just its shard of the sum and sends (N-1)/N of the buffer per "
                        "rank, half an all-reduce; with the all-gather of the parameters that "
                        "is exactly DDP's traffic (ZeRO §7.2.1), where all-reduce + all-gather "
                        "costs 1.5x (DeepSpeed's first ZeRO-1 did that)")
            if t.others:
                op = t.others[0]
                why = {"broadcast": ("each owner broadcasting its shard is torch's "
                                     "ZeroRedundancyOptimizer; ONE all-gather gives every rank "
                                     "every shard"),
                       "reduce": ("a reduce gives the sum to one rank; a reduce-scatter gives "
                                  "every rank the sum of its own shard, in one collective")}
                return (f"{at}, {NAME} ran {op}: "
                        + why.get(op, "ZeRO-1 needs only a reduce-scatter of the gradients "
                                      "and an all-gather of the parameters"))
    hint = _sharded.ring_problem(results, n)
    if hint:
        return hint
    for rank, result in enumerate(results):
        for step, ledgers in _sharded.counted(result):
            at = f"in step {step} on rank {rank}"
            t = _sharded.traffic(ledgers["backward"], ledgers["step"])
            hint = _message_hint(t, num, n, s, es, at) or _count_hint(t, n, at) or \
                _payload_hint(t, num, n, s, es, buffer, at, run.dtype)
            if hint:
                return hint
    return None


def _uneven(num, n, s):
    return (f"{num} elements cut into {n} unequal shards: pad the flat vector with zeros to a "
            f"multiple of N ({s * n} here) so that every rank owns exactly ceil({num} / {n}) = "
            f"{s} elements: equal shards share memory and work equally, and are what "
            "reduce_scatter_single and all_gather_single take")


def _message_hint(t, num, n, s, es, at):
    sizes = sorted({b for b, _ in t.sends})
    if not sizes or sizes == [s * es]:
        return None
    if set(sizes) <= {num // n * es, math.ceil(num / n) * es} and len(sizes) > 1:
        return f"{at}, your ring sent messages of {sizes} bytes: {_uneven(num, n, s)}"
    if max(sizes) >= s * n * es:
        return (f"{at}, your ring sent the whole flat buffer in one message ({max(sizes):,} "
                f"bytes): a ring step sends one shard ({s * es:,} bytes)")
    return (f"{at}, your ring sent messages of {sizes} bytes; a shard of the padded flat buffer "
            f"is {s} elements, {s * es:,} bytes: run the ring on the padded flat vector")


def _count_hint(t, n, at):
    passes = _sharded.ring_passes(t.sends, n) or []
    rs, ag = len(t.reduce_scatter), len(t.all_gather)
    if rs + ag + len(passes) == 2 and rs <= 1 and ag <= 1:
        return None
    if not (rs or ag or passes):
        return (f"{at}, nothing was communicated after backward: each rank stepped with its own "
                "gradients only. step() must reduce-scatter the gradients and all-gather the "
                "updated shards")
    if rs > 1 or ag > 1:
        what = "reduce-scatters" if rs > 1 else "all-gathers"
        return (f"{at}, {max(rs, ag)} {what}: flatten every parameter into ONE padded buffer "
                "and run one reduce-scatter of the gradients and one all-gather of the "
                "parameters per step (each collective pays a latency)")
    if len(passes) == 3 and not (rs or ag):
        return (f"{at}, your ring ran {3 * (n - 1)} sends, three phases of N-1: a ring "
                "all-reduce (reduce-scatter + all-gather) of the gradients and an all-gather of "
                "the parameters. The gradients need only the reduce-scatter: rank r uses only "
                "its own shard of the sum")
    if rs + ag + len(passes) == 1:
        if ag:
            return (f"{at}, an all-gather but no reduce-scatter: the gradients were never summed "
                    "over the ranks. Reduce-scatter the flat gradients before the optimizer "
                    "step")
        return (f"{at}, a reduce-scatter but no all-gather: after the step each rank holds "
                "only its own updated shard, and the other ranks' shards of its parameters "
                "stay stale. All-gather every rank's shard back into the parameters")
    return (f"{at}, {rs} reduce-scatter(s), {ag} all-gather(s) and {len(passes)} ring phase(s): "
            "one reduce-scatter of the gradients and one all-gather of the parameters per step")


def _payload_hint(t, num, n, s, es, buffer, at, dtype):
    passes = _sharded.ring_passes(t.sends, n) or []
    for what, payload in ([("reduce-scatter", b) for b in t.reduce_scatter]
                          + [("all-gather", b) for b in t.all_gather]
                          + [("ring phase", b) for b in passes]):
        if payload == buffer:
            continue
        head = (f"{at}, the {what} carried {payload:,} bytes; the padded flat buffer is "
                f"{buffer:,} ({s * n} elements of {es} bytes)")
        if payload == num * es:
            return f"{head}: that is the flat vector without padding. {_uneven(num, n, s)}"
        if payload == num // n * n * es:
            return (f"{head}: shards of {num} // {n} = {num // n} elements leave the last "
                    f"{num % n} out. Pad the flat vector with zeros to a multiple of N")
        if 2 * payload == buffer or payload == 2 * buffer:
            return (f"{head}: a buffer in the wrong dtype. torch.zeros(k) and torch.empty(k) "
                    f"are float32 whatever the model is; make every buffer in the parameters' "
                    f"dtype ({str(dtype).split('.')[-1]})")
        return f"{head}: reduce-scatter the whole padded flat gradient, all-gather the whole " \
               "padded flat parameters"
    return None


def _diagnose(run, results, n):
    """(hint or None, largest difference) for one run on n ranks."""
    hint = _sharded.loop_hint(results, NAME)
    if hint:
        return hint, None
    hint = _ledger_hint(run, results, n)
    if hint:
        return hint, None
    hint, diff = _sharded.values_hint(run, results, n)
    if hint:
        return hint, None
    return _sharded.optimizer_hint(run, results, n), diff


def _wire(ledgers, n):
    """Bytes this rank sent in one step (the ring model for collectives, sends as they are)."""
    t = _sharded.traffic(ledgers["backward"], ledgers["step"])
    return (sum(theory.wire_bytes("reduce_scatter", b, n) for b in t.reduce_scatter)
            + sum(theory.wire_bytes("all_gather", b, n) for b in t.all_gather)
            + sum(b for b, _ in t.sends))


@exercise("zero1", sizes=True)
def zero1(cls, *, timeout: float = 15.0):
    """``cls(params, optimizer_class, **kwargs)``: ZeRO-1 (module docstring)."""
    ranks = Ranks("zero1", timeout=timeout, budget=3 * timeout,
                  crash_advice=_sharded.crash_advice, hang_advice=_sharded.hang_advice)
    figures, worst, shown = {}, {}, None
    worlds = _sizes.pick(WORLDS, QUICK_WORLDS)
    (a, _), (b, _) = worlds
    for n, cases in worlds:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        runs = [_sharded.fresh_run(widths, n, dtype, optimizer, generator)
                for widths, dtype, optimizer in cases]
        trained = _sharded.train_everywhere(ranks, _sharded.train_on_rank, n, cls, runs, NAME)
        for run, results in zip(runs, trained):
            hint, diff = _diagnose(run, results, n)
            if hint:
                raise Failed(f"on {n} ranks, with {run.label}: {hint}")
            worst[n] = max(worst.get(n, 0.0), diff)
            num = _sharded.numel(run.widths)
            state = _sharded.optimizer_bytes(results)[0]
            full = sum(_sharded.state_bytes(run.optimizer, run.options, k, run.dtype)
                       for k in _sharded.tensor_sizes(run.widths))
            sent = _wire(_sharded.counted(results[0])[-1][1], n)
            key = f"{n} ranks, {run.label}"
            figures[f"{key}: optimizer state bytes per rank"] = state
            figures[f"{key}: optimizer state bytes of one process"] = full
            figures[f"{key}: bytes sent per rank per step"] = sent
            if n == b and run.optimizer == "SGD":
                shown = (n, run, num, state, full, sent)
        figures[f"{n} ranks: largest difference from one process"] = worst[n]
    summary = (f"on {a} and {b} ranks (SGD with momentum and Adam, float32 and float64, MLPs of "
               f"161 and 263 parameters), {_sharded.STEPS} steps: equal to one process (largest "
               f"difference {worst[a]:.1e} and {worst[b]:.1e}); each step one reduce-scatter "
               "and one all-gather of the padded flat buffer, no all-reduce; optimizer state 1/N "
               "per rank")
    if shown and attempted(*PREDICTIONS):
        n, run, num, state, full, sent = shown
        dtype = str(run.dtype).split(".")[-1]
        summary += (f"; on {n} ranks with {num} {dtype} parameters and SGD: {state:,} bytes of "
                    f"optimizer state per rank (one process: {full:,}), {sent:,.0f} bytes sent "
                    "per rank per step")
    elif shown:
        summary += ("; the bytes of state and traffic per rank show here once you have "
                    f"predicted them ({', '.join(PREDICTIONS)})")
    return summary, figures
