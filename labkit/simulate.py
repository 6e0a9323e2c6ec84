"""Per-rank memory of ZeRO at any scale, measured by running it on fake tensors.

``zero(7.5e9, world_size=64, stage=3)`` answers "how many bytes does one rank hold after one
training step?" for a 7.5-billion-parameter model on 64 ranks, by running that step: rank
``rank`` of ``world_size`` executes the course's reference implementation of the stage
(``labkit.stages``: DDP, ZeRO1, ZeRO2, ZeRO3, the algorithms of notebooks 02 and 06-08) on
torch's fake tensors, and ``labkit.MemoryTracer`` measures what it holds. On the course's 2-core
machine the first call takes about 1 s, later ones 0.1-0.3 s for 7.5B parameters; a whole
Table 1 column (6 world sizes x 3 stages, ``table1``) 4-5 s.

Executed, as rank ``rank`` in this process
* The model: a copy of ``model`` whose parameters are fake tensors (``FakeTensorMode``: a shape
  and a dtype, no data; fp16 in mixed precision). A number of parameters becomes
  ``sized_model(n)``, bias-free linear layers with exactly ``n`` parameters.
* The stage's set-up: flattening and padding the parameters into buffers, the shards, the fp32
  master copy in mixed precision, its optimizer (torch's Adam) over this rank's part; ZeRO-3
  frees its gathered units.
* One training step: forward and backward of a batch of one (``inputs``) with the stage's hooks
  (ZeRO-2: gradients copied into buckets, reduce-scattered, full gradients dropped; ZeRO-3:
  each unit all-gathered before its forward and its backward, freed after), then
  ``stage.step()``: all-reduce (DDP) or reduce-scatter, Adam's step, all-gather (ZeRO-1/2).
* The collectives go through ``torch.distributed`` to torch's fake process group (backend
  ``"fake"``, a temporary default group): they return at once and move nothing, so one process
  can play rank 17 of 1024. ``collectives`` is what ``labkit.CommCounter`` saw.

Not executed: any arithmetic (fake tensors have no data: every op only computes the shape and
dtype of its result), and no other rank.

Measured, by ``MemoryTracer`` through the step (set-up excluded): the bytes of every live
storage, by category from what owns it: the model's parameters ("params"), their ``.grad``,
``optimizer.state``, and the tags the reference implementation puts on the buffers it makes
itself (master copies "optimizer", shards "params"/"grads", buckets "comm"). So ZeRO-3's
parameter bytes are what it keeps once its gathered units are freed: nothing is assigned by
stage. ``params``, ``grads``, ``optimizer`` are read at rest after the step (before
``zero_grad``); Adam's ``step`` counters are reported apart (``step_counters``), as the ZeRO
paper leaves them out; ``leftover`` is anything else still live: the model's buffers (e.g.
BatchNorm statistics), else 0 for a correct stage.
``peak`` is the most bytes live at once during the step, ``peak_by_category`` its make-up
(activations of the batch of one included).

The tracer runs with ``fake=True``: it counts storages on the meta device, which it otherwise
skips (a meta tensor holds no memory), because a fake tensor's storage is a meta storage.

The same code runs on real tensors (zeros) with ``fake=False`` (still on the fake process
group): that is how the tests check that fake tensors count the same bytes as real ones. The
private torch APIs (``FakeTensorMode``, ``FakeStore``) come from ``labkit._torch_private``.
"""
import contextlib
import copy
import inspect
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from labkit import theory
from labkit.comm import CommCounter
from labkit.memory import MemoryTracer
from labkit.stages import STAGES

CATEGORIES = ("params", "grads", "optimizer")  # the ZeRO paper's model states
PRECISIONS = {  # (dtype of the params and grads, optimizer-state bytes per parameter "K")
    "mixed": (torch.float16, 12),   # fp16 params and grads; fp32 master copy + Adam m and v
    "fp32": (torch.float32, 8),     # fp32 params and grads; Adam m and v (no master copy)
}
MIN_TORCH = "2.4"


