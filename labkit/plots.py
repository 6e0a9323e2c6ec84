"""Figures shared by notebooks and slides: where memory goes, rank by rank, beside the formula."""

CATEGORIES = ("params", "grads", "optimizer", "activations", "comm", "other")  # as labkit.memory's
COLOURS = {"params": "#4C72B0", "grads": "#DD8452", "optimizer": "#55A868",
           "activations": "#C44E52", "comm": "#8172B3", "other": "#937860"}
UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _categories(entry) -> dict:
    """Accept a tracer report ({"peak": {...}}) or a plain {category: bytes} dict."""
    if isinstance(entry, dict) and isinstance(entry.get("peak"), dict):
        entry = entry["peak"]
    return {c: float(entry.get(c, 0) or 0) for c in CATEGORIES}


def stacked_bytes(per_rank, predicted=None) -> tuple[list[str], list[dict]]:
    """The bars memory_bars draws: one per rank, then the prediction if there is one."""
    labels = [f"rank {r}" for r in range(len(per_rank))]
    bars = [_categories(entry) for entry in per_rank]
    if predicted is not None:
        labels.append("formula")
        bars.append(_categories(predicted))
    return labels, bars


def memory_bars(per_rank, predicted=None, unit: str = "MB", title: str | None = None, ax=None):
    """Stacked bars of bytes by category, one per rank, and the formula's prediction beside them.

    per_rank: a list (index = rank) of tracer reports or {category: bytes} dicts, e.g. what each
    rank returned from ``labkit.launch``. predicted: {category: bytes} from ``labkit.theory``
    (e.g. ``zero_memory_breakdown``); it is drawn as a hatched bar and its total as a dashed line.
    Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 * (len(per_rank) + 2) + 2, 3.5))
    labels, bars = stacked_bytes(per_rank, predicted)
    scale = UNITS[unit]
    bottoms = [0.0] * len(bars)
    for category in CATEGORIES:
        heights = [bar[category] / scale for bar in bars]
        if not any(heights):
            continue
        drawn = ax.bar(labels, heights, bottom=bottoms, label=category, color=COLOURS[category],
                       edgecolor="black", linewidth=0.5)
        if predicted is not None:
            drawn[-1].set_hatch("//")
            drawn[-1].set_alpha(0.6)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    if predicted is not None:
        ax.axhline(bottoms[-1], linestyle="--", color="black", linewidth=1,
                   label=f"formula total {bottoms[-1]:.3g} {unit}")
    ax.set_ylabel(f"memory per rank ({unit})")
    ax.set_title(title or "Memory per rank by category")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


def _values(row) -> list | None:
    """One rank's values as a list of floats: from a tensor, an array, a list or None."""
    if row is None:
        return None
    if hasattr(row, "tolist"):
        row = row.tolist()
    if not isinstance(row, (list, tuple)):
        row = [row]
    return [float(v) for v in row]


def collective_grid(per_rank) -> tuple:
    """(values, mask) for one panel of collective_picture: rows = ranks, columns = elements.

    A rank with fewer elements than the longest, or None, leaves its missing cells masked.
    """
    import numpy as np

    rows = [_values(row) for row in per_rank]
    width = max([len(row) for row in rows if row is not None] + [1])
    values = np.zeros((len(rows), width))
    mask = np.ones((len(rows), width), dtype=bool)
    for r, row in enumerate(rows):
        for j, value in enumerate(row or []):
            values[r, j], mask[r, j] = value, False
    return values, mask


def _shared_norm(grids):
    """One colour scale for several (values, mask) grids: logarithmic when every value is > 0
    and they span more than a factor of 100, so that 1 and 1111 both stand out."""
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    shown = np.concatenate([values[~mask] for values, mask in grids] or [np.zeros(0)])
    if shown.size and shown.min() > 0 and shown.max() / shown.min() > 100:
        return LogNorm(vmin=shown.min(), vmax=shown.max() * 3)
    low, high = (shown.min(), shown.max()) if shown.size else (0.0, 1.0)
    return Normalize(vmin=low, vmax=high + (high - low or 1.0) * 0.5)


