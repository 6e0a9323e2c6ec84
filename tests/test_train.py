"""``python -m labkit.train`` under real torchrun on CPU: every strategy trains like one process.

The entry point is how the lab's code leaves the laptop (docs/cluster.md). Each run is
``torchrun --standalone --nproc-per-node 2 -m labkit.train`` with ``--save``; the test trains
the same model on the whole batch in this process with a plain torch optimizer and compares the
saved parameters, and reads the printed table (memory per rank, bytes per step beside the formula).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from labkit import theory, train

ROOT = Path(__file__).resolve().parents[1]


def torchrun(tmp_path, *args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "labkit.train", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def one_process(args) -> dict:
    """The same model, data and optimizer in one process on the whole batch."""
    model = train.build_model(args)
    optimizer_class, options = train.OPTIMIZERS[args.optimizer]
    optimizer = optimizer_class(model.parameters(), **options)
    for step in range(args.steps):
        x, y = train.global_batch(model, args, step, "cpu")
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return dict(model.named_parameters())


NUMBER = r"\s+([\d.]+(?:e[-+]\d+)?)"
ROWS = re.compile(r"^\s+(\d)" + NUMBER * 8 + "$", re.MULTILINE)


@pytest.mark.notebook   # end to end under torchrun: in make test's parallel phase
@pytest.mark.parametrize("strategy,impl", [("ddp", None), ("zero1", None), ("zero2", None),
                                           ("zero3", None), ("zero3", "sharded_solutions:ZeRO3")])
def test_each_strategy_under_torchrun_trains_as_one_process(tmp_path, strategy, impl):
    extra = ["--impl", impl] if impl else []
    flags = ["--strategy", strategy, "--width", "64", "--depth", "3", "--steps", "3",
             "--optimizer", "adam", "--save", "final.pt", *extra]
    out = torchrun(tmp_path, *flags)
    args = train.parse(flags)
    reference = one_process(args)
    saved = torch.load(tmp_path / "final.pt")
    assert saved.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(saved[name], value.detach(), rtol=1e-5, atol=1e-6)

    rows = [[float(v) for v in row] for row in ROWS.findall(out)]
    assert [int(row[0]) for row in rows] == [0, 1], out
    psi = sum(v.numel() for v in reference.values())
    stage = train.STRATEGIES[strategy]
    for _, params, grads, optimizer, _, _, _, wire, formula in rows:
        # Adam keeps 8 bytes per parameter it updates: all of them (DDP), 1/N (ZeRO)
        share = 1 if stage == 0 else 2
        assert optimizer * 1e6 == pytest.approx(8 * psi / share, rel=0.02, abs=2e3), out
        if stage == 3:
            assert params * 1e6 == pytest.approx(4 * psi / 2, rel=0.02, abs=2e3), out
        expected = (theory.ddp_bytes_per_step(psi, 2) if stage == 0 else
                    theory.zero_bytes_per_step(psi, 2, stage, grad_bytes=4, param_bytes=4))
        assert formula * 1e6 == pytest.approx(expected, rel=1e-3)   # printed to 4 digits
        assert wire == pytest.approx(formula, rel=0.02, abs=2e-3), out


def test_outside_torchrun_it_says_how_to_start_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "labkit.train"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode != 0
    assert "run this under torchrun" in done.stderr
    assert "Traceback" not in done.stderr