@dataclass
class ZeroMemory:
    """Bytes one rank held in one executed ZeRO step; see the module's docstring for what is
    executed and measured. ``params``, ``grads``, ``optimizer``: the model states at rest after
    ``step()`` (Adam's ``step`` counters are in ``step_counters``, not in ``optimizer``)."""
    num_params: int
    padded_params: int    # elements in the flat buffers (stages 1-3: each padded to N | size)
    world_size: int
    stage: int
    precision: str
    rank: int
    params: int
    grads: int
    optimizer: int
    step_counters: int = 0
    leftover: int = 0     # other bytes live at rest: the model's buffers, else 0 when correct
    peak: int = 0
    peak_by_category: dict = field(default_factory=dict)
    peak_event: str = ""
    collectives: list = field(default_factory=list)   # (op, payload bytes), in order
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "total": self.total}

    def theory(self) -> dict:
        """The ZeRO formula for the same setting (``labkit.theory``), with the total."""
        low, k = PRECISIONS[self.precision]
        states = theory.zero_memory_breakdown(self.num_params, self.world_size, self.stage, k=k,
                                              param_bytes=low.itemsize, grad_bytes=low.itemsize)
        return {**states, "total": sum(states.values())}

    def __str__(self) -> str:
        gb = lambda b: f"{b / 1e9:.3f} GB"   # decimal GB, as in the ZeRO paper
        return (f"ZeRO-{self.stage}, {self.num_params:.4g} params, {self.precision}, rank "
                f"{self.rank} of {self.world_size}: params {gb(self.params)}, grads "
                f"{gb(self.grads)}, optimizer {gb(self.optimizer)}, total {gb(self.total)} "
                f"(theory {gb(self.theory()['total'])}); peak {gb(self.peak)}")