def _draw_cells(ax, values, mask, norm, colours, fmt):
    """One rank x element grid: coloured cells, each annotated with its value (white on dark),
    rank 0 on top; masked cells stay blank."""
    import numpy as np

    ax.pcolormesh(np.ma.masked_array(values, mask), cmap=colours, norm=norm,
                  edgecolors="white", linewidth=2)
    for r in range(values.shape[0]):
        for j in range(values.shape[1]):
            if mask[r, j]:
                continue
            red, green, blue, _ = colours(norm(values[r, j]))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(j + 0.5, r + 0.5, fmt.format(values[r, j]), ha="center", va="center",
                    fontsize="small", color="white" if dark else "black")
    ax.set_xlim(0, values.shape[1])
    ax.set_ylim(values.shape[0], 0)   # rank 0 on top


def collective_picture(before, after, title: str | None = None, axes=None, fmt: str = "{:g}",
                       cmap: str = "YlGnBu"):
    """What every rank held before and after a collective: two grids, rank x element.

    before, after: one entry per rank (index = rank): a 1-D tensor, array or list of numbers,
    or None for a rank with nothing to show. Rows may differ in length (a reduce-scatter leaves
    each rank a shard); missing cells stay blank. Each cell is annotated with its value and
    coloured by it, on one colour scale for both panels (logarithmic when every value is > 0
    and they span more than a factor of 100, so that 1 and 1111 both stand out).
    axes: a pair of matplotlib Axes to draw in. Returns (ax_before, ax_after).
    """
    import matplotlib.pyplot as plt

    panels = [collective_grid(before), collective_grid(after)]
    norm = _shared_norm(panels)
    if axes is None:
        widths = [values.shape[1] for values, _ in panels]
        height = max(values.shape[0] for values, _ in panels)
        _, axes = plt.subplots(1, 2, figsize=(0.7 * sum(widths) + 2.6, 0.45 * height + 1.2),
                               gridspec_kw={"width_ratios": widths}, layout="constrained")
    colours = plt.get_cmap(cmap)
    for ax, (values, mask), label in zip(axes, panels, ("before", "after")):
        ranks, width = values.shape
        _draw_cells(ax, values, mask, norm, colours, fmt)
        ax.set_yticks([r + 0.5 for r in range(ranks)], [f"rank {r}" for r in range(ranks)])
        ax.set_xticks([j + 0.5 for j in range(width)], [str(j) for j in range(width)])
        ax.set_xlabel("element")
        ax.set_title(label)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    if title:
        axes[0].figure.suptitle(title)
    return axes[0], axes[1]


MARKS = ("enter", "after forward", "before optimizer.step", "after optimizer.step", "exit")


