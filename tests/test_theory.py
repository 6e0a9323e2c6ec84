"""labkit.theory against the papers' own numbers, hand computations and torch modules.

Sources: ZeRO (arXiv 1910.02054) Table 1, Figure 1 and §7; nccl-tests doc/PERFORMANCE.md;
Korthikanti et al. (arXiv 2205.05198) Table 2; the course's ground-truth note §9.2 (CPU lab).
"""
import random
from collections import Counter

import pytest

from labkit import theory
from labkit.theory import (algbw, busbw, collective_time, ddp_bytes_per_step, fit_alpha_beta,
                           printed_match, r_squared, transformer_activation_bytes,
                           transformer_params, wire_bytes, zero_bytes_per_step, zero_memory,
                           zero_memory_breakdown, zero_table1)

GB = 1e9  # the ZeRO paper's GB is decimal
TABLE1 = zero_table1()


# --- ZeRO Table 1 and Figure 1 ------------------------------------------------------------------

# The 7.5B columns are exact or rounded half up to the printed decimals; the 128B and 1T columns
# may also be truncated (the paper prints 513.5 as 513). Ground-truth note §1.4.
ALLOWED = {"7.5B": {"exact", "rounded"},
           "128B": {"exact", "rounded", "truncated"},
           "1T": {"exact", "rounded", "truncated"}}


def reproduces(cell, value_gb) -> bool:
    return printed_match(value_gb, cell["paper_gb"]) in ALLOWED[cell["model"]]


def table1_mismatches(memory_gb) -> list:
    """Cells of Table 1 that ``memory_gb(num_params, world_size, stage)`` does not reproduce."""
    return [cell for cell in TABLE1
            if not reproduces(cell, memory_gb(cell["num_params"], cell["world_size"],
                                              cell["stage"]))]


def test_table1_has_54_cells_as_printed():
    assert len(TABLE1) == 54
    assert Counter(cell["model"] for cell in TABLE1) == {"7.5B": 18, "128B": 18, "1T": 18}
    cell = next(c for c in TABLE1 if c["model"] == "1T" and c["world_size"] == 64
                and c["stage"] == 1)
    assert cell == {"model": "1T", "num_params": 1e12, "world_size": 64, "stage": 1,
                    "paper_gb": "4187"}


@pytest.mark.parametrize("cell", TABLE1,
                         ids=[f"{c['model']}-Nd{c['world_size']}-stage{c['stage']}"
                              for c in TABLE1])
def test_table1_cell(cell):
    value_gb = zero_memory(cell["num_params"], cell["world_size"], cell["stage"]) / GB
    assert reproduces(cell, value_gb), (value_gb, cell["paper_gb"])


def test_table1_rounding_tally_matches_the_note():
    """Ground-truth note §1.4: 33 exact, 13 rounded, 8 truncated, no mismatch."""
    verdicts = Counter(printed_match(zero_memory(c["num_params"], c["world_size"], c["stage"])
                                     / GB, c["paper_gb"]) for c in TABLE1)
    assert verdicts == {"exact": 33, "rounded": 13, "truncated": 8}


@pytest.mark.parametrize("wrong, memory_gb", [
    ("K = 16", lambda psi, n, stage: zero_memory(psi, n, stage, k=16) / GB),
    ("GiB instead of GB", lambda psi, n, stage: zero_memory(psi, n, stage) / 2**30),
    ("stages shifted by one", lambda psi, n, stage: zero_memory(psi, n, stage - 1) / GB),
    ("fp32 gradients", lambda psi, n, stage: zero_memory(psi, n, stage, grad_bytes=4) / GB),
    ("1% too much", lambda psi, n, stage: 1.01 * zero_memory(psi, n, stage) / GB),
])
def test_a_wrong_formula_is_rejected(wrong, memory_gb):
    assert len(table1_mismatches(memory_gb)) >= 40, wrong  # of 54 cells; the right one: 0


