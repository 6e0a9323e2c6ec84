"""Notebook 08: ZeRO-3, parameter sharding (``ZeRO3``, checked with and without prefetch), and one
prediction (``zero3_bytes_per_step``).

``ZeRO3(module, optimizer_class, *, prefetch=False, **kwargs)`` wraps an ``nn.Sequential`` whose
children are the units, and is also the optimizer. At construction each unit's parameters are
flattened into one vector padded to a multiple of N; rank r keeps the r-th slice (a shard, an
``nn.Parameter``) and frees the full parameters; ``self.optim = optimizer_class(shards,
**kwargs)``. ``forward`` all-gathers each unit before it runs and frees it after; backward
all-gathers each unit again before its backward and, after it, reduce-scatters the unit's padded
flat gradient into the shard's .grad and frees the full parameters and gradients; ``step()``
waits for what is outstanding, divides by N and steps the shards. With ``prefetch=True`` the
all-gather of the next unit (unit i+1 in forward, i-1 in backward) starts with ``async_op=True``
before the current unit runs. ``full_state_dict()`` returns every full parameter by name
(gathered), on every rank: the grader reads the trained values through it.

What ``zero3(ZeRO3)`` asserts (``_sharded.train_module_on_rank``; fresh weights, the same on every
rank, fresh data, three steps; the wrapper built with ``prefetch=False``): on 2 ranks with SGD
with momentum in float32 and Adam in float64, on 4 ranks with the dtypes swapped, the model
``_sharded.UNITS``: nine units of 35 to 165 parameters (961 in all), each of a size neither 2 nor
4 divides, all distinct once padded, so that a payload names its unit. In the order the hint
names the first problem found, on every rank:
* the loop runs: ``step``, ``zero_grad``, ``full_state_dict`` exist, ``zero_grad(set_to_none=True)``
  leaves no .grad on the model or the shards;
* ``self.optim`` is over the shards: its parameters hold fewer elements than the model
  (an optimizer over ``module.parameters()`` is named);
* ``full_state_dict()`` right after construction is the initial weights (a rank keeping another
  rank's slice is named);
* when backward returns, the model's .grad tensors hold at most one unit (U = the largest padded
  unit's bytes): each unit's full gradients are freed once reduce-scattered;
* memory, in the last step (a ``MemoryTracer`` sampled at each unit's forward start and end and
  before and after the wrapper's backward pre-hooks, sizes re-read, so a storage resized to 0
  counts 0): parameter bytes never exceed shards + k·U, k = 1 (2 for ``zero3_prefetch``): the
  shards (the sum over units of ceil(size / N) elements) and k units in flight. That is exact:
  the valid designs of tests/test_nb08_check.py reach 1.00·U without prefetch (the largest unit
  gathered) and 1.82·U with it (the two largest neighbours); a wrapper that never frees holds
  the whole model, 5.8·U. Everything the rank holds besides gradients and optimizer state
  (parameters, activations, autograd's and the wrapper's buffers) stays within shards + H +
  (k + 2)·U, H what the unsharded model holds besides its parameters at the same moments
  (``_sharded.plain_hidden``), the two more units for gradient buffers (the padded flat gradient
  being reduce-scattered, the one before it still in flight with ``async_op=True``); the
  designs reach 0.96 to 2.23·U (2.84·U with prefetch). This is what catches ``p.data =
  torch.empty(0)`` as the way to free a gathered unit: autograd keeps the weights it saved for
  backward (a Linear saves a view of its weight), so the memory stays; ``untyped_storage().
  resize_(0)`` frees it whoever holds a view. At rest after ``step()`` and ``zero_grad``, the
  parameter bytes are the shards' exactly, and everything else but optimizer state is at most U;
* the ledger of steps 0 and 1 (torch's collectives, or notebook 01's ring of send/recv: N-1
  sends of one chunk to (r+1)%N per phase): forward all-gathers each unit once, its padded flat
  parameters; backward all-gathers each unit once more (the last unit may skip it when it stayed
  gathered from its forward, as FSDP2 does: it does not reshard the last unit) and
  reduce-scatters each unit's padded flat gradient once; ``step()`` communicates nothing; no
  all-reduce. So a step sends 3(N-1)/N of the padded parameters per rank, 1.5x DDP's all-reduce
  (ZeRO §7.2.2), a little less when the last unit's backward gather is skipped;
* every parameter equals one process trained with ``optimizer_class`` over
  ``model.parameters()`` on the global batch (``_sharded``'s tolerance; a unit's tail left out
  by an unpadded partition and a missing or double division by N are named);
* optimizer state at rest as in notebook 06, with one shard per unit.

``zero3_prefetch(ZeRO3)`` trains with ``prefetch=True`` (2 ranks, Adam in float32; 4 ranks, SGD
with momentum in float64) and asserts all of the above with k = 2, and that the all-gathers are
launched ahead: the harness's forward pre-hook and forward hook on each unit place it in the
ledger, and unit i+1's all-gather is issued, with ``async_op=True``, before unit i's forward has
finished (for every i); in backward, unit i-1's before unit i-1's backward begins (the harness's
backward pre-hook, which runs before the wrapper's). The plain check passes a correct prefetch
too (k = 1 is then not asked of it: ``zero3`` builds with ``prefetch=False``).

Prediction (no ranks): ``zero3_bytes_per_step(num_params, world_size, elem_bytes)`` = 3(N-1)/N ·
padded · elem_bytes, padded = ceil(num_params / N) · N, for one unit: two ring all-gathers and
one ring reduce-scatter of the padded flat buffer.
"""
import collections
import math
import secrets

