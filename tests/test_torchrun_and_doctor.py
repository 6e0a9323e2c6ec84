"""The same function under real torchrun; and `labkit doctor`."""
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import labkit
from labkit import doctor


def gathered_ranks(scale):
    """Depends on rank, world size and a real collective, so a wrong setup shows."""
    out = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([float(dist.get_rank())]) * scale)
    return [t.item() for t in out], dist.get_rank(), dist.get_world_size()


def test_the_same_function_gives_the_same_results_under_torchrun(no_leftovers):
    ours = labkit.launch(gathered_ranks, 3, args=(2.0,), quiet=True)
    theirs = labkit.launch(gathered_ranks, 3, args=(2.0,), start_method="torchrun", quiet=True,
                           timeout=120)
    assert ours == theirs == [([0.0, 2.0, 4.0], r, 3) for r in range(3)]


def fails_on_rank_1():
    if dist.get_rank() == 1:
        raise ArithmeticError("rank 1 divides by zero")
    dist.barrier()


def test_a_crash_under_torchrun_names_the_root_cause(no_leftovers):
    with pytest.raises(labkit.LaunchError) as info:
        labkit.launch(fails_on_rank_1, 2, start_method="torchrun", quiet=True, timeout=120)
    assert info.value.rank == 1
    assert str(info.value).startswith("ROOT CAUSE: rank 1 of 2: ArithmeticError")


def test_doctor_runs_a_real_all_reduce_and_says_ok():
    done = subprocess.run([sys.executable, "-m", "labkit", "doctor"], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for field in ("python", "torch", "backends", "GPUs", "cores", "threads"):
        assert f"\n{field}" in "\n" + out
    assert "gloo: yes" in out
    assert "OK: every rank got 3 = 1 + ... + 2" in out


def test_doctor_reports_a_wrong_all_reduce_and_a_failed_launch(monkeypatch, capsys):
    monkeypatch.setattr(labkit, "launch", lambda *a, **k: [1.0, 1.0])
    assert doctor.run(2) is False
    assert "FAILED: the all_reduce gave [1.0, 1.0], expected [3.0, 3.0]" in capsys.readouterr().out

    def times_out(*a, **k):
        raise labkit.LaunchTimeout("TIMEOUT: rank(s) 1 of 2 were still running")
    monkeypatch.setattr(labkit, "launch", times_out)
    assert doctor.run(2) is False
    out = capsys.readouterr().out
    assert "FAILED: LaunchTimeout" in out and "GLOO_SOCKET_IFNAME" in out
