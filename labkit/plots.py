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
