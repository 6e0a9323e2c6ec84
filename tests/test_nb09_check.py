"""Notebook 09's checks: the references pass, each named mistake gets its hint, a stub is "not
implemented yet", the hints are registered, and a quiz with a wrong answer names that answer only."""
import pytest

from labkit import theory
from labkit.check import _hints
from labkit.check import nb09_capstone as nb09


def t(op, s, n, a, b):
    return theory.collective_time(op, s, n, a, b)


def right_time(strategy, p, n, b, a, be):
    s = p * b
    if strategy == "ddp":
        return t("all_reduce", s, n, a, be)
    gathers = 2 if strategy == "zero3" else 1
    return t("reduce_scatter", s, n, a, be) + gathers * t("all_gather", s, n, a, be)


def right_bound(t1, p, b, a, be, strategy):
    n = 1
    while right_time(strategy, p, n, b, a, be) < t1 / n:
        n += 1
    return n


def answers(**changes):
    out = {key: truth for key, (_, truth, _) in nb09.STATEMENTS.items()}
    out.update(changes)
    return out


def stub(*args):
    raise NotImplementedError()


def test_the_references_pass():
    for check, fn in ((nb09.step_comm_time, right_time),
                      (nb09.comm_bound_world_size, right_bound),
                      (nb09.misconceptions, lambda: answers())):
        result = check(fn)
        assert result.passed, result.hint


def test_an_all_reduce_for_zero1_is_also_right():
    # RS + AG costs what one all-reduce costs on a ring: a learner may write it either way
    def as_all_reduce(strategy, p, n, b, a, be):
        if strategy in ("zero1", "zero2"):
            return t("all_reduce", p * b, n, a, be)
        return right_time(strategy, p, n, b, a, be)
    assert nb09.step_comm_time(as_all_reduce).passed


def _patched(strategy, fn):
    return lambda st, *rest: fn(st, *rest) if st == strategy else right_time(st, *rest)


TIME_MISTAKES = [
    (lambda st, p, n, b, a, be: right_time(st, p, n, b, 0.0, be), "bandwidth term alone"),
    (lambda st, p, n, b, a, be: right_time(st, p, n, b, a, 0.0), "latency term alone"),
    (lambda st, p, n, b, a, be: right_time(st, p / n, n, b, a, be), "not the 1/N"),
    (lambda st, p, n, b, a, be: right_time(st, p, n, 1, a, be), "counts elements"),
    (_patched("ddp", lambda st, p, n, b, a, be: t("reduce_scatter", p * b, n, a, be)),
     "one phase of the all-reduce"),
    (_patched("zero1", lambda st, p, n, b, a, be: t("all_reduce", p * b, n, a, be)
              + t("all_gather", p * b, n, a, be)), "ZeroRedundancyOptimizer"),
    (_patched("zero2", lambda st, p, n, b, a, be: t("reduce_scatter", p * b, n, a, be)),
     "one more collective"),
    (_patched("zero3", lambda st, p, n, b, a, be: right_time("zero1", p, n, b, a, be)),
     "gathered again"),
    (_patched("zero3", lambda st, p, n, b, a, be: t("all_reduce", p * b, n, a, be)
              + 2 * t("all_gather", p * b, n, a, be)), "not an all-reduce"),
]


@pytest.mark.parametrize("fn, hint", TIME_MISTAKES)
def test_step_comm_time_mistakes_get_their_hint(fn, hint):
    result = nb09.step_comm_time(fn)
    assert not result.passed and hint in result.hint, result.hint


def _first(condition):
    n = 1
    while not condition(n):
        n += 1
    return n


BOUND_MISTAKES = [
    (lambda t1, p, b, a, be, st: _first(lambda n: right_time(st, p, n, b, a, be) >= t1),
     "T1/N"),
    (lambda t1, p, b, a, be, st: right_bound(t1, p, b, a, be, st) - 1, "one too few"),
    (lambda t1, p, b, a, be, st: right_bound(t1, p, b, 0.0, be, st), "latency term"),
    (lambda t1, p, b, a, be, st: right_bound(t1, p, b, a, be, "ddp"), "DDP's for every strategy"),
]


@pytest.mark.parametrize("fn, hint", BOUND_MISTAKES)
def test_comm_bound_mistakes_get_their_hint(fn, hint):
    result = nb09.comm_bound_world_size(fn)
    assert not result.passed and hint in result.hint, result.hint


