"""labkit.plots' step-by-step figures: collective_steps, alpha_beta_plot, step_timeline."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from labkit import plots, theory  # noqa: E402


def cell_texts(ax) -> dict:
    """{(rank, element): text} for the values written in one panel."""
    return {(int(t.get_position()[1] - 0.5), int(t.get_position()[0] - 0.5)): t.get_text()
            for t in ax.texts}


def outlined(ax) -> set:
    """(rank, element) of every outlined cell in one panel."""
    return {(round(p.get_y() - 0.08), round(p.get_x() - 0.06)) for p in ax.patches
            if isinstance(p, Rectangle) and not p.get_fill()}


# --- collective_steps --------------------------------------------------------------------------

RING = [[[1, 2], [10, 20]],          # 2 ranks, 2 elements: start
        [[1, 22], [11, 20]],          # after the reduce-scatter step
        [[11, 22], [11, 22]]]         # after the all-gather step


def test_one_panel_per_state_with_its_title_and_values():
    fig = plots.collective_steps(RING, ["start", "reduce-scatter 1", "all-gather 1"])
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == ["start", "reduce-scatter 1", "all-gather 1"]
    assert cell_texts(fig.axes[1]) == {(0, 0): "1", (0, 1): "22", (1, 0): "11", (1, 1): "20"}
    assert cell_texts(fig.axes[2]) == {(r, j): v for r in (0, 1) for j, v in ((0, "11"), (1, "22"))}


def test_highlighted_cells_are_outlined_and_only_those():
    highlight = [[], [(0, 1), (1, 0)], [(0, 0), (1, 1)]]
    fig = plots.collective_steps(RING, ["a", "b", "c"], highlight)
    assert [outlined(ax) for ax in fig.axes] == [set(), {(0, 1), (1, 0)}, {(0, 0), (1, 1)}]


def test_panels_wrap_into_rows_and_only_the_first_column_names_the_ranks():
    states = [[[i], [i + 1], [i + 2]] for i in range(5)]
    fig = plots.collective_steps(states, [str(i) for i in range(5)], ncols=3)
    assert len(fig.axes) == 5                       # the sixth slot of the 2x3 grid is removed
    labels = [[t.get_text() for t in ax.get_yticklabels()] for ax in fig.axes]
    assert labels[0] == labels[3] == ["rank 0", "rank 1", "rank 2"]
    assert labels[1] == labels[2] == labels[4] == []
    assert fig.axes[3].get_subplotspec().rowspan.start == 1     # state 3 starts row 2


def test_one_colour_scale_for_every_panel_and_blank_cells_for_missing_values():
    fig = plots.collective_steps([[[1, 2], [1000, 2000]], [[3], None]], ["x", "y"])
    norms = [ax.collections[0].norm for ax in fig.axes]
    assert norms[0] is norms[1] and isinstance(norms[0], matplotlib.colors.LogNorm)
    assert cell_texts(fig.axes[1]) == {(0, 0): "3"}


def test_titles_and_highlights_must_match_the_states():
    with pytest.raises(ValueError):
        plots.collective_steps(RING, ["only one title"])
    with pytest.raises(ValueError):
        plots.collective_steps([], [])


# --- alpha_beta_plot --------------------------------------------------------------------------

def test_points_model_and_crossover_are_drawn_from_alpha_and_beta():
    sizes = [2**10, 2**14, 2**18, 2**22]
    alpha, beta = 50e-6, 1e-9                       # crossover at N·alpha/beta = 100,000 B
    seconds = [theory.collective_time("all_reduce", s, 2, alpha, beta) for s in sizes]
    ax = plots.alpha_beta_plot(sizes, seconds, alpha, beta, runs={sizes[0]: [1e-4, 2e-4]})
    points, model = ax.get_lines()[0], ax.get_lines()[1]
    assert list(points.get_xdata()) == sizes
    assert list(points.get_ydata()) == pytest.approx([s * 1e6 for s in seconds])
    assert model.get_ydata()[0] == pytest.approx(seconds[0] * 1e6)
    assert model.get_ydata()[-1] == pytest.approx(seconds[-1] * 1e6)
    crossover = ax.get_lines()[2]
    assert crossover.get_xdata()[0] == pytest.approx(2 * alpha / beta)
    assert len(ax.collections) == 1 and len(ax.collections[0].get_offsets()) == 2
    assert "crossover 100,000 B" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_no_crossover_line_outside_the_measured_sizes():
    ax = plots.alpha_beta_plot([10, 100], [1.0, 1.0], 1.0, 1e-12)
    assert len(ax.get_lines()) == 2


# --- step_timeline ----------------------------------------------------------------------------

def two_ranks():
    return [{"backward": (0.001, 0.005), "sync": (0.005, 0.007), "grads": [0.002, 0.004],
             "comms": [(0.002, 0.003, 100), (0.004, 0.002, 200), (0.005, None, 300)]},
            {"backward": (0.002, 0.004), "sync": (0.004, 0.008), "grads": [0.003],
             "comms": [(0.003, 0.004, 100)]}]


def bars(ax):
    """(x start, width, y bottom) of every bar, in drawing order, in ms and axis units."""
    out = []
    for collection in ax.collections:
        for path in collection.get_paths() if type(collection).__name__ != "LineCollection" else []:
            xs, ys = path.vertices[:, 0], path.vertices[:, 1]
            out.append((round(xs.min(), 6), round(xs.max() - xs.min(), 6), round(ys.min(), 6)))
    return out


def test_every_phase_and_all_reduce_is_a_bar_at_its_time_in_ms():
    ax = plots.step_timeline(two_ranks())
    drawn = bars(ax)
    # rank 0 (on top, rows 3..5): backward, sync, then its three all-reduces, first on top
    assert drawn[:2] == [(1.0, 4.0, 4.1), (5.0, 2.0, 4.1)]
    assert [d[:2] for d in drawn[2:5]] == [(2.0, 3.0), (4.0, 2.0), (5.0, 0.0)]
    assert [d[2] for d in drawn[2:5]] == sorted((d[2] for d in drawn[2:5]), reverse=True)
    # rank 1 below: backward, sync, one all-reduce filling its row
    assert drawn[5:] == [(2.0, 2.0, 1.1), (4.0, 4.0, 1.1), (3.0, 4.0, 0.1)]


def test_gradient_ticks_labels_and_legend():
    ax = plots.step_timeline(two_ranks(), title="t", legend=True)
    ticks = [c for c in ax.collections if type(c).__name__ == "LineCollection"]
    assert [len(c.get_segments()) for c in ticks] == [2, 1]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "rank 0 all-reduces", "rank 0 backward | sync", "rank 1 all-reduces",
        "rank 1 backward | sync"]
    assert ax.get_yticks()[0] > ax.get_yticks()[2]        # rank 0 on top
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "backward", "wait after backward", "all-reduce in flight"]
    assert ax.get_title() == "t"


def test_default_title_explains_the_colours():
    ax = plots.step_timeline(two_ranks()[:1])
    assert ax.get_title() == plots.TIMELINE_TITLE and ax.get_legend() is None
