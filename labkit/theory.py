"""The formulas the course measures against. Plain Python: no torch needed.

Every function names its source; numbers are bytes (not GiB) and seconds unless a name says
otherwise. Five groups: ZeRO model-state memory (with the paper's Table 1), collective costs
(bytes on the wire, alpha-beta time, nccl-tests bandwidths), bytes moved per training step,
transformer size (parameters, activations), and model states by optimizer and precision with one
transformer layer's activations item by item.
"""
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal

ZERO_STAGES = (0, 1, 2, 3)


def _check_stage(stage: int) -> None:
    if stage not in ZERO_STAGES:
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")


def _check_world_size(world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")


def _check_op(op: str, known: dict) -> None:
    if op not in known:
        raise ValueError(f"unknown collective {op!r}; known: {', '.join(known)}")


# ---------------------------------------------------------------------------------------------
# Model-state memory (ZeRO)
# ---------------------------------------------------------------------------------------------

def zero_memory_breakdown(num_params: float, world_size: int, stage: int, k: float = 12,
                          param_bytes: float = 2, grad_bytes: float = 2) -> dict:
    """Model-state bytes per rank, by kind: {"params", "grads", "optimizer"}.

    ZeRO (Rajbhandari et al., arXiv 1910.02054, §5.1-5.3, Figure 1): with Ψ parameters,
    mixed-precision Adam keeps 2Ψ (fp16 params) + 2Ψ (fp16 grads) + KΨ (fp32 master copy,
    momentum, variance; K = 12). Stage 1 shards the optimizer states over the N_d ranks, stage 2
    also the gradients, stage 3 also the parameters; stage 0 is plain data parallelism.
    For plain fp32 Adam use param_bytes=4, grad_bytes=4, k=8 (no master copy).
    """
    _check_stage(stage)
    _check_world_size(world_size)
    params, grads, optimizer = param_bytes * num_params, grad_bytes * num_params, k * num_params
    return {"params": params / world_size if stage >= 3 else params,
            "grads": grads / world_size if stage >= 2 else grads,
            "optimizer": optimizer / world_size if stage >= 1 else optimizer}


def zero_memory(num_params: float, world_size: int, stage: int, k: float = 12,
                param_bytes: float = 2, grad_bytes: float = 2) -> float:
    """Model-state bytes per rank for ZeRO stage 0-3 (ZeRO paper §5, Table 1).

    E.g. 7.5e9 parameters on 64 ranks: 120e9, 31.4e9, 16.6e9 and 1.88e9 bytes for stages 0-3.
    """
    return sum(zero_memory_breakdown(num_params, world_size, stage, k, param_bytes,
                                     grad_bytes).values())


TABLE1_WORLD_SIZES = (1, 4, 16, 64, 256, 1024)

# ZeRO Table 1 as printed (GB = 1e9 bytes per device), one column per (model, stage), rows are
# TABLE1_WORLD_SIZES. Strings, so that the printed precision is kept.
_TABLE1 = {
    "7.5B": (7.5e9, {1: ("120", "52.5", "35.6", "31.4", "30.4", "30.1"),
                     2: ("120", "41.3", "21.6", "16.6", "15.4", "15.1"),
                     3: ("120", "30", "7.5", "1.88", "0.47", "0.12")}),
    "128B": (128e9, {1: ("2048", "896", "608", "536", "518", "513"),
                     2: ("2048", "704", "368", "284", "263", "257"),
                     3: ("2048", "512", "128", "32", "8", "2")}),
    "1T": (1e12, {1: ("16000", "7000", "4750", "4187", "4046", "4011"),
                  2: ("16000", "5500", "2875", "2218", "2054", "2013"),
                  3: ("16000", "4000", "1000", "250", "62.5", "15.6")}),
}


def zero_table1() -> list:
    """The ZeRO paper's Table 1 as printed: one dict per cell (arXiv 1910.02054, §5.4, Table 1).

    Keys: "model" ("7.5B", "128B", "1T"), "num_params", "world_size" (N_d), "stage" (1 = P_os,
    2 = P_os+g, 3 = P_os+g+p) and "paper_gb", the printed number as a string (GB = 1e9 bytes).
    The paper rounds the 7.5B columns half up and truncates most 128B and 1T cells to integers
    (e.g. 513.5 is printed 513); `printed_match` tells which.
    """
    return [{"model": model, "num_params": num_params, "world_size": world_size,
             "stage": stage, "paper_gb": printed}
            for model, (num_params, columns) in _TABLE1.items()
            for stage, column in columns.items()
            for world_size, printed in zip(TABLE1_WORLD_SIZES, column)]


def printed_match(value: float, printed: str) -> str | None:
    """How ``value`` becomes the ``printed`` number: "exact", "rounded", "truncated" or None.

    "rounded" is round half up, "truncated" is round down, both to the printed number's last
    decimal ("30" to units, "1.88" to hundredths). These are the two conventions of ZeRO Table 1
    (see `zero_table1`). None means the printed number does not come from ``value``.
    """
    shown = Decimal(printed)
    last_digit = Decimal(1).scaleb(shown.as_tuple().exponent)
    exact = Decimal(repr(float(value)))  # the shortest decimal that is this float
    if exact == shown:
        return "exact"
    if exact.quantize(last_digit, rounding=ROUND_HALF_UP) == shown:
        return "rounded"
    if exact.quantize(last_digit, rounding=ROUND_FLOOR) == shown:
        return "truncated"
    return None


# ---------------------------------------------------------------------------------------------
# Collectives: bytes on the wire, time, bandwidth
# ---------------------------------------------------------------------------------------------

# Bytes one rank sends, per byte of the full buffer, under the ring algorithms
# (Patarasuk & Yuan 2009; NVIDIA nccl-tests doc/PERFORMANCE.md "bus bandwidth" factors).
_RING_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: (n - 1) / n,  # pipelined ring: N-1 of the N ranks forward S
    "reduce": lambda n: (n - 1) / n,
    "send": lambda n: 1.0,
    "recv": lambda n: 0.0,
    "barrier": lambda n: 0.0,
}