def memory_timeline(timeline, unit: str = "MB", title: str | None = None, ax=None,
                    marks: bool = True):
    """Bytes by category after each op of a ``MemoryTracer`` timeline, stacked, with its marks.

    timeline: ``mem.timeline``, a list of (event, total bytes, {category: bytes}), one entry per
    op that changed the total and one per mark (the start of the ``with``, the end of each
    forward, the start and end of each ``optimizer.step()``, the end of the ``with``). The x axis
    is the entry's index; marks are dotted vertical lines, labelled; a triangle marks the first
    entry with the largest total (the tracer's peak when the timeline starts at ``enter``).
    Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if not timeline:
        raise ValueError("the timeline is empty: trace with MemoryTracer(..., timeline=True)")
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 3.5))
    scale = UNITS[unit]
    x = list(range(len(timeline)))
    shown = [c for c in CATEGORIES if any(by.get(c, 0) for _, _, by in timeline)]
    ax.stackplot(x, *[[by.get(c, 0) / scale for _, _, by in timeline] for c in shown],
                 labels=shown, colors=[COLOURS[c] for c in shown], step="post")
    totals = [total / scale for _, total, _ in timeline]
    top = max(totals)
    if marks:
        at = [i for i, (event, _, _) in enumerate(timeline) if event in MARKS]
        for n, i in enumerate(at):
            ax.axvline(i, color="black", linestyle=":", linewidth=0.8)
            # hanging from the top of the axes; alternately right and left of their line, so
            # that adjacent marks stay legible
            ax.text(i, 0.98, f" {timeline[i][0]} ", rotation=90, fontsize="x-small", va="top",
                    ha="left" if n % 2 == 0 else "right", transform=ax.get_xaxis_transform())
    peak = totals.index(top)
    ax.plot([peak], [top], marker="v", color="black", linestyle="none",
            label=f"peak {top:.3g} {unit}")
    ax.set_xlim(-1, len(timeline))
    ax.set_ylim(0, top * (1.7 if marks else 1.1) or 1)
    ax.set_xlabel("op (each entry of the timeline)")
    ax.set_ylabel(f"live tensor memory ({unit})")
    ax.set_title(title or "Memory by category, op by op")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


# --- collectives step by step, and timelines of a step (decks and notebooks 01-03) -------------


def collective_steps(states, titles=None, highlight=None, ncols: int | None = None,
                     title: str | None = None, fmt: str = "{:g}", cmap: str = "YlGnBu"):
    """Successive states of a collective run step by step: one grid, rank x element, per state.

    states: a list of states, each a list (index = rank) of one rank's values (a 1-D tensor,
    array or list, or None for nothing shown), e.g. every rank's buffer after each step of a
    ring all-reduce. titles: one per state. highlight: one collection of (rank, element) cells
    per state, outlined in black (say, the cells that step wrote). ncols: panels per row (default
    all in one row). Every panel shares one colour scale (logarithmic when the values are > 0
    and span more than a factor of 100) and each cell shows its value. Returns the Figure; its
    ``axes`` holds one Axes per state, in order.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if not states:
        raise ValueError("no states to draw")
    titles = list(titles) if titles is not None else [f"state {i}" for i in range(len(states))]
    highlight = list(highlight) if highlight is not None else [()] * len(states)
    if len(titles) != len(states) or len(highlight) != len(states):
        raise ValueError(f"{len(states)} states, but {len(titles)} titles and "
                         f"{len(highlight)} highlights")
    grids = [collective_grid(state) for state in states]
    norm = _shared_norm(grids)
    colours = plt.get_cmap(cmap)
    ncols = ncols or len(states)
    nrows = -(-len(states) // ncols)
    ranks = max(values.shape[0] for values, _ in grids)
    width = max(values.shape[1] for values, _ in grids)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=(ncols * (0.62 * width + 0.35) + 0.7,
                                      nrows * (0.36 * ranks + 0.75)))
    for i, ax in enumerate(axes.flat):
        if i >= len(states):
            ax.remove()
            continue
        values, mask = grids[i]
        _draw_cells(ax, values, mask, norm, colours, fmt)
        for r, j in highlight[i]:
            ax.add_patch(Rectangle((j + 0.06, r + 0.08), 0.88, 0.84, fill=False,
                                   edgecolor="black", linewidth=2.2))
        ax.set_xticks([])
        if i % ncols == 0:
            ax.set_yticks([r + 0.5 for r in range(values.shape[0])],
                          [f"rank {r}" for r in range(values.shape[0])])
        else:
            ax.set_yticks([])
        ax.set_title(titles[i], fontsize="medium")
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def alpha_beta_plot(sizes, seconds, alpha: float, beta: float, op: str = "all_reduce",
                    world_size: int = 2, runs: dict | None = None, title: str | None = None,
                    ax=None):
    """Measured times of one collective against message size, beside the alpha-beta model.

    sizes: message sizes S in bytes; seconds: one time per size (a median, say); runs: optional
    {size: [seconds of each repetition]}, drawn as faint dots. alpha, beta: seconds per step and
    per byte (``labkit.theory.fit_alpha_beta``). Draws, log-log, the points, the model
    ``theory.collective_time(op, S, world_size, alpha, beta)`` as a line, and a dotted vertical
    line at the crossover size, where the latency term (steps·alpha) equals the bandwidth term
    (factor·S·beta). Returns the Axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from labkit import theory

    if len(sizes) != len(seconds):
        raise ValueError(f"{len(sizes)} sizes but {len(seconds)} times")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for size, times in (runs or {}).items():
        ax.scatter([size] * len(times), [t * 1e6 for t in times], s=6, color="C0", alpha=0.3)
    ax.loglog(sizes, [t * 1e6 for t in seconds], "o", color="C0", label="measured (median)")
    low, high = min(sizes), max(sizes)
    fine = [low * (high / low) ** (k / 99) for k in range(100)]
    ax.loglog(fine, [theory.collective_time(op, s, world_size, alpha, beta) * 1e6 for s in fine],
              "-", color="C1", label=f"model: α = {alpha * 1e6:.3g} µs, "
                                     f"1/β = {1 / beta / 1e9:.3g} GB/s" if beta else "model")
    if beta > 0:
        steps = theory.ring_steps(op, world_size)
        crossover = steps * alpha / (theory.busbw_factor(op, world_size) * beta)
        if low <= crossover <= high:
            ax.axvline(crossover, color="grey", linestyle=":",
                       label=f"crossover {crossover:,.0f} B")
    def plain(value, _, keep=None):       # 600 and 2000, not 6×10² and 2×10³
        leading = f"{value:.0e}"[0]
        return f"{value:g}" if keep is None or leading in keep else ""

    ax.yaxis.set_major_formatter(FuncFormatter(plain))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, p: plain(v, p, keep="25")))
    ax.set_xlabel("message size S (bytes)")
    ax.set_ylabel("time (µs)")
    ax.set_title(title or f"{op} on {world_size} ranks")
    ax.legend(fontsize="small")
    return ax


TIMELINE_TITLE = ("backward (blue, a tick per gradient), the wait after it (red), each "
                  "all-reduce from its launch to its completion (orange, first on top)")


def step_timeline(per_rank, title: str | None = None, ax=None, legend: bool = False):
    """One training step on every rank: backward, the wait after it, and every all-reduce.

    per_rank: a list (index = rank) of dicts, times in seconds since that rank's step began:
    "backward": (start, end); "sync": (start, end), the wait for communication after backward
    (e.g. ``finish_gradient_sync()``); "grads": the times at which gradients became ready (a
    tick each); "comms": [(start, seconds, payload_bytes), ...], each all-reduce from its launch
    for its duration (None: unknown, drawn 0 wide), in launch order. Rank 0 on top: per rank a
    row for backward | sync and, under it, one thin row per all-reduce, the first on top.
    Times are drawn in ms. Returns the Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 1.6 * len(per_rank)))
    ticks, names = [], []
    for rank, tl in enumerate(per_rank):
        y0 = 3 * (len(per_rank) - 1 - rank)
        first = rank == 0
        b0, b1 = tl["backward"]
        ax.broken_barh([(b0 * 1e3, (b1 - b0) * 1e3)], (y0 + 1.1, 0.8), color="C0", alpha=0.35,
                       label="backward" if first else None)
        ax.vlines([t * 1e3 for t in tl.get("grads", [])], y0 + 1.1, y0 + 1.9, color="C0", lw=0.6)
        s0, s1 = tl["sync"]
        ax.broken_barh([(s0 * 1e3, (s1 - s0) * 1e3)], (y0 + 1.1, 0.8), color="C3", alpha=0.35,
                       label="wait after backward" if first else None)
        comms = tl.get("comms", [])
        height = 0.8 / max(1, len(comms))
        for i, (start, seconds, _) in enumerate(comms):
            ax.broken_barh([(start * 1e3, (seconds or 0) * 1e3)],
                           (y0 + 0.9 - (i + 1) * height, height), color="C1", edgecolor="k",
                           lw=0.3, label="all-reduce in flight" if first and i == 0 else None)
        ticks += [y0 + 0.5, y0 + 1.5]
        names += [f"rank {rank} all-reduces", f"rank {rank} backward | sync"]
    ax.set_yticks(ticks, names)
    ax.set_ylim(-0.2, 3 * len(per_rank) - 0.9)
    ax.set_xlabel("ms since the start of forward (each rank its own clock)")
    ax.set_title(title if title is not None else TIMELINE_TITLE, fontsize=9)
    if legend:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