import torch

from labkit import theory
from labkit.check import _sharded, _sizes
from labkit.check._core import Failed, Ranks, attempted, exercise
from labkit.check._hints import register
from labkit.check.predictions import _compare

NAME = "ZeRO3"
UNITS = _sharded.UNITS
WORLDS = ((2, ((torch.float32, "SGD"), (torch.float64, "Adam"))),
          (4, ((torch.float64, "SGD"), (torch.float32, "Adam"))))
PREFETCH_WORLDS = ((2, ((torch.float32, "Adam"),)), (4, ((torch.float64, "SGD"),)))
# LABKIT_AUTOGRADE_SIZES=quick under nbgrader (_sizes.py): the same runs on 3 ranks, not 4
QUICK_WORLDS = (WORLDS[0], (3, WORLDS[1][1]))
QUICK_PREFETCH_WORLDS = (PREFETCH_WORLDS[0], (3, PREFETCH_WORLDS[1][1]))
GRADIENT_BUFFERS = 2   # units' worth of gradient buffers allowed besides the units in flight
PREDICTION = "zero3_bytes_per_step"


# --- prediction ----------------------------------------------------------------------------------

def reference_bytes_per_step(num_params, world_size, elem_bytes):
    """Bytes one rank sends per step for one unit: two ring all-gathers of the padded flat
    parameters (forward, backward) and one ring reduce-scatter of the padded flat gradient."""
    size = math.ceil(num_params / world_size) * world_size * elem_bytes
    return (2 * theory.wire_bytes("all_gather", size, world_size)
            + theory.wire_bytes("reduce_scatter", size, world_size))


register("zero3_bytes_per_step", [
    "List the collectives one unit goes through in a step: how many times are its parameters "
    "gathered, and how many times are its gradients reduced? On how big a buffer?",
    "Forward all-gathers the unit, backward all-gathers it again (it was freed after forward), "
    "then reduce-scatters its gradient: three ring phases, each sending (N-1)/N of the flat "
    "buffer padded to ceil(num_params / N) * N elements.",
])

_CASES = [(p, n, b) for p in (10**6, 1001, 165, 7) for n in (1, 2, 3, 4, 8) for b in (2, 4, 8)]


@exercise("zero3_bytes_per_step")
def zero3_bytes_per_step(fn):
    """``fn(num_params, world_size, elem_bytes) -> float``: bytes one rank sends per step of
    ZeRO-3 for one unit (ring model)."""
    pad = lambda p, n: math.ceil(p / n) * n   # noqa: E731
    _compare("zero3_bytes_per_step", fn, _CASES, reference_bytes_per_step, [
        (lambda p, n, b: 3 * (n - 1) / n * p * b,
         "that leaves out the padding: every collective moves the unit's flat buffer padded to a "
         "multiple of N"),
        (lambda p, n, b: 2 * (n - 1) / n * pad(p, n) * b,
         "that is DDP's all-reduce, or ZeRO-1 and ZeRO-2 (a reduce-scatter and ONE all-gather): "
         "ZeRO-3 frees the parameters after forward, so backward gathers them a second time"),
        (lambda p, n, b: 3 * pad(p, n) * b,
         "that is the payload (N = 1 sends nothing at all): on a ring each rank sends N-1 of the "
         "N shards in each phase"),
        (lambda p, n, b: (n - 1) / n * pad(p, n) * b,
         "that is one collective; a unit goes through three in a step"),
        (lambda p, n, b: 4 * (n - 1) / n * pad(p, n) * b,
         "that counts an all-reduce of the gradients (2(N-1)/N) where a reduce-scatter is "
         "enough: rank r keeps only its shard of the summed gradient"),
        (lambda p, n, b: 3 * (n - 1) / n * pad(p, n),
         "that counts elements: multiply by elem_bytes"),
        (lambda p, n, b: 3 * (n - 1) * pad(p, n) * b,
         "that sends the whole buffer at every ring step; a ring step sends one shard"),
    ])
    return ("matches: 3(N-1)/N of the padded unit, 1.5x what DDP's all-reduce sends (ZeRO "
            "§7.2.2)"), {}


