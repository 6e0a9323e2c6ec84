"""labkit.simulate: ZeRO executed on fake tensors, measured, against the formula and the paper.

What makes these tests more than the formula checked against itself: simulate assigns no size.
It runs labkit.stages' DDP / ZeRO1 / ZeRO2 / ZeRO3 for one step and MemoryTracer reads what they
hold; a stage with a planted bug gives other bytes (test_a_planted_bug_changes_the_bytes).

Padding bound. Stages 1-3 pad each flat buffer (one per piece: ZeRO-1 one, ZeRO-2 a bucket,
ZeRO-3 a unit) to a multiple of N, so P = padded_params >= Ψ elements, P − Ψ < N per piece.
Replicated and sharded bytes per element add up to 16 (2 + 2 + 12 mixed, 4 + 4 + 8 fp32), so

    0 <= simulated − theory.zero_memory(Ψ) <= 16·(P − Ψ) bytes,

and, exactly, simulated == theory.zero_memory(P) category by category.
"""
import sys
import time

import psutil
import pytest
import torch
import torch.distributed as dist

from labkit import simulate, stages, theory

PSI = 7_500_000_000   # the ZeRO paper's 7.5B example
MIXED = dict(k=12, param_bytes=2, grad_bytes=2)
FP32 = dict(k=8, param_bytes=4, grad_bytes=4)
KW = {"mixed": MIXED, "fp32": FP32}


def tiny_model():
    """4 × Linear(500, 500, bias=False): exactly 1,000,000 parameters (ground-truth note §9.2)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(500, 500, bias=False) for _ in range(4)))


def test_7_5b_at_64_ranks_uses_no_real_memory():
    """~150 GB of fake buffers at stage 0's peak, yet the process grows by a few tens of MiB."""
    process = psutil.Process()
    before, start = process.memory_info().rss, time.perf_counter()
    results = [simulate.zero(PSI, world_size=64, stage=s) for s in range(4)]
    seconds, grown = time.perf_counter() - start, process.memory_info().rss - before
    each = ", ".join(f"{r.seconds:.3f}" for r in results)
    print(f"\n7.5B at N=64, stages 0-3: {seconds:.2f} s in all ({each} s each), "
          f"RSS +{grown / 2**20:.1f} MiB")
    assert results[0].peak > 150e9     # 16Ψ + the fp32 copy of the gradients for the update
    assert grown < 500e6
    assert not dist.is_initialized()


def test_the_7_5b_model_is_exact():
    model = simulate.sized_model(PSI)
    assert sum(p.numel() for p in model.parameters()) == PSI and len(model) == 48
    assert all(p.is_meta for p in model.parameters())
    odd = simulate.sized_model(1_000_003)
    assert sum(p.numel() for p in odd.parameters()) == 1_000_003


@pytest.mark.parametrize("precision", ["mixed", "fp32"])
@pytest.mark.parametrize("world_size", [1, 4, 64, 1024])
def test_measured_bytes_match_theory_by_category(world_size, precision):
    for stage in range(4):
        r = simulate.zero(PSI, world_size=world_size, stage=stage, precision=precision)
        pad = r.padded_params - PSI
        assert 0 <= pad < world_size * 48 and (stage > 0 or pad == 0)
        exact = theory.zero_memory_breakdown(r.padded_params, world_size, stage, **KW[precision])
        assert {c: getattr(r, c) for c in exact} == exact, (stage, r)
        gap = r.total - theory.zero_memory(PSI, world_size, stage, **KW[precision])
        assert 0 <= gap <= 16 * pad
        assert r.leftover == 0                        # nothing else live at rest
        assert 0 < r.step_counters <= 4 * 48          # Adam's step scalars, reported apart


def test_padding_bound_for_an_uneven_count():
    psi, n = 1_000_003, 64
    for precision in ("mixed", "fp32"):
        for stage in range(4):
            r = simulate.zero(psi, world_size=n, stage=stage, precision=precision)
            pad = r.padded_params - psi
            assert (pad == 0) == (stage == 0)
            gap = r.total - theory.zero_memory(psi, n, stage, **KW[precision])
            assert 0 <= gap <= 16 * pad
            assert r.as_dict()["total"] == theory.zero_memory(r.padded_params, n, stage,
                                                              **KW[precision])


@pytest.mark.parametrize("stage,paper_gb", [(0, "120"), (1, "31.4"), (2, "16.6"), (3, "1.9"),
                                            (3, "1.88")])
def test_zero_paper_figure_1(stage, paper_gb):
    """Ψ = 7.5B, N_d = 64, K = 12; GB = 1e9 B (1.9 in §5.3's text, 1.88 in Table 1)."""
    total_gb = simulate.zero(PSI, world_size=64, stage=stage).total / 1e9
    assert theory.printed_match(total_gb, paper_gb) in ("exact", "rounded")


def test_zero_paper_table_1_for_7_5b_by_execution():
    """Every 7.5B cell (P_os, P_os+g, P_os+g+p at N_d = 1 ... 1024) from one executed step,
    against the printed cell under the paper's rounding of this column (half up)."""
    start = time.perf_counter()
    rows = simulate.table1(PSI)
    print(f"\nTable 1, 7.5B column by execution: {time.perf_counter() - start:.2f} s")
    assert len(rows) == 18
    for row in rows:
        assert row["match"] in ("exact", "rounded"), row
    assert not dist.is_initialized()


