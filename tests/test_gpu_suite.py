"""The GPU suite (``tests/gpu``) seen from a machine without a GPU.

Its tests can only pass on a GPU (``bash tests/gpu/run.sh``), but CI can still show that they
are collected, that each is skipped with the reason naming the missing GPU (not an error, which
would hide the suite), that the suite still covers what ``tests/gpu/README.md`` promises, and that
``run.sh`` parses. pytest runs the folder in a subprocess exactly as run.sh does (its own
conftest only, no project addopts).
"""
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "tests" / "gpu"
AS_RUN_SH = ["-p", "no:cacheprovider", "-o", "addopts=", "--confcutdir=tests/gpu"]

# What the suite must cover: a fragment of a test's id for each area (README.md's table).
AREAS = {
    "launcher, NCCL, one rank per GPU": ["test_nccl_one_rank_per_gpu"],
    "launcher, 2 and 4 ranks sharing a GPU under gloo": [
        "test_shared_gpu_gloo_every_collective_and_p2p_exact[2]",
        "test_shared_gpu_gloo_every_collective_and_p2p_exact[4]"],
    "results from CUDA tensors arrive on the CPU": ["test_results_from_cuda_tensors"],
    "CommCounter on CUDA": ["test_comm_counter_on_cuda"],
    "tracer against torch.cuda": ["test_tracer_live_and_peak_cuda_bytes_match_torch_cuda_forward",
                                  "test_tracer_live_and_peak_cuda_bytes_match_torch_cuda_adam"],
    "the checks": [f"[{name}]" for name in (
        "nb01_ring_all_reduce", "nb02_naive_ddp", "nb03_bucketed_ddp", "nb04_no_sync_ddp",
        "nb06_zero1", "nb07_zero2", "nb08_zero3")],
    "labkit.train under torchrun": ["test_labkit_train_under_torchrun"],
    "the benches, --quick": ["test_bench_quick"],
}
# Every collective and point-to-point call the launcher test must make on CUDA tensors.
CALLS = ["dist.all_reduce(", "dist.broadcast(", "dist.all_gather(", "all_gather_into_tensor(",
         "reduce_scatter_tensor(", "dist.send(", "dist.recv(", "dist.isend(", "dist.irecv(",
         "dist.batch_isend_irecv(", ".wait()"]


def pytest_on_the_gpu_folder(*args, timeout=300):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_XDIST", "PYTEST_ADDOPTS")) and k != "LABKIT_DEVICE"}
    return subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", *AS_RUN_SH, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def test_ids():
    done = pytest_on_the_gpu_folder("--collect-only", "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    ids = [line for line in done.stdout.splitlines() if line.startswith("tests/gpu/")]
    assert ids, done.stdout
    return ids


def test_without_a_gpu_every_gpu_test_is_skipped_and_says_why(tmp_path, test_ids):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: run the suite itself, bash tests/gpu/run.sh")
    report = tmp_path / "junit.xml"
    done = pytest_on_the_gpu_folder("-rs", "-q", f"--junitxml={report}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        skipped = case.find("skipped")
        problems = [child.tag for child in case if child.tag in ("failure", "error")]
        assert not problems and skipped is not None, f"{name}: {problems or 'not skipped'}"
        outcomes[name] = skipped.get("message", "")
    assert len(outcomes) == len(test_ids), (sorted(outcomes), test_ids)
    for name, message in outcomes.items():
        assert "no CUDA GPU" in message and "tests/gpu/run.sh" in message, (name, message)
        assert torch.__version__ in message, (name, message)
    # -rs prints each reason in the summary; nothing passed, failed or errored
    assert re.search(rf"^{len(test_ids)} skipped in ", output.splitlines()[-1]), output[-2000:]
    assert output.count("SKIPPED [") >= 1 and "no CUDA GPU" in output


def test_the_suite_covers_every_area(test_ids):
    missing = {area: [f for f in fragments if not any(f in id for id in test_ids)]
               for area, fragments in AREAS.items()}
    missing = {area: fragments for area, fragments in missing.items() if fragments}
    assert not missing, f"no GPU test for {missing}; the suite has {test_ids}"
    launch = (GPU / "test_gpu_1_launch.py").read_text()
    assert not [call for call in CALLS if call not in launch]
    readme = (GPU / "README.md").read_text()
    assert "bash tests/gpu/run.sh" in readme and "What it cannot check" in readme


def test_run_sh_parses_and_runs_what_the_readme_says():
    script = GPU / "run.sh"
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    done = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    for part in ("nvidia-smi -L", "labkit doctor", "pyproject.toml", "-m pytest tests/gpu",
                 "-x", "--tb=short", "no:cacheprovider", "gpu-suite.log", "${OUT:-/tmp}"):
        assert part in text, part
