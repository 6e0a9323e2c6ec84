"""Notebook 05: memory anatomy, mixed precision, recomputation. One exercise
(``mixed_precision_step``) and two predictions (``predicted_bytes``, ``pos_gb``).

What the checks assert, on models and data drawn afresh in the notebook for every run:

* ``predicted_bytes(fn)``: ``fn(num_params, optimizer, precision) -> {"params", "grads",
  "optimizer"}``, the bytes of each kind of model state one process holds at rest once the first
  ``optimizer.step()`` has returned, for optimizer "sgd" (no momentum), "sgd_momentum", "adam"
  and precision "fp32" or "bf16_mixed" (bf16 parameters and gradients, an fp32 master copy of
  the weights owned by the optimizer, its state in fp32). The check first measures: it trains an
  MLP of random widths one step with each of the six combinations under ``labkit.MemoryTracer``
  (its own mixed-precision loop, the master copy tagged "optimizer") and reads the bytes per
  category; Adam's ``step`` counters (one 4-byte scalar per parameter *tensor*, not per
  parameter) are taken out of the optimizer bytes, as the notebook says. The learner's function
  must give exactly those bytes for that MLP's parameter count, and the same bytes per parameter
  for 1 to 7.5e9 parameters; the measurement must also agree with ``labkit.theory``
  (``state_bytes_per_param``), or the check reports a labkit bug rather than grade against it. A
  wrong value is named by combination and category, and matched against the usual mistakes:
  elements for bytes, K = 12 for fp32 Adam, a master copy forgotten or counted with the
  parameters, state for momentum-free SGD, fp32 gradients kept at rest, bf16 moments.
* ``mixed_precision_step(fn)``: ``fn(params, master, optimizer)`` is one step of the mixed-
  precision recipe: the model's bf16 parameters hold this step's bf16 gradients; ``master`` are
  fp32 copies of them, the tensors ``optimizer`` updates. Trained for three steps on two MLPs
  (Adam, and SGD with momentum) against the check's own implementation of the recipe, the
  master copies must equal the reference's (float32, tolerance ``MASTER_TOL``) and the model's
  parameters must be exactly the master rounded to bf16, still bf16, still the same tensors; the
  model's gradients are left as backward wrote them. Under ``MemoryTracer`` (master tagged
  "optimizer") the first step must leave, at rest, 2 bytes of parameters and 2 of gradients per
  parameter and nothing in the optimizer beyond the master copy and its state: fp32 gradient
  copies still alive after the step are named. A wrong result is matched against the usual
  mistakes: nothing stepped, the weights not copied down, copied down before the step, the
  master copy overwritten from the bf16 weights each step (that loses every update smaller than
  bf16's spacing).
* ``pos_gb(fn)``: ``fn(psi, n_d)``, the GB per device of ZeRO's P_os (optimizer states
  partitioned, mixed-precision Adam, K = 12, GB = 1e9 bytes), compared with
  ``labkit.theory.zero_memory(psi, n_d, 1)`` on Table 1's 18 cases and a few others, and then
  with the paper's printed cells (``printed_match``: the 7.5B column rounded half up, the 128B
  and 1T columns rounded or truncated). Mistakes named: GiB, bytes, the other stages, K = 8,
  fp32 parameters and gradients, the optimizer state alone.
"""
import math
import numbers
import secrets
from collections.abc import Mapping

import torch

from labkit import models, theory
from labkit.check._core import Failed, call_here, exercise
from labkit.check._hints import register

KEYS = ("params", "grads", "optimizer")
COMBOS = [(o, p) for p in theory.PRECISIONS for o in theory.OPTIMIZERS]
GRID = (1, 1000, 123_457, 7_500_000_000)
RTOL = 1e-9
GB = 1e9
MIXED_STEPS = 3
MASTER_TOL = 1e-6   # the recipe is deterministic; this only absorbs another order of fp32 ops
# (optimizer, lr): Adam's first steps move every weight by about lr, SGD's by lr * momentum buffer.
# Both move some weights by more than bf16's spacing and some by less, so the bf16 weights change
# and the master copy carries what bf16 cannot.
MIXED_CASES = (("adam", 1e-3), ("sgd_momentum", 0.05))