def test_truncation_is_not_accepted_in_the_rounded_columns():
    # 41.25 truncates to 41.2: fine for printed_match, but the 7.5B columns are rounded
    assert printed_match(41.25, "41.3") == "rounded"
    assert printed_match(41.25, "41.2") == "truncated"
    def off_by_truncation(psi, n, stage):
        return 41.2 if (psi, n, stage) == (7.5e9, 4, 2) else zero_memory(psi, n, stage) / GB

    assert [(c["world_size"], c["stage"]) for c in table1_mismatches(off_by_truncation)
            if c["model"] == "7.5B"] == [(4, 2)]


def test_printed_match():
    assert printed_match(120.0, "120") == "exact"
    assert printed_match(1.875, "1.88") == "rounded"  # half up, not half to even
    assert printed_match(0.46875, "0.47") == "rounded"
    assert printed_match(513.5, "513") == "truncated"
    assert printed_match(15.625, "15.6") == "rounded"
    assert printed_match(111.76, "120") is None
    assert printed_match(31.5, "31.4") is None


def test_figure1_example():
    """ZeRO Figure 1: Ψ = 7.5B, N_d = 64, K = 12 → 120, 31.4, 16.6, 1.88 GB."""
    exact = [zero_memory(7.5e9, 64, stage) / GB for stage in (0, 1, 2, 3)]
    assert exact == [120.0, 31.40625, 16.640625, 1.875]
    assert [printed_match(v, p) for v, p in zip(exact, ["120", "31.4", "16.6", "1.88"])] == [
        "exact", "rounded", "rounded", "rounded"]


def test_baseline_is_16_psi_at_every_world_size():
    for n in (1, 4, 1024):
        assert zero_memory(7.5e9, n, 0) == 16 * 7.5e9


@pytest.mark.parametrize("n", [1, 2, 4])
def test_plain_fp32_adam_cpu_lab(n):
    """Ground-truth note §9.2: 1M fp32 parameters, plain Adam, exact to the byte."""
    psi, fp32 = 1_000_000, dict(k=8, param_bytes=4, grad_bytes=4)
    assert zero_memory(psi, n, 0, **fp32) == 16 * psi
    assert zero_memory_breakdown(psi, n, 1, **fp32) == {
        "params": 4 * psi, "grads": 4 * psi, "optimizer": 8 * psi / n}
    assert zero_memory_breakdown(psi, n, 2, **fp32) == {
        "params": 4 * psi, "grads": 4 * psi / n, "optimizer": 8 * psi / n}
    assert zero_memory(psi, n, 3, **fp32) == 16 * psi / n


# --- collectives --------------------------------------------------------------------------------

def test_wire_bytes_ring_model():
    assert wire_bytes("all_reduce", 1000, 4) == 1500
    assert wire_bytes("reduce_scatter", 1000, 4) == 750
    assert wire_bytes("all_gather", 1000, 4) == 750
    assert wire_bytes("all_reduce", 1000, 1) == 0
    assert wire_bytes("send", 1000, 1) == 1000


def test_collective_time_by_hand():
    alpha, beta, size = 1e-5, 1e-9, 1e6  # 10 µs per step, 1 GB/s, 1 MB
    assert collective_time("all_reduce", size, 4, alpha, beta) == pytest.approx(
        6 * 1e-5 + 1.5e6 * 1e-9)  # 2(N-1) steps, 2(N-1)/N · S bytes
    assert collective_time("reduce_scatter", size, 4, alpha, beta) == pytest.approx(3e-5 + 7.5e-4)
    assert collective_time("all_gather", size, 4, alpha, beta) == pytest.approx(3e-5 + 7.5e-4)
    assert collective_time("broadcast", size, 4, alpha, beta) == pytest.approx(3e-5 + 1e-3)
    assert collective_time("send", size, 4, alpha, beta) == pytest.approx(1e-5 + 1e-3)
    assert collective_time("all_reduce", size, 1, alpha, beta) == 0


