"""Quick sizes under nbgrader: only when nbgrader runs the kernel AND the instructor asked.

``labkit.check._sizes``: with ``NBGRADER_EXECUTION`` in ("autograde", "validate") and
``LABKIT_AUTOGRADE_SIZES=quick`` the rank checks run on 2 and 3 ranks instead of 2, 3, 4 (or 2
and 4), and say so in their line; with either variable alone, or neither, nothing changes (a
learner's own run is never lowered). Quick sizes still catch what the checks exist for: a bug
that shows only on an odd N above 2, a wrong neighbour in the ring, sizes N does not divide,
gradients summed instead of averaged. A few small checks only: each launches ranks.
"""
import pytest

from labkit import check
from labkit.check import _sizes
from test_check import ring_all_reduce, ring_the_wrong_way, sum_of_ranks, with_max
from test_nb02_check import PerTensor, SumNotMean
from test_nb06_check import NoPadding

FULL = {"2 ranks", "3 ranks", "4 ranks"}
QUICK = {"2 ranks", "3 ranks"}


@pytest.fixture
def environment(monkeypatch):
    """Set (a value) or unset (None) the two variables, starting from neither."""
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.delenv(_sizes.SETTING, raising=False)

    def set_to(execution=None, sizes=None):
        for name, value in (("NBGRADER_EXECUTION", execution), (_sizes.SETTING, sizes)):
            if value is not None:
                monkeypatch.setenv(name, value)
    return set_to


def world_sizes_tried(result) -> set:
    return {key for key in result.figures if key.endswith(" ranks")}


@pytest.mark.parametrize("execution, sizes", [
    (None, None),            # a learner's own run
    ("autograde", None),     # nbgrader, but the instructor did not ask
    ("validate", "full"),
    (None, "quick"),         # a learner who sets the variable by hand
    ("", "quick"),
    ("something else", "quick"),
])
def test_full_sizes_unless_nbgrader_runs_and_quick_was_asked_for(environment, capsys,
                                                                  execution, sizes):
    environment(execution, sizes)
    assert not _sizes.quick()
    result = check.sum_of_ranks(sum_of_ranks)
    assert result.passed and world_sizes_tried(result) == FULL
    assert "sizes" not in result.figures and "quick" not in capsys.readouterr().out


@pytest.mark.parametrize("execution", ["autograde", "validate"])
def test_quick_sizes_under_autograde_and_validate_and_the_line_says_so(environment, capsys,
                                                                       execution):
    environment(execution, "quick")
    assert _sizes.quick()
    result = check.sum_of_ranks(sum_of_ranks)
    assert result.passed and world_sizes_tried(result) == QUICK
    assert result.figures["sizes"] == "quick"
    line = capsys.readouterr().out.strip()
    assert line.startswith("✓ sum_of_ranks:") and "on 2 and 3 ranks" in line
    assert line.endswith(_sizes.NOTE) and "LABKIT_AUTOGRADE_SIZES=quick" in line


def test_an_unknown_setting_warns_and_keeps_the_full_sizes(environment):
    environment("autograde", "fast")
    with pytest.warns(UserWarning, match="neither 'quick' nor 'full'"):
        assert _sizes.pick((2, 3, 4), (2, 3)) == (2, 3, 4)


def test_quick_sizes_still_try_an_odd_world_size(environment):
    environment("autograde", "quick")
    # op=MAX gives N(N-1)/2 on 2 ranks (1 = 1): only a larger N tells it from a sum
    result = check.sum_of_ranks(with_max)
    assert not result.passed and "on 3 ranks" in result.hint and "op=MAX" in result.hint
    assert result.hint.endswith(_sizes.NOTE)


def test_a_quick_ring_check_passes_a_ring_and_names_a_wrong_neighbour(environment):
    environment("autograde", "quick")
    right = check.ring_all_reduce(ring_all_reduce)
    assert right.passed and right.figures["world_sizes"] == [2, 3]
    assert "on 2, 3 ranks for 1, 7, 12, 64, 1000 float32" in right.summary   # 7, 1: uneven
    # on 2 ranks left and right are the same rank: the wrong way round shows on 3
    wrong = check.ring_all_reduce(ring_the_wrong_way)
    assert not wrong.passed
    assert "on 3 ranks rank 0 sent to rank 2, not rank 1 (the ring runs the wrong way)" in \
        wrong.hint


def test_quick_training_checks_catch_a_missing_average_and_a_missing_padding(environment):
    environment("autograde", "quick")
    assert check.naive_ddp(PerTensor).passed
    summed = check.naive_ddp(SumNotMean)
    assert not summed.passed and "times too far" in summed.hint
    # 161 and 263 parameters: neither 2 nor 3 divides them
    unpadded = check.zero1(NoPadding)
    assert not unpadded.passed and "the input must be exactly N shards" in unpadded.hint
