"""Notebook 09, the capstone: two predictions for "when does communication dominate?"
(``step_comm_time``, ``comm_bound_world_size``) and the misconceptions quiz (``misconceptions``).

No ranks: the predictions are formulas, compared on a grid with an independent reference built
from ``labkit.theory.collective_time`` (the α-β ring model of notebook 01), and the quiz is a dict
of True/False answers. The notebook's other checks re-run the graders of notebooks 03, 06, 07 and
08 (``bucketed_ddp``, ``zero1``, ``zero2``, ``zero3``) on the classes the learner pastes there.

``step_comm_time(strategy, num_params, world_size, elem_bytes, alpha, beta)``: the seconds of one
training step's collectives, each on the whole model as one buffer of S = num_params·elem_bytes
bytes (one bucket, one unit): "ddp" one all-reduce of the gradients; "zero1" and "zero2" one
reduce-scatter of the gradients and one all-gather of the parameters (ZeRO §7.2.1); "zero3" two
all-gathers of the parameters (forward, backward) and one reduce-scatter (§7.2.2). 0 on 1 rank.

``comm_bound_world_size(step_compute_s_at_1, num_params, elem_bytes, alpha, beta, strategy)``: for a
fixed global batch whose step computes for T1 seconds on one rank, a rank computes T1/N on N ranks
(perfect split), and communicates ``step_comm_time``; the answer is the smallest N >= 1 at which
communication takes at least as long as compute.

``misconceptions()`` returns {key: True or False} for the statements of ``STATEMENTS``; the check
names the keys answered wrong (and missing or unknown ones), never the right answer to the others,
and points each wrong one to the measurement in the notebook that settles it.
"""
import numbers

from labkit import theory
from labkit.check._core import Failed, call_here, exercise
from labkit.check._hints import register
from labkit.check.predictions import _compare

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")

# Each strategy's collectives per step, on the whole model: (op, how many).
_COLLECTIVES = {
    "ddp": (("all_reduce", 1),),
    "zero1": (("reduce_scatter", 1), ("all_gather", 1)),
    "zero2": (("reduce_scatter", 1), ("all_gather", 1)),
    "zero3": (("reduce_scatter", 1), ("all_gather", 2)),
}


def _step_comm_time(strategy, num_params, world_size, elem_bytes, alpha, beta):
    """The reference: the strategy's collectives on S = num_params·elem_bytes, α-β ring model."""
    size = num_params * elem_bytes
    return sum(count * theory.collective_time(op, size, world_size, alpha, beta)
               for op, count in _COLLECTIVES[strategy])


def _ct(op, s, n, a, b):
    return theory.collective_time(op, s, n, a, b)


# (num_params, N, elem_bytes, alpha, beta): sizes N divides and does not, 1 rank, many ranks
_TIME_CASES = [(1_000_000, 2, 4, 50e-6, 1 / 2e9), (262_144, 4, 4, 20e-6, 1 / 5e9),
               (1000, 3, 8, 1e-3, 1e-9), (7.5e9, 64, 2, 5e-6, 1 / 100e9),
               (12, 5, 2, 1e-6, 1e-10), (4096, 1, 4, 30e-6, 1e-9)]

register("step_comm_time", [
    "Write down, for each strategy, which collectives one step makes and on how many bytes each "
    "(the full buffer S, even when a rank keeps only 1/N of the result). Notebook 01's "
    "all_reduce_time is the time of one of them.",
    "DDP: one all-reduce of the gradients. ZeRO-1 and ZeRO-2: a reduce-scatter of the gradients, "
    "then an all-gather of the updated parameters (ZeRO §7.2.1). ZeRO-3: the parameters are "
    "all-gathered in the forward and again in the backward, and the gradients reduce-scattered "
    "(§7.2.2). labkit.theory.collective_time gives each one's time.",
    "sum(count * labkit.theory.collective_time(op, num_params * elem_bytes, world_size, alpha, "
    "beta)) over the strategy's (op, count): ddp [(all_reduce, 1)], zero1 and zero2 "
    "[(reduce_scatter, 1), (all_gather, 1)], zero3 [(reduce_scatter, 1), (all_gather, 2)].",
])

register("comm_bound_world_size", [
    "Keep the global batch fixed: on N ranks each rank computes 1/N of it. Which of the two times "
    "falls with N, and which grows?",
    "Try N = 1, 2, 3, ... in turn: compute time T1/N, communication time your step_comm_time(...) "
    "for that N; return the first N where communication >= compute. On 1 rank nothing is sent.",
    "n = 1; while step_comm_time(strategy, num_params, n, elem_bytes, alpha, beta) < "
    "step_compute_s_at_1 / n: n += 1; return n",
])


