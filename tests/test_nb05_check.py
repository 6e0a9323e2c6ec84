"""labkit.check for notebook 05: predicted_bytes, mixed_precision_step and pos_gb.

Valid answers pass (another way to write the same formula; numbers as floats, numpy or one-element
tensors; the fp32 gradient copies dropped with zero_grad, the weights copied down with
``p.data.copy_`` or ``torch._foreach_copy_``); each planted bug gets its own hint: elements for
bytes, K = 12 for fp32 Adam, no master copy, the master copy counted with the parameters, state
for momentum-free SGD, two momentum buffers, no gradients at rest, fp32 gradients at rest, bf16
moments, a prediction not proportional to N, the wrong shape of answer; a mixed-precision step
that keeps its fp32 gradients, never copies down, copies down before the step, overwrites the
master copy from the bf16 weights, assigns bf16 gradients to fp32 tensors, copies into the
parameters with grad on, does nothing, replaces the parameters with fp32 tensors, frees or changes
the model's gradients, steps the bf16 weights directly, steps twice; GiB, bytes, the other
stages, K = 8, fp32 parameters and gradients, the optimizer states alone.
"""
import numpy as np
import pytest
import torch

from labkit import theory
from labkit.check import _hints, nb05_memory as nb05
from labkit.check.nb05_memory import mixed_precision_step, pos_gb, predicted_bytes


# --- predicted_bytes -----------------------------------------------------------------------------

def bytes_ok(num_params, optimizer, precision):
    value = 4 if precision == "fp32" else 2
    state = {"sgd": 0, "sgd_momentum": 1, "adam": 2}[optimizer]
    master = 0 if precision == "fp32" else 1
    return {"params": value * num_params, "grads": value * num_params,
            "optimizer": 4 * (state + master) * num_params}


def bytes_as_tensors_and_numpy(num_params, optimizer, precision):
    """A valid alternative: a table, and numbers that are not Python ints."""
    table = {("sgd", "fp32"): (4, 4, 0), ("sgd_momentum", "fp32"): (4, 4, 4),
             ("adam", "fp32"): (4, 4, 8), ("sgd", "bf16_mixed"): (2, 2, 4),
             ("sgd_momentum", "bf16_mixed"): (2, 2, 8), ("adam", "bf16_mixed"): (2, 2, 12)}
    p, g, o = table[optimizer, precision]
    return {"optimizer": torch.tensor(float(o * num_params), dtype=torch.float64),
            "params": np.float64(p) * num_params, "grads": np.int64(g) * num_params}


def with_change(optimizer, precision, key, value):
    def fn(num_params, o, p):
        out = bytes_ok(num_params, o, p)
        if (o, p) == (optimizer, precision):
            out[key] = value * num_params
        return out
    return fn


def bytes_elements(num_params, optimizer, precision):
    out = bytes_ok(num_params, optimizer, precision)
    out["params"] //= 4 if precision == "fp32" else 2
    out["grads"] //= 4 if precision == "fp32" else 2
    out["optimizer"] //= 4
    return out


def bytes_no_master(num_params, optimizer, precision):
    out = bytes_ok(num_params, optimizer, precision)
    if precision == "bf16_mixed":
        out["optimizer"] -= 4 * num_params
    return out


def bytes_master_in_params(num_params, optimizer, precision):
    out = bytes_ok(num_params, optimizer, precision)
    if precision == "bf16_mixed":
        out["params"] += 4 * num_params
        out["optimizer"] -= 4 * num_params
    return out


def bytes_plus_constant(num_params, optimizer, precision):
    out = bytes_ok(num_params, optimizer, precision)
    out["optimizer"] += 16     # Adam's step counters of some model, added for every N
    return out


def bytes_stub(num_params, optimizer, precision):
    raise NotImplementedError()


def bytes_crash(num_params, optimizer, precision):
    value = {"fp32": 4}[precision]          # KeyError for "bf16_mixed"
    return bytes_ok(num_params, optimizer, precision) if value else None


@pytest.mark.parametrize("fn", [bytes_ok, bytes_as_tensors_and_numpy,
                                lambda n, o, p: theory.model_state_breakdown(n, o, p)])
