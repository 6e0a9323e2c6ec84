"""labkit.plots and labkit.widgets: the bars show the bytes they are given, the calculator the formula."""
import matplotlib

matplotlib.use("Agg")

import nbformat  # noqa: E402
import pytest  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

from labkit import plots, theory, widgets  # noqa: E402

RANK0 = {"params": 4e6, "grads": 4e6, "optimizer": 8e6, "activations": 1e6, "comm": 0, "other": 0}
RANK1 = {"peak": {"params": 4e6, "grads": 4e6, "optimizer": 8e6, "activations": 2e6}}


def test_memory_bars_stack_each_category_at_its_measured_height():
    predicted = {"params": 4e6, "grads": 4e6, "optimizer": 8e6}
    ax = plots.memory_bars([RANK0, RANK1], predicted=predicted, unit="MB")
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["rank 0", "rank 1", "formula"]
    drawn = {}
    for container in ax.containers:
        drawn[container.get_label()] = [(p.get_y(), p.get_height()) for p in container.patches]
    assert list(drawn) == ["params", "grads", "optimizer", "activations"]  # empty ones skipped
    assert drawn["params"] == [(0, 4), (0, 4), (0, 4)]
    assert drawn["optimizer"] == [(8, 8), (8, 8), (8, 8)]
    assert drawn["activations"] == [(16, 1), (16, 2), (16, 0)]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(16)


def test_plots_know_the_tracer_categories_in_the_same_order():
    from labkit.memory import CATEGORIES
    assert plots.CATEGORIES == CATEGORIES


def test_memory_bars_reject_an_unknown_unit():
    with pytest.raises(ValueError, match="unit must be one of"):
        plots.memory_bars([RANK0], unit="parsecs")


def test_calculator_shows_the_zero_paper_figure_1_numbers():
    calc = widgets.memory_calculator(num_params=7.5e9, world_size=64)
    totals = []
    for stage in range(4):
        calc.stage.value = stage
        totals.append(round(sum(calc.breakdown().values()) / 1e9, 2))
    assert totals == [120.0, 31.41, 16.64, 1.88]
    assert "1.88 GB of model states per rank" in calc.summary.value


def test_calculator_precision_optimizer_and_world_size_change_the_bytes():
    calc = widgets.memory_calculator(num_params=1e9, world_size=1)
    calc.precision.value, calc.optimizer.value = "fp32", "Adam"
    assert calc.breakdown() == {"params": 4e9, "grads": 4e9, "optimizer": 8e9}
    calc.optimizer.value = "SGD"
    assert calc.breakdown()["optimizer"] == 0
    calc.world_size.value, calc.stage.value = 4, 2
    assert calc.breakdown() == {"params": 4e9, "grads": 1e9, "optimizer": 0}


def test_calculator_in_transformer_mode_counts_with_the_theory_formula():
    calc = widgets.memory_calculator(world_size=1)
    calc.mode.value = "transformer shape"
    calc.layers.value, calc.hidden.value = 12, 768
    expected = theory.transformer_params(layers=12, hidden=768, vocab_size=50257, seq_len=2048)
    assert calc.num_params() == expected
    assert sum(calc.breakdown().values()) == 16 * expected


def test_calculator_displays_as_a_widget_in_a_kernel():
    cell = ("import matplotlib\nfrom labkit import widgets\n"
            "widgets.memory_calculator(measured=[{'params': 1e9, 'grads': 1e9}], num_params=1e9,"
            " world_size=1)")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    outputs = notebook.cells[0].outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)


def test_memory_timeline_stacks_the_tracer_timeline_and_marks_its_peak():
    timeline = [
        ("enter", 4e6, {"params": 4e6}),
        ("forward aten.mm.default", 5e6, {"params": 4e6, "activations": 1e6}),
        ("after forward", 5e6, {"params": 4e6, "activations": 1e6}),
        ("backward aten.mm.default", 9e6, {"params": 4e6, "grads": 4e6, "activations": 1e6}),
        ("before optimizer.step", 8e6, {"params": 4e6, "grads": 4e6}),
        ("optimizer.step aten.div.Tensor", 17e6, {"params": 4e6, "grads": 4e6, "other": 9e6}),
        ("after optimizer.step", 16e6, {"params": 4e6, "grads": 4e6, "optimizer": 8e6}),
    ]
    ax = plots.memory_timeline(timeline, unit="MB")
    labels = ax.get_legend_handles_labels()[1]
    assert labels[:5] == ["params", "grads", "optimizer", "activations", "other"]
    assert labels[5] == "peak 17 MB"
    dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert [line.get_xdata()[0] for line in dotted] == [0, 2, 4, 6]
    peak = next(line for line in ax.get_lines() if line.get_marker() == "v")
    assert (peak.get_xdata()[0], peak.get_ydata()[0]) == (5, 17)
    # the stack's top edge at each entry is the entry's total
    tops = ax.collections[-1].get_paths()[0].vertices[:, 1].max()
    assert tops == pytest.approx(17)


def test_memory_timeline_rejects_an_empty_timeline_and_an_unknown_unit():
    with pytest.raises(ValueError, match="empty"):
        plots.memory_timeline([])
    with pytest.raises(ValueError, match="unit must be one of"):
        plots.memory_timeline([("enter", 1, {"params": 1})], unit="parsecs")


def test_parameter_slider_keeps_the_requested_size_exactly():
    # A FloatLogSlider snapped 7.5 B to its exponent grid (10^0.88 = 7.59 B) in the browser.
    for num_params in (7.5e9, 6.7e9, 125e6, 175e9):
        calc = widgets.memory_calculator(num_params=num_params)
        assert calc.num_params() == pytest.approx(num_params, rel=1e-12)
        assert calc.summary.value.startswith(f"<b>{num_params / 1e9:.3g} B parameters</b>")
    calc = widgets.memory_calculator(num_params=7.5e9)
    stops = [value for _, value in calc.billions.options]
    assert stops == sorted(stops) and len(set(stops)) == len(stops)
    calc.billions.index += 1                      # one step right, as the arrow key does
    assert calc.num_params() == 10e9
    assert calc.billions.label == "10 B"