def test_comm_bound_needs_a_whole_number():
    result = nb09.comm_bound_world_size(lambda *args: right_bound(*args) + 0.5)
    assert not result.passed and "whole number" in result.hint


def test_the_grid_has_no_crossing_at_a_float_tie():
    # a learner's float order must not decide the answer: the crossing is clear at every case
    for case in nb09._BOUND_CASES:
        for strategy in nb09.STRATEGIES:
            n = nb09._comm_bound(*case, strategy)
            t1, p, b, a, be = case
            for m in (n - 1, n):
                if m >= 1:
                    gap = right_time(strategy, p, m, b, a, be) - t1 / m
                    assert abs(gap) > 1e-9 * t1, (case, strategy, m)


def test_stubs_are_not_implemented():
    for check in (nb09.step_comm_time, nb09.comm_bound_world_size, nb09.misconceptions):
        assert check(stub).status == "not implemented"


def test_hints_are_registered():
    for name in ("step_comm_time", "comm_bound_world_size", "misconceptions"):
        assert name in _hints.exercises() and len(_hints._HINTS[name]) >= 2


def test_a_wrong_answer_is_named_and_no_other():
    result = nb09.misconceptions(lambda: answers(k_is_always_12=True))
    assert not result.passed
    assert "'k_is_always_12'" in result.hint and "1 of 13" in result.hint
    others = [k for k in nb09.STATEMENTS if k != "k_is_always_12"]
    assert not any(f"'{k}'" in result.hint for k in others), result.hint


@pytest.mark.parametrize("given, hint", [
    (lambda: {k: v for k, v in answers().items() if k != "dataparallel_is_ddp"}, "no answer yet"),
    (lambda: answers(maybe=True), "unknown key"),
    (lambda: answers(ddp_bucket_25_mib="True"), "True or False"),
    (lambda: [True] * 13, "return a dict"),
])
def test_malformed_quiz_answers_get_a_hint(given, hint):
    result = nb09.misconceptions(given)
    assert not result.passed and hint in result.hint, result.hint


def test_the_checks_are_reachable_from_labkit_check():
    import labkit.check
    for name in ("step_comm_time", "comm_bound_world_size", "misconceptions"):
        assert getattr(labkit.check, name) is getattr(nb09, name)


# --- smallest_world_size: an independent reference, by search over N_d with the formula --------

def right_fit(psi, stage, gb):
    """The first N_d whose model states fit, found by walking N_d up (no algebra); 0 if the
    part no N_d divides does not fit alone."""
    limit = gb * 1e9
    if theory.zero_memory(psi, 10**9, stage) > limit * (1 + 1e-12):
        return 0
    n = 1
    while theory.zero_memory(psi, n, stage) > limit * (1 + 1e-12):
        n += 1
    return n


def test_smallest_world_size_reference_passes_and_matches_table1s_bold_cells():
    assert nb09.smallest_world_size(right_fit).passed
    # the paper's bold cells: the smallest listed N_d that fits 32 GB (ground truth §1.3)
    listed = theory.TABLE1_WORLD_SIZES
    first_listed = {stage: next(n for n in listed if n >= right_fit(7.5e9, stage, 32))
                    for stage in (1, 2, 3)}
    assert first_listed == {1: 64, 2: 16, 3: 4}
    assert right_fit(128e9, 3, 32) == 64 and next(n for n in listed
                                                   if n >= right_fit(1e12, 3, 32)) == 1024


@pytest.mark.parametrize("fn, hint", [
    (lambda psi, st, gb: next((n for n in theory.TABLE1_WORLD_SIZES
                               if right_fit(psi, st, gb) and n >= right_fit(psi, st, gb)), 0),
     "Table 1's rows"),
    (lambda psi, st, gb: right_fit(psi, st, gb * 2**30 / 1e9), "GiB"),
    (lambda psi, st, gb: right_fit(psi, min(st + 1, 3), gb), "next stage"),
    (lambda psi, st, gb: 4, "smallest_world_size(7500000000.0, 0, 32) returned 4"),
])
def test_smallest_world_size_mistakes_get_their_hint(fn, hint):
    result = nb09.smallest_world_size(fn)
    assert not result.passed and hint in result.hint, result.hint


def test_smallest_world_size_stub_is_not_implemented():
    assert nb09.smallest_world_size(stub).status == "not implemented"