def wire_bytes(op: str, size_bytes: float, world_size: int) -> float:
    """Bytes each rank sends for one collective on a buffer of ``size_bytes``, ring model.

    ``size_bytes`` is the full (unsharded) buffer: the input of an all-reduce or reduce-scatter,
    the output of an all-gather. All-reduce: 2(N-1)/N·S; reduce-scatter, all-gather:
    (N-1)/N·S (nccl-tests PERFORMANCE.md; ZeRO §7.1: all-reduce = reduce-scatter + all-gather).
    """
    _check_op(op, _RING_FACTOR)
    _check_world_size(world_size)
    if world_size == 1:
        return 0.0 if op != "send" else float(size_bytes)
    return _RING_FACTOR[op](world_size) * size_bytes


# nccl-tests "bus bandwidth" factors: busbw = algbw · factor (doc/PERFORMANCE.md; send/recv:
# src/sendrecv.cu). The factor is also the number of bytes, per byte of S, that the busiest link
# carries, which is why busbw can be compared with the link's bandwidth for any N.
_BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
    "send": lambda n: 1.0,
    "recv": lambda n: 1.0,
}

# Message steps (each costs one latency alpha) of the ring algorithms: all-reduce is a ring
# reduce-scatter then a ring all-gather, N-1 steps each (MPICH allreduce_intra_ring.c); a
# pipelined ring broadcast or reduce needs N-1 hops to reach the last rank; send/recv is one.
_RING_STEPS = {
    "all_reduce": lambda n: 2 * (n - 1),
    "reduce_scatter": lambda n: n - 1,
    "all_gather": lambda n: n - 1,
    "all_to_all": lambda n: n - 1,
    "broadcast": lambda n: n - 1,
    "reduce": lambda n: n - 1,
    "send": lambda n: 1,
    "recv": lambda n: 1,
}
_POINT_TO_POINT = ("send", "recv")


