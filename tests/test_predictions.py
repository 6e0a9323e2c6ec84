"""The prediction checks: the right formula passes; each usual mistake fails with its own hint;
a stub is "not implemented"; a crash or a non-number is a hint, never a traceback."""
import pytest

from labkit import theory
from labkit.check import predictions


def ring_bytes(s, n):
    return 2 * (n - 1) / n * s


def all_reduce_time(s, n, alpha, beta):
    return 2 * (n - 1) * alpha + ring_bytes(s, n) * beta


RIGHT = {
    "predicted_sum": lambda n: n * (n - 1) // 2,          # an int is a number too
    "ring_sends_per_rank": lambda n: 2 * (n - 1),
    "ring_bytes_per_rank": ring_bytes,
    "all_reduce_time": all_reduce_time,
    "crossover_size": lambda n, alpha, beta: n * alpha / beta,
    "algbw_from_busbw": lambda busbw, n: busbw * n / (2 * (n - 1)),
}

WRONG = [  # (check, function, a piece of the hint it must give)
    ("predicted_sum", lambda n: n * (n + 1) / 2, "numbered from 0"),
    ("predicted_sum", lambda n: n, "number of ranks"),
    ("ring_sends_per_rank", lambda n: n - 1, "one phase"),
    ("ring_bytes_per_rank", lambda s, n: (n - 1) / n * s, "one phase"),
    ("ring_bytes_per_rank", lambda s, n: 2 * (n - 1) * s, "whole tensor"),
    ("ring_bytes_per_rank", lambda s, n: 2 * s, "how many steps"),
    ("all_reduce_time", lambda s, n, a, b: ring_bytes(s, n) * b, "latency"),
    ("all_reduce_time", lambda s, n, a, b: a + ring_bytes(s, n) * b, "once per step"),
    ("all_reduce_time", lambda s, n, a, b: 2 * (n - 1) * a + s * b, "ring_bytes_per_rank"),
    ("crossover_size", lambda n, a, b: a / b, "factors in N"),
    ("algbw_from_busbw", lambda b, n: b * 2 * (n - 1) / n, "other way"),
    ("ring_bytes_per_rank", lambda s, n: ring_bytes(s, n) + (s == 7), "(7, 5) returned"),
]


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_the_right_formula_passes(name):
    result = getattr(predictions, name)(RIGHT[name])
    assert result.passed, result.hint


@pytest.mark.parametrize("name, fn, hint", WRONG)
def test_each_usual_mistake_gets_its_hint(name, fn, hint):
    result = getattr(predictions, name)(fn)
    assert not result.passed and hint in result.hint, result.hint
    assert f"{name}: {name}:" not in result.line, result.line   # the name once


def test_a_stub_is_not_implemented_and_a_crash_is_a_hint():
    def stub(n):
        raise NotImplementedError()
    assert predictions.ring_sends_per_rank(stub).status == "not implemented"
    crashed = predictions.ring_sends_per_rank(lambda n: 1 / 0)
    assert not crashed.passed and "ZeroDivisionError" in crashed.hint
    text = predictions.ring_sends_per_rank(lambda n: "2(N-1)")
    assert not text.passed and "return a number" in text.hint


def test_the_hint_does_not_give_the_formula_away():
    result = predictions.ring_bytes_per_rank(lambda s, n: 0.0)
    assert not result.passed and "2(N-1)" not in result.hint and "returned 0" in result.hint
    assert "picture of the ring" in result.hint                 # ring advice for a ring formula


def test_theory_names_the_steps_and_the_bus_factor():
    assert [theory.ring_steps("all_reduce", n) for n in (1, 2, 4)] == [0, 2, 6]
    assert theory.ring_steps("all_gather", 4) == 3 and theory.ring_steps("send", 1) == 1
    assert theory.busbw_factor("all_reduce", 4) == pytest.approx(1.5)
    assert theory.busbw("all_reduce", 10, 1, 4) == pytest.approx(10 * 1.5)


def test_a_not_implemented_error_from_torch_is_a_crash_not_the_stub():
    """Only the learner's own stub means "not implemented"; torch's NotImplementedError (an op
    without a kernel for this dtype) is a bug in the learner's formula, with its message."""
    import torch

    def uses_an_op_torch_lacks(n):
        raise NotImplementedError("Could not run 'aten::x' with arguments from the 'CPU' backend")

    uses_an_op_torch_lacks.__code__ = uses_an_op_torch_lacks.__code__.replace(
        co_filename=torch.__file__)   # as if raised inside torch
    result = predictions.ring_sends_per_rank(uses_an_op_torch_lacks)
    assert not result.passed and "Could not run" in result.hint, result.status
