"""labkit.simulate: fake-tensor ZeRO bytes per rank against the formula, the paper and real tensors.

Padding bound used below. Stages 1-3 pad the flat buffer from Ψ to P = ceil(Ψ/N)·N elements
(pad = P − Ψ < N) so that it splits into N equal shards. A full (replicated) buffer of b bytes
per element then holds b·pad extra bytes, a shard b·pad/N. Replicated and sharded bytes per
element add up to 16 (2 + 2 + 12 mixed, 4 + 4 + 8 fp32), so

    0 <= simulated − theory.zero_memory(Ψ) <= 16·pad <= 16·(N − 1) bytes,

and, exactly, simulated == theory.zero_memory(P) category by category: the simulation is the
formula applied to the padded count.
"""
import sys
import time
from decimal import Decimal, ROUND_HALF_UP

import psutil
import pytest
import torch
import torch.distributed as dist

from labkit import simulate, theory

PSI = 7_500_000_000   # the ZeRO paper's 7.5B example
MIXED = dict(k=12, param_bytes=2, grad_bytes=2)
FP32 = dict(k=8, param_bytes=4, grad_bytes=4)


def tiny_model():
    """4 × Linear(500, 500, bias=False): exactly 1,000,000 parameters (ground-truth note §9.2)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(500, 500, bias=False) for _ in range(4)))


def test_7_5b_at_64_ranks_uses_no_real_memory():
    """~150 GB of fake buffers (stage 0 peak), yet the process grows by a few tens of MiB."""
    process = psutil.Process()
    before, start = process.memory_info().rss, time.perf_counter()
    results = [simulate.zero(PSI, world_size=64, stage=s) for s in range(4)]
    seconds, grown = time.perf_counter() - start, process.memory_info().rss - before
    each = ", ".join(f"{r.seconds:.3f}" for r in results)
    print(f"\n7.5B at N=64, stages 0-3: {seconds:.2f} s in all ({each} s each), "
          f"RSS +{grown / 2**20:.1f} MiB")
    assert results[0].unbucketed_peak == 150e9   # what it would have taken for real
    assert grown < 500e6
    assert not dist.is_initialized()


@pytest.mark.parametrize("world_size", [1, 4, 64, 1024])
def test_matches_theory_for_7_5b_mixed_precision(world_size):
    for stage in range(4):
        r = simulate.zero(PSI, world_size=world_size, stage=stage)
        pad = r.padded_params - PSI
        assert pad == (0 if stage == 0 else -PSI % world_size)   # 256 at N=1024, else 0
        assert stage == 0 or r.padded_params % world_size == 0
        exact = theory.zero_memory_breakdown(r.padded_params, world_size, stage, **MIXED)
        assert {c: getattr(r, c) for c in exact} == exact
        gap = r.total - theory.zero_memory(PSI, world_size, stage, **MIXED)
        assert 0 <= gap <= 16 * pad
        assert r.theory()["total"] == theory.zero_memory(PSI, world_size, stage)


def test_padding_bound_for_an_uneven_count():
    psi, n = 1_000_003, 64   # pad = 61
    for precision, kw in (("mixed", MIXED), ("fp32", FP32)):
        for stage in range(4):
            r = simulate.zero(psi, world_size=n, stage=stage, precision=precision)
            pad = r.padded_params - psi
            assert pad == (0 if stage == 0 else 61)
            gap = r.total - theory.zero_memory(psi, n, stage, **kw)
            assert 0 <= gap <= 16 * pad
            assert r.as_dict()["total"] == theory.zero_memory(r.padded_params, n, stage, **kw)


@pytest.mark.parametrize("stage,paper_gb", [(0, "120"), (1, "31.4"), (2, "16.6"), (3, "1.88")])
def test_zero_paper_figure_1(stage, paper_gb):
    """Ψ = 7.5B, N_d = 64, K = 12; GB = 1e9 B, rounded half-up to the printed digits."""
    shown = Decimal(paper_gb)
    total_gb = Decimal(simulate.zero(PSI, world_size=64, stage=stage).total) / Decimal(10**9)
    assert total_gb.quantize(shown, rounding=ROUND_HALF_UP) == shown


# ZeRO Table 1, 7.5B columns (stages 1-3), rows N_d = 1, 4, 16, 64, 256, 1024.
TABLE_1 = {1: "120 52.5 35.6 31.4 30.4 30.1", 2: "120 41.3 21.6 16.6 15.4 15.1",
           3: "120 30 7.5 1.88 0.47 0.12"}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_paper_table_1_for_7_5b(stage):
    for n, shown in zip([1, 4, 16, 64, 256, 1024], TABLE_1[stage].split()):
        total_gb = Decimal(simulate.zero(PSI, world_size=n, stage=stage).total) / Decimal(10**9)
        assert total_gb.quantize(Decimal(shown), rounding=ROUND_HALF_UP) == Decimal(shown), n


def test_fp32_adam_is_16_bytes_per_parameter_and_matches_theory():
    for n in (1, 4, 64):
        for stage in range(4):
            r = simulate.zero(PSI, world_size=n, stage=stage, precision="fp32")
            assert r.as_dict()["total"] == theory.zero_memory(PSI, n, stage, **FP32)
            assert r.theory()["total"] == theory.zero_memory(PSI, n, stage, **FP32)
    assert simulate.zero(PSI, world_size=64, stage=0, precision="fp32").total == 16 * PSI


@pytest.mark.parametrize("precision", ["mixed", "fp32"])
@pytest.mark.parametrize("world_size", [1, 4])
def test_fake_tensors_count_the_same_bytes_as_real_ones(precision, world_size):
    model = tiny_model()
    for stage in range(4):
        fake = simulate.zero(model, world_size, stage, precision=precision, rank=world_size - 1)
        real = simulate.zero(model, world_size, stage, precision=precision, rank=world_size - 1,
                             fake=False)
        assert fake.as_dict() == real.as_dict()
        assert (fake.unbucketed_peak, fake.collectives) == (real.unbucketed_peak, real.collectives)


def test_simulation_equals_a_real_fp32_adam_step_on_one_rank():
    """An ordinary training step with torch's Adam, no ZeRO code at all, counted by hand."""
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 500)).square().mean().backward()
    optimizer.step()
    real = {"params": sum(p.nbytes for p in model.parameters()),
            "grads": sum(p.grad.nbytes for p in model.parameters()),
            "optimizer": sum(s[k].nbytes for s in optimizer.state.values()
                             for k in ("exp_avg", "exp_avg_sq"))}
    assert real == {"params": 4_000_000, "grads": 4_000_000, "optimizer": 8_000_000}
    for stage in range(4):   # on one rank every stage is plain data parallelism
        r = simulate.zero(model, world_size=1, stage=stage, precision="fp32")
        assert {c: getattr(r, c) for c in real} == real


