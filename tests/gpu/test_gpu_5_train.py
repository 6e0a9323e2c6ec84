"""``python -m labkit.train`` under real torchrun on the GPU machine: 2 ranks on one node.

With one GPU the 2 local ranks share it under gloo (``labkit.placement``); with two or more each
has its own under NCCL. The saved parameters must equal the same training in one process on the
CPU (the reference in ``labkit.train``); the printed table must say the ranks were on CUDA.
"""
import os
import subprocess
import sys

import pytest
import torch

from labkit import train

from ._util import ROOT, TESTS, timeout

TORCHRUN_TIMEOUT = 120


@pytest.mark.notebook   # end to end under torchrun: make test's parallel phase, as on the CPU
@timeout(TORCHRUN_TIMEOUT + 30)
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_labkit_train_under_torchrun_on_cuda_trains_as_one_process(tmp_path, strategy):
    flags = ["--strategy", strategy, "--width", "64", "--depth", "3", "--steps", "3",
             "--optimizer", "adam", "--save", "final.pt", "--check"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), str(TESTS), os.environ.get("PYTHONPATH")) if p))
    env.pop("LABKIT_DEVICE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "labkit.train", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT,
                          env=env, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    print(done.stdout)
    assert "on 2 ranks, cuda" in done.stdout, done.stdout   # rank 0's table names the device
    reference = train.train_one_process(train.parse(flags))
    saved = torch.load(tmp_path / "final.pt")
    assert saved.keys() == reference.keys()
    for name, value in reference.items():
        assert saved[name].device.type == "cpu"
        # a GPU sums in another order than the CPU: float32 rounding, not a different training
        torch.testing.assert_close(saved[name], value, rtol=1e-4, atol=1e-5, msg=name)