@exercise("step_comm_time")
def step_comm_time(fn):
    """``fn(strategy, num_params, world_size, elem_bytes, alpha, beta)``: seconds of one step's
    collectives under the α-β ring model (module docstring)."""
    for strategy in STRATEGIES:
        cases = [(strategy, *case) for case in _TIME_CASES]
        ops = _COLLECTIVES[strategy]

        def scaled(factor, ops=ops):   # every collective on a buffer `factor` times S
            return lambda st, p, n, b, a, be: sum(c * _ct(op, factor(n) * p * b, n, a, be)
                                                  for op, c in ops)
        mistakes = [
            (lambda st, p, n, b, a, be: _step_comm_time(st, p, n, b, 0.0, be),
             f"{strategy}: the bandwidth term alone; each collective also pays the latency alpha "
             "once per step of its ring"),
            (lambda st, p, n, b, a, be: _step_comm_time(st, p, n, b, a, 0.0),
             f"{strategy}: the latency term alone; the bytes cost beta each"),
            (scaled(lambda n: 1 / n),
             f"{strategy}: each collective's size is the full buffer S (the input of a "
             "reduce-scatter or all-reduce, the output of an all-gather), not the 1/N a rank "
             "keeps"),
            (lambda st, p, n, b, a, be: _step_comm_time(st, p, n, 1, a, be),
             f"{strategy}: that counts elements; the bytes are num_params · elem_bytes"),
            (lambda st, p, n, b, a, be: sum(c * (a + (1 if op == "all_reduce" else 0.5)
                                                 * 2 * (n - 1) / n * p * b * be)
                                            for op, c in ops) if n > 1 else 0.0,
             f"{strategy}: alpha is paid once per step of the ring, not once per collective"),
        ]
        if strategy == "ddp":
            mistakes += [
                (lambda st, p, n, b, a, be: _ct("reduce_scatter", p * b, n, a, be),
                 "ddp: that is one phase of the all-reduce (notebook 01: it is a reduce-scatter "
                 "and then an all-gather)"),
            ]
        elif strategy in ("zero1", "zero2"):
            mistakes += [
                (lambda st, p, n, b, a, be: _ct("all_reduce", p * b, n, a, be)
                 + _ct("all_gather", p * b, n, a, be),
                 f"{strategy}: an all-reduce and an all-gather is 1.5x DDP: torch's "
                 "ZeroRedundancyOptimizer with DDP, or DeepSpeed's first ZeRO-1; the paper's "
                 "design (and yours) reduce-scatters the gradients instead (ZeRO §7.2.1)"),
                (lambda st, p, n, b, a, be: _ct("reduce_scatter", p * b, n, a, be),
                 f"{strategy}: after the update each rank needs every parameter again: one more "
                 "collective"),
            ]
        else:
            mistakes += [
                (lambda st, p, n, b, a, be: _step_comm_time("zero1", p, n, b, a, be),
                 "zero3: the parameters are gathered in the forward and freed, so the backward "
                 "needs them gathered again (ZeRO §7.2.2)"),
                (lambda st, p, n, b, a, be: _ct("all_reduce", p * b, n, a, be)
                 + 2 * _ct("all_gather", p * b, n, a, be),
                 "zero3: each rank needs only its shard of the summed gradients: a reduce-scatter, "
                 "not an all-reduce"),
            ]
        _compare("step_comm_time", fn, cases, _step_comm_time, mistakes,
                 advice="list the strategy's collectives and the size of each")
    return ("matches the α-β ring model of each strategy's collectives (ddp, zero1, zero2, zero3) "
            "on every case tried"), {}


def _bound(compute, comm_at):
    """The smallest N >= 1 with comm_at(N) >= compute(N) (both given as functions of N)."""
    n = 1
    while comm_at(n) < compute(n):
        n += 1
        if n > 10**7:
            raise ValueError("no crossing below 10^7 ranks")
    return n


def _comm_bound(t1, p, b, a, be, strategy):
    return _bound(lambda n: t1 / n, lambda n: _step_comm_time(strategy, p, n, b, a, be))


# (T1, num_params, elem_bytes, alpha, beta): crossings from 2 to a few thousand ranks
_BOUND_CASES = [(0.010, 262_144, 4, 60e-6, 1 / 1.5e9), (0.002, 1_000_000, 4, 50e-6, 1 / 2e9),
                (0.5, 25e6, 2, 5e-6, 1 / 20e9), (30.0, 7.5e9, 2, 5e-6, 1 / 100e9),
                (0.004, 100_000, 4, 20e-6, 1 / 5e9), (1.0, 1e8, 4, 100e-6, 1 / 1e9)]