class ZeRO2KeepsFullGrads(stages.ZeRO2):
    """Planted bug: the parameters' full gradients are copied into the bucket, never dropped."""
    def _grad_ready(self, p):
        grad = p.grad
        super()._grad_ready(p)
        p.grad = grad


class ZeRO3KeepsGatheredUnits(stages.ZeRO3):
    """Planted bug: a unit gathered for the step is never freed (freed once, at set-up)."""
    def _free(self, i):
        if not hasattr(self, "optim"):
            super()._free(i)


class ZeRO1FullMaster(stages.ZeRO1):
    """Planted bug: the fp32 master copy of all parameters, not of this rank's shard."""
    def _optimizer(self, weights, optimizer_class, **kwargs):
        super()._optimizer(weights, optimizer_class, **kwargs)
        self.extra = self.tag(self.flats[0].float(), "optimizer")


@pytest.mark.parametrize("bug,stage,category,extra", [
    (ZeRO2KeepsFullGrads, 2, "grads", 2 * PSI),
    (ZeRO3KeepsGatheredUnits, 3, "params", 2 * PSI),
    (ZeRO1FullMaster, 1, "optimizer", 4 * PSI)])
def test_a_planted_bug_changes_the_bytes(bug, stage, category, extra):
    """The measurement follows the code: a stage that keeps what it should free is caught."""
    good = simulate.zero(PSI, world_size=64, stage=stage)
    bad = simulate.zero(PSI, world_size=64, stage=stage, stage_class=bug)
    assert getattr(bad, category) - getattr(good, category) == pytest.approx(extra, rel=1e-5)
    assert bad.as_dict() != theory.zero_memory_breakdown(bad.padded_params, 64, stage)
    assert theory.printed_match(bad.total / 1e9, {1: "31.4", 2: "16.6", 3: "1.88"}[stage]) \
        is None


@pytest.mark.parametrize("precision", ["mixed", "fp32"])
@pytest.mark.parametrize("world_size", [1, 4])
def test_fake_tensors_count_the_same_bytes_as_real_ones(precision, world_size):
    """Same code, real uninitialised tensors (fake process group): same bytes, same peak."""
    model = tiny_model()
    for stage in range(4):
        fake = simulate.zero(model, world_size, stage, precision=precision, rank=world_size - 1)
        real = simulate.zero(model, world_size, stage, precision=precision, rank=world_size - 1,
                             fake=False)
        keys = ("params", "grads", "optimizer", "step_counters", "leftover", "peak",
                "peak_by_category", "collectives", "padded_params")
        assert {k: getattr(fake, k) for k in keys} == {k: getattr(real, k) for k in keys}
        assert fake.total == theory.zero_memory(1_000_000, world_size, stage, **KW[precision])


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
    """Payloads (full buffers) as CommCounter saw them: stages 0-2 move 2Ψ elements per step,
    stage 3 3Ψ (ZeRO §7), here in fp16 bytes, up to the padding."""
    runs = {s: simulate.zero(PSI, world_size=64, stage=s) for s in range(4)}
    ops = {s: r.collectives for s, r in runs.items()}
    by_op = lambda s: {op: sum(b for o, b in ops[s] if o == op) for op, _ in ops[s]}
    full = lambda s: 2 * runs[s].padded_params
    assert by_op(0) == {"all_reduce": 2 * PSI} and len(ops[0]) == 48    # one per parameter
    assert ops[1] == [("reduce_scatter", full(1)), ("all_gather", full(1))]
    assert by_op(2) == {"reduce_scatter": full(2), "all_gather": full(2)}
    assert by_op(3) == {"all_gather": 2 * full(3), "reduce_scatter": full(3)}
    assert [op for op, _ in ops[3][:48]] == ["all_gather"] * 48       # the forward, unit by unit
    assert [op for op, _ in ops[2][:48]] == ["reduce_scatter"] * 48   # in backward, by bucket
    volume = lambda s: sum(2 * b if op == "all_reduce" else b for op, b in ops[s])
    assert volume(3) / volume(0) == pytest.approx(1.5, rel=1e-5)


def test_peak_is_measured_through_the_step():
    """The peak falls stage by stage; ZeRO-3's stays within the model states plus at most two
    gathered units (fp16) and the fp32 copy of its gradient shard for the update."""
    runs = [simulate.zero(PSI, world_size=64, stage=s) for s in range(4)]
    peaks = [r.peak for r in runs]
    assert peaks == sorted(peaks, reverse=True)
    assert all(r.peak >= r.total for r in runs)
    unit = 2 * PSI / 48
    assert runs[3].peak - runs[3].total < 2 * unit + 4 * PSI / 64
    assert runs[0].peak - runs[0].total >= 4 * PSI   # fp32 copies of all gradients in the step


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


def test_any_module_with_an_input_function_and_buffers():
    """A module with BatchNorm: its statistics are live but no model state (``leftover``);
    the module handed in is copied, never changed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.Linear(16, 4))
    before = [p.detach().clone() for p in model.parameters()]
    for stage in range(4):
        r = simulate.zero(model, 4, stage, inputs=lambda dtype: torch.zeros(2, 8, dtype=dtype))
        assert r.as_dict() == r.theory()                  # 244 parameters, no padding needed
        assert r.leftover == 2 * 16 * 2 + 8               # fp16 mean and var, int64 counter
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="pass inputs="):
        simulate.zero(torch.nn.Sequential(torch.nn.Conv1d(1, 1, 3)), 2, 1)