def test_predicted_bytes_solutions_pass(fn):
    result = predicted_bytes(fn)
    assert result.passed, result.hint
    assert result.figures["adam, bf16_mixed: bytes per parameter (params, grads, optimizer)"] \
        == (2, 2, 12)
    assert result.figures["adam, fp32: bytes per parameter (params, grads, optimizer)"] \
        == (4, 4, 8)


@pytest.mark.parametrize("fn, hint", [
    (bytes_elements, "that counts elements"),
    (with_change("adam", "fp32", "optimizer", 12), "MIXED-precision Adam"),
    (with_change("adam", "fp32", "optimizer", 4), "two float32 moments"),
    (with_change("sgd", "fp32", "optimizer", 4), "SGD without momentum keeps no state"),
    (with_change("sgd_momentum", "fp32", "optimizer", 8), "exactly one buffer"),
    (with_change("sgd_momentum", "fp32", "optimizer", 0), "keeps a buffer per parameter"),
    (with_change("adam", "fp32", "grads", 0), "leaves .grad in place"),
    (with_change("adam", "fp32", "params", 2), "every parameter and gradient is a float32"),
    (bytes_no_master, "no fp32 master copy"),
    (bytes_master_in_params, "counts the fp32 master copy with the parameters"),
    (with_change("adam", "bf16_mixed", "params", 4), "bf16 in this recipe"),
    (with_change("adam", "bf16_mixed", "grads", 4), "fp32 copies the optimizer steps with are "
                                                    "freed"),
    (with_change("adam", "bf16_mixed", "optimizer", 8), "either the fp32 master copy is missing"),
    (with_change("adam", "bf16_mixed", "optimizer", 16), "one fp32 tensor too many"),
    (with_change("sgd_momentum", "bf16_mixed", "optimizer", 6), "the momentum buffer is fp32"),
    (with_change("sgd", "bf16_mixed", "optimizer", 3), "list the tensors of this kind"),
    (bytes_plus_constant, "not proportional to N"),
    (lambda n, o, p: 16 * n, "return a dict"),
    (lambda n, o, p: {"params": 4 * n, "grads": 4 * n}, "return exactly 'params', 'grads'"),
    (lambda n, o, p: dict(bytes_ok(n, o, p), grads="4N"), "a number of bytes"),
    (bytes_crash, "raised KeyError"),
])
def test_each_bytes_mistake_gets_its_hint(fn, hint):
    result = predicted_bytes(fn)
    assert not result.passed and hint in result.hint, result.hint


def test_predicted_bytes_stub_is_not_implemented():
    assert predicted_bytes(bytes_stub).status == "not implemented"


def test_the_hint_names_the_learners_value_not_the_answer():
    hint = predicted_bytes(with_change("adam", "fp32", "optimizer", 12)).hint
    assert "is 12 bytes per parameter" in hint and " 8 " not in hint


def test_the_tracer_measures_what_the_formula_says():
    """What the check grades against: six one-step runs under MemoryTracer, at rest."""
    generator = torch.Generator().manual_seed(0)
    widths = nb05._widths(generator)
    for combo in nb05.COMBOS:
        n, states = nb05.measure_states(*combo, widths, generator)
        assert states == theory.model_state_breakdown(n, *combo), combo


def test_a_measurement_that_disagrees_with_the_formula_is_a_labkit_bug(monkeypatch):
    real = nb05.measure_states

    def off_by_one_tensor(optimizer, precision, widths, generator):
        n, states = real(optimizer, precision, widths, generator)
        return n, dict(states, optimizer=states["optimizer"] + 4 * n)
    monkeypatch.setattr(nb05, "measure_states", off_by_one_tensor)
    result = predicted_bytes(bytes_ok)
    assert not result.passed and "likely a bug in labkit" in result.hint, result.hint


# --- mixed_precision_step ------------------------------------------------------------------------

def step_ok(params, master, optimizer):
    for p, m in zip(params, master):
        m.grad = p.grad.float()
    optimizer.step()
    with torch.no_grad():
        for p, m in zip(params, master):
            p.copy_(m)
            m.grad = None