def _same(a, b):
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-12)


def make_optimizer(name, params, lr=1e-3):
    """torch's optimizer for "sgd", "sgd_momentum" (momentum 0.9) or "adam"."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"optimizer must be one of {theory.OPTIMIZERS}, got {name!r}")


def step_counter_bytes(optimizer):
    """Bytes of the optimizer's per-tensor ``step`` counters (Adam keeps one per parameter
    tensor; SGD none)."""
    return sum(state["step"].untyped_storage().nbytes() for state in optimizer.state.values()
               if torch.is_tensor(state.get("step")))


def reference_mixed_step(params, master, optimizer):
    """The check's own mixed-precision step: fp32 copies of the bf16 gradients into the master
    copy, the optimizer's step on it, the master rounded into the bf16 parameters, and the fp32
    gradient copies dropped."""
    for weight, copy in zip(params, master):
        copy.grad = weight.grad.to(dtype=torch.float32)
    optimizer.step()
    with torch.no_grad():
        for weight, copy in zip(params, master):
            weight.copy_(copy.to(dtype=weight.dtype))
    for copy in master:
        copy.grad = None


def _widths(generator):
    pick = lambda low, high: int(torch.randint(low, high, (1,), generator=generator))  # noqa: E731
    return pick(12, 40), pick(8, 33), pick(2, 9)


def measure_states(optimizer, precision, widths, generator):
    """(number of parameters, {params, grads, optimizer} bytes at rest after one step, Adam's
    step counters excluded) of an MLP of these widths, measured with MemoryTracer."""
    from labkit.memory import MemoryTracer

    model = models.fill(models.MLP(*widths), generator)
    x, y = model.batch(8, generator)
    master = None
    if precision == "bf16_mixed":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
        master = [p.detach().to(torch.float32) for p in model.parameters()]
        opt = make_optimizer(optimizer, master)
    else:
        opt = make_optimizer(optimizer, model.parameters())
    tracer = MemoryTracer(model, opt, timeline=False)
    if master is not None:
        tracer.tag(master, "optimizer")
    with tracer:
        model.zero_grad(set_to_none=True)
        model.loss(model(x).float(), y).backward()
        if master is None:
            opt.step()
        else:
            reference_mixed_step(list(model.parameters()), master, opt)
    at_rest = tracer.current
    at_rest["optimizer"] -= step_counter_bytes(opt)
    return sum(p.numel() for p in model.parameters()), {k: at_rest[k] for k in KEYS}


# --- prediction 1: bytes per category -----------------------------------------------------------

def _prediction(fn, args):
    """The learner's dict, as {key: float}; a wrong shape is a hint."""
    who = f"predicted_bytes{args}"
    got = call_here(fn, *args, who=who)
    if not isinstance(got, Mapping):
        raise Failed(f"{who} returned {type(got).__name__} {got!r:.40}: return a dict "
                     "{'params': bytes, 'grads': bytes, 'optimizer': bytes}")
    if set(got) != set(KEYS):
        raise Failed(f"{who} returned the keys {sorted(map(str, got))}: return exactly "
                     "'params', 'grads' and 'optimizer' (bytes of each at rest)")
    out = {}
    for key in KEYS:
        value = got[key]
        if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise Failed(f"{who}[{key!r}] is {type(value).__name__} {value!r:.40}: a number of "
                         "bytes")
        out[key] = float(value)
    return out


_NO_MASTER = ("no fp32 master copy: the optimizer does not update the bf16 weights themselves "
              "but an fp32 copy of them, 4 bytes per parameter, which it owns (the ZeRO paper, "
              "§3.1, counts it in the optimizer states)")