@pytest.mark.parametrize("n", [2, 3, 8, 64])
def test_all_reduce_is_reduce_scatter_plus_all_gather(n):
    args = (1e6, n, 3e-6, 2e-10)
    assert collective_time("all_reduce", *args) == pytest.approx(
        collective_time("reduce_scatter", *args) + collective_time("all_gather", *args))


def test_bandwidths_follow_nccl_tests():
    """algbw = S/t; busbw = algbw · factor (nccl-tests doc/PERFORMANCE.md)."""
    size, seconds, n = 8e9, 2.0, 8
    assert algbw(size, seconds) == 4e9
    factors = {"all_reduce": 2 * 7 / 8, "reduce_scatter": 7 / 8, "all_gather": 7 / 8,
               "all_to_all": 7 / 8, "broadcast": 1, "reduce": 1, "send": 1, "recv": 1}
    for op, factor in factors.items():
        assert busbw(op, size, seconds, n) == pytest.approx(4e9 * factor), op


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter", "all_gather", "broadcast",
                                "send"])
@pytest.mark.parametrize("n", [2, 8, 512])
def test_busbw_of_the_model_is_the_link_bandwidth(op, n):
    """Without latency, busbw recovers 1/beta whatever N: what busbw is defined for."""
    beta = 1 / 25e9
    seconds = collective_time(op, 1e8, n, alpha=0, beta=beta)
    assert busbw(op, 1e8, seconds, n) == pytest.approx(1 / beta)


SIZES = [2 ** k for k in range(10, 27, 2)]  # 1 KiB .. 64 MiB


@pytest.mark.parametrize("op, n", [("all_reduce", 2), ("all_reduce", 4), ("all_gather", 8),
                                   ("send", 2)])
def test_fit_recovers_alpha_beta_exactly_without_noise(op, n):
    alpha, beta = 20e-6, 1 / 2e9
    seconds = [collective_time(op, s, n, alpha, beta) for s in SIZES]
    fit_alpha, fit_beta = fit_alpha_beta(SIZES, seconds, op, n)
    assert fit_alpha == pytest.approx(alpha, rel=1e-9)
    assert fit_beta == pytest.approx(beta, rel=1e-9)
    assert r_squared(SIZES, seconds, fit_alpha, fit_beta, op, n) == pytest.approx(1)


def test_fit_recovers_alpha_beta_with_noise():
    alpha, beta, n = 20e-6, 1 / 2e9, 4
    rng = random.Random(0)
    for _ in range(5):  # ±2% noise on each time
        seconds = [collective_time("all_reduce", s, n, alpha, beta) * (1 + rng.uniform(-.02, .02))
                   for s in SIZES]
        fit_alpha, fit_beta = fit_alpha_beta(SIZES, seconds, "all_reduce", n)
        assert fit_alpha == pytest.approx(alpha, rel=0.05)
        assert fit_beta == pytest.approx(beta, rel=0.02)
        assert r_squared(SIZES, seconds, fit_alpha, fit_beta, "all_reduce", n) > 0.999


def test_fit_clips_a_negative_alpha_to_zero():
    beta, n = 1 / 2e9, 4
    seconds = [collective_time("all_reduce", s, n, 0, beta) for s in SIZES]
    seconds[0] *= 0.98  # the smallest message a little fast: unconstrained alpha < 0
    fit_alpha, fit_beta = fit_alpha_beta(SIZES, seconds, "all_reduce", n)
    assert fit_alpha == 0
    assert fit_beta == pytest.approx(beta, rel=0.02)


def test_fit_rejects_what_cannot_be_fitted():
    with pytest.raises(ValueError, match="two different sizes"):
        fit_alpha_beta([1024, 1024], [1e-5, 1.1e-5])
    with pytest.raises(ValueError, match="one time per size"):
        fit_alpha_beta([1024, 2048], [1e-5])
    with pytest.raises(ValueError, match="1 rank"):
        fit_alpha_beta([1024, 2048], [1e-5, 2e-5], world_size=1)


# --- bytes per training step (ZeRO §7) ----------------------------------------------------------