def overlap_bars(per_rank, title: str | None = None, ax=None):
    """Per rank, the time communication was in flight and, over it, the part hidden behind
    compute, in ms, with the share written above: ``labkit.trace.overlap``'s result (anything
    with ``rank``, ``comm_s``, ``hidden_s`` and ``share``). Returns the Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(3.0 + 1.0 * len(per_rank), 3.4))
    labels = [f"rank {o.rank}" for o in per_rank]
    ax.bar(labels, [o.comm_s * 1e3 for o in per_rank], color="#DDDDDD", edgecolor="black",
           linewidth=0.5, label="communication in flight")
    ax.bar(labels, [o.hidden_s * 1e3 for o in per_rank], color=COLOURS["comm"],
           label="of it, under compute")
    for x, o in enumerate(per_rank):
        ax.annotate("no communication" if o.share is None else f"{o.share:.0%}",
                    (x, o.comm_s * 1e3), ha="center", va="bottom", fontsize="small",
                    xytext=(0, 2), textcoords="offset points")
    ax.set_ylabel("ms")
    ax.set_ylim(0, 1.45 * max([o.comm_s * 1e3 for o in per_rank] + [1e-3]))  # room for the legend
    ax.legend(fontsize="x-small", loc="upper center", ncol=2)
    if title:
        ax.set_title(title, fontsize="medium")
    return ax


# --- strategies side by side: memory, bytes and time per strategy (decks and notebooks 07-09) ---

def _by_category(entry) -> dict:
    """{category: bytes} in CATEGORIES order; keys outside CATEGORIES count as "other" and a
    "total" key is ignored (a tracer's ``current``, or a summary of it)."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for key, value in entry.items():
        if key != "total":
            out[key if key in CATEGORIES else "other"] += float(value or 0)
    return out


def _strategy_axis(ax, names, title):
    ax.set_xticks(list(range(len(names))), list(names), rotation=35, ha="right",
                  fontsize="small")
    if title:
        ax.set_title(title, fontsize="medium")


def memory_by_strategy(names, at_rest, formula=None, peaks=None, unit: str = "MB", ax=None,
                       title: str | None = None):
    """Stacked bars of bytes by category, one per strategy, with the formula's total (a black
    tick) and the peak during the step (a triangle) beside each.

    names: the strategies' labels. at_rest: one {category: bytes} per strategy (e.g. a tracer's
    ``current``; keys outside ``CATEGORIES`` count as "other"). formula, peaks: one number of
    bytes per strategy, or None. Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.1 * len(names) + 2.5, 3.5))
    scale, where = UNITS[unit], list(range(len(names)))
    bars = [_by_category(entry) for entry in at_rest]
    bottoms = [0.0] * len(bars)
    for category in CATEGORIES:
        heights = [bar[category] / scale for bar in bars]
        if not any(heights):
            continue
        ax.bar(where, heights, bottom=bottoms, color=COLOURS[category], edgecolor="black",
               linewidth=0.4, label=category)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    if formula is not None:
        ax.scatter(where, [f / scale for f in formula], marker="_", s=600, color="black",
                   label="formula", zorder=3)
    if peaks is not None:
        ax.scatter(where, [p / scale for p in peaks], marker="v", color="black",
                   label="peak during the step", zorder=3)
    top = max(bottoms + [f / scale for f in formula or []] + [p / scale for p in peaks or []])
    ax.set_ylim(0, 1.45 * top or 1)      # room for the legend above the bars
    ax.set_ylabel(f"{unit} per rank")
    _strategy_axis(ax, names, title)
    ax.legend(fontsize="x-small", loc="upper right", ncol=2)
    return ax


def bars_by_strategy(names, values, formula=None, ylabel: str = "", scale: float = 1.0,
                     colour: str = "#8172B3", label: str | None = "measured", ax=None,
                     title: str | None = None):
    """One bar per strategy (value / scale) and, when given, the formula's value of each as a
    black tick: bytes per step beside their formula, or step times.

    names: the strategies' labels; values, formula: one number per strategy (formula: or None).
    A legend is drawn when there is a formula. Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.5))
    where = list(range(len(names)))
    ax.bar(where, [v / scale for v in values], color=colour, edgecolor="black", linewidth=0.4,
           label=label)
    if formula is not None:
        ax.scatter(where, [f / scale for f in formula], marker="_", s=600, color="black",
                   label="formula", zorder=3)
        top = max([v / scale for v in values] + [f / scale for f in formula])
        ax.set_ylim(0, 1.3 * top or 1)   # room for the legend above the bars
        ax.legend(fontsize="x-small", loc="upper left", ncol=2)
    ax.set_ylabel(ylabel)
    _strategy_axis(ax, names, title)
    return ax


