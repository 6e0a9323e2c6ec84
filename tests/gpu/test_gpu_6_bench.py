"""The benchmarks' smoke run, ``bench/run_all.py --quick``, on the GPU machine.

The benches measure on the CPU (their targets are about the CPU); here they must run on a CUDA
build of torch with a GPU present, exit 0 and print their ratios. No timing is asserted. The run
starts in the background when the first test of this folder starts (``conftest.py``), since it
takes a minute or two and uses the CPUs, not the GPU; this test waits for it.
"""
import json
import math

import pytest

from ._util import BENCH_TIMEOUT, timeout


@pytest.mark.notebook   # as tests/test_bench.py: make test's parallel phase
@timeout(BENCH_TIMEOUT + 30)
def test_bench_quick_runs_every_bench_and_prints_its_ratios(bench_quick_run):
    returncode, output = bench_quick_run.wait()
    assert returncode == 0, f"bench/run_all.py --quick exited {returncode}:\n{output[-8000:]}"
    assert "== summary" in output and "ratio" in output, output[-4000:]
    report = json.loads(bench_quick_run.report.read_text())
    assert report["quick"] is True and report["benches"], report.keys()
    ratios = {}
    for name, run in report["benches"].items():
        assert "error" not in run, f"{name}: {run['error']}"
        for check in run["results"]["checks"]:
            assert check["ok"], f"{name}: {check['name']}"
        for entry in run["results"]["entries"]:
            ratios[entry["id"]] = entry["ratio"]["median"]
    assert ratios, "no bench reported a ratio"
    bad = {id: r for id, r in ratios.items() if not (math.isfinite(r) and r > 0)}
    assert not bad, f"ratios that are not finite and positive: {bad}"
    print(f"{len(ratios)} ratios from {len(report['benches'])} benches")
