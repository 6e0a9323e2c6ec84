"""Per-rank memory of ZeRO at any scale, without the memory: fake tensors on a fake process group.

``zero(7.5e9, world_size=64, stage=3)`` answers "how many bytes does one rank hold after one
training step?" for a 7.5-billion-parameter model on 64 ranks. The first call in a process takes
about 2 s (it imports torch's fake-tensor machinery), later ones about 0.01 s (on the course's
2-core machine). What it does, as rank ``rank`` of ``world_size``, in this process:

Executed
* Allocation, with ``torch.empty`` under torch's ``FakeTensorMode`` (a fake tensor has a shape
  and a dtype but no data): the buffers one rank of ZeRO-``stage`` holds, as flat 1-D buffers
  (parameters, gradients, the fp32 master copy in mixed precision) and the transient ones of a
  step (stage 3: the gathered parameters, once for the forward and once for the backward;
  stages 2-3: the full gradient before its reduce-scatter; mixed precision: an fp32 copy of this
  rank's gradient shard for the update). Their sizes are set by the rules of each stage, below.
* The step's collectives, through ``torch.distributed`` on torch's fake process group (backend
  ``"fake"``, a temporary default group): stage 0 all-reduces the gradients; stage 1
  reduce-scatters them into this rank's slice of the same buffer and all-gathers the updated
  parameters; stage 2 reduce-scatters the full gradient into the shard and all-gathers the
  parameters; stage 3 all-gathers the parameters twice and reduce-scatters the gradients. The
  fake group returns at once: it moves no data and checks no sizes, so one process can play
  rank 17 of 1024.
* torch's own Adam, one ``step()`` on this rank's part: in mixed precision on the fp32 master
  copy (with an fp32 copy of the gradient shard), copied back into the fp16 parameters after;
  in fp32 on the parameters themselves. Adam itself creates its state, ``exp_avg`` and
  ``exp_avg_sq``.

Not executed: the model. No forward and no backward run, so there are no activations and no
gradient values; a module only gives its parameter count.

Assigned by rule
* What each stage keeps, in elements: parameters Ψ (stage 3: Ψ/N); gradients Ψ (stages 2-3:
  Ψ/N); in mixed precision an fp32 master copy, Ψ/N (stage 0: Ψ). The bytes per element come
  from ``precision``.
* The category of every buffer is the label the code gives it; Adam's ``step`` counter is left
  out, as in the ZeRO paper.
* Padding: in stages 1-3 the flat buffers have ``padded_params`` = Ψ rounded up to a multiple
  of N elements (fewer than N extra, at the end, in the last rank's shard), so that every shard
  has the same size and every rank holds the same bytes. Stage 0 does not pad.

Measured: the bytes of the storages behind the live buffers, read after the step (for the
buffers above that is shape x dtype size; for Adam's state it is what torch's Adam allocated),
and the most bytes live at once among those buffers (``unbucketed_peak``). ``collectives`` logs
the size of each collective's full buffer from the shapes the code hands it.

So the result equals ``labkit.theory.zero_memory`` applied to ``padded_params``, category by
category: the rules are the formula's, and torch's Adam keeps the 8 bytes per parameter the
formula assumes. Against the formula at Ψ it differs only by the padding (at most 16 bytes per
padding element). The same code runs on real, uninitialised tensors with ``fake=False`` (still
on the fake process group): that is how the tests check that fake tensors count the same bytes
as real ones.

The private torch APIs used here (``FakeTensorMode``, the fake process group's ``FakeStore``)
come from ``labkit._torch_private``, which says which torch is needed when one is missing.
"""
import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from labkit import compat, theory

CATEGORIES = ("params", "grads", "optimizer")  # model states; transients: `unbucketed_peak`
PRECISIONS = {  # (dtype of the params and grads, optimizer-state bytes per parameter "K")
    "mixed": (torch.float16, 12),   # fp16 params and grads; fp32 master copy + Adam m and v
    "fp32": (torch.float32, 8),     # fp32 params and grads; Adam m and v (no master copy)
}
MIN_TORCH = "2.4"