@pytest.mark.parametrize("n", [2, 4, 8, 64])
def test_zero3_moves_1_5x_and_zero1_2_move_as_much_as_ddp(n):
    psi = 1_000_000
    ddp = ddp_bytes_per_step(psi, n, grad_bytes=2)
    assert zero_bytes_per_step(psi, n, 0) == ddp
    assert zero_bytes_per_step(psi, n, 1) == ddp
    assert zero_bytes_per_step(psi, n, 2) == ddp
    assert zero_bytes_per_step(psi, n, 3) / zero_bytes_per_step(psi, n, 0) == 1.5


def test_bytes_per_step_cpu_lab():
    """Ground-truth note §9.2: 1M fp32 parameters (S = 4,000,000 B), per-rank ring bytes."""
    psi = 1_000_000
    assert [ddp_bytes_per_step(psi, n) for n in (1, 2, 4)] == [0, 4_000_000, 6_000_000]
    assert [zero_bytes_per_step(psi, n, 3, grad_bytes=4, param_bytes=4) for n in (1, 2, 4)] == [
        0, 6_000_000, 9_000_000]


def test_bytes_per_step_tend_to_the_papers_element_counts():
    """ZeRO §7 counts 2Ψ and 3Ψ elements, the large-N limit of the ring's (N-1)/N."""
    psi, n = 1e9, 2 ** 20
    assert zero_bytes_per_step(psi, n, 1, grad_bytes=1, param_bytes=1) == pytest.approx(2 * psi,
                                                                                        rel=1e-5)
    assert zero_bytes_per_step(psi, n, 3, grad_bytes=1, param_bytes=1) == pytest.approx(3 * psi,
                                                                                        rel=1e-5)


# --- transformer size ---------------------------------------------------------------------------

def test_gpt2_small_parameter_count_by_hand():
    h, layers, vocab, seq = 768, 12, 50257, 1024
    by_hand = vocab * h + seq * h + layers * (12 * h * h + 13 * h) + 2 * h
    assert by_hand == 124_439_808
    assert transformer_params(layers, h, vocab, seq_len=seq) == by_hand
    assert transformer_params(layers, h, vocab) == by_hand - seq * h
    assert transformer_params(layers, h, vocab, seq_len=seq, tied_embeddings=False) == (
        by_hand + vocab * h)


@pytest.mark.parametrize("bias, tied, ffn_hidden", [(True, True, None), (False, True, None),
                                                    (True, False, 40), (False, False, 24)])
def test_parameter_count_matches_a_torch_gpt(bias, tied, ffn_hidden):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    layers, h, heads, vocab, seq = 3, 16, 4, 50, 12
    f = 4 * h if ffn_hidden is None else ffn_hidden

    class TinyGPT(nn.Module):  # GPT-2 shapes, built from torch's own layers
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(vocab, h)
            self.positions = nn.Embedding(seq, h)
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(h, heads, f, dropout=0.0, batch_first=True,
                                           norm_first=True, bias=bias) for _ in range(layers))
            self.norm = nn.LayerNorm(h, bias=bias)
            self.head = nn.Linear(h, vocab, bias=False)
            if tied:
                self.head.weight = self.tokens.weight

    counted = sum(p.numel() for p in TinyGPT().parameters())  # a tied weight counts once
    assert transformer_params(layers, h, vocab, seq_len=seq, ffn_hidden=ffn_hidden,
                              tied_embeddings=tied, bias=bias) == counted


# GPT-3 shapes (Korthikanti et al. §5): s = 2048, h = 12288, a = 96, so 5as/h = 80; b = 1, t = 8
S, B, H, A, T = 2048, 1, 12288, 96, 8
SBH = S * B * H  # 25,165,824