def zero(model, world_size: int = 64, stage: int = 0, *, precision: str = "mixed",
         rank: int = 0, fake: bool = True, inputs=None, stage_class=None,
         bucket_bytes: int = 2**28) -> ZeroMemory:
    """Run one training step of ZeRO-``stage`` (0: plain data parallelism) as rank ``rank`` of
    ``world_size`` on fake tensors and measure its bytes (module docstring).

    ``model``: a whole number of parameters (``7.5e9``: ``sized_model``) or an ``nn.Module``
        (best on the meta device, see ``mlp_stack``; it is copied, not changed). Every
        parameter counts as trainable.
    ``precision``: ``"mixed"`` (fp16 params and grads, fp32 master copy + Adam m, v; K = 12) or
        ``"fp32"`` (plain fp32 Adam, K = 8).
    ``inputs``: a function of the dtype that returns the model's input; by default a batch of
        one for the first module with ``in_features``.
    ``stage_class``: a class to run instead of ``labkit.stages.STAGES[stage]`` (same
        constructor), e.g. a learner's or a deliberately broken one.
    ``bucket_bytes``: ZeRO-2's bucket size. ``fake=False`` allocates real tensors (small models
        only). Returns a ``ZeroMemory``; ``seconds`` is its wall time. Refuses to run where a process group exists (e.g. inside labkit.launch).
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
    start = time.perf_counter()
    low, _ = PRECISIONS[precision]
    template = model if isinstance(model, torch.nn.Module) else sized_model(num_params)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        with FakeTensorMode() if fake else contextlib.nullcontext():
            net = _materialize(template, low)
            x = inputs(low) if inputs is not None else _default_input(net, low)
            mem = MemoryTracer(net, timeline=False, fake=True)
            kind = stage_class or STAGES[stage]
            takes = "bucket_bytes" in inspect.signature(kind).parameters
            options = {"bucket_bytes": bucket_bytes} if stage == 2 and takes else {}
            impl = kind(net, torch.optim.Adam, mixed=precision == "mixed", tag=mem.tag, lr=1e-3,
                        **options)
            mem.optimizers = [impl.optim]
            with mem, CommCounter() as comm:
                out = net(x)
                (out[0] if isinstance(out, (tuple, list)) else out).float().sum().backward()
                del out, x                  # the batch is not model state
                impl.step()
            rest = mem.current
            counters = _step_counter_bytes(impl.optim)
    finally:
        dist.destroy_process_group()   # never leave the fake group behind
    return ZeroMemory(
        num_params, impl.padded, world_size, stage, precision, rank, params=rest["params"],
        grads=rest["grads"], optimizer=rest["optimizer"] - counters, step_counters=counters,
        leftover=sum(rest.values()) - rest["params"] - rest["grads"] - rest["optimizer"],
        peak=mem.peak_total, peak_by_category=dict(mem.peak), peak_event=mem.peak_event,
        collectives=[(c.op, c.payload_bytes) for c in comm.calls],
        seconds=time.perf_counter() - start)


def table1(num_params=7.5e9, world_sizes=theory.TABLE1_WORLD_SIZES, stages=(1, 2, 3),
           **options) -> list:
    """ZeRO Table 1 by execution: one dict per cell, in GB (1e9 B) per device, beside the
    paper's printed cell and how it matches (``theory.printed_match``) where the paper has one.
    """
    printed = {(c["num_params"], c["world_size"], c["stage"]): c["paper_gb"]
               for c in theory.zero_table1()}
    rows = []
    for n in world_sizes:
        for stage in stages:
            r = zero(num_params, world_size=n, stage=stage, **options)
            paper = printed.get((float(num_params), n, stage))
            rows.append({"world_size": n, "stage": stage, "gb": r.total / 1e9, "paper_gb": paper,
                         "match": paper and theory.printed_match(r.total / 1e9, paper),
                         "result": r})
    return rows


def _step_counter_bytes(optimizer) -> int:
    """Bytes of the optimizer's ``step`` entries (Adam's step counters)."""
    return sum(s["step"].untyped_storage().nbytes() for s in optimizer.state.values()
               if isinstance(s.get("step"), torch.Tensor))


def _materialize(template, dtype):
    """A copy of ``template`` with new parameters and buffers (zeros; fake under
    FakeTensorMode), floating ones in ``dtype``; ``template`` is left alone, and its tensors'
    memory is not copied. Shared tensors stay shared."""
    old = {id(t): t for module in template.modules()
           for t in [*module._parameters.values(), *module._buffers.values()] if t is not None}
    memo = {key: torch.empty(0, device="meta") for key in old}   # stand-ins, replaced below
    net = copy.deepcopy(template, memo)
    fresh = {}
    for new_module, module in zip(net.modules(), template.modules()):
        for table, new_table in ((module._parameters, new_module._parameters),
                                 (module._buffers, new_module._buffers)):
            for name, t in table.items():
                if t is None:
                    continue
                if id(t) not in fresh:
                    made = torch.zeros(t.shape, dtype=dtype if t.is_floating_point() else t.dtype)
                    fresh[id(t)] = (torch.nn.Parameter(made, requires_grad=t.requires_grad)
                                    if isinstance(t, torch.nn.Parameter) else made)
                new_table[name] = fresh[id(t)]
    return net


def _default_input(model, dtype):
    for module in model.modules():
        if isinstance(getattr(module, "in_features", None), int):
            return torch.zeros(1, module.in_features, dtype=dtype)
    raise ValueError("cannot tell this model's input: pass inputs=lambda dtype: ...")


class _Tail(torch.nn.Module):
    """The rest of ``sized_model``'s parameters: a gain, the sum of ``n`` weights."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(n))

    def forward(self, x):
        return x * self.weight.sum()


def sized_model(num_params: int, depth: int = 48, device="meta"):
    """Exactly ``num_params`` parameters: up to ``depth`` bias-free square linear layers and,
    if they do not add up, a gain with the rest (fewer than one layer's worth).

    7.5e9 gives 48 layers of 12500 x 12500, the ZeRO paper's 7.5B model to the parameter.
    """
    width = max(1, math.isqrt(int(num_params) // depth))
    layers = int(num_params) // width**2
    rest = int(num_params) - layers * width**2
    with torch.device(device):
        blocks = [torch.nn.Linear(width, width, bias=False) for _ in range(layers)]
        return torch.nn.Sequential(*blocks, *([_Tail(rest)] if rest else []))


def mlp_stack(width: int = 4096, depth: int = 56, expansion: int = 4, device="meta"):
    """``depth`` transformer-style MLP blocks, width -> expansion*width -> width, on ``device``.

    The defaults give 7.52e9 parameters, the size of the ZeRO paper's 7.5B example (for its
    exact count use ``sized_model(7.5e9)``). On the meta device the weights have shapes but no
    data, so it builds in milliseconds and takes no memory.
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