@dataclass
class ZeroMemory:
    """Bytes one rank holds after one simulated ZeRO step (after ``optimizer.step()``, before
    zero_grad); the module's docstring says which numbers are measured and which set by rule.

    ``params``, ``grads`` and ``optimizer`` are the model states of the ZeRO paper; Adam's 4-byte
    ``step`` counter is left out, as in the paper. ``unbucketed_peak`` is the most bytes live at
    once among the buffers this step allocates, transient ones included (gathered parameters,
    the full gradient before its reduce-scatter, fp32 gradients for the update); it leaves out
    Adam's own temporaries inside ``step()`` and activations (no forward runs). It is NOT the
    peak of a real ZeRO-2/3, which moves buckets and gathers layer by layer and so peaks far
    lower; it shows what the fake tensors would have cost for real.
    """
    num_params: int
    padded_params: int    # num_params rounded up to a multiple of world_size (stages 1-3)
    world_size: int
    stage: int
    precision: str
    rank: int
    params: int
    grads: int
    optimizer: int
    unbucketed_peak: int
    collectives: list = field(default_factory=list)   # (op, bytes of the full buffer), in order
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "total": self.total}

    def theory(self) -> dict:
        """The ZeRO formula for the same setting (``labkit.theory``), with the total."""
        k, low = PRECISIONS[self.precision][1], PRECISIONS[self.precision][0].itemsize
        states = theory.zero_memory_breakdown(self.num_params, self.world_size, self.stage, k=k,
                                              param_bytes=low, grad_bytes=low)
        return {**states, "total": sum(states.values())}

    def __str__(self) -> str:
        gb = lambda b: f"{b / 1e9:.3f} GB"   # decimal GB, as in the ZeRO paper
        return (f"ZeRO-{self.stage}, {self.num_params:.4g} params, {self.precision}, rank "
                f"{self.rank} of {self.world_size}: params {gb(self.params)}, grads "
                f"{gb(self.grads)}, optimizer {gb(self.optimizer)}, total {gb(self.total)} "
                f"(theory {gb(self.theory()['total'])})")


def zero(model, world_size: int = 64, stage: int = 0, *, precision: str = "mixed",
         rank: int = 0, fake: bool = True) -> ZeroMemory:
    """One ZeRO step (stage 0: plain data parallel) as rank ``rank`` of ``world_size``: the
    buffers that rank holds, allocated as fake tensors, the step's collectives on torch's fake
    process group and torch's Adam on this rank's part; no forward or backward (see the module's
    docstring for what is executed, measured and set by rule).

    ``model`` is a parameter count (``7.5e9``) or an ``nn.Module``, best built on the meta device
    (see ``mlp_stack``); only its parameter count is used, and every parameter counts as trainable.
    ``precision``: ``"mixed"`` (fp16 params and grads, fp32 master + Adam state: 16 bytes per
    parameter) or ``"fp32"`` (plain fp32 Adam: also 16). Stages 1-3 pad the parameter count up
    to a multiple of ``world_size`` (``padded_params``). ``fake=False`` allocates real tensors,
    for small models only. Runs in this process with a temporary fake default process group, so
    it refuses to run where a process group already exists (e.g. inside a rank of
    labkit.launch).
    """
    num_params = _count(model)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if stage not in theory.ZERO_STAGES or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need stage in 0-3, world_size >= 1 and 0 <= rank < world_size; "
                         f"got stage={stage!r}, world_size={world_size!r}, rank={rank!r}")
    if not fake and 16 * num_params > 2e9:
        raise ValueError(f"fake=False allocates real memory: {16 * num_params / 1e9:.1f} GB here; "
                         "use fake=True for large models")
    FakeTensorMode, FakeStore = _torch_fakes()
    if dist.is_initialized():
        raise RuntimeError(
            "labkit.simulate installs a fake process group as this process's default group, but "
            f"one exists already (backend {dist.get_backend()!r}, world size "
            f"{dist.get_world_size()}), and it leaves yours alone. Call it from the notebook "
            "itself, not from a function run by labkit.launch, or after "
            "dist.destroy_process_group().")
    start, ledger, log = time.perf_counter(), _Ledger(), []
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        with FakeTensorMode() if fake else contextlib.nullcontext():
            padded = _zero_step(ledger, log, num_params, world_size, rank, stage, precision)
            at_rest = {c: ledger.bytes(c) for c in CATEGORIES}
            assert sum(at_rest.values()) == ledger.bytes(), "a transient buffer was not freed"
    finally:
        dist.destroy_process_group()   # never leave the fake group behind
    return ZeroMemory(num_params, padded, world_size, stage, precision, rank, **at_rest,
                      unbucketed_peak=ledger.peak, collectives=log,
                      seconds=time.perf_counter() - start)