def step_zero_grad_and_foreach(params, master, optimizer):
    """A valid alternative: the copies freed with zero_grad, the weights copied with foreach."""
    for p, m in zip(params, master):
        m.grad = torch.empty_like(m).copy_(p.grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch._foreach_copy_(params, master)


def step_data_copy(params, master, optimizer):
    for p, m in zip(params, master):
        m.grad = p.grad.to(torch.float32)
    optimizer.step()
    for p, m in zip(params, master):
        p.data.copy_(m.data)
        m.grad = None


def step_keeps_fp32_grads(params, master, optimizer):
    for p, m in zip(params, master):
        m.grad = p.grad.float()
    optimizer.step()
    with torch.no_grad():
        for p, m in zip(params, master):
            p.copy_(m)


def step_no_copy_down(params, master, optimizer):
    for p, m in zip(params, master):
        m.grad = p.grad.float()
    optimizer.step()
    for m in master:
        m.grad = None


def step_copy_down_first(params, master, optimizer):
    with torch.no_grad():
        for p, m in zip(params, master):
            p.copy_(m)
    for p, m in zip(params, master):
        m.grad = p.grad.float()
    optimizer.step()
    for m in master:
        m.grad = None


def step_recopies_master(params, master, optimizer):
    with torch.no_grad():
        for p, m in zip(params, master):
            m.copy_(p)
    step_ok(params, master, optimizer)


def step_no_cast(params, master, optimizer):
    for p, m in zip(params, master):
        m.grad = p.grad
    optimizer.step()


def step_copy_with_grad(params, master, optimizer):
    for p, m in zip(params, master):
        m.grad = p.grad.float()
    optimizer.step()
    for p, m in zip(params, master):
        p.copy_(m)
        m.grad = None


def step_nothing(params, master, optimizer):
    optimizer.step()


def step_fp32_params(params, master, optimizer):
    for p, m in zip(params, master):
        m.grad = p.grad.float()
    optimizer.step()
    for p, m in zip(params, master):
        p.data = m.detach().clone()
        m.grad = None


def step_frees_model_grads(params, master, optimizer):
    step_ok(params, master, optimizer)
    for p in params:
        p.grad = None


def step_scales_model_grads(params, master, optimizer):
    for p in params:
        p.grad.mul_(0.5)
    step_ok(params, master, optimizer)


def step_bf16_weights(params, master, optimizer):
    with torch.no_grad():
        for p in params:
            p -= 1e-2 * p.grad


def step_twice(params, master, optimizer):
    for p, m in zip(params, master):
        m.grad = p.grad.float()
    optimizer.step()
    optimizer.step()
    with torch.no_grad():
        for p, m in zip(params, master):
            p.copy_(m)
            m.grad = None


def step_stub(params, master, optimizer):
    raise NotImplementedError()


@pytest.mark.parametrize("fn", [step_ok, step_zero_grad_and_foreach, step_data_copy])
def test_mixed_precision_solutions_pass(fn):
    result = mixed_precision_step(fn)
    assert result.passed, result.hint
    assert result.figures["adam: bytes per parameter at rest (params, grads, optimizer)"] \
        == (2, 2, 12)
    assert result.figures["sgd_momentum: bytes per parameter at rest (params, grads, optimizer)"] \
        == (2, 2, 8)


@pytest.mark.parametrize("fn, hint", [
    (step_keeps_fp32_grads, "the fp32 gradient copies"),
    (step_no_copy_down, "copy the master weights down AFTER optimizer.step()"),
    (step_copy_down_first, "copy the master weights down AFTER optimizer.step()"),
    (step_recopies_master, "overwritten with the bf16 weights"),
    (step_no_cast, "torch refused a bf16 gradient"),
    (step_copy_with_grad, "copy into them under torch.no_grad()"),
    (step_nothing, "nothing moved"),
    (step_fp32_params, "no longer bfloat16"),
    (step_frees_model_grads, "the model's .grad was freed"),
    (step_scales_model_grads, "the model's bf16 gradients were changed"),
    (step_bf16_weights, "the master weights did not"),
    (step_twice, "differ from the recipe's"),
])
def test_each_mixed_precision_bug_gets_its_hint(fn, hint):
    result = mixed_precision_step(fn)
    assert not result.passed and hint in result.hint, result.hint


def test_mixed_precision_stub_is_not_implemented():
    assert mixed_precision_step(step_stub).status == "not implemented"


def test_the_master_copy_carries_what_bf16_rounds_away():
    """Why the re-copy mistake is caught: over three steps some update is below bf16's spacing,
    so a master copy re-read from the bf16 weights ends elsewhere."""
    generator = torch.Generator().manual_seed(3)
    for optimizer, lr in nb05.MIXED_CASES:
        widths = nb05._widths(generator)
        fp32 = nb05.models.fill(nb05.models.MLP(*widths), generator)
        runs = [nb05._MixedRun(fp32, optimizer, lr, widths) for _ in range(2)]
        for x, y in [fp32.batch(8, generator) for _ in range(nb05.MIXED_STEPS)]:
            for run in runs:
                run.backward(x, y)
            with torch.no_grad():
                for w, m in zip(runs[1].params, runs[1].master):
                    m.copy_(w)
            for run in runs:
                nb05.reference_mixed_step(run.params, run.master, run.optimizer)
        assert not nb05._close(runs[0].master, runs[1].master)


# --- pos_gb --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [
    lambda psi, n: (2 * psi + 2 * psi + 12 * psi / n) / 1e9,
    lambda psi, n: 16 * psi / 1e9 - 12 * psi * (1 - 1 / n) / 1e9,
    lambda psi, n: np.float64(psi) * (4 + 12 / n) * 1e-9,
    lambda psi, n: torch.tensor(psi * (4 + 12 / n) / 1e9, dtype=torch.float64),
])
def test_pos_gb_solutions_pass(fn):
    result = pos_gb(fn)
    assert result.passed, result.hint
    assert result.figures == {"Table 1 P_os cells reproduced": 18}