# --- the exercise ---------------------------------------------------------------------------------

register("zero3", [
    "ZeRO-1 sharded the optimizer state, ZeRO-2 the gradients too; now the parameters. Each rank "
    "keeps 1/N of every unit. Which collective gives a unit back its full parameters just before "
    "it runs? Once it has run, what can you throw away, and what will backward need again?",
    "__init__: for each unit, flatten its parameters into one vector padded to a multiple of N, "
    "keep slice r as an nn.Parameter shard (a clone), and free the full parameters. forward: for "
    "each unit, all-gather its flat parameters, point its parameters at slices of the gathered "
    "buffer, run it, free the buffer. Before each unit's backward (register_full_backward_pre_"
    "hook), gather it again; once all its gradients are in (register_post_accumulate_grad_hook), "
    "reduce-scatter the padded flat gradient into the shard's .grad, then free the gradients "
    "and the gathered buffer. step(): shard.grad / N, self.optim.step().",
    "Free with storage, not with references: autograd keeps views of the weights it saved for "
    "backward, so p.data = torch.empty(0) leaves the gathered memory alive. Keep one flat buffer "
    "per unit, full = shard.new_empty(s * N), make each parameter a view "
    "(p.data = full[o:o + k].view_as(p)), and free with full.untyped_storage().resize_(0); to "
    "gather, resize it back (resize_(full.numel() * full.element_size())) and "
    "all_gather_into_tensor(full, shard). The saved views then see the gathered values again in "
    "backward.",
])
register("zero3_prefetch", [
    "While unit i computes, the network is idle. Which all-gather could already be on its way, "
    "and how do you start a collective without waiting for it?",
    "In forward, before running unit i, start unit i+1's all-gather with async_op=True and keep "
    "the handle; before unit i+1 runs, handle.wait(). In backward (the full backward pre-hook of "
    "unit i), wait for unit i's handle if it has one, then start unit i-1's. Two units are in "
    "flight at most: free unit i after its forward (its backward) as before.",
])


def _es(run):
    return torch.empty((), dtype=run.dtype).element_size()


class _Sizes:
    """Byte counts of one run on n ranks."""

    def __init__(self, run, n):
        es = _es(run)
        self.units = _sharded.unit_sizes(run.widths)
        self.padded = [math.ceil(k / n) * n * es for k in self.units]
        self.bare = [k * es for k in self.units]
        self.shards = sum(math.ceil(k / n) for k in self.units) * es
        self.unit = max(self.padded)
        self.num = sum(self.units)
        self.es = es

    def which(self, payload):
        """The unit whose padded flat buffer has ``payload`` bytes, or None."""
        return self.padded.index(payload) if payload in self.padded else None


def _names(sizes, payloads):
    return ", ".join(f"{b:,}" for b in payloads[:6]) + (", ..." if len(payloads) > 6 else "")


# --- checks, in the order they run ----------------------------------------------------------------

def _optim_hint(run, results, sizes):
    for rank, result in enumerate(results):
        got = result["optim"]
        if got is None:
            return (f"rank {rank}'s {NAME} has no self.optim, a torch.optim optimizer: build "
                    "self.optim = optimizer_class(shards, **kwargs), one nn.Parameter shard per "
                    "unit")
        if sum(got) >= sizes.num:
            return (f"rank {rank}'s self.optim was built over {len(got)} tensors of "
                    f"{sum(got):,} elements, the whole model ({sizes.num:,}): build it over the "
                    f"shards (this rank's 1/N of each unit, {sizes.shards // sizes.es:,} "
                    "elements), optimizer_class(shards, **kwargs); the full parameters are "
                    "gathered only for a moment and cannot be stepped")
    return None