def strategy_bars(names, at_rest, wire_bytes, *, memory_formula=None, wire_formula=None,
                  peaks=None, step_ms=None, unit: str = "MB", where: str = "",
                  time_label: str = "ms per step (measured here)", axes=None):
    """Every strategy side by side, one panel each for memory at rest by category (formula
    tick, peak triangle), wire bytes per step (formula tick) and, if ``step_ms`` is given,
    step time.

    names: the strategies' labels; at_rest: one {category: bytes} per strategy; wire_bytes,
    memory_formula, wire_formula, peaks, step_ms: one number per strategy (or None). where: said
    after each panel's title ("2 ranks"). axes: the Axes to draw in, two or three. Returns the
    list of Axes.
    """
    import matplotlib.pyplot as plt

    count = 2 if step_ms is None else 3
    if axes is None:
        _, axes = plt.subplots(1, count, figsize=(5 * count, 3.8), layout="constrained")
    axes = list(axes)
    if len(axes) != count:
        raise ValueError(f"need {count} axes, got {len(axes)}")
    suffix = f", {where}" if where else ""
    memory_by_strategy(names, at_rest, memory_formula, peaks, unit=unit, ax=axes[0],
                       title=f"memory at rest{suffix}")
    bars_by_strategy(names, wire_bytes, wire_formula, scale=UNITS[unit], ax=axes[1],
                     ylabel=f"wire {unit} per rank per step (ring model)",
                     title=f"bytes per step{suffix}", label="measured (ledger)")
    if step_ms is not None:
        bars_by_strategy(names, step_ms, ylabel=time_label, colour="#C44E52", label=None,
                         ax=axes[2], title=f"step time{suffix}")
    return axes


