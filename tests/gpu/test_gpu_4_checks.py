"""The course's checks on CUDA tensors, with the reference solutions the CPU tests use.

``LABKIT_DEVICE=cuda`` makes every launch inside a check put its ranks on the GPU (on one GPU:
all ranks share it under gloo; a machine without a GPU would be an error, not a CPU run). The
checks choose their own world sizes (2 and 4 ranks, the ring 2, 3 and 4), which share one GPU
fine. Each is given ``timeout=`` per launch for the ranks' CUDA contexts.
"""
import importlib

import pytest

from labkit import check

from ._util import CHECK_TIMEOUT, timeout

# (notebook, check, module in tests/ holding the reference solution, its name there)
CHECKS = [
    ("nb01", "ring_all_reduce", "test_check", "ring_all_reduce"),
    ("nb02", "naive_ddp", "test_nb02_check", "PerTensor"),
    ("nb03", "bucketed_ddp", "test_nb03_check", "Bucketed"),
    ("nb04", "no_sync_ddp", "test_nb04_check", "NoSync"),   # accumulation with DDP, in ranks
    ("nb06", "zero1", "test_nb06_check", "ZeRO1"),
    ("nb07", "zero2", "test_nb07_check", "ZeRO2"),
    ("nb08", "zero3", "sharded_solutions", "ZeRO3"),
]


@timeout(240)
@pytest.mark.parametrize("notebook, name, module, solution", CHECKS,
                         ids=[f"{nb}_{name}" for nb, name, _, _ in CHECKS])
def test_check_passes_on_cuda_with_the_reference_solution(notebook, name, module, solution,
                                                          monkeypatch):
    monkeypatch.setenv("LABKIT_DEVICE", "cuda")
    reference = getattr(importlib.import_module(module), solution)
    result = getattr(check, name)(reference, timeout=CHECK_TIMEOUT)
    assert result.passed, result.hint