def _built_hint(run, results, n, sizes):
    """A hint when full_state_dict() right after construction is not the initial weights."""
    init = _sharded.flat(run.init, run.widths)
    for rank, result in enumerate(results):
        got = result["built_state"]
        if _sharded.close(got, init, run.dtype):
            continue
        offset = 0
        for i, k in enumerate(sizes.units):
            s = math.ceil(k / n)
            want = torch.cat([init[offset:offset + k], init.new_zeros(s * n - k)]).split(s)
            have = torch.cat([got[offset:offset + k], got.new_zeros(s * n - k)]).split(s)
            for j in range(n):
                if _sharded.close(have[j][:max(0, min(s, k - j * s))],
                                  want[j][:max(0, min(s, k - j * s))], run.dtype):
                    continue
                other = next((a for a in range(n) if a != j and
                              _sharded.close(have[j][:max(0, min(s, k - j * s))],
                                             want[a][:max(0, min(s, k - j * s))], run.dtype)),
                             None)
                where = (f"right after construction, full_state_dict() on rank {rank} had in "
                         f"unit {i}, slice {j} (elements {j * s} to {j * s + s - 1} of its "
                         "padded flat vector)")
                if other is not None:
                    return (f"{where} the initial values of slice {other}: rank r must keep "
                            f"slice r (elements r·s to (r+1)·s - 1, s = ceil(numel / N)), which "
                            "is where the all-gather puts rank r's input")
                return (f"{where} values that are not the initial weights: keep a clone of "
                        "slice r of each unit's padded flat parameters as the shard, and "
                        "gather it back in order")
            offset += k
    return None


def _grads_hint(run, results, sizes):
    for rank, result in enumerate(results):
        for step, ledgers in enumerate(result["steps"]):
            kept = ledgers["grads_after_backward"]
            if kept > sizes.unit:
                return (f"in step {step} on rank {rank}, when loss.backward() returned the "
                        f"model's parameters still held {kept:,} bytes of .grad (the whole "
                        f"model's gradients are {sizes.num * sizes.es:,}): once a unit's "
                        "gradient is reduce-scattered into its shard's .grad, set its "
                        "parameters' .grad to None, so that no rank ever holds the full "
                        "gradients")
    return None


def _memory_hint(run, results, n, sizes, k):
    """Parameters in flight, everything else the rank holds, and the state at rest."""
    hidden = _sharded.plain_hidden(run.widths, run.dtype)
    params_cap = sizes.shards + k * sizes.unit
    total_cap = sizes.shards + hidden + (k + GRADIENT_BUFFERS) * sizes.unit
    for rank, result in enumerate(results):
        memory = _sharded.measured(result)
        at = f"in step {len(result['steps']) - 1} on rank {rank}"
        unit, what, by = max(memory["samples"], key=lambda s: s[2]["params"])
        if by["params"] > params_cap:
            units = (by["params"] - sizes.shards) / sizes.unit
            return (f"{at}, the parameters took {by['params']:,} bytes at unit {unit}'s "
                    f"{_moment(what)}: the shards are {sizes.shards:,} and "
                    f"{k} unit{'s' * (k > 1)} in flight at most {k * sizes.unit:,} more "
                    f"(the largest unit padded is {sizes.unit:,}), but {units:.1f} units' worth "
                    "were gathered. Free each unit's gathered parameters as soon as its forward "
                    "(and, in backward, its backward) is done: resize the gathered buffer's "
                    "storage to 0 (full.untyped_storage().resize_(0))"
                    + ("" if k > 1 else "; with prefetch=False, gather one unit at a time"))
        unit, what, by = max(memory["samples"], key=lambda s: _held(s[2]))
        if _held(by) > total_cap:
            extra = _held(by) - sizes.shards - hidden
            return (f"{at}, at unit {unit}'s {_moment(what)} the rank held {_held(by):,} bytes "
                    f"besides gradients and optimizer state, {extra:,} more than the shards and "
                    f"what the unsharded model itself holds (activations), about "
                    f"{extra / sizes.unit:.1f} units where {k} in flight and two gradient "
                    "buffers are enough. If you free a unit with p.data = torch.empty(0), "
                    "the memory stays: autograd saved views of the weights for backward (a "
                    "Linear keeps its weight), and they hold the gathered buffer. Free the "
                    "storage itself, full.untyped_storage().resize_(0), and gather into the "
                    "same storage again before backward; also wait for each async "
                    "reduce-scatter before the next one, so that its buffer can go")
        rest = memory["rest"]
        if rest["params"] > sizes.shards:
            return (f"{at}, after step() and zero_grad() the parameters still took "
                    f"{rest['params']:,} bytes; the shards are {sizes.shards:,} (the model's "
                    f"full parameters {sizes.num * sizes.es:,}): at rest a rank keeps only its "
                    "shards. Free the full parameters at construction (and each gathered unit "
                    "after use) with untyped_storage().resize_(0) or p.data = torch.empty(0), "
                    "and keep each shard as a clone of its slice, not a view of the full "
                    "flat vector")
        rest_other = rest["activations"] + rest["other"] + rest["comm"] + rest["grads"]
        if rest_other > sizes.unit:
            return (f"{at}, after step() and zero_grad() the rank still held {rest_other:,} "
                    "bytes besides its shards and optimizer state (gathered buffers, "
                    f"gradients), more than one unit ({sizes.unit:,}): free the gathered "
                    "buffers and gradients once they are used")
    return None