@pytest.mark.parametrize("row, kwargs, per_layer", [
    ("no parallelism", {}, SBH * (34 + 80)),
    ("tensor parallel", dict(tensor_parallel=T), SBH * (10 + 24 / 8 + 80 / 8)),
    ("tensor + sequence parallel", dict(tensor_parallel=T, sequence_parallel=True),
     SBH * (34 / 8 + 80 / 8)),
    ("TP + selective recompute", dict(tensor_parallel=T, recompute="selective"),
     SBH * (10 + 24 / 8)),
    ("TP + SP + selective recompute",
     dict(tensor_parallel=T, sequence_parallel=True, recompute="selective"), SBH * 34 / 8),
    ("full recompute", dict(tensor_parallel=T, recompute="full"), 2 * SBH),
])
def test_activation_memory_table2(row, kwargs, per_layer):
    """Korthikanti et al. Table 2, each row with numbers, times the number of layers."""
    for layers in (1, 96):
        assert transformer_activation_bytes(S, B, H, A, layers, **kwargs) == pytest.approx(
            layers * per_layer, rel=1e-12), row


def test_activation_memory_sanity_values():
    """Ground-truth note §6.3: GPT-3 2.87 GB per layer (0.86 GB selective); GPT-2 small 8.6 GB."""
    assert transformer_activation_bytes(S, B, H, A, 1) == 2_868_903_936
    assert transformer_activation_bytes(S, B, H, A, 1, recompute="selective") == 855_638_016
    gpt2 = transformer_activation_bytes(1024, 8, 768, 12, 12)
    assert gpt2 == 12 * 717_225_984 and round(gpt2 / GB, 1) == 8.6


def test_one_way_tensor_parallel_is_eq1():
    plain = transformer_activation_bytes(S, B, H, A, 2)
    assert transformer_activation_bytes(S, B, H, A, 2, tensor_parallel=1,
                                        sequence_parallel=True) == pytest.approx(plain)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: zero_memory(1e9, 4, 4), "stage must be 0, 1, 2 or 3"),
    (lambda: zero_memory(1e9, 0, 1), "world_size must be >= 1"),
    (lambda: zero_bytes_per_step(1e9, 4, 4), "stage must be 0, 1, 2 or 3"),
    (lambda: wire_bytes("allreduce", 1e6, 4), "unknown collective 'allreduce'"),
    (lambda: wire_bytes("all_reduce", 1e6, 0), "world_size must be >= 1"),
    (lambda: collective_time("gather", 1e6, 4, 1e-6, 1e-9), "unknown collective 'gather'"),
    (lambda: collective_time("all_reduce", 1e6, 0, 1e-6, 1e-9), "world_size must be >= 1"),
    (lambda: collective_time("all_reduce", 1e6, 4, -1e-6, 1e-9), "must be >= 0"),
    (lambda: busbw("barrier", 1e6, 1.0, 4), "unknown collective 'barrier'"),
    (lambda: algbw(1e6, 0), "seconds must be > 0"),
    (lambda: transformer_activation_bytes(S, B, H, A, 1, recompute="some"), "recompute must be"),
    (lambda: transformer_activation_bytes(S, B, H, A, 1, tensor_parallel=0), "tensor_parallel"),
])
def test_bad_input_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_theory_does_not_import_torch():
    source = open(theory.__file__).read()
    assert "import torch" not in source


# --- model states by optimizer and precision (notebook 05) --------------------------------------

def test_state_bytes_per_param_is_zero_s_mixed_adam_and_plain_fp32():
    """ZeRO §3.1: mixed-precision Adam is 2 + 2 + K with K = 12; fp32 Adam has no master copy
    (4 + 4 + 8), the same 16 bytes. Ground-truth note §9.2: 1M parameters, fp32 Adam."""
    assert theory.state_bytes_per_param("adam", "bf16_mixed") == (2, 2, 12)
    assert theory.state_bytes_per_param("adam", "fp32") == (4, 4, 8)
    assert sum(theory.state_bytes_per_param("adam", "fp32")) == 16
    assert theory.model_state_breakdown(1_000_000, "adam", "fp32") == {
        "params": 4_000_000, "grads": 4_000_000, "optimizer": 8_000_000}
    assert theory.state_bytes_per_param("sgd", "fp32")[2] == 0
    for optimizer in theory.OPTIMIZERS:   # the master copy: 4 more bytes of optimizer state
        fp32 = theory.state_bytes_per_param(optimizer, "fp32")
        mixed = theory.state_bytes_per_param(optimizer, "bf16_mixed")
        assert mixed == (fp32[0] / 2, fp32[1] / 2, fp32[2] + 4)