def _mistake(optimizer, precision, key, got):
    """What a wrong bytes-per-parameter value ``got`` for one category most likely means."""
    want = dict(zip(KEYS, theory.state_bytes_per_param(optimizer, precision)))[key]
    element = 4 if precision == "fp32" or key == "optimizer" else 2
    if want and _same(got, want / element):
        return ("that counts elements; the prediction is in bytes (a float32 element is 4 bytes, "
                "a bfloat16 one 2)")
    if key == "grads" and got == 0:
        return ("optimizer.step() leaves .grad in place (zero_grad, before the next backward, "
                "resets it): at rest after the step the gradients are still there")
    if precision == "fp32" and key in ("params", "grads"):
        return "in fp32 training every parameter and gradient is a float32: 4 bytes"
    if key == "params" and got == 6:
        return ("that counts the fp32 master copy with the parameters: it belongs to the "
                "optimizer, which updates it (the ZeRO paper, §3.1, counts it in the optimizer "
                "states' K). 'params' is the model's own bf16 weights")
    if key == "params":
        return "the model's parameters are bf16 in this recipe: 2 bytes each"
    if key == "grads":
        return ("at rest the gradients are the model's bf16 .grad, 2 bytes each; the fp32 "
                "copies the optimizer steps with are freed once it has stepped")
    if precision == "fp32":
        if optimizer == "sgd":
            return ("SGD without momentum keeps no state at all: torch.optim.SGD makes a "
                    "momentum_buffer only when momentum != 0, and in fp32 there is no master copy")
        if optimizer == "sgd_momentum":
            return ("SGD with momentum keeps exactly one buffer per parameter, "
                    "state['momentum_buffer'], a float32" if got else
                    "with momentum, SGD keeps a buffer per parameter (state['momentum_buffer'])")
        if got == 12:
            return ("12 bytes is the ZeRO paper's K for MIXED-precision Adam: an fp32 master copy, "
                    "the momentum and the variance. In fp32 training the parameters are "
                    "already fp32, so there is no master copy. (Adam's `step` is one scalar per "
                    "parameter tensor, not per parameter: it is left out here)")
        if got == 0:
            return "Adam keeps state: exp_avg and exp_avg_sq, one float32 each per parameter"
        if got == 4:
            return "Adam keeps two float32 moments per parameter, exp_avg and exp_avg_sq"
    else:
        if optimizer == "adam" and got == 8:
            return ("8 bytes: either the fp32 master copy is missing, or Adam's moments are "
                    "counted in bf16. The optimizer keeps the master copy, exp_avg and "
                    "exp_avg_sq, all three in fp32")
        if optimizer == "adam" and got == 6:
            return "the master copy and Adam's moments are fp32 in this recipe, not bf16"
        if optimizer == "sgd_momentum" and got == 6:
            return ("the momentum buffer is fp32: torch makes it from the gradient of the fp32 "
                    "master copy")
        if optimizer == "sgd_momentum" and got == 4:
            return ("4 bytes is the master copy alone or the momentum buffer alone: with "
                    "momentum the optimizer keeps both, in fp32")
        if got == want - 4:
            return _NO_MASTER
        if got == want + 4:
            return ("one fp32 tensor too many: the fp32 gradient copies are freed after the "
                    "step, and Adam's `step` is one scalar per tensor, not per parameter")
    return ("list the tensors of this kind still alive once optimizer.step() has returned, and "
            "the bytes of one element of each (float32 4, bfloat16 2)")


def _diagnose(optimizer, precision, values):
    """values: [(num_params, the learner's dict)]; a Failed for the first wrong category."""
    args = f"N, {optimizer!r}, {precision!r}"
    per_param = theory.state_bytes_per_param(optimizer, precision)
    for key, want in zip(KEYS, per_param):
        if all(_same(got[key], want * n) for n, got in values):
            continue
        ratios = [got[key] / n for n, got in values]
        if not all(_same(r, ratios[0]) for r in ratios):
            listed = ", ".join(f"N={n:,}: {got[key]:.6g}" for n, got in values)
            raise Failed(f"predicted_bytes({args})[{key!r}] is not proportional to N ({listed}): "
                         "each kind of model state has one element per parameter, so its bytes "
                         "are (bytes per parameter) x N")
        raise Failed(f"predicted_bytes({args})[{key!r}] is {ratios[0]:g} bytes per parameter: "
                     f"{_mistake(optimizer, precision, key, ratios[0])}")