def _held(by):
    return by["params"] + by["activations"] + by["other"] + by["comm"]


def _moment(what):
    return {"start": "forward start", "end": "forward end", "backward": "backward start",
            "gathered": "backward start (after your backward pre-hook)"}[what]


def _passes(t, n, sizes):
    return _sharded.ring_passes(t.sends, n) or []


def _ledger_hint(run, results, n, sizes):
    last = len(sizes.units) - 1
    want = collections.Counter(sizes.padded)
    hint = _sharded.ring_problem(results, n, phases=("forward", "backward", "step"))
    if hint:
        return hint
    for rank, result in enumerate(results):
        for step, ledgers in _sharded.counted(result):
            at = f"in step {step} on rank {rank}"
            for phase in ("forward", "backward", "step"):
                t = _sharded.traffic(ledgers[phase])
                if t.all_reduce:
                    return (f"{at}, {NAME} ran an all-reduce ({phase}): every rank then receives "
                            "every summed gradient, where rank r needs only its shard. "
                            "Reduce-scatter each unit's padded flat gradient into its shard's "
                            ".grad: (N-1)/N of the buffer per rank, half an all-reduce")
                if t.others:
                    return (f"{at}, {NAME} ran {t.others[0]} ({phase}): ZeRO-3 needs only "
                            "all-gathers of the units' parameters and reduce-scatters of their "
                            "gradients")
            fwd = _sharded.traffic(ledgers["forward"])
            if fwd.reduce_scatter:
                return (f"{at}, a reduce-scatter ran during forward: gradients exist only from "
                        "backward on")
            gathers = fwd.all_gather + _passes(fwd, n, sizes)
            hint = _unit_payloads(gathers, want, sizes, f"{at}, forward", "all-gather")
            if hint:
                return hint
            if not gathers:
                return (f"{at}, nothing was gathered in forward: every rank keeps only its "
                        "shards, so each unit must be all-gathered before it runs")
            if collections.Counter(gathers) != want:
                return (f"{at}, forward all-gathered {len(gathers)} times ({_names(sizes, gathers)}"
                        f" bytes); there are {len(want)} units, padded "
                        f"{_names(sizes, sizes.padded)} bytes: gather each unit once, just "
                        "before it runs")
            step_t = _sharded.traffic(ledgers["step"])
            back = _sharded.traffic(ledgers["backward"])
            if step_t.reduce_scatter and not back.reduce_scatter:
                return (f"{at}, every reduce-scatter ran in step(): reduce-scatter each unit "
                        "during backward, as soon as its gradients are in, so that its full "
                        "gradients and parameters can be freed then")
            if step_t.reduce_scatter or step_t.all_gather or step_t.sends:
                return (f"{at}, step() communicated ({_names(sizes, step_t.all_gather + step_t.reduce_scatter + [b for b, _ in step_t.sends])} bytes): "
                        "ZeRO-3's step only divides and steps the shards; the next forward "
                        "gathers the updated parameters, and each unit's reduce-scatter "
                        "belongs to backward")
            hint = _backward_hint(back, n, sizes, want, last, at)
            if hint:
                return hint
    return None