def test_simulation_equals_a_real_mixed_precision_step_on_one_rank():
    """fp16 model, fp16 grads; Adam on an fp32 master copy (Micikevicius et al.; ZeRO §3.1)."""
    model = tiny_model().half()
    master = [p.detach().float().requires_grad_() for p in model.parameters()]
    optimizer = torch.optim.Adam(master, lr=1e-3)
    model(torch.randn(8, 500, dtype=torch.half)).float().square().mean().backward()
    for w, p in zip(master, model.parameters()):
        w.grad = p.grad.float()
    optimizer.step()
    with torch.no_grad():
        for w, p in zip(master, model.parameters()):
            p.copy_(w)
            w.grad = None
    real = {"params": sum(p.nbytes for p in model.parameters()),
            "grads": sum(p.grad.nbytes for p in model.parameters()),
            "optimizer": sum(w.nbytes + optimizer.state[w]["exp_avg"].nbytes
                             + optimizer.state[w]["exp_avg_sq"].nbytes for w in master)}
    assert real == {"params": 2_000_000, "grads": 2_000_000, "optimizer": 12_000_000}
    for stage in range(4):
        r = simulate.zero(model, world_size=1, stage=stage)
        assert {c: getattr(r, c) for c in real} == real


def test_meta_model_of_7_5b_parameters():
    start = time.perf_counter()
    model = simulate.mlp_stack()
    print(f"\nmlp_stack(): {time.perf_counter() - start:.3f} s")
    assert all(p.is_meta for p in model.parameters())
    num = sum(p.numel() for p in model.parameters())
    assert num == 56 * (2 * 4096 * 16384 + 16384 + 4096) == 7_517_339_648
    r = simulate.zero(model, world_size=64, stage=3)
    assert r.num_params == num and r.total == theory.zero_memory(num, 64, 3)


