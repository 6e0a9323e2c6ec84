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
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    panels = [collective_grid(before), collective_grid(after)]
    shown = np.concatenate([values[~mask] for values, mask in panels])
    if shown.size and shown.min() > 0 and shown.max() / shown.min() > 100:
        norm = LogNorm(vmin=shown.min(), vmax=shown.max() * 3)
    else:
        low, high = (shown.min(), shown.max()) if shown.size else (0.0, 1.0)
        norm = Normalize(vmin=low, vmax=high + (high - low or 1.0) * 0.5)
    if axes is None:
        widths = [values.shape[1] for values, _ in panels]
        height = max(values.shape[0] for values, _ in panels)
        _, axes = plt.subplots(1, 2, figsize=(0.7 * sum(widths) + 2.6, 0.45 * height + 1.2),
                               gridspec_kw={"width_ratios": widths}, layout="constrained")
    colours = plt.get_cmap(cmap)
    for ax, (values, mask), label in zip(axes, panels, ("before", "after")):
        ranks, width = values.shape
        ax.pcolormesh(np.ma.masked_array(values, mask), cmap=colours, norm=norm,
                      edgecolors="white", linewidth=2)
        for r in range(ranks):
            for j in range(width):
                if mask[r, j]:
                    continue
                red, green, blue, _ = colours(norm(values[r, j]))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(j + 0.5, r + 0.5, fmt.format(values[r, j]), ha="center", va="center",
                        fontsize="small", color="white" if dark else "black")
        ax.set_xlim(0, width)
        ax.set_ylim(ranks, 0)   # rank 0 on top
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


# --- strategies side by side: memory, bytes and time per strategy (decks and notebooks 07-09) ---