def collective_time(op: str, size_bytes: float, world_size: int, alpha: float,
                    beta: float) -> float:
    """Seconds for one collective on ``size_bytes`` (the full buffer) under the alpha-beta model.

    Hockney's model, time = steps·alpha + bytes·beta, applied to the ring algorithms (MPICH
    ring cost comments; nccl-tests PERFORMANCE.md for the bandwidth terms):
    all-reduce 2(N-1)·alpha + 2(N-1)/N·S·beta; reduce-scatter, all-gather, all-to-all
    (N-1)·alpha + (N-1)/N·S·beta; broadcast, reduce (N-1)·alpha + S·beta; send, recv
    alpha + S·beta. ``alpha`` is the latency of one message step in seconds, ``beta`` the
    seconds per byte (1 / link bandwidth). Reduction compute is ignored. On 1 rank a collective
    costs 0. The bandwidth term counts the busiest link, so for a broadcast it is S, where
    `wire_bytes` gives the bytes sent averaged over the ranks, (N-1)/N·S.
    """
    _check_op(op, _RING_STEPS)
    _check_world_size(world_size)
    if size_bytes < 0 or alpha < 0 or beta < 0:
        raise ValueError(f"size_bytes, alpha and beta must be >= 0, got "
                         f"{size_bytes!r}, {alpha!r}, {beta!r}")
    if world_size == 1 and op not in _POINT_TO_POINT:
        return 0.0
    steps, factor = _RING_STEPS[op](world_size), _BUS_FACTOR[op](world_size)
    return steps * alpha + factor * size_bytes * beta


def ring_steps(op: str, world_size: int) -> int:
    """Message steps of one collective under the ring algorithms: 2(N-1) for an all-reduce,
    N-1 for a reduce-scatter or an all-gather (the latency term of ``collective_time``)."""
    _check_op(op, _RING_STEPS)
    _check_world_size(world_size)
    return 0 if world_size == 1 and op not in _POINT_TO_POINT else _RING_STEPS[op](world_size)


def busbw_factor(op: str, world_size: int) -> float:
    """busbw / algbw for one collective (nccl-tests doc/PERFORMANCE.md): 2(n-1)/n for an
    all-reduce, (n-1)/n for a reduce-scatter or an all-gather, 1 for a broadcast."""
    _check_op(op, _BUS_FACTOR)
    _check_world_size(world_size)
    return _BUS_FACTOR[op](world_size)


