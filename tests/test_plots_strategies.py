"""labkit.plots' strategy figures (decks and notebooks 07-09): memory, bytes and time per strategy,
the prefetch timeline, memory against the number of ranks, compute against communication."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from labkit import plots  # noqa: E402

NAMES = ["DDP", "ZeRO-1", "ZeRO-2"]


def bars(ax, label=None):
    """The bar patches of one container (by its legend label), or of every container."""
    containers = [c for c in ax.containers if label is None or c.get_label() == label]
    return [patch for c in containers for patch in c]


def scatter(ax, label):
    """The (x, y) points of the scatter drawn with this legend label."""
    found = [c for c in ax.collections if c.get_label() == label]
    assert len(found) == 1, f"one scatter labelled {label!r}, got {len(found)}"
    return [tuple(p) for p in found[0].get_offsets().tolist()]


def teardown_function():
    plt.close("all")


def test_memory_by_strategy_stacks_categories_and_marks_formula_and_peak():
    at_rest = [{"params": 4e6, "grads": 4e6, "optimizer": 8e6, "comm": 4e6},
               {"params": 4e6, "grads": 4e6, "optimizer": 4e6},
               {"params": 4e6, "grads": 2e6, "optimizer": 4e6, "total": 10e6, "buffers": 1e6}]
    ax = plots.memory_by_strategy(NAMES, at_rest, formula=[16e6, 12e6, 10e6],
                                  peaks=[22e6, 15e6, 12e6], unit="MB", title="at rest")
    params, grads, optimizer = (bars(ax, c) for c in ("params", "grads", "optimizer"))
    assert [p.get_height() for p in params] == [4, 4, 4]
    assert [p.get_height() for p in grads] == [4, 4, 2]
    assert [p.get_y() for p in grads] == [4, 4, 4]           # stacked on the parameters
    assert [p.get_height() for p in optimizer] == [8, 4, 4]
    assert [p.get_height() for p in bars(ax, "comm")] == [4, 0, 0]
    # an unknown key counts as "other"; "total" is not a category
    assert [p.get_height() for p in bars(ax, "other")] == [0, 0, 1]
    assert [b.get_label() for b in ax.containers] == ["params", "grads", "optimizer", "comm",
                                                      "other"]
    assert scatter(ax, "formula") == [(0, 16), (1, 12), (2, 10)]
    assert scatter(ax, "peak during the step") == [(0, 22), (1, 15), (2, 12)]
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    assert ax.get_ylabel() == "MB per rank" and ax.get_title() == "at rest"
    assert ax.get_ylim()[1] > 22                              # the peak is on the axes


def test_bars_by_strategy_scales_values_and_draws_the_formula():
    ax = plots.bars_by_strategy(NAMES, [6e6, 6e6, 9e6], formula=[6e6, 6e6, 9e6], scale=1e6,
                                ylabel="MB per step")
    assert [p.get_height() for p in bars(ax)] == [6, 6, 9]
    assert scatter(ax, "formula") == [(0, 6), (1, 6), (2, 9)]
    assert ax.get_ylabel() == "MB per step"
    no_formula = plots.bars_by_strategy(NAMES, [1.0, 2.0, 3.0], label=None)
    assert [p.get_height() for p in bars(no_formula)] == [1, 2, 3]
    assert no_formula.get_legend() is None and not no_formula.collections


def test_strategy_bars_draws_two_or_three_panels():
    at_rest = [{"params": 2e6}, {"params": 1e6}]
    axes = plots.strategy_bars(["DDP", "ZeRO-3"], at_rest, [4e6, 6e6],
                               memory_formula=[2e6, 1e6], wire_formula=[4e6, 6e6],
                               step_ms=[3.0, 5.0], where="2 ranks", time_label="ms")
    assert len(axes) == 3
    assert [ax.get_title() for ax in axes] == ["memory at rest, 2 ranks",
                                               "bytes per step, 2 ranks", "step time, 2 ranks"]
    assert [p.get_height() for p in bars(axes[0], "params")] == [2, 1]
    assert [p.get_height() for p in bars(axes[1])] == [4, 6]
    assert [p.get_height() for p in bars(axes[2])] == [3, 5]
    assert axes[2].get_ylabel() == "ms"
    two = plots.strategy_bars(["DDP", "ZeRO-3"], at_rest, [4e6, 6e6])
    assert len(two) == 2
    _, three = plt.subplots(1, 3)
    with pytest.raises(ValueError, match="need 2 axes"):
        plots.strategy_bars(["DDP", "ZeRO-3"], at_rest, [4e6, 6e6], axes=three)


def test_prefetch_timeline_puts_each_rank_in_its_lanes():
    ranks = [{"forward": [(0.000, 0.001)], "backward": [(0.003, 0.005), (0.006, 0.007)],
              "all_gather": [(0.0005, 0.002)], "reduce_scatter": [(0.004, None)],
              "backward_starts": 0.003},
             {"forward": [(0.000, 0.002)], "all_gather": [(0.001, 0.003), (0.004, 0.0045)]}]
    ax = plots.prefetch_timeline(ranks, title="one step")
    lanes = {c.get_label(): c for c in ax.collections if c.get_label() and
             not c.get_label().startswith("_")}
    assert set(lanes) == {"compute, forward", "compute, backward", "all-gather"}
    # rank 0 on top: its compute lane starts at 3 + 1.1; spans in ms
    forward = [tuple(p.get_paths()[0].vertices.min(axis=0)) for p in
               [c for c in ax.collections if c.get_label() == "compute, forward"]]
    assert forward == [(0.0, 4.1)]
    backward = lanes["compute, backward"].get_paths()
    assert len(backward) == 2
    assert backward[0].vertices.min(axis=0).tolist() == pytest.approx([3.0, 4.1])
    assert backward[0].vertices.max(axis=0).tolist() == pytest.approx([5.0, 4.9])
    green = list(matplotlib.colors.to_rgb(plots.PREFETCH_COLOURS["all_gather"]))
    gathers = [c for c in ax.collections if len(c.get_facecolor())
               and c.get_facecolor().tolist()[0][:3] == pytest.approx(green)]
    assert sum(len(c.get_paths()) for c in gathers) == 3     # one on rank 0, two on rank 1
    ticks = [line for line in ax.lines if line.get_marker() == "|"]
    assert len(ticks) == 1 and ticks[0].get_xdata().tolist() == [4.0]
    assert ticks[0].get_label() == "reduce-scatter called (end not known)"
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "rank 0 comm", "rank 0 compute", "rank 1 comm", "rank 1 compute"]
    assert [t.get_position()[1] for t in ax.get_yticklabels()] == [3.5, 4.5, 0.5, 1.5]
    assert ax.get_title() == "one step" and ax.get_legend() is not None
    assert plots.prefetch_timeline(ranks, legend=False).get_legend() is None


def test_memory_vs_world_size_draws_formula_measured_and_printed():
    formula = {"baseline": ([1, 64], [120e9, 120e9]), "P_os": ([1, 64], [120e9, 31.4e9])}
    measured = {"P_os": ([64], [31.40625e9])}
    ax = plots.memory_vs_world_size(formula, measured, printed=[(64, 31.4e9), (4, 52.5e9)],
                                    device=(32e9, "32 GB"), at=64)
    lines = {line.get_label(): line for line in ax.lines}
    assert lines["baseline: formula"].get_ydata().tolist() == [120, 120]
    assert lines["P_os: formula"].get_color() == lines["P_os: measured"].get_color()
    assert lines["P_os: measured"].get_ydata().tolist() == [pytest.approx(31.40625)]
    assert lines["as printed"].get_xdata().tolist() == [64, 4]
    assert list(lines["32 GB"].get_ydata()) == [32, 32]
    assert "baseline: measured" not in lines
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_ylabel() == "model states per device (GB)"
    with pytest.raises(ValueError, match="unit"):
        plots.memory_vs_world_size(formula, unit="pages")


def test_compute_vs_comm_lines_points_and_marks():
    ax = plots.compute_vs_comm([1, 2, 4], {"T1 / N": [0.008, 0.004, 0.002],
                                           "comm": [0.0, 0.003, 0.005]},
                               points={"measured": ([2, 4], [0.0035, 0.006])},
                               marks={"bound from N = 3": 3},
                               colours={"comm": "C3", "bound from N = 3": "C3"})
    lines = {line.get_label(): line for line in ax.lines}
    assert lines["T1 / N"].get_ydata().tolist() == pytest.approx([8, 4, 2])
    assert lines["comm"].get_ydata().tolist() == pytest.approx([0, 3, 5])
    assert lines["measured"].get_marker() == "o"
    assert lines["measured"].get_ydata().tolist() == pytest.approx([3.5, 6])
    assert list(lines["bound from N = 3"].get_xdata()) == [3, 3]
    assert lines["comm"].get_color() == lines["bound from N = 3"].get_color() == "C3"
    assert ax.get_xscale() == "linear" and ax.get_legend() is not None
    quiet = plots.compute_vs_comm([1, 2], {"a": [1, 2]}, log=True, legend=False)
    assert quiet.get_legend() is None and quiet.get_yscale() == "log"