PREFETCH_COLOURS = {"forward": "#4C72B0", "backward": "#DD8452", "all_gather": "#55A868",
                    "reduce_scatter": "#8172B3"}


def prefetch_timeline(ranks, ax=None, title: str | None = None, legend: bool = True):
    """One step of each rank against time: a compute lane (forward and backward spans) above a
    communication lane (all-gathers and reduce-scatters), rank 0 on top, in ms.

    ranks: one dict per rank (index = rank), times in seconds from that rank's own start:
    "forward", "backward": [(start, end), ...] spans of compute; "all_gather",
    "reduce_scatter": [(start, end), ...] from a collective's call to its completion, where an
    end of None (not known) draws a tick at the call; "backward_starts" (optional): a dotted
    line there. Missing keys draw nothing. Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 1.2 + 1.1 * len(ranks)))
    names = {"forward": "compute, forward", "backward": "compute, backward",
             "all_gather": "all-gather", "reduce_scatter": "reduce-scatter"}
    labelled, ticks = set(), []
    for rank, lanes in enumerate(ranks):
        base = 3 * (len(ranks) - 1 - rank)
        for kind, height in (("forward", 1.1), ("backward", 1.1), ("all_gather", 0.1),
                             ("reduce_scatter", 0.1)):
            spans = list(lanes.get(kind, ()))
            known = [(a * 1e3, (b - a) * 1e3) for a, b in spans if b is not None]
            label = names[kind] if kind not in labelled and known else None
            if known:
                labelled.add(kind)
                comm = kind in ("all_gather", "reduce_scatter")
                ax.broken_barh(known, (base + height, 0.8), color=PREFETCH_COLOURS[kind],
                               alpha=0.75 if comm else 1.0, edgecolor="black" if comm else None,
                               linewidth=0.3, label=label)
            calls = [a * 1e3 for a, b in spans if b is None]
            if calls:
                key = f"{kind}-called"
                ax.plot(calls, [base + 0.5] * len(calls), "|", color=PREFETCH_COLOURS[kind],
                        markersize=14, mew=2,
                        label=(f"{names[kind]} called (end not known)"
                               if key not in labelled else None))
                labelled.add(key)
        if lanes.get("backward_starts") is not None:
            ax.vlines(lanes["backward_starts"] * 1e3, base, base + 2, color="black",
                      linestyle=":")
        ticks += [(base + 0.5, f"rank {rank} comm"), (base + 1.5, f"rank {rank} compute")]
    ax.set_yticks([y for y, _ in ticks], [text for _, text in ticks])
    ax.set_ylim(-0.2, 3 * len(ranks) - 0.8)
    ax.set_xlabel("ms from the start of the forward (each rank's own clock)")
    if title:
        ax.set_title(title, fontsize="medium")
    if legend:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


def memory_vs_world_size(formula, measured=None, printed=None, device=None, at=None,
                         unit: str = "GB", ax=None, title: str | None = None):
    """Model-state bytes per device against the number of ranks, on log-log axes: each
    strategy's formula as a line, its measured points in the same colour, printed values as
    crosses (ZeRO Table 1), a device's memory as a dashed line and one N as a dotted line.

    formula: {label: (world_sizes, bytes)}; measured: {label: (world_sizes, bytes)}, the same
    labels; printed: [(world_size, bytes), ...]; device: (bytes, label); at: a world size.
    Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.8))
    scale = UNITS[unit]
    for i, (label, (sizes, values)) in enumerate(formula.items()):
        colour = f"C{i}"
        ax.plot(sizes, [v / scale for v in values], color=colour, linewidth=1,
                label=f"{label}: formula")
        if measured and label in measured:
            m_sizes, m_values = measured[label]
            ax.plot(m_sizes, [v / scale for v in m_values], "o", color=colour,
                    label=f"{label}: measured")
    if printed:
        ax.plot([n for n, _ in printed], [v / scale for _, v in printed], "x", color="black",
                markersize=7, label="as printed")
    if device is not None:
        ax.axhline(device[0] / scale, color="grey", linestyle="--", label=device[1])
    if at is not None:
        ax.axvline(at, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("data-parallel ranks N_d")
    ax.set_ylabel(f"model states per device ({unit})")
    if title:
        ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="x-small", ncol=2)
    return ax