def algbw(size_bytes: float, seconds: float) -> float:
    """Algorithm bandwidth in bytes/s: S / t (nccl-tests doc/PERFORMANCE.md)."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    return size_bytes / seconds


def busbw(op: str, size_bytes: float, seconds: float, world_size: int) -> float:
    """Bus bandwidth in bytes/s: algbw · factor (nccl-tests doc/PERFORMANCE.md).

    Factors: all-reduce 2(n-1)/n; reduce-scatter, all-gather, all-to-all (n-1)/n; broadcast,
    reduce, send/recv 1. Unlike algbw, busbw can be compared with the link's peak bandwidth
    whatever the number of ranks.
    """
    _check_op(op, _BUS_FACTOR)
    _check_world_size(world_size)
    return algbw(size_bytes, seconds) * _BUS_FACTOR[op](world_size)


def _fit_line(x: list, t: list, w: list) -> tuple:
    """Weighted least squares for t ≈ a + b·x; returns (a, b)."""
    total = sum(w)
    mean_x = sum(wi * xi for wi, xi in zip(w, x)) / total
    mean_t = sum(wi * ti for wi, ti in zip(w, t)) / total
    b = (sum(wi * (xi - mean_x) * (ti - mean_t) for wi, xi, ti in zip(w, x, t))
         / sum(wi * (xi - mean_x) ** 2 for wi, xi in zip(w, x)))
    return mean_t - b * mean_x, b


def fit_alpha_beta(sizes_bytes, seconds, op: str = "all_reduce", world_size: int = 2) -> tuple:
    """(alpha, beta) that best fit measured times of one collective, by least squares.

    The model is `collective_time`, linear in alpha and beta (Hockney's alpha-beta model):
    t = steps·alpha + factor·S·beta. Each point is weighted by 1/t², so the fit minimises the
    relative error: small messages (which fix alpha) count as much as large ones (which fix
    beta). A negative alpha or beta means nothing physically (noise can swamp the latency of
    a fast link); then the fit is redone with that parameter held at 0, which gives the best
    fit with alpha >= 0 and beta >= 0. On gloo (CPU) the algorithms are not NCCL's rings
    (ground-truth note §4), so the fitted values are effective ones for this model.
    """
    _check_op(op, _RING_STEPS)
    _check_world_size(world_size)
    if world_size == 1 and op not in _POINT_TO_POINT:
        raise ValueError("on 1 rank a collective sends nothing: there is no alpha or beta to fit")
    t = [float(s) for s in seconds]
    x = [_BUS_FACTOR[op](world_size) * s for s in sizes_bytes]
    if len(x) != len(t) or len(set(x)) < 2:
        raise ValueError("need one time per size, for at least two different sizes")
    if min(t) <= 0:
        raise ValueError("times must be > 0")
    w = [1 / ti ** 2 for ti in t]
    a, b = _fit_line(x, t, w)  # a = steps·alpha, b = beta
    if a < 0 or b < 0:  # refit with a = 0, then with b = 0, and keep the better of the two
        def error(ab):
            return sum(wi * (ti - ab[0] - ab[1] * xi) ** 2 for wi, xi, ti in zip(w, x, t))
        through_origin = (sum(wi * xi * ti for wi, xi, ti in zip(w, x, t))
                          / sum(wi * xi * xi for wi, xi in zip(w, x)))
        flat = sum(wi * ti for wi, ti in zip(w, t)) / sum(w)
        a, b = min((0.0, max(0.0, through_origin)), (max(0.0, flat), 0.0), key=error)
    return a / _RING_STEPS[op](world_size), b


def r_squared(sizes_bytes, seconds, alpha: float, beta: float, op: str = "all_reduce",
              world_size: int = 2) -> float:
    """How well `collective_time` with (alpha, beta) explains measured times: 1 - SS_res/SS_tot.

    The usual coefficient of determination (1 = every point on the model).
    """
    t = [float(s) for s in seconds]
    predicted = [collective_time(op, s, world_size, alpha, beta) for s in sizes_bytes]
    mean = sum(t) / len(t)
    ss_tot = sum((ti - mean) ** 2 for ti in t)
    if ss_tot == 0:
        raise ValueError("all times are equal: r² is undefined")
    return 1 - sum((ti - pi) ** 2 for ti, pi in zip(t, predicted)) / ss_tot


# ---------------------------------------------------------------------------------------------
# Bytes moved per training step
# ---------------------------------------------------------------------------------------------

def ddp_bytes_per_step(num_params: float, world_size: int, grad_bytes: float = 4) -> float:
    """Bytes each rank sends per step in DDP: one ring all-reduce of all gradients.

    2(N-1)/N · grad_bytes·Ψ (PyTorch DDP paper, arXiv 2006.15704; ZeRO §7.1; ring model of
    `wire_bytes`). The default grad_bytes=4 is fp32 gradients, as in the course's CPU labs.
    """
    return wire_bytes("all_reduce", grad_bytes * num_params, world_size)


def zero_bytes_per_step(num_params: float, world_size: int, stage: int, grad_bytes: float = 2,
                        param_bytes: float = 2) -> float:
    """Bytes each rank sends per step for ZeRO stage 0-3 (ZeRO paper §7), ring model.

    Stage 0: all-reduce of the gradients. Stages 1 and 2: reduce-scatter of the gradients, then
    all-gather of the updated parameters. Stage 3: all-gather of the parameters in the forward
    pass and again in the backward pass, and reduce-scatter of the gradients.

    The paper counts *elements* in the large-N limit: 2Ψ for stages 0-2, 3Ψ (1.5x) for stage 3.
    Here each collective is in bytes each rank sends (`wire_bytes`), so every Ψ becomes
    (N-1)/N · bytes-per-element · Ψ and the result compares with a measured ledger; with equal
    byte widths the ratios (1x, 1.5x) are the paper's for every N.
    """
    _check_stage(stage)
    grads, params = grad_bytes * num_params, param_bytes * num_params
    if stage == 0:
        return wire_bytes("all_reduce", grads, world_size)
    gather = wire_bytes("all_gather", params, world_size)
    scatter = wire_bytes("reduce_scatter", grads, world_size)
    return (2 * gather if stage == 3 else gather) + scatter


# ---------------------------------------------------------------------------------------------
# Transformer size
# ---------------------------------------------------------------------------------------------

def transformer_params(layers: int, hidden: int, vocab_size: int, seq_len: int | None = None,
                       ffn_hidden: int | None = None, tied_embeddings: bool = True,
                       bias: bool = True) -> int:
    """Parameters of a GPT-2-style decoder (pre-LayerNorm blocks, learned position embeddings).

    Counted, with h = hidden, f = ffn_hidden (default 4h), V = vocab_size:
    token embedding V·h; position embedding seq_len·h if seq_len is given; per layer two
    LayerNorms (2h each), attention QKV 3h² + 3h and output projection h² + h, MLP h·f + f and
    f·h + h, i.e. 12h² + 13h for f = 4h; a final LayerNorm 2h; an output head V·h unless it is
    tied to the token embedding. This is Narayanan et al. (arXiv 2104.04473, §5.1),
    P = 12lh²(1 + 13/(12h) + (V + s)/(12lh)), plus the final LayerNorm; GPT-2 small
    (12 layers, h = 768, V = 50257, s = 1024) has 124,439,808. With bias=False (nanoGPT's
    option) Linear layers have no bias and LayerNorms only a weight (h each).
    """
    h = hidden
    f = 4 * h if ffn_hidden is None else ffn_hidden
    with_bias = 1 if bias else 0
    layernorm = h + with_bias * h
    attention = 4 * h * h + with_bias * 4 * h
    mlp = 2 * h * f + with_bias * (f + h)
    embeddings = vocab_size * h + (seq_len * h if seq_len else 0)
    head = 0 if tied_embeddings else vocab_size * h
    return embeddings + layers * (2 * layernorm + attention + mlp) + layernorm + head


RECOMPUTE = ("none", "selective", "full")


def transformer_activation_bytes(seq_len: int, batch: int, hidden: int, heads: int, layers: int,
                                 tensor_parallel: int = 1, sequence_parallel: bool = False,
                                 recompute: str = "none") -> float:
    """Activation bytes a rank stores for ``layers`` transformer layers (Korthikanti et al.,
    arXiv 2205.05198, Eq. 1 and Table 2; 16-bit activations, 1-byte dropout masks).

    Per layer, with s, b, h, a, t = seq_len, batch, hidden, heads, tensor_parallel:
    no parallelism sbh(34 + 5as/h); tensor parallel sbh(10 + 24/t + 5as/(ht)); with sequence
    parallel sbh(34/t + 5as/(ht)). Selective recompute drops the 5as/h term (attention scores,
    softmax, its dropout): sbh(10 + 24/t), or sbh·34/t with sequence parallel. Full recompute
    keeps only each layer's input, 2sbh, whatever t (as in Table 2).
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {tensor_parallel!r}")
    s, b, h, a, t = seq_len, batch, hidden, heads, tensor_parallel
    sbh = s * b * h
    if recompute == "full":
        return layers * 2 * sbh
    # Of the 34sbh, tensor parallelism alone leaves 10sbh whole on every rank: the LayerNorm
    # inputs (4sbh), the two dropout masks (2sbh) and the inputs of the QKV and first MLP
    # GEMMs (4sbh). Sequence parallelism splits those too.
    linear_part = 34 / t if sequence_parallel else 10 + 24 / t
    attention_scores = 0 if recompute == "selective" else 5 * a * s / (h * t)
    return layers * sbh * (linear_part + attention_scores)


# ---------------------------------------------------------------------------------------------
# Model states by optimizer and precision; one transformer layer's activations, item by item
# ---------------------------------------------------------------------------------------------

OPTIMIZERS = ("sgd", "sgd_momentum", "adam")
PRECISIONS = ("fp32", "bf16_mixed")

# Bytes per parameter at rest after an optimizer step: (parameter, gradient, optimizer state).
# fp32: the parameters and grads are float32; torch.optim.SGD keeps a momentum_buffer per
# parameter only when momentum != 0 (torch 2.13 torch/optim/sgd.py), Adam exp_avg and exp_avg_sq
# (torch/optim/adam.py). bf16_mixed: bfloat16 parameters and grads; the optimizer updates an fp32
# master copy of the weights and keeps its own state in fp32 (Micikevicius et al., arXiv
# 1710.03740; the ZeRO paper, §3.1, counts the master copy in K: 2 + 2 + 12 for Adam).
_STATE_BYTES = {
    ("sgd", "fp32"): (4, 4, 0), ("sgd_momentum", "fp32"): (4, 4, 4), ("adam", "fp32"): (4, 4, 8),
    ("sgd", "bf16_mixed"): (2, 2, 4), ("sgd_momentum", "bf16_mixed"): (2, 2, 8),
    ("adam", "bf16_mixed"): (2, 2, 12),
}


def state_bytes_per_param(optimizer: str, precision: str) -> tuple:
    """(parameter, gradient, optimizer state) bytes per parameter at rest after a step.

    optimizer: "sgd" (no momentum), "sgd_momentum" or "adam"; precision: "fp32", or
    "bf16_mixed" (bf16 parameters and gradients, an fp32 master copy of the weights owned by the
    optimizer, its state in fp32). Adam in bf16_mixed is the ZeRO paper's 2 + 2 + K with K = 12
    (§3.1); fp32 Adam is 4 + 4 + 8: no master copy (ground-truth note, misconception 12).
    Not counted: Adam's ``step``, one scalar per parameter *tensor* (4 bytes each in torch 2.13),
    and the fp32 gradient copies the mixed recipe makes for the step and frees after it.
    """
    if optimizer not in OPTIMIZERS or precision not in PRECISIONS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} and precision one of "
                         f"{PRECISIONS}, got {optimizer!r}, {precision!r}")
    return _STATE_BYTES[optimizer, precision]