@pytest.mark.parametrize("fn, hint", [
    (lambda psi, n: (4 * psi + 12 * psi / n) / 2**30, "GiB"),
    (lambda psi, n: 4 * psi + 12 * psi / n, "that is bytes"),
    (lambda psi, n: 16 * psi / 1e9, "that is the baseline"),
    (lambda psi, n: (2 * psi + 14 * psi / n) / 1e9, "that is P_os+g"),
    (lambda psi, n: 16 * psi / n / 1e9, "that is P_os+g+p"),
    (lambda psi, n: (4 * psi + 8 * psi / n) / 1e9, "K = 8 is fp32 Adam"),
    (lambda psi, n: (8 * psi + 12 * psi / n) / 1e9, "fp16 in the paper"),
    (lambda psi, n: 12 * psi / n / 1e9, "the optimizer states' share alone"),
    (lambda psi, n: (4 * psi + 12 * psi / (n + 1)) / 1e9, "which is not P_os"),
    (lambda psi, n: "31.4 GB", "return a number"),
])
def test_each_pos_gb_mistake_gets_its_hint(fn, hint):
    result = pos_gb(fn)
    assert not result.passed and hint in result.hint, result.hint


def test_pos_gb_stub_is_not_implemented():
    def stub(psi, n_d):
        raise NotImplementedError()
    assert pos_gb(stub).status == "not implemented"


def test_pos_gb_hints_do_not_give_the_formula_away_before_the_last():
    hints = _hints._HINTS["pos_gb"]
    assert "12 * psi" not in hints[0] + hints[1] and "12 * psi" in hints[-1]


# --- hints ---------------------------------------------------------------------------------------

def test_hints_are_registered_from_a_nudge_to_nearly_the_answer():
    for name in ("predicted_bytes", "mixed_precision_step", "pos_gb"):
        assert len(_hints._HINTS[name]) == 3, name
    assert "m.grad = None" in _hints._HINTS["mixed_precision_step"][2]
    assert "adam 4, 4, 8" in _hints._HINTS["predicted_bytes"][2]
