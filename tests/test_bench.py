"""The benchmarks run: `bench/run_all.py --quick` runs every bench once, and each computes its
ratios, with an entry for every target the benchmark issue names. No timing is asserted: a quick
run's numbers come from too few repeats, on a machine shared with the rest of the tests.

Marked "notebook", so that `make test` runs it in its parallel phase. One test uses the quick run
(a module-scoped fixture): under pytest-xdist each worker that ran a test of this module would
run the fixture again.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import _report  # noqa: E402  bench/_report.py
import run_all  # noqa: E402  bench/run_all.py

pytestmark = pytest.mark.notebook

# Every quantity the issue asks for, by entry id; (id, target text) where it names a target.
LAUNCH = [f"launch/{kind}/{n}" for kind in ("cold", "warm", "burst") for n in (2, 4)]
TARGETS = [("ddp/step_time", "ratio <= 1.05")] + [
    (f"zero1/wire_bytes/ours/{n}", "ratio <= 0.67") for n in (2, 4)] + [
    (f"zero3/step_time/ours/{n}", "ratio <= 1.0") for n in (2, 4)] + [
    (f"tracer/{model}", "ratio <= 1.5") for model in ("mlp_1m", "deep_100", "deep_100_forward")]
REPORTED = LAUNCH + ["ddp/overlap"] + [
    f"zero1/step_time/ours/{n}" for n in (2, 4)] + [
    f"zero3/peak_memory/ours/{n}" for n in (2, 4)] + [
    f"scaling/step_time/{stage}/{n}" for stage in ("ddp", "zero1", "zero3") for n in (1, 2, 4)] + [
    f"scaling/wire_bytes/{stage}/{n}" for stage in ("ddp", "zero1", "zero3") for n in (2, 4)]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`run_all.py --quick`, once: (the finished process, its JSON report, the README copy it
    was told to write, that copy's text before)."""
    folder = tmp_path_factory.mktemp("bench")
    readme = folder / "README.md"
    shutil.copy(BENCH / "README.md", readme)
    env = dict(os.environ, BENCH_PROGRESS="1")   # the progress bars' code runs too
    done = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--json",
                           str(folder / "all.json"), "--write-readme", "--readme", str(readme)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, f"run_all.py --quick failed:\n{done.stdout[-6000:]}\n" \
                                 f"{done.stderr[-6000:]}"
    report = json.loads((folder / "all.json").read_text())
    return done, report, readme, (BENCH / "README.md").read_text()


def finite_positive(stats):
    """A positive median; every value finite (a single repeat may measure 0, e.g. no overlap)."""
    return (all(math.isfinite(stats[key]) and stats[key] >= 0 for key in ("median", "min", "max"))
            and stats["median"] > 0)


@pytest.mark.timeout(900)
def test_quick_run_runs_every_bench_and_computes_every_ratio(quick_run, tmp_path):
    done, report, readme, readme_before = quick_run
    assert list(report["benches"]) == list(run_all.BENCHES)
    entries = {}
    for name, run in report["benches"].items():
        assert "error" not in run, f"{name}: {run['error']}"
        results = run["results"]
        assert results["bench"] == name and results["quick"] is True
        for key in ("cpu", "cores", "usable_cores", "torch", "python"):
            assert results["machine"][key], f"{name}: no {key} in the machine"
        assert results["entries"], f"{name} reported nothing"
        for check in results["checks"]:
            assert check["ok"], f"{name}: {check['name']}"
        for entry in results["entries"]:
            assert entry["id"] not in entries, f"two entries {entry['id']}"
            entries[entry["id"]] = entry
            assert finite_positive(entry["ratio"]), f"{entry['id']}: ratio {entry['ratio']}"
            assert finite_positive(entry["ours"]) and finite_positive(entry["reference"]), \
                entry["id"]
            assert (entry["met"] is None) == (entry["target"] is None), entry["id"]
    for id, target in TARGETS:
        assert id in entries, f"no entry for {id}"
        assert entries[id]["target"] == target and isinstance(entries[id]["met"], bool), id
    for id in REPORTED:
        assert id in entries, f"no entry for {id}"
    assert all(entries[id]["reference_label"] == "torchrun" for id in LAUNCH)

    # one summary table, a row per entry; a --quick run leaves the README alone
    assert "== summary" in done.stdout
    assert len(run_all.summary_rows(report)) == len(entries)
    assert "not writing" in done.stdout and readme.read_text() == readme_before

    # the README section, written from this run into a copy of the README
    copy = tmp_path / "README.md"
    shutil.copy(BENCH / "README.md", copy)
    section = run_all.write_readme(copy, report)
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(entries)
    assert report["machine"]["cpu"] in section and report["date"] in section
    assert "--quick" in section


def small_report(quick=False):
    results = _report.Results("ddp_vs_torch", quick)
    results.add("ddp/step_time", "step time", "2 ranks", "ms", "ours", [10.0, 11.0, 12.0],
                "torch DDP", [10.0, 10.5, 12.5], ratios=[1.0, 11 / 10.5, 12 / 12.5],
                target="ratio <= 1.05", met=True)
    return {"date": "2026-12-02T12:00:00+00:00", "command": "python bench/run_all.py "
            "--write-readme", "quick": quick, "machine": results.machine,
            "benches": {"ddp_vs_torch": {"rc": 0, "wall_s": 1.0, "cpu_s": 1.0,
                                         "results": results.as_dict()}}}


def test_write_readme_replaces_only_the_results_section(tmp_path):
    original = (BENCH / "README.md").read_text()
    assert original.count(run_all.START) == 1 and original.count(run_all.END) == 1
    copy = tmp_path / "README.md"
    copy.write_text(original)
    section = run_all.write_readme(copy, small_report())
    text = copy.read_text()
    head, rest = original.split(run_all.START)
    tail = rest.split(run_all.END)[1]
    assert text == f"{head}{run_all.START}\n{section}\n{run_all.END}{tail}"
    assert "| bench | quantity | case | ours | reference | ratio | target | met |" in section
    assert "| ddp_vs_torch | step time | 2 ranks | ours 11.0 [10.0-12.0] ms |" in section
    assert "ratio <= 1.05 | yes |" in section
    assert "2026-12-02" in section and "bench/run_all.py --write-readme" in section
    assert run_all.write_readme(copy, small_report()) == section   # again: the same file
    assert copy.read_text() == text

    copy.write_text("# no markers\n")
    with pytest.raises(ValueError):
        run_all.write_readme(copy, small_report())