@exercise("comm_bound_world_size")
def comm_bound_world_size(fn):
    """``fn(step_compute_s_at_1, num_params, elem_bytes, alpha, beta, strategy)``: the smallest
    world size at which a step's communication takes at least as long as its compute."""
    cases = [(*case, strategy) for strategy in STRATEGIES for case in _BOUND_CASES]

    first = call_here(fn, *cases[0], who=f"comm_bound_world_size{cases[0]}")
    if isinstance(first, bool) or not isinstance(first, numbers.Real) \
            or float(first) != int(first):
        raise Failed(f"comm_bound_world_size{cases[0]} returned {first!r:.40}: return a whole "
                     "number of ranks")
    _compare("comm_bound_world_size", fn, cases, _comm_bound, [
        (lambda t1, p, b, a, be, st: _bound(lambda n: t1, lambda n: _step_comm_time(
            st, p, n, b, a, be)),
         "the global batch is fixed: on N ranks each rank computes only T1/N"),
        (lambda t1, p, b, a, be, st: _comm_bound(t1, p, b, a, be, st) - 1,
         "one too few: that is the last world size still compute-bound; the question asks for "
         "the first where communication >= compute"),
        (lambda t1, p, b, a, be, st: _comm_bound(t1, p, b, 0.0, be, st),
         "the communication time needs its latency term too (alpha per ring step); without it "
         "the crossing comes too late"),
        (lambda t1, p, b, a, be, st: _comm_bound(t1, p, b, a, be, "ddp"),
         "your answer is DDP's for every strategy: use the strategy's own collectives "
         "(step_comm_time)"),
    ], advice="compare compute T1/N with step_comm_time at each N, from N = 1 up")
    return ("matches the first world size where the α-β model's communication reaches T1/N, for "
            "each strategy, on every case tried"), {}



# --- which N_d fits a device: Table 1 read the other way --------------------------------------