def _zero_step(ledger, log, num_params, n, rank, stage, precision) -> int:
    """Allocate what one rank of ZeRO-``stage`` keeps and run one step's collectives and update.

    The model lives in one flat buffer. To split it into N equal shards it is padded to a
    multiple of N (stages 1-3; the padding is < N elements). Returns the padded length.
    """
    low, _ = PRECISIONS[precision]
    padded = num_params if stage == 0 else -(-num_params // n) * n
    shard = padded if stage == 0 else padded // n
    mine = slice(rank * shard, (rank + 1) * shard)   # this rank's piece of a full buffer (1-3)
    own = lambda t: t if t.numel() == shard else t[mine]   # the part of a buffer this rank updates

    # What each stage keeps between steps: stage 3 only a shard of the parameters, stage 2+ only
    # a shard of the gradients; stage 1+ only a shard of the fp32 master copy (and of Adam's m, v).
    params = ledger.new("params", shard if stage == 3 else padded, low)
    grads = ledger.new("grads", padded if stage <= 1 else shard, low)
    master = ledger.new("optimizer", shard, torch.float32) if precision == "mixed" else None

    # Forward and backward. Stage 3 gathers the full parameters before each and drops them after;
    # in the backward they live beside the full-size gradient buffer that the backward fills.
    if stage == 3:
        gathered = ledger.new("comm", padded, low)
        _collective(log, "all_gather", gathered, params)   # forward
        ledger.free(gathered)
        gathered = ledger.new("comm", padded, low)
        _collective(log, "all_gather", gathered, params)   # backward
    full_grads = grads if stage <= 1 else ledger.new("comm", padded, low)
    if stage == 3:
        ledger.free(gathered)
    if stage == 0:      # plain data parallel: every rank gets the full summed gradient
        _collective(log, "all_reduce", grads)
    elif stage == 1:    # full gradient buffer, but each rank only needs its own summed shard
        _collective(log, "reduce_scatter", grads[mine], grads)
    else:               # stages 2-3 keep only their summed shard; the full buffer goes
        _collective(log, "reduce_scatter", grads, full_grads)
        ledger.free(full_grads)

    # The update: torch's Adam on this rank's shard (its m and v appear on the first step).
    if precision == "mixed":
        weights, grad = master.requires_grad_(), ledger.add("temp", own(grads).float())
    else:
        weights, grad = own(params).detach().requires_grad_(), own(grads)
    weights.grad = grad
    optimizer = torch.optim.Adam([weights], lr=1e-3)
    with torch.no_grad():
        optimizer.step()
        for name in ("exp_avg", "exp_avg_sq"):
            ledger.add("optimizer", optimizer.state[weights][name])
        if precision == "mixed":
            own(params).copy_(weights)      # fp32 master -> fp16 working copy
            ledger.free(grad)
    weights.grad = None
    if stage in (1, 2):     # everyone needs all updated parameters for the next forward
        _collective(log, "all_gather", params, params[mine])
    return padded


class _Ledger:
    """The buffers live on one rank, each with a category, and the peak of their total bytes."""

    def __init__(self):
        self.live, self.peak = [], 0

    def add(self, category, tensor):
        self.live.append((category, tensor))
        self.peak = max(self.peak, self.bytes())
        return tensor

    def new(self, category, numel, dtype):
        return self.add(category, torch.empty(numel, dtype=dtype))   # fake: a shape, no memory

    def free(self, tensor):
        self.live = [(c, t) for c, t in self.live if t is not tensor]

    def bytes(self, category=None) -> int:
        """Bytes of storage behind the live tensors (of one category, or all)."""
        return sum(t.untyped_storage().nbytes() for c, t in self.live if category in (None, c))


def _collective(log, op, out, inp=None):
    """Run one collective on the (fake) default group; log the bytes of its full buffer."""
    if op == "all_reduce":
        dist.all_reduce(out)
    elif op == "reduce_scatter":
        compat.reduce_scatter_tensor(out, inp)
    else:
        compat.all_gather_into_tensor(out, inp)
    full = out if op != "reduce_scatter" else inp
    log.append((op, full.numel() * full.element_size()))


def mlp_stack(width: int = 4096, depth: int = 56, expansion: int = 4, device="meta"):
    """``depth`` transformer-style MLP blocks, width -> expansion*width -> width, on ``device``.

    The defaults give 7.52e9 parameters, the ZeRO paper's 7.5B example. On the meta device the
    weights have shapes but no data, so it builds in milliseconds and takes no memory.
    """
    with torch.device(device):
        return torch.nn.Sequential(*(torch.nn.Sequential(
            torch.nn.Linear(width, expansion * width), torch.nn.GELU(),
            torch.nn.Linear(expansion * width, width)) for _ in range(depth)))


def _count(model) -> int:
    """Parameters of a module (shared ones once), or a whole number such as 7.5e9."""
    if isinstance(model, torch.nn.Module):
        count = sum(p.numel() for p in model.parameters())
    elif isinstance(model, (int, float)) and not isinstance(model, bool) and 1 <= model < 2**62 \
            and model == int(model):
        count = int(model)
    else:
        count = 0
    if count < 1:
        raise ValueError("model must be an nn.Module or a whole number of parameters (>= 1), "
                         f"got {model!r}")
    return count


def _torch_fakes():
    """torch's FakeTensorMode and FakeStore (importing it registers the "fake" backend), or an
    error that says which torch is needed."""
    need = (f"labkit.simulate needs torch >= {MIN_TORCH} (tested with 2.13) for FakeTensorMode "
            f"and the fake process group; this is torch {torch.__version__}")
    if torch.__version__ < MIN_TORCH or not dist.is_available():
        raise RuntimeError(need)
    from labkit._torch_private import FakeStore, FakeTensorMode
    return FakeTensorMode, FakeStore