def _unit_payloads(payloads, want, sizes, at, what):
    """A hint when a payload is not a padded unit (unpadded, or the wrong dtype), or None."""
    for b in payloads:
        if b in want:
            continue
        if b in sizes.bare:
            i = sizes.bare.index(b)
            return (f"{at}, an {what} carried {b:,} bytes, unit {i}'s {sizes.units[i]} "
                    f"elements unpadded: pad each unit's flat vector with zeros to a multiple "
                    f"of N ({sizes.padded[i] // sizes.es} here) so that it cuts into N equal "
                    "shards, what the tensor collectives take and the ranks share equally")
        if 2 * b in want or b // 2 in want:
            return (f"{at}, an {what} carried {b:,} bytes, a unit in the wrong dtype: make "
                    "every buffer in the parameters' dtype (torch.empty(k) is float32 whatever "
                    "the model is)")
        return (f"{at}, an {what} carried {b:,} bytes; the units padded to a multiple of N are "
                f"{_names(sizes, sizes.padded)} bytes: each collective moves one unit's whole "
                "padded flat buffer")
    return None


def _backward_hint(back, n, sizes, want, last, at):
    ring = _passes(back, n, sizes)
    hint = _unit_payloads(back.all_gather + back.reduce_scatter + ring, want, sizes,
                          f"{at}, backward", "collective")
    if hint:
        return hint
    if not (back.reduce_scatter or ring):
        return (f"{at}, nothing was reduce-scattered during backward: each rank stepped with "
                "its own gradients. Once a unit's gradients are in, reduce-scatter its padded "
                "flat gradient into its shard's .grad")
    if back.reduce_scatter and collections.Counter(back.reduce_scatter) != want:
        return (f"{at}, backward reduce-scattered {_names(sizes, back.reduce_scatter)} bytes; "
                "each unit's padded flat gradient must be reduce-scattered exactly once "
                f"({_names(sizes, sizes.padded)})")
    # every unit: one reduce-scatter, and one all-gather before it (a ring's passes are both)
    total = collections.Counter(back.all_gather + back.reduce_scatter + ring)
    for i, b in enumerate(sizes.padded):
        count = total[b] - 1
        if count == 1:
            continue
        if count == 0 and i == last:
            continue    # kept gathered from its forward to its backward (FSDP2 does this)
        if count == 0:
            return (f"{at}, unit {i} was not all-gathered before its backward: you freed its "
                    "parameters after forward, and backward needs them (for the gradient of "
                    "its input). Gather it again in a full backward pre-hook "
                    "(register_full_backward_pre_hook). Only the last unit may stay gathered "
                    "from its forward to its backward")
        return (f"{at}, unit {i} was all-gathered {count} times in backward: once, just before "
                "its backward, is enough")
    return None


def _values_hint(run, results, n, sizes):
    """Per-unit tails that never moved (no padding), then ``_sharded.values_hint``."""
    init = _sharded.flat(run.init, run.widths)
    after_one = _sharded.flat(_sharded.reference(run, steps=1), run.widths)
    for rank, result in enumerate(results):
        first = result["after_first"]
        offset, stuck = 0, []
        for i, k in enumerate(sizes.units):
            tail = k % n
            piece = slice(offset + k - tail, offset + k)
            if tail and bool((first[piece] == init[piece]).all()) and \
                    bool((after_one[piece] != init[piece]).any()):
                stuck.append((i, tail))
            offset += k
        if stuck:
            i, tail = stuck[0]
            return (f"after the first step, the last {tail} parameters of unit {i} "
                    f"({sizes.units[i]} elements) had not changed on rank {rank}, nor the tails "
                    f"of {len(stuck) - 1} other units: {sizes.units[i]} elements do not cut into "
                    f"{n} equal shards of {sizes.units[i]} // {n}. Pad each unit's flat vector "
                    "with zeros to a multiple of N so that every element belongs to a shard of "
                    "ceil(numel / N)"), None
    return _sharded.values_hint(run, results, n, contiguous=False)