def _smallest_world_size(num_params, stage, device_gb):
    """The smallest whole N_d >= 1 whose model states (mixed-precision Adam, K = 12) fit in
    device_gb·1e9 bytes, or 0 when no N_d is enough (stages 0-2 keep Ψ-sized parts whole). The
    bound comes from the formula solved for N_d; exact integers make the rounding exact."""
    psi, limit = int(num_params), int(device_gb * 10**9)
    whole = {0: 16, 1: 4, 2: 2, 3: 0}[stage] * psi      # what N_d does not divide
    shared = 16 * psi - whole                           # what it does
    if shared == 0:                                     # stage 0: N_d changes nothing
        return 1 if whole <= limit else 0
    if whole >= limit:                                  # shared / N_d > 0 never fits beside it
        return 0
    return max(1, -(-shared // (limit - whole)))        # ceil(shared / (limit - whole))


# (num_params, stage, device_gb): the paper's three models and 32 GB V100s, and other devices
_FIT_CASES = [(psi, stage, gb) for psi in (7.5e9, 128e9, 1e12, 1.5e9, 14e9)
              for stage in (0, 1, 2, 3) for gb in (32, 80)]

register("smallest_world_size", [
    "Write the model-state bytes per device of the stage as a function of N_d (notebook 05's "
    "pos_gb is one of them), then find where it drops to the device's bytes.",
    "Split the bytes into the part N_d divides and the part it does not. If the undivided part "
    "alone does not fit, no N_d is enough: return 0.",
    "Solve whole + shared / N_d <= limit for N_d and round up to a whole number of ranks; GB "
    "here is 10^9 bytes, and stage 0 divides nothing.",
])


@exercise("smallest_world_size")
def smallest_world_size(fn):
    """``fn(num_params, stage, device_gb)``: the smallest number of data-parallel ranks at which
    a ZeRO stage's model states fit one device, 0 if none does."""
    def listed(psi, stage, gb):
        fitting = [n for n in theory.TABLE1_WORLD_SIZES
                   if n >= max(1, _smallest_world_size(psi, stage, gb))]
        return fitting[0] if _smallest_world_size(psi, stage, gb) and fitting else 0

    _compare("smallest_world_size", fn, _FIT_CASES, _smallest_world_size, [
        (listed, "those are Table 1's rows (1, 4, 16, 64, 256, 1024), the smallest listed one "
                 "that fits; the question asks for the smallest whole N_d"),
        (lambda psi, stage, gb: _smallest_world_size(psi, stage, gb * 1.073741824),
         "that is GiB (2^30 bytes); the paper's GB is 10^9 bytes"),
        (lambda psi, stage, gb: _smallest_world_size(psi, min(stage + 1, 3), gb),
         "that is the next stage's answer: which parts does this stage leave whole?"),
    ], advice="write the stage's bytes per device as whole + shared / N_d and solve for N_d")
    return ("matches the smallest N_d that fits, for the paper's three models and two more, "
            "every stage, 32 and 80 GB"), {}

# --- the misconceptions quiz -----------------------------------------------------------------------

# key: (statement, True/False, where in notebook 09 the measurement is)
STATEMENTS = {
    "ddp_shards_parameters": (
        "Under DDP each rank stores 1/N of the parameters.", False, "section 6.1"),
    "dataparallel_is_ddp": (
        "nn.DataParallel is DDP under an older name: one process per device, gradients "
        "all-reduced through a process group.", False, "section 6.2"),
    "zero_saves_through_accumulation": (
        "ZeRO saves memory through gradient accumulation.", False, "section 6.3"),
    "torch_distributed_zeros": (
        "torch.distributed.zeros(...) makes a zero tensor sharded across the ranks.", False,
        "section 6.4"),
    "state_step_per_parameter": (
        "Adam's step count is optimizer.state[p]['step'], a tensor per parameter; "
        "optimizer.state['step'] is not it, and reading it adds a key to the state.", True,
        "section 6.5"),
    "zero12_same_bytes_as_ddp": (
        "ZeRO-1 and ZeRO-2, as the paper designs them, send the same bytes per step as DDP.",
        True, "section 6.6 (and the table of section 3)"),
    "zero_redundancy_even_state": (
        "torch's ZeroRedundancyOptimizer gives every rank 1/N of the optimizer state.", False,
        "section 6.6 (and the table of section 3)"),
    "k_is_always_12": (
        "Adam keeps K = 12 bytes of optimizer state per parameter, whatever the precision.",
        False, "section 6.7"),
    "bf16_needs_loss_scaling": (
        "bf16 training needs loss scaling, as fp16 training does.", False, "section 6.8"),
    "zero3_is_model_parallelism": (
        "ZeRO-3 is model parallelism: each rank computes only its part of each layer.", False,
        "section 6.9"),
    "ddp_bucket_25_mib": (
        "DDP's default bucket cap is 25 MiB (2^20-byte megabytes), not 25 million bytes.", True,
        "section 6.10"),
    "ddp_broadcasts_every_step": (
        "DDP broadcasts the parameters from rank 0 at every step.", False, "section 6.10"),
    "accumulation_equals_big_batch": (
        "k micro-batches accumulated always give the gradient of one batch k times larger.",
        False, "section 6.11"),
}

register("misconceptions", [
    "Each statement has a measurement in section 6 that settles it: run it, read it, then answer. "
    "A statement is True only if every part of it holds.",
    "Wrong answers are named with the section of their measurement. For each: what does the "
    "measurement print, and which word of the statement does it contradict or confirm? (A "
    "statement can be partly true: 'as the paper designs them', 'whatever the precision', "
    "'always' matter.)",
    "Three of the statements are True; the others are the field's misconceptions, each refuted "
    "by its measurement.",
])


@exercise("misconceptions")
def misconceptions(fn):
    """``fn()`` returns {key: True or False} for every key of ``STATEMENTS``."""
    answers = call_here(fn, who="misconceptions()")
    if not isinstance(answers, dict):
        raise Failed(f"misconceptions() returned {type(answers).__name__}: return a dict "
                     "{key: True or False}, one key per statement")
    missing = [k for k in STATEMENTS if k not in answers]
    unknown = [k for k in answers if k not in STATEMENTS]
    if unknown:
        raise Failed(f"unknown key(s) {', '.join(map(repr, unknown))}: the keys are those of "
                     "the table in section 6")
    if missing:
        raise Failed(f"no answer yet for {', '.join(map(repr, missing))}")
    not_bool = [k for k, v in answers.items() if not isinstance(v, bool)]
    if not_bool:
        raise Failed(f"answer True or False (a bool) for {', '.join(map(repr, not_bool))}")
    wrong = [k for k, (_, truth, _) in STATEMENTS.items() if answers[k] is not truth]
    if wrong:
        where = "; ".join(f"{k!r}: {STATEMENTS[k][2]}" for k in wrong)
        raise Failed(f"{len(wrong)} of {len(STATEMENTS)} answers are wrong. Look again at the "
                     f"measurement for each: {where}")
    return f"all {len(STATEMENTS)} statements answered as the measurements say", {}