def model_state_breakdown(num_params: float, optimizer: str = "adam",
                          precision: str = "bf16_mixed") -> dict:
    """{"params", "grads", "optimizer"}: model-state bytes of one process at rest after a step,
    for ``num_params`` parameters (see `state_bytes_per_param`)."""
    per_param = state_bytes_per_param(optimizer, precision)
    return dict(zip(("params", "grads", "optimizer"), (b * num_params for b in per_param)))


def layer_activation_items(seq_len: int, batch: int, hidden: int, heads: int,
                           value_bytes: float = 2, dropout: bool = True,
                           mask_bytes: float = 1) -> dict:
    """What one transformer layer keeps for backward, item by item, in bytes (Korthikanti et
    al., arXiv 2205.05198, §4.1, no parallelism): {item: bytes}.

    With the paper's assumptions (16-bit values, ``value_bytes=2``; 1-byte dropout masks) the
    items add up to Eq. 1, sbh(34 + 5as/h): attention 11sbh + 5as²b, MLP 19sbh, the two
    LayerNorms 4sbh. ``value_bytes=4`` is fp32. Without dropout (``dropout=False``) the three
    masks are gone and so is the softmax dropout's output: attention over V then reads the
    softmax output itself, one tensor kept once. Small buffers (LayerNorm's mean and variance)
    are ignored, as in the paper.
    """
    s, b, h, a, v = seq_len, batch, hidden, heads, value_bytes
    sbh, ass_b = s * b * h, a * s * s * b
    items = {
        "attention: QKV input": v * sbh,
        "attention: Q and K": 2 * v * sbh,
        "attention: softmax output": v * ass_b,
        "attention: softmax dropout mask": mask_bytes * ass_b,
        "attention: softmax dropout output": v * ass_b,
        "attention: V": v * sbh,
        "attention: output projection input": v * sbh,
        "attention: dropout mask": mask_bytes * sbh,
        "MLP: first linear input": v * sbh,
        "MLP: GeLU input": 4 * v * sbh,
        "MLP: second linear input": 4 * v * sbh,
        "MLP: dropout mask": mask_bytes * sbh,
        "LayerNorm inputs (two)": 2 * v * sbh,
    }
    if not dropout:
        items = {item: n for item, n in items.items() if "dropout" not in item}
    return items


def layer_activation_bytes(seq_len: int, batch: int, hidden: int, heads: int,
                           value_bytes: float = 2, dropout: bool = True,
                           mask_bytes: float = 1) -> float:
    """The sum of `layer_activation_items`: sbh(34 + 5as/h) with the paper's defaults; in fp32
    without dropout, 4 · (16sbh + as²b)."""
    return sum(layer_activation_items(seq_len, batch, hidden, heads, value_bytes, dropout,
                                      mask_bytes).values())