def test_state_bytes_agree_with_the_memory_calculator():
    from labkit import widgets
    names = {"sgd": "SGD", "sgd_momentum": "SGD + momentum", "adam": "Adam"}
    for optimizer, shown in names.items():
        for precision, widget_precision in (("fp32", "fp32"), ("bf16_mixed", "mixed")):
            assert widgets.BYTES_PER_PARAM[widget_precision, shown] == \
                theory.state_bytes_per_param(optimizer, precision)


@pytest.mark.parametrize("optimizer, precision", [("Adam", "fp32"), ("adam", "fp16"),
                                                  ("lion", "bf16_mixed")])
def test_state_bytes_reject_unknown_names(optimizer, precision):
    with pytest.raises(ValueError, match="optimizer must be one of"):
        theory.model_state_breakdown(10, optimizer, precision)


# --- one layer's activations, item by item (Korthikanti et al. §4.1) -----------------------------

@pytest.mark.parametrize("s, b, h, a", [(S, B, H, A), (1024, 8, 768, 12), (128, 4, 128, 4)])
def test_layer_items_add_up_to_eq1_and_its_three_parts(s, b, h, a):
    items = theory.layer_activation_items(s, b, h, a)
    sbh, ass_b = s * b * h, a * s * s * b
    assert sum(items.values()) == transformer_activation_bytes(s, b, h, a, 1)
    assert theory.layer_activation_bytes(s, b, h, a) == sbh * (34 + 5 * a * s / h)
    part = lambda prefix: sum(n for item, n in items.items() if item.startswith(prefix))  # noqa
    assert part("attention") == 11 * sbh + 5 * ass_b
    assert part("MLP") == 19 * sbh
    assert part("LayerNorm") == 4 * sbh


def test_layer_items_in_fp32_without_dropout():
    s, b, h, a = 128, 4, 128, 4
    items = theory.layer_activation_items(s, b, h, a, value_bytes=4, dropout=False)
    assert not any("dropout" in item for item in items)
    assert theory.layer_activation_bytes(s, b, h, a, value_bytes=4, dropout=False) == \
        4 * (16 * s * b * h + a * s * s * b)


def test_layer_items_match_what_a_plain_torch_block_saves():
    """A pre-LayerNorm block in fp32 without dropout saves exactly the items, plus LayerNorm's
    mean and rstd (s*b fp32 values each, two LayerNorms): counted by storage, as autograd keeps
    them, parameters left out."""
    import math

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    s, b, h, a = 16, 3, 32, 4
    torch.manual_seed(0)
    ln1, ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
    qkv, proj, fc1, fc2 = nn.Linear(h, 3 * h), nn.Linear(h, h), nn.Linear(h, 4 * h), \
        nn.Linear(4 * h, h)
    weights = {p.untyped_storage().data_ptr()
               for m in (ln1, ln2, qkv, proj, fc1, fc2) for p in m.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and t.dim() > 0:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(b, s, h, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q, k, v = qkv(ln1(x)).split(h, dim=-1)
        q, k, v = (t.view(b, s, a, h // a).transpose(1, 2) for t in (q, k, v))
        probs = ((q @ k.transpose(-2, -1)) / math.sqrt(h // a)).softmax(dim=-1)
        y = x + proj((probs @ v).transpose(1, 2).reshape(b, s, h))
        y = y + fc2(F.gelu(fc1(ln2(y))))
    layernorm_stats = 2 * 2 * s * b * 4
    assert sum(saved.values()) == theory.layer_activation_bytes(
        s, b, h, a, value_bytes=4, dropout=False) + layernorm_stats