def _prefetch_hint(run, results, n, sizes):
    """A hint when the next unit's all-gather is not async and issued ahead, or None."""
    count = len(sizes.units)
    for rank, result in enumerate(results):
        for step, ledgers in _sharded.counted(result):
            at = f"in step {step} on rank {rank}"
            calls = [(i, op, payload, asynchronous) for i, (op, payload, asynchronous, _)
                     in enumerate(ledgers["forward"]) if op == "all_gather"]
            if not calls:
                return (f"{at}, with prefetch=True no tensor all-gather ran in forward (a ring "
                        "of send/recv cannot run in the background): use "
                        "all_gather_into_tensor(..., async_op=True) and wait on its handle")
            marks = {(u, what): pos for u, what, pos in result["steps"][step]["forward_marks"]}
            for i in range(1, count):
                mine = [(j, a) for j, op, b, a in calls if sizes.which(b) == i]
                if not mine:
                    continue
                j, asynchronous = mine[0]
                end = marks.get((i - 1, "end"))
                start_before = marks.get((i - 2, "end"), 0) if i > 1 else 0
                if end is not None and j >= end:
                    during = [sizes.which(b) for jj, _, b, _ in calls
                              if start_before <= jj < end and sizes.which(b) not in (i - 1,)]
                    if during:
                        return (f"{at}, while unit {i - 1} ran forward, the all-gather issued "
                                f"ahead was unit {during[0]}'s; prefetch the NEXT unit, "
                                f"{i}, so that it is ready when unit {i - 1} is done")
                    return (f"{at}, unit {i}'s all-gather was issued after unit {i - 1}'s "
                            "forward had finished, so nothing overlapped: with prefetch=True "
                            f"start it (async_op=True) before unit {i - 1} runs")
                if not asynchronous:
                    return (f"{at}, unit {i}'s all-gather was issued ahead but without "
                            "async_op=True: it waited until it was done, so it overlapped "
                            f"nothing. Start it with async_op=True and wait on the handle just "
                            f"before unit {i} runs")
            bcalls = [(i, payload, a) for i, (op, payload, a, _) in
                      enumerate(ledgers["backward"]) if op == "all_gather"]
            bmarks = {u: pos for u, what, pos in result["steps"][step]["backward_marks"]
                      if what == "backward"}
            for i in range(count - 2, -1, -1):
                mine = [(j, a) for j, b, a in bcalls if sizes.which(b) == i]
                begins = bmarks.get(i)
                if not mine or begins is None:
                    continue
                j, asynchronous = mine[0]
                if j >= begins or not asynchronous:
                    return (f"{at}, in backward unit {i}'s all-gather was "
                            + ("issued only when its backward began" if j >= begins else
                               "not async") +
                            f": with prefetch=True start it with async_op=True in unit "
                            f"{i + 1}'s backward pre-hook, so that it overlaps unit "
                            f"{i + 1}'s backward")
    return None


def _prefetches(results) -> bool:
    """Whether some all-gather ran with async_op=True: a wrapper that prefetches."""
    return any(op == "all_gather" and asynchronous
               for result in results for _, ledgers in _sharded.counted(result)
               for phase in ("forward", "backward")
               for op, _, asynchronous, _ in ledgers[phase])


def _diagnose(run, results, n, prefetch):
    """(hint or None, largest difference). k, the units in flight allowed: 2 with prefetch=True,
    and for a wrapper that prefetches even when not asked to (async all-gathers); else 1."""
    sizes = _Sizes(run, n)
    k = 2 if prefetch or _prefetches(results) else 1
    hint = (_sharded.loop_hint(results, NAME) or _optim_hint(run, results, sizes)
            or _built_hint(run, results, n, sizes) or _grads_hint(run, results, sizes)
            or (_prefetch_hint(run, results, n, sizes) if prefetch else None)
            or _memory_hint(run, results, n, sizes, k) or _ledger_hint(run, results, n, sizes))
    if hint:
        return hint, None
    hint, diff = _values_hint(run, results, n, sizes)
    if hint:
        return hint, None
    return _sharded.optimizer_hint(run, results, n, buckets=len(sizes.units)), diff


def crash_advice(crash):
    message = crash.message or ""
    if "setStorage" in message and "storage of size 0" in message:
        return ("Backward used a unit's parameters after their storage had been freed: "
                "all-gather each unit again before its backward (a full backward pre-hook, "
                "register_full_backward_pre_hook), into the same storage, since autograd "
                "saved views of it")
    if "returned an invalid gradient" in message or "but expected shape" in message:
        return ("A gradient did not match its parameter's shape: the parameter was freed "
                "(p.data = torch.empty(0)) when autograd accumulated into it; point the unit's "
                "parameters at the gathered buffer again before its backward")
    return _sharded.crash_advice(crash)


