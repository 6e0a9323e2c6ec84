"""The GPU suite's collection rules: without CUDA every test here is skipped, and says why.

Loaded when pytest collects ``tests/gpu`` (the normal ``make test`` run too). The collection hook
sees every item of the session, so it marks only the items under this folder. ``tests/`` and the
repository root go on ``sys.path``: the checks' reference solutions live in ``tests/``
(``sharded_solutions.py``, ``test_nb0*_check.py``) and the ranks import them from there.
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
for folder in (str(ROOT), str(TESTS)):
    if folder not in sys.path:
        sys.path.insert(0, folder)

from ._util import BENCH_TIMEOUT, Background  # noqa: E402

BENCH_TEST = "test_bench_quick_runs_every_bench_and_prints_its_ratios"


def no_gpu_reason():
    """Why this machine cannot run the suite, or None when it can."""
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"no CUDA GPU: torch {torch.__version__} ({build}) sees none; "
            "run tests/gpu/run.sh on a GPU machine")


def _in_this_folder(item) -> bool:
    path = getattr(item, "path", None) or item.fspath   # item.path: pytest >= 7
    return HERE in Path(str(path)).resolve().parents


def pytest_collection_modifyitems(config, items):
    reason = no_gpu_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if _in_this_folder(item):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _device_auto_means_the_gpu(monkeypatch):
    """A LABKIT_DEVICE=cpu left in the environment would keep every "auto" launch on the CPU."""
    monkeypatch.delenv("LABKIT_DEVICE", raising=False)


@pytest.fixture(scope="session", autouse=True)
def bench_quick_run(request, tmp_path_factory):
    """``bench/run_all.py --quick``, when the bench test is among the tests: started with the
    first test of this folder that runs, so that it runs on the CPUs beside the GPU tests, and
    waited for by the bench test (under pytest-xdist, where every worker would start one, the
    bench test starts it itself). Its output goes to ``$GPU_SUITE_LOG_DIR/bench-quick.log``
    when that is set (run.sh), else to a temporary folder."""
    if not any(item.name == BENCH_TEST for item in request.session.items):
        yield None
        return
    folder = tmp_path_factory.mktemp("bench")
    log_dir = Path(os.environ.get("GPU_SUITE_LOG_DIR") or folder)
    report = folder / "all.json"
    missing = [name for name in ("psutil", "tqdm") if importlib.util.find_spec(name) is None]
    reason = (f"{' and '.join(missing)} not installed in this Python: the benches need them "
              "(labkit dependencies; run.sh lists what is missing)") if missing else None
    env = {k: v for k, v in os.environ.items() if k != "LABKIT_DEVICE"}
    env.update(BENCH_PROGRESS="0", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    run = Background([sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--json",
                      str(report)], log_dir / "bench-quick.log", BENCH_TIMEOUT,
                     skip_reason=reason, cwd=ROOT, env=env)
    run.report = report
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        run.start()
    yield run
    run.stop()