def test_every_rank_holds_the_same_bytes():
    """Equal shards, padding included (the padding sits in the last rank's shard)."""
    for stage in range(4):
        results = [simulate.zero(1_000_003, world_size=4, stage=stage, rank=k) for k in range(4)]
        assert all(r.as_dict() == results[0].as_dict() for r in results)


def test_collectives_of_one_step():
    """Logical sizes (the full buffer): stages 0-2 move 2Ψ elements, stage 3 3Ψ (ZeRO §7)."""
    full = 2 * PSI   # fp16 bytes
    ops = {s: simulate.zero(PSI, world_size=64, stage=s).collectives for s in range(4)}
    assert ops[0] == [("all_reduce", full)]
    assert ops[1] == ops[2] == [("reduce_scatter", full), ("all_gather", full)]
    assert ops[3] == [("all_gather", full), ("all_gather", full), ("reduce_scatter", full)]
    volume = lambda calls: sum(2 * b if op == "all_reduce" else b for op, b in calls)
    assert volume(ops[3]) / volume(ops[0]) == 1.5


def test_peak_includes_the_transient_buffers_of_an_unbucketed_step():
    """P params, s = P/N shard, mixed precision (bytes): see ZeroMemory's docstring."""
    P, s = PSI, PSI // 64
    peaks = [simulate.zero(PSI, world_size=64, stage=st).unbucketed_peak for st in range(4)]
    assert peaks == [20 * P,                  # 16Ψ + the fp32 gradients for the update
                     4 * P + 16 * s,          # + an fp32 shard of the gradients
                     4 * P + 6 * s,           # the full gradient before its reduce-scatter
                     4 * P + 8 * s]           # gathered params + full gradient in backward


def test_leaves_no_process_group_behind_even_on_error(monkeypatch):
    simulate.zero(1000, world_size=8, stage=3)
    assert not dist.is_initialized()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(torch.optim, "Adam", broken)
    with pytest.raises(RuntimeError, match="boom"):
        simulate.zero(1000, world_size=8, stage=3)
    assert not dist.is_initialized()


def test_refuses_and_leaves_an_existing_process_group_alone():
    from labkit._torch_private import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        group = dist.group.WORLD
        with pytest.raises(RuntimeError, match="one exists already"):
            simulate.zero(1000, world_size=8)
        assert dist.is_initialized() and dist.group.WORLD is group
        assert (dist.get_rank(), dist.get_world_size()) == (1, 2)
    finally:
        dist.destroy_process_group()


def test_clear_error_without_the_private_torch_apis(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.testing._internal.distributed.fake_pg", None)
    with pytest.raises(RuntimeError, match=r"needs torch >= 2\.4"):
        simulate.zero(1000, world_size=8)
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.3.1"))
    with pytest.raises(RuntimeError, match="this is torch 2.3.1"):
        simulate.zero(1000, world_size=8)
    assert not dist.is_initialized()


@pytest.mark.parametrize("kwargs", [dict(stage=4), dict(precision="bf16"), dict(rank=8),
                                    dict(world_size=0), dict(fake=False)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        simulate.zero(PSI, **{"world_size": 8, **kwargs})   # fake=False: 120 GB of real memory


@pytest.mark.parametrize("model", [1.5, 0, -3, float("nan"), float("inf"), "7.5e9", True, None,
                                   torch.nn.ReLU()])
def test_model_must_be_a_module_or_a_whole_number(model):
    with pytest.raises(ValueError, match="nn.Module or a whole number"):
        simulate.zero(model)


def test_result_prints_in_decimal_gb_beside_the_formula():
    text = str(simulate.zero(PSI, world_size=64, stage=3))
    assert "total 1.875 GB (theory 1.875 GB)" in text and "rank 0 of 64" in text
