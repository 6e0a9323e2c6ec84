"""labkit.plots.collective_picture: every rank's values, before and after, in the right cell."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from labkit import plots  # noqa: E402


def cell_texts(ax) -> dict:
    """{(rank, element): text} for the annotations drawn in one panel."""
    return {(int(t.get_position()[1] - 0.5), int(t.get_position()[0] - 0.5)): t.get_text()
            for t in ax.texts}


def test_each_rank_row_shows_its_values_in_order():
    before = [[1, 2], [10, 20], [100, 200]]
    after = [[111, 222]] * 3
    ax_before, ax_after = plots.collective_picture(before, after, title="all-reduce")
    assert cell_texts(ax_before) == {(0, 0): "1", (0, 1): "2", (1, 0): "10", (1, 1): "20",
                                     (2, 0): "100", (2, 1): "200"}
    assert cell_texts(ax_after) == {(r, j): v for r in range(3) for j, v in enumerate(["111", "222"])}
    assert [t.get_text() for t in ax_before.get_yticklabels()] == ["rank 0", "rank 1", "rank 2"]
    assert (ax_before.get_title(), ax_after.get_title()) == ("before", "after")
    assert ax_before.figure._suptitle.get_text() == "all-reduce"


def test_shards_of_different_length_and_missing_ranks_leave_cells_blank():
    before = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])]
    after = [torch.tensor([11.0, 22.0]), None]          # tensors, and a rank with nothing shown
    ax_before, ax_after = plots.collective_picture(before, after)
    assert len(cell_texts(ax_before)) == 8
    assert cell_texts(ax_after) == {(0, 0): "11", (0, 1): "22"}
    assert ax_after.get_xlim() == (0, 2) and ax_after.get_ylim() == (2, 0)   # rank 0 on top


def test_the_grid_masks_exactly_the_missing_cells():
    values, mask = plots.collective_grid([[5.0], None, [1.0, 2.0, 3.0]])
    assert values.shape == (3, 3)
    assert mask.tolist() == [[False, True, True], [True, True, True], [False, False, False]]
    assert values[2].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("values, log", [([1, 10, 100, 1000], True), ([0, 1, 2, 3], False),
                                         ([-1, 1], False), ([3, 3], False)])
def test_colour_scale_is_logarithmic_only_for_positive_values_spanning_a_wide_range(values, log):
    ax_before, _ = plots.collective_picture([values], [values])
    norm = ax_before.collections[0].norm
    assert isinstance(norm, matplotlib.colors.LogNorm) == log


def test_draws_into_given_axes_and_uses_the_format():
    import matplotlib.pyplot as plt
    _, axes = plt.subplots(1, 2)
    got = plots.collective_picture([[0.5]], [[1.25]], axes=axes, fmt="{:.1f}")
    assert got == (axes[0], axes[1])
    assert cell_texts(axes[1]) == {(0, 0): "1.2"}
