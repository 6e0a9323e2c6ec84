"""Where each rank's tensors live: the CPU, a GPU of its own, or a GPU it shares with other ranks.

One rule, decided in the launching process and carried to every rank (``plan``):

=====================================  ========  ==================================================
this machine                           backend   rank r's tensors
=====================================  ========  ==================================================
no GPU (or ``device="cpu"``)           gloo      ``cpu``
a GPU for every rank, NCCL available   nccl      ``cuda:r`` (its own GPU)
fewer GPUs than ranks (one GPU, 4      gloo      ``cuda:(r % GPUs)``: ranks share the GPUs, and
ranks: the usual learner's machine)              gloo moves CUDA tensors through host memory
=====================================  ========  ==================================================

NCCL cannot put two ranks on one GPU (it refuses a duplicate GPU), so sharing one needs gloo,
which supports CUDA tensors in its collectives but not in ``send``/``recv`` (the torch.distributed
docs, "Backends"); labkit stages those through host memory (``labkit.launcher._staging``).

Inside a rank, ``device()`` answers where tensors go, so the same code runs on a laptop's CPU, one
shared GPU, or a GPU per rank::

    def work():
        x = torch.ones(4, device=labkit.device())
        model = MyModel().to(labkit.device())

Data and models are best built on the CPU from a seeded generator and then moved: a GPU draws
different random numbers than the CPU from the same seed, and the checks compare with references
computed on the CPU.

``LABKIT_DEVICE=cpu`` (or ``cuda``) in the environment changes what ``device="auto"`` means for
every launch, e.g. to keep a shared GPU free while working through the course.
"""
import os
from typing import NamedTuple, Optional

DEVICES = ("auto", "cpu", "cuda")
RANK_DEVICE_VARIABLE = "LABKIT_RANK_DEVICE"   # set by the launcher in each rank
CHOICE_VARIABLE = "LABKIT_DEVICE"             # the learner's default for device="auto"


class Placement(NamedTuple):
    """The backend and each rank's device for one launch, and why, in words for the banner."""
    backend: str
    devices: tuple
    why: str

    @property
    def shared_gpu(self) -> bool:
        """True when ranks hold CUDA tensors under gloo (ranks share GPUs)."""
        return self.backend == "gloo" and any(d.startswith("cuda") for d in self.devices)


def _visible_gpus() -> tuple:
    """(number of GPUs, whether NCCL is built in) without creating a CUDA context."""
    import torch
    import torch.distributed as dist
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return gpus, bool(gpus) and dist.is_nccl_available()


def plan(nprocs: int, backend: str = "auto", device: str = "auto", *,
         gpus: Optional[int] = None, nccl: Optional[bool] = None) -> Placement:
    """Choose the backend and each rank's device; a choice this machine cannot honour is a
    ``ValueError`` that says what to do. ``gpus``/``nccl`` default to what this machine has."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend={backend!r} is not supported; use one of auto, gloo, nccl.")
    if device == "auto":
        device = os.environ.get(CHOICE_VARIABLE, "auto").strip().lower() or "auto"
        if device not in DEVICES:
            raise ValueError(f"{CHOICE_VARIABLE}={os.environ[CHOICE_VARIABLE]!r} in the environment "
                             f"is not a device labkit knows; use one of {', '.join(DEVICES)}.")
    elif device not in DEVICES:
        raise ValueError(f"device={device!r} is not supported; use one of {', '.join(DEVICES)}.")
    if gpus is None or nccl is None:
        found_gpus, found_nccl = _visible_gpus()
        gpus = found_gpus if gpus is None else gpus
        nccl = found_nccl if nccl is None else nccl

    if backend == "nccl":
        if not nccl:
            raise ValueError("backend='nccl' needs a CUDA build of torch with NCCL and a GPU; this "
                             "machine has none. Use backend='gloo' (CPU) or 'auto'.")
        if device == "cpu":
            raise ValueError("backend='nccl' works on GPU tensors only; with device='cpu' use "
                             "backend='gloo' or 'auto'.")
        if gpus < nprocs:
            raise ValueError(f"backend='nccl' needs one GPU per rank: {nprocs} ranks but {gpus} "
                             f"GPU(s) visible (NCCL refuses two ranks on one GPU). Use fewer "
                             f"ranks, or backend='auto' (gloo, ranks sharing the GPUs).")
        return Placement("nccl", tuple(f"cuda:{r}" for r in range(nprocs)), "a GPU per rank")
    if device == "cuda" and gpus == 0:
        raise ValueError("device='cuda' but no GPU is visible (torch.cuda.is_available() is "
                         "False). Use device='auto' or 'cpu'.")
    if device == "cpu" or gpus == 0:
        why = "as asked" if device == "cpu" else "no GPU"
        return Placement("gloo", ("cpu",) * nprocs, why)
    if backend == "auto" and nccl and nprocs <= gpus:
        return Placement("nccl", tuple(f"cuda:{r}" for r in range(nprocs)), "a GPU per rank")
    if nprocs > gpus:
        why = f"{nprocs} ranks share {gpus} GPU{'s' if gpus > 1 else ''}"
    else:
        why = "a GPU per rank, gloo " + ("as asked" if backend == "gloo" else "(no NCCL)")
    return Placement("gloo", tuple(f"cuda:{r % gpus}" for r in range(nprocs)), why)


def enter(where: str, backend: str) -> None:
    """Make ``where`` this rank's device: what ``device()`` answers, the current CUDA device, and,
    when ranks share a GPU under gloo, point-to-point through host memory
    (``labkit.launcher._staging``). Called by a rank before its process group starts."""
    os.environ[RANK_DEVICE_VARIABLE] = where
    if where.startswith("cuda"):
        import torch
        torch.cuda.set_device(int(where.split(":")[1]))
        if backend == "gloo":
            from labkit.launcher import _staging
            _staging.install()


def device():
    """The ``torch.device`` this rank's tensors belong on.

    In a rank of ``labkit.launch``: what the launch planned (see the module docstring). Under
    torchrun or ``labkit.train``: the current CUDA device when the default process group is NCCL,
    else the CPU. Outside any rank (the notebook itself): the CPU.
    """
    import torch
    planned = os.environ.get(RANK_DEVICE_VARIABLE)
    if planned:
        return torch.device(planned)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(value, where=None):
    """``value`` with every tensor and module in it moved to ``where`` (default: ``device()``):
    a tensor, an ``nn.Module``, or lists, tuples and dicts of them; anything else unchanged."""
    import torch
    where = device() if where is None else torch.device(where)
    if isinstance(value, (torch.Tensor, torch.nn.Module)):
        return value.to(where)
    if isinstance(value, dict):
        return type(value)((k, to_device(v, where)) for k, v in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):   # a namedtuple
        return type(value)(*(to_device(v, where) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, where) for v in value)
    return value
