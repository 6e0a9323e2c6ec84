"""What every benchmark shares: --quick and --json, progress bars, medians and spreads, the
machine it ran on, and the results it prints and writes.

Each bench collects its results in a `Results`: one entry per quantity and case, with the
samples of ours and of the reference (one per repeat), the ratio ours / reference (the median of
the per-repeat ratios when the two were measured in pairs, else the ratio of the medians), its
spread and the target, if the issue names one. ``print_table()`` prints them; ``write(path)``
writes them as JSON (``--json PATH``), which `run_all.py` reads.

Spread, everywhere: the smallest and the largest value over the repeats (min-max), beside the
median; the JSON also holds the quartiles. Values that do not vary between runs (bytes) are one
sample: their spread is the value itself.

Progress bars (tqdm) go to stderr, on when stderr is a terminal; ``BENCH_PROGRESS=1`` forces them
on (and ``0`` off) for runs whose stderr is a pipe. Inside ranks launched by labkit, rank 0 shows
the bar: labkit shows a rank's redrawn line live in the launcher's terminal.

Every benchmark runs its ranks on the CPU (gloo), also on a GPU machine: ``LABKIT_DEVICE=cpu``.
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys

SPREAD = "min-max over the repeats"

# The benchmarks measure the course's own setting, gloo ranks on CPU cores, on any machine: on a
# GPU machine labkit.launch would otherwise put the ranks on the GPU (labkit.placement), where
# these CPU timers, targets and thread counts mean something else.
os.environ["LABKIT_DEVICE"] = "cpu"


def add_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """--quick (a smoke run: every measurement and ratio, few repeats) and --json PATH."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")


def show_progress() -> bool:
    """Progress bars wanted: BENCH_PROGRESS=1 / 0, else when stderr is a terminal."""
    wanted = os.environ.get("BENCH_PROGRESS", "")
    if wanted in ("0", "1"):
        return wanted == "1"
    return sys.stderr.isatty()


def progress(iterable=None, *, total=None, desc=None, show=None):
    """A tqdm bar on stderr over ``iterable`` (or updated by hand), shown when ``show`` (default:
    `show_progress()`)."""
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, ncols=80,
                disable=not (show_progress() if show is None else show))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine, as the results table is headed: CPU, cores, versions, load at the start."""
    import labkit
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": labkit.usable_cores(),
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        import importlib.metadata
        info["torch"] = importlib.metadata.version("torch")
    except Exception:   # noqa: BLE001 - no torch: the bench fails later, with its own message
        info["torch"] = None
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average"] = None
    return info


def stats(values) -> dict:
    """median, min, max, quartiles and count of a list of numbers (or of one number)."""
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if not values:
        raise ValueError("no values")
    q1, q3 = (statistics.quantiles(values, n=4, method="inclusive")[::2] if len(values) > 1
              else (values[0], values[0]))
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "q1": q1, "q3": q3, "n": len(values)}


def fmt(value: float, unit: str = "") -> str:
    """A value for a table: bytes with thousands separators, the rest with 3-4 digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "B":
        return f"{value:,.0f}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_stats(s: dict, unit: str = "") -> str:
    """``median [min-max]``, or the value alone when it did not vary."""
    if s is None:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt(s["median"], unit)
    return f"{fmt(s['median'], unit)} [{fmt(s['min'], unit)}-{fmt(s['max'], unit)}]"


def unit_suffix(unit: str) -> str:
    return f" {unit}" if unit and unit != "B" else (" B" if unit == "B" else "")


class Results:
    """The results of one bench run: entries, correctness checks, settings, the machine."""

    def __init__(self, bench: str, quick: bool = False, settings: dict | None = None):
        self.bench, self.quick = bench, quick
        self.settings = dict(settings or {})
        self.machine = machine()
        self.started = datetime.datetime.now().astimezone()
        self.entries, self.checks, self.extra = [], [], {}

    def add(self, id: str, quantity: str, case: str, unit: str, ours_label: str, ours,
            reference_label: str, reference, ratios=None, target: str | None = None,
            met: bool | None = None, note: str | None = None) -> dict:
        """One row. ``ours``/``reference``: samples (one per repeat) or one number. ``ratios``:
        the per-repeat ratios ours / reference when the two ran in pairs; else the ratio of the
        medians. ``target``: the target as text ("ratio <= 1.05"), ``met``: whether it was."""
        ours_s, ref_s = stats(ours), stats(reference)
        if ratios is None:
            ratio = stats(ours_s["median"] / ref_s["median"] if ref_s["median"] else math.nan)
        else:
            ratio = stats(ratios)
        entry = {"id": id, "quantity": quantity, "case": case, "unit": unit,
                 "ours_label": ours_label, "ours": ours_s,
                 "reference_label": reference_label, "reference": ref_s,
                 "ratio": ratio, "paired": ratios is not None,
                 "target": target, "met": None if target is None else bool(met), "note": note}
        self.entries.append(entry)
        return entry

    def check(self, name: str, ok: bool) -> None:
        """A correctness check (e.g. both end with equal parameters)."""
        self.checks.append({"name": name, "ok": bool(ok)})

    def as_dict(self) -> dict:
        return {"bench": self.bench, "quick": self.quick, "command": " ".join(sys.argv),
                "date": self.started.isoformat(timespec="seconds"), "machine": self.machine,
                "settings": self.settings, "spread": SPREAD, "ratio": "ours / reference",
                "entries": self.entries, "checks": self.checks, "extra": self.extra}

    def write(self, path: str | None) -> None:
        if path:
            with open(path, "w") as out:
                json.dump(self.as_dict(), out, indent=1, default=str)

    def print_table(self) -> None:
        """Every entry: ours, reference, ratio (median [min-max]), the target and whether met."""
        paired = any(e["paired"] for e in self.entries)
        print(f"\nsummary ({self.bench}{', --quick' if self.quick else ''}): median "
              f"[{SPREAD}]; ratio = ours / reference"
              f"{' (median of per-repeat ratios where paired)' if paired else ''}")
        rows = [("quantity", "case", "ours", "reference", "ratio", "target", "met")]
        for e in self.entries:
            unit = unit_suffix(e["unit"])
            rows.append((e["quantity"], e["case"],
                         f"{e['ours_label']} {fmt_stats(e['ours'], e['unit'])}{unit}",
                         f"{e['reference_label']} {fmt_stats(e['reference'], e['unit'])}{unit}",
                         fmt_stats(e["ratio"]) + "x", e["target"] or "-",
                         "-" if e["met"] is None else ("yes" if e["met"] else "NO")))
        print_rows(rows)
        for c in self.checks:
            print(f"check: {c['name']}: {'ok' if c['ok'] else 'FAILED'}")

    def finish(self, path: str | None) -> None:
        self.print_table()
        self.write(path)


def print_rows(rows) -> None:
    """Fixed-width columns, left-aligned, for a terminal."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