register("predicted_bytes", [
    "Look at what torch keeps: after one step, optimizer.state[p] lists each optimizer's tensors "
    "for parameter p. For each of them, and for the parameters and gradients: how many elements "
    "per parameter, and how many bytes per element? In bf16_mixed, which tensors are bf16, "
    "which fp32, and who owns the fp32 copy of the weights?",
    "fp32: parameters and gradients are float32 (4 bytes); SGD keeps nothing, SGD with momentum "
    "one buffer, Adam two moments, all float32. bf16_mixed: the model's parameters and "
    "gradients are bfloat16 (2 bytes); the optimizer owns an fp32 master copy of the weights "
    "(4 bytes) and keeps its own state in fp32.",
    "Bytes per parameter (params, grads, optimizer): fp32 sgd 4, 4, 0; sgd_momentum 4, 4, 4; "
    "adam 4, 4, 8. bf16_mixed: 2 and 2 for params and grads, and the optimizer's fp32 state plus "
    "4 for the master copy. Multiply each by num_params.",
])


@exercise("predicted_bytes")
def predicted_bytes(fn):
    """``fn(num_params, optimizer, precision) -> {"params", "grads", "optimizer"}`` bytes at rest
    after the first step; against MemoryTracer and ``theory.state_bytes_per_param``."""
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    widths = _widths(generator)
    measured = {}
    for combo in COMBOS:
        num_params, states = measure_states(*combo, widths, generator)
        formula = theory.model_state_breakdown(num_params, *combo)
        if states != formula:   # torch changed, or labkit's tracer: not the learner's fault
            raise RuntimeError(f"MemoryTracer measured {states} for {combo} on {num_params} "
                               f"parameters; labkit.theory says {formula}")
        measured[combo] = states
    for combo in COMBOS:
        values = [(n, _prediction(fn, (n, *combo))) for n in (num_params,) + GRID]
        _diagnose(*combo, values)
    per_param = {f"{o}, {p}: bytes per parameter (params, grads, optimizer)":
                 tuple(measured[o, p][k] // num_params for k in KEYS) for o, p in COMBOS}
    adam32, adam16 = (measured["adam", p] for p in theory.PRECISIONS)
    show = lambda m: " + ".join(str(m[k] // num_params) for k in KEYS)  # noqa: E731
    return (f"equal to what MemoryTracer measured on an MLP of {num_params:,} parameters for all "
            f"six optimizer x precision pairs (Adam: fp32 {show(adam32)}, bf16_mixed "
            f"{show(adam16)} bytes per parameter), and to the formula up to 7.5e9 "
            "parameters"), per_param


# --- exercise: the mixed-precision step ---------------------------------------------------------

class _MixedRun:
    """A bf16 copy of a model, its fp32 master copy and an optimizer over the master."""

    def __init__(self, fp32_model, optimizer, lr, widths):
        self.model = models.MLP(*widths)
        self.model.load_state_dict(fp32_model.state_dict())
        self.model.to(torch.bfloat16)
        self.params = list(self.model.parameters())
        self.master = [p.detach().to(torch.float32) for p in self.params]
        self.optimizer = make_optimizer(optimizer, self.master, lr)

    def backward(self, x, y):
        self.model.zero_grad(set_to_none=True)
        self.model.loss(self.model(x.to(torch.bfloat16)).float(), y).backward()

    def snapshot(self):
        return ([p.detach().clone() for p in self.params],
                [m.detach().clone() for m in self.master])


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _close(a, b):
    return all(torch.allclose(x, y, rtol=MASTER_TOL, atol=MASTER_TOL) for x, y in zip(a, b))


def _largest(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def _rounded(master, like):
    return [m.to(p.dtype) for m, p in zip(master, like)]


def _call_step(fn, run, who):
    try:
        call_here(fn, run.params, list(run.master), run.optimizer, who=who)
    except Failed as failure:
        if "assign a gradient" in failure.hint or "different type" in failure.hint:
            raise Failed(f"{who}: torch refused a bf16 gradient in an fp32 master tensor's "
                         ".grad: give each master tensor an fp32 copy of its parameter's "
                         "gradient (p.grad.float())") from None
        if "leaf Variable" in failure.hint:
            raise Failed(f"{failure.hint.rstrip('.')}: the parameters require grad, so copy "
                         "into them under torch.no_grad()") from None
        raise


def _mixed_values(run, reference, recopy, before, grads_before, at):
    """A hint when the learner's run differs from the recipe after one step, or None."""
    params, master = run.snapshot()
    if any(p.dtype != torch.bfloat16 for p in run.params):
        return (f"{at}: the model's parameters are no longer bfloat16: copy the master weights "
                "INTO them (p.copy_(m) rounds to bf16) rather than replacing them")
    if any(p.grad is None for p in run.params):
        return (f"{at}: the model's .grad was freed: leave the bf16 gradients as backward left "
                "them (the training loop's zero_grad resets them before the next backward)")
    if not _equal([p.grad for p in run.params], grads_before):
        return (f"{at}: the model's bf16 gradients were changed: read them, copy them up, but "
                "leave them as backward wrote them")
    ref_params, ref_master = reference.snapshot()
    master_moved = not _equal(master, before[1])
    if not master_moved:
        if _equal(params, before[0]):
            return (f"{at}: nothing moved: give each master tensor an fp32 copy of its "
                    "parameter's gradient (m.grad = ...), call optimizer.step(), then copy the "
                    "master weights down into the bf16 parameters")
        return (f"{at}: the bf16 parameters changed but the master weights did not: the "
                "optimizer must step on the fp32 master copy (its own tensors), with fp32 "
                "copies of the gradients, and the parameters then take the master's values")
    if not _close(master, ref_master):
        if recopy is not None and _close(master, recopy.snapshot()[1]):
            return (f"{at}: the master copy was overwritten with the bf16 weights before the "
                    "step: it must keep its fp32 values from one step to the next. That is "
                    "where the updates smaller than bf16's spacing add up; copy only the "
                    "gradients up, and the weights only down")
        return (f"{at}: the master weights differ from the recipe's (largest difference "
                f"{_largest(master, ref_master):.2g}): the optimizer must step once on fp32 "
                "copies of this step's bf16 gradients, unscaled")
    if not _equal(params, ref_params):
        if _equal(params, before[0]) or _equal(params, _rounded(before[1], params)):
            return (f"{at}: the master weights moved, but the model's bf16 parameters still hold "
                    "the weights from before this step: copy the master weights down AFTER "
                    "optimizer.step() (p.copy_(m) under torch.no_grad())")
        return (f"{at}: the bf16 parameters are not the master weights rounded to bf16 (largest "
                f"difference {_largest(params, ref_params):.2g}): copy each master tensor into "
                "its parameter after the step")
    return None


def _bytes_hint(at_rest, num_params, optimizer, expected_optimizer):
    want = theory.model_state_breakdown(num_params, optimizer, "bf16_mixed")
    if at_rest["grads"] > want["grads"]:
        extra = (at_rest["grads"] - want["grads"]) / num_params
        return (f"the values are right, but after the step {extra:g} more bytes of gradients "
                "per parameter are still alive: the fp32 gradient copies. The recipe keeps "
                "only the bf16 gradients at rest; drop the copies once the optimizer has "
                "stepped (m.grad = None, or optimizer.zero_grad(set_to_none=True))")
    if at_rest["params"] != want["params"]:
        return (f"the values are right, but the tracer counted {at_rest['params'] / num_params:g} "
                "bytes of parameters per parameter at rest, where the model's bf16 weights are "
                "2: keep the model's own parameter tensors and copy into them")
    if at_rest["optimizer"] != expected_optimizer:
        return (f"the values are right, but the optimizer holds {at_rest['optimizer']:,} bytes "
                f"at rest, where the master copy and the optimizer's state are "
                f"{expected_optimizer:,}: keep nothing else in it")
    return None


register("mixed_precision_step", [
    "Three moves per step: the gradients go up (bf16 to fp32, into the master copy's .grad), "
    "the optimizer steps on the master copy, and the weights come down (fp32 to bf16, into the "
    "model's parameters). Then: which fp32 tensors must not outlive the step?",
    "The optimizer only sees the master tensors, so their .grad must hold fp32 copies of the "
    "bf16 gradients. copy_ into a bf16 tensor rounds to the nearest bf16 value, while the master "
    "keeps the exact fp32 result, so updates too small for bf16 still add up. Afterwards the "
    "fp32 gradient copies are garbage: set them to None.",
    "for p, m in zip(params, master): m.grad = p.grad.float(); then optimizer.step(); then "
    "with torch.no_grad(): p.copy_(m) for each pair; and finally m.grad = None for each master "
    "tensor.",
])


@exercise("mixed_precision_step")
def mixed_precision_step(fn):
    """``fn(params, master, optimizer)``: one step of the mixed-precision recipe (see the
    module docstring)."""
    from labkit.memory import MemoryTracer

    generator = torch.Generator().manual_seed(secrets.randbits(63))
    measured = {}
    for optimizer, lr in MIXED_CASES:
        widths = _widths(generator)
        fp32 = models.fill(models.MLP(*widths), generator)
        batches = [fp32.batch(8, generator) for _ in range(MIXED_STEPS)]
        run, reference, recopy = (_MixedRun(fp32, optimizer, lr, widths) for _ in range(3))
        num_params = sum(p.numel() for p in run.params)
        for step, (x, y) in enumerate(batches):
            at = f"with {optimizer} on an MLP {widths}, step {step}"
            for each in (run, reference, recopy):
                each.backward(x, y)
            before, grads_before = run.snapshot(), [p.grad.detach().clone() for p in run.params]
            who = f"mixed_precision_step {at}"
            if step == 0:
                tracer = MemoryTracer(run.model, run.optimizer, timeline=False)
                tracer.tag(run.master, "optimizer")
                with tracer:
                    _call_step(fn, run, who)
                at_rest = tracer.current
            else:
                _call_step(fn, run, who)
            with torch.no_grad():
                for weight, copy in zip(recopy.params, recopy.master):
                    copy.copy_(weight)     # the mistake: the master re-read from the bf16 weights
            reference_mixed_step(reference.params, reference.master, reference.optimizer)
            reference_mixed_step(recopy.params, recopy.master, recopy.optimizer)
            hint = _mixed_values(run, reference, recopy, before, grads_before, at)
            if hint:
                raise Failed(hint)
            if step == 0:
                state = theory.model_state_breakdown(num_params, optimizer, "bf16_mixed")
                expected = state["optimizer"] + step_counter_bytes(run.optimizer)
                hint = _bytes_hint(at_rest, num_params, optimizer, expected)
                if hint:
                    raise Failed(f"{at}: {hint}")
                measured[optimizer] = tuple((at_rest[k] - (step_counter_bytes(run.optimizer)
                                                           if k == "optimizer" else 0))
                                            / num_params for k in KEYS)
    figures = {f"{o}: bytes per parameter at rest (params, grads, optimizer)": v
               for o, v in measured.items()}
    adam = " + ".join(f"{v:g}" for v in measured["adam"])
    return (f"equal to the recipe for {MIXED_STEPS} steps with Adam and with SGD + momentum "
            "(master copy within 1e-6, bf16 weights exact); at rest after the first step the "
            f"tracer measured {adam} bytes per parameter with Adam (bf16 weights, bf16 "
            "gradients, fp32 master copy and moments)"), figures


# --- prediction 2: one column of ZeRO's Table 1 -------------------------------------------------

TABLE1_ALLOWED = {"7.5B": {"exact", "rounded"}, "128B": {"exact", "rounded", "truncated"},
                  "1T": {"exact", "rounded", "truncated"}}


def reference_pos_gb(psi, n_d):
    return theory.zero_memory(psi, n_d, 1) / GB


def _number(fn, args):
    who = f"pos_gb{args}"
    value = call_here(fn, *args, who=who)
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise Failed(f"{who} returned {type(value).__name__} {value!r:.40}: return a number (GB)")
    return float(value)


def _gb(stage, **kwargs):
    return lambda psi, n: theory.zero_memory(psi, n, stage, **kwargs) / GB


_POS_MISTAKES = [
    (lambda psi, n: reference_pos_gb(psi, n) * GB / 2**30,
     "that is GiB (2^30 bytes); the ZeRO paper's GB is 1e9 bytes: 7.5e9 parameters x 16 bytes "
     "is its 120 GB"),
    (lambda psi, n: reference_pos_gb(psi, n) * GB, "that is bytes; return GB (1e9 bytes)"),
    (_gb(0), "that is the baseline: nothing partitioned. P_os partitions the optimizer states"),
    (_gb(2), "that is P_os+g: it partitions the gradients too. P_os partitions only the "
             "optimizer states"),
    (_gb(3), "that is P_os+g+p: everything partitioned. P_os partitions only the optimizer "
             "states"),
    (_gb(1, k=8), "K = 8 is fp32 Adam (two moments, no master copy); Table 1 is "
                  "mixed-precision Adam, whose optimizer states include the fp32 master copy"),
    (_gb(1, param_bytes=4, grad_bytes=4),
     "the parameters and gradients are fp16 in the paper's mixed-precision training: 2 bytes "
     "each"),
    (lambda psi, n: 12 * psi / n / GB,
     "that is the optimizer states' share alone; every rank also keeps all the fp16 parameters "
     "and gradients"),
]


def _pos_cases():
    table = [(c["num_params"], c["world_size"]) for c in theory.zero_table1() if c["stage"] == 1]
    return table + [(1e6, 3), (2.5e9, 8), (7.5e9, 2), (1e11, 5)]


register("pos_gb", [
    "P_os partitions only the optimizer states over the N_d ranks. What does every rank still "
    "hold whole, and how many bytes per parameter is each part, in the paper's mixed-precision "
    "Adam (§3.1)?",
    "Every rank keeps its fp16 parameters and fp16 gradients (2 + 2 bytes per parameter) and "
    "1/N_d of the K = 12 bytes per parameter of optimizer state. The paper's GB is 1e9 bytes.",
    "((2 + 2) * psi + 12 * psi / n_d) / 1e9",
])


@exercise("pos_gb")
def pos_gb(fn):
    """``fn(psi, n_d)``: GB per device of P_os (ZeRO-1) with mixed-precision Adam."""
    cases = _pos_cases()
    got = [_number(fn, case) for case in cases]
    want = [reference_pos_gb(*case) for case in cases]
    if not all(math.isclose(g, w, rel_tol=1e-6) for g, w in zip(got, want)):
        for formula, meaning in _POS_MISTAKES:
            if all(math.isclose(g, formula(*case), rel_tol=1e-6) for g, case in zip(got, cases)):
                raise Failed(meaning)
        case, value = next((c, g) for c, g, w in zip(cases, got, want)
                           if not math.isclose(g, w, rel_tol=1e-6))
        raise Failed(f"pos_gb{case} returned {value:.6g}, which is not P_os of the paper's "
                     "model: list what one rank holds, whole or as a 1/N_d share, in bytes per "
                     "parameter")
    reproduced = 0
    for cell in theory.zero_table1():
        if cell["stage"] != 1:
            continue
        value = _number(fn, (cell["num_params"], cell["world_size"]))
        verdict = theory.printed_match(value, cell["paper_gb"])
        if verdict not in TABLE1_ALLOWED[cell["model"]]:
            raise Failed(f"pos_gb({cell['num_params']:g}, {cell['world_size']}) = {value:.6g}, "
                         f"which does not print as the paper's {cell['paper_gb']} GB")
        reproduced += 1
    return (f"matches labkit.theory on {len(cases)} cases and gives all {reproduced} printed "
            "P_os cells of Table 1 (the 7.5B column rounded, the 128B and 1T columns rounded or "
            "truncated)"), {"Table 1 P_os cells reproduced": reproduced}