def _train(cls, worlds, prefetch, name, timeout):
    ranks = Ranks(name, timeout=timeout, budget=3 * timeout, crash_advice=crash_advice,
                  hang_advice=_sharded.hang_advice)
    figures, worst, shown = {}, {}, None
    for n, cases in worlds:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        runs = [_sharded.fresh_run(UNITS, n, dtype, optimizer, generator)
                for dtype, optimizer in cases]
        trained = _sharded.train_everywhere(ranks, _sharded.train_module_on_rank, n, cls, runs,
                                            NAME, prefetch)
        for run, results in zip(runs, trained):
            hint, diff = _diagnose(run, results, n, prefetch)
            if hint:
                raise Failed(f"on {n} ranks, with {run.label}: {hint}")
            worst[n] = max(worst.get(n, 0.0), diff)
            sizes = _Sizes(run, n)
            key = f"{n} ranks, {run.label}"
            sent = _wire(_sharded.counted(results[0])[-1][1], n)
            ddp = theory.wire_bytes("all_reduce", sizes.num * sizes.es, n)
            memory = _sharded.measured(results[0])
            peak = max(by["params"] for _, _, by in memory["samples"])
            figures[f"{key}: bytes sent per rank per step"] = sent
            figures[f"{key}: DDP's all-reduce, bytes sent per rank"] = ddp
            figures[f"{key}: peak parameter bytes per rank"] = peak
            figures[f"{key}: parameter bytes per rank at rest"] = memory["rest"]["params"]
            figures[f"{key}: full parameter bytes"] = sizes.num * sizes.es
            if shown is None and run.dtype == torch.float32:
                shown = (n, sizes, peak, memory["rest"]["params"], sent, ddp)
        figures[f"{n} ranks: largest difference from one process"] = worst[n]
    return figures, worst, shown


def _wire(ledgers, n):
    total = 0.0
    for phase in ("forward", "backward", "step"):
        t = _sharded.traffic(ledgers[phase])
        total += (sum(theory.wire_bytes("all_gather", b, n) for b in t.all_gather)
                  + sum(theory.wire_bytes("reduce_scatter", b, n) for b in t.reduce_scatter)
                  + sum(b for b, _ in t.sends))
    return total


def _measured(shown):
    n, sizes, peak, rest, sent, ddp = shown
    return (f"; on {n} ranks ({sizes.num} float32 parameters, {sizes.num * sizes.es:,} bytes): "
            f"parameters {rest:,} bytes per rank at rest and {peak:,} at most, "
            f"{sent:,.0f} bytes sent per rank per step, {sent / ddp:.2f}x DDP's {ddp:,.0f}")


@exercise("zero3", sizes=True)
def zero3(cls, *, timeout: float = 15.0):
    """``cls(module, optimizer_class, prefetch=False, **kwargs)``: ZeRO-3 (module docstring)."""
    worlds = _sizes.pick(WORLDS, QUICK_WORLDS)
    figures, worst, shown = _train(cls, worlds, False, "zero3", timeout)
    (a, _), (b, _) = worlds
    summary = (f"on {a} and {b} ranks (SGD with momentum and Adam, float32 and float64, 9 units "
               f"of 35 to 165 parameters), {_sharded.STEPS} steps: equal to one process (largest "
               f"difference {worst[a]:.1e} and {worst[b]:.1e}); per step each unit all-gathered "
               "in forward and again in backward, reduce-scattered in backward, no all-reduce; "
               "parameters, gradients and optimizer state 1/N per rank, one unit gathered at a "
               "time (two with prefetch)")
    if shown and attempted(PREDICTION):
        summary += _measured(shown)
    elif shown:
        summary += f"; the measured bytes per rank show here once you have predicted them " \
                   f"({PREDICTION})"
    return summary, figures


@exercise("zero3_prefetch", sizes=True)
def zero3_prefetch(cls, *, timeout: float = 15.0):
    """``cls(module, optimizer_class, prefetch=True, **kwargs)``: ZeRO-3 with the next unit's
    all-gather started ahead, with async_op=True (module docstring)."""
    worlds = _sizes.pick(PREFETCH_WORLDS, QUICK_PREFETCH_WORLDS)
    figures, worst, shown = _train(cls, worlds, True, "zero3_prefetch", timeout)
    (a, _), (b, _) = worlds
    summary = (f"on {a} and {b} ranks, {_sharded.STEPS} steps with prefetch=True: equal to one "
               f"process (largest difference {worst[a]:.1e} and {worst[b]:.1e}); each unit's "
               "all-gather started with async_op=True before the unit before it had finished "
               "(forward) or begun (backward), at most two units gathered at a time")
    if shown and attempted(PREDICTION):
        summary += _measured(shown)
    return summary, figures