def compute_vs_comm(world_sizes, lines, points=None, marks=None, colours=None, ax=None,
                    title: str | None = None, log: bool = False, legend: bool = True):
    """Seconds per step against the number of ranks, in ms: lines (compute T1/N, each
    strategy's communication under the α-β model), measured points, and dotted vertical lines
    at given N (where a strategy becomes communication-bound).

    world_sizes: the x of every line; lines: {label: seconds, one per world size};
    points: {label: (world_sizes, seconds)}; marks: {label: world size}; colours: {label:
    colour} for any of them (default: the colour cycle). log: log-log axes. Returns the Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    colours = colours or {}
    cycle = iter(f"C{i}" for i in range(100))
    for label, seconds in lines.items():
        ax.plot(world_sizes, [s * 1e3 for s in seconds], linewidth=1.5,
                color=colours.get(label) or next(cycle), label=label)
    for marker, (label, (sizes, seconds)) in zip("os^Dv<>" * 10, (points or {}).items()):
        ax.plot(sizes, [s * 1e3 for s in seconds], marker, color=colours.get(label) or next(cycle),
                label=label)
    for label, n in (marks or {}).items():
        ax.axvline(n, color=colours.get(label, "grey"), linestyle=":", label=label)
    if log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel("ranks N")
    ax.set_ylabel("ms per step")
    if title:
        ax.set_title(title, fontsize="medium")
    if legend:
        ax.legend(fontsize="x-small")
    return ax
