"""Reference implementations of data parallelism and ZeRO stages 1-3, small enough to read.

The algorithms the learners write in notebooks 02 (DDP), 06 (ZeRO-1), 07 (ZeRO-2) and 08
(ZeRO-3), for one training step on any tensors (real or fake) and the current default process
group (gloo, or torch's "fake" group in ``labkit.simulate``):

    stage = ZeRO2(model, torch.optim.Adam, mixed=True, lr=1e-3)   # after dist.init_process_group
    model(x).float().sum().backward()     # ZeRO-2/3 act during backward, through hooks
    stage.step()                          # the rest of the step: collectives, update, gathers

What each keeps between steps (Ψ parameters, N ranks; "flat" = padded to a multiple of N):

=========  =========================  ===================================  ======================
class      parameters                 gradients                            optimizer (this rank)
=========  =========================  ===================================  ======================
DDP        the model's own, Ψ         ``p.grad``, Ψ, all-reduced           all Ψ
ZeRO1      flat buffer, Ψ             flat buffer, Ψ; slice r reduced       slice r of the flat
ZeRO2      flat buffer per bucket, Ψ  slice r of each bucket (Ψ/N); the     slice r of each bucket
                                      full bucket freed in backward
ZeRO3      slice r of each unit (Ψ/N) as ZeRO2, per unit                    slice r of each unit
=========  =========================  ===================================  ======================

``mixed=True`` is the ZeRO paper's mixed precision (K = 12): the model's parameters and
gradients are in their own low precision (make the model fp16 first), the optimizer runs on an
fp32 master copy of the part this rank updates (its gradient copied to fp32 just for the
update, then dropped), and the result is copied back into the low-precision parameters.
``mixed=False``: the optimizer runs on the parameters (or their shard) themselves.

Differences from the notebooks' solutions, on purpose:
* ZeRO1 keeps its gradients in one flat buffer (``p.grad`` are views into it, as DDP's
  ``gradient_as_bucket_view``) and reduce-scatters slice r of that buffer in place, so that it
  holds Ψ gradients as in the paper; notebook 06 concatenates the grads into a temporary and
  keeps an extra Ψ/N gradient shard.
* Collectives are synchronous (notebook 07 overlaps one bucket in flight).
* ZeRO3 frees a gathered unit by shrinking its storage to 0 bytes (``untyped_storage().resize_``,
  as FSDP does) so that the tensors autograd saved for backward stay valid, and re-gathers it
  when the gradient of the unit's output arrives (a tensor hook), before the unit's backward.

``tag(tensor, category)`` (e.g. ``MemoryTracer.tag``) is called on every buffer the stage makes
that no model, ``.grad`` or optimizer state owns: master copies ("optimizer"), shards of
parameters ("params") and gradients ("grads"), gradient buckets ("comm") and the fp32 gradient
copies of the update ("other"). The sizes are whatever the code allocates.
"""
import math

import torch
import torch.distributed as dist
from torch import nn

from labkit.compat import all_gather_into_tensor, reduce_scatter_tensor


def _no_tag(tensor, category):
    return tensor


class DDP:
    """Stage 0, plain data parallelism (notebook 02's NaiveDDP with its optimizer): every rank
    keeps all parameters, gradients and optimizer state; ``step`` all-reduces each gradient,
    averages it and updates everything."""
    stage = 0

    def __init__(self, model, optimizer_class=torch.optim.Adam, *, mixed=False, tag=None,
                 **kwargs):
        self._setup(model, mixed, tag)
        self.padded = sum(p.numel() for p in self.params)
        self._optimizer(self.params, optimizer_class, **kwargs)

    def _setup(self, model, mixed, tag):
        self.model, self.mixed, self.tag = model, mixed, tag or _no_tag
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _optimizer(self, weights, optimizer_class, **kwargs):
        """The optimizer over ``weights`` (what this rank updates), or over fp32 master copies
        of them in mixed precision."""
        self.weights = weights
        if self.mixed:
            with torch.no_grad():
                self.masters = [nn.Parameter(self.tag(w.detach().float(), "optimizer"))
                                for w in weights]
            self.optim = optimizer_class(self.masters, **kwargs)
        else:
            self.optim = optimizer_class(weights, **kwargs)

    @torch.no_grad()
    def _update(self, grads):
        """Average this rank's summed gradients ``grads`` (one per weight) and step."""
        for g in grads:
            g /= self.world
        if not self.mixed:
            for w, g in zip(self.weights, grads):
                if w.grad is not g:
                    w.grad = g
            self.optim.step()
            return
        for m, g in zip(self.masters, grads):
            m.grad = self.tag(g.float(), "other")   # fp32 copy, for the update only
        self.optim.step()
        for w, m in zip(self.weights, self.masters):
            w.copy_(m)                               # fp32 master -> low-precision weights
            m.grad = None

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        self._update([p.grad for p in self.params])

    def zero_grad(self):
        for p in self.params:
            p.grad = None


class ZeRO1(DDP):
    """Stage 1 (P_os, notebook 06): the parameters become views into one flat buffer padded to a
    multiple of N; rank r updates slice r of it with an optimizer over that slice only. The
    gradients live in a flat buffer laid out the same way; ``step`` reduce-scatters it (slice r
    gets the sum), updates slice r and all-gathers the parameters."""
    stage = 1

    def __init__(self, model, optimizer_class=torch.optim.Adam, *, mixed=False, tag=None,
                 **kwargs):
        self._setup(model, mixed, tag)
        self._shard(self._pieces(), optimizer_class, **kwargs)
        self.flat_grads = []
        for flat, piece in zip(self.flats, self.pieces):
            flat_grad = torch.zeros_like(flat)
            for p in piece:
                offset = self.where[p][1]
                p.grad = flat_grad[offset:offset + p.numel()].view_as(p)   # backward adds here
            self.flat_grads.append(flat_grad)

    def _pieces(self):
        return [self.params]              # one flat buffer

    def _shard(self, pieces, optimizer_class, **kwargs):
        """Flatten each piece into its own buffer, padded to a multiple of N; the parameters
        become views into it; rank r owns slice r of every piece."""
        self.pieces, self.flats, self.shards, self.where = pieces, [], [], {}
        with torch.no_grad():
            for i, piece in enumerate(pieces):
                size = math.ceil(sum(p.numel() for p in piece) / self.world)
                flat = torch.zeros(size * self.world, dtype=piece[0].dtype, device=piece[0].device)
                offset = 0
                for p in piece:
                    flat[offset:offset + p.numel()].copy_(p.flatten())
                    p.data = flat[offset:offset + p.numel()].view_as(p)
                    self.where[p] = (i, offset)
                    offset += p.numel()
                self.flats.append(flat)
                self.shards.append(self._slice(flat))
        self.padded = sum(flat.numel() for flat in self.flats)
        self._optimizer(self.shards, optimizer_class, **kwargs)

    def _slice(self, flat):
        """Slice r of a flat buffer (a view), as a Parameter for the optimizer."""
        size = flat.numel() // self.world
        return nn.Parameter(flat[self.rank * size:(self.rank + 1) * size])

    @torch.no_grad()
    def step(self):
        grads = []
        for flat_grad in self.flat_grads:
            mine = self._slice(flat_grad).detach()
            reduce_scatter_tensor(mine, flat_grad)      # in place: slice r gets the sum
            grads.append(mine)
        self._update(grads)
        self._gather()

    def zero_grad(self):
        for flat_grad in self.flat_grads:
            flat_grad.zero_()            # in place: the parameters' .grad are views into it

    def _gather(self):
        for flat, shard in zip(self.flats, self.shards):
            all_gather_into_tensor(flat, shard.detach())   # in place: shard is slice r of flat


class ZeRO2(ZeRO1):
    """Stage 2 (P_os+g, notebook 07): the flat parameters cut into buckets in the order
    backward makes gradients; as a bucket's gradients arrive they are copied into a bucket
    buffer and the parameters' own gradients dropped; a complete bucket is reduce-scattered
    into this rank's gradient shard and the buffer freed. ``step``: update, all-gather."""
    stage = 2

    def __init__(self, model, optimizer_class=torch.optim.Adam, *, mixed=False, tag=None,
                 bucket_bytes=2**20, **kwargs):
        self._setup(model, mixed, tag)
        self._shard(self._pieces(bucket_bytes), optimizer_class, **kwargs)
        self.buffers = [None] * len(self.pieces)   # a piece's full gradient while it fills
        self.grads = [None] * len(self.pieces)     # slice r of it, summed over the ranks
        self.arrived = [0] * len(self.pieces)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _pieces(self, bucket_bytes):
        buckets, size = [[]], 0
        for p in reversed(self.params):          # the order in which backward makes gradients
            nbytes = p.numel() * p.element_size()
            if buckets[-1] and size + nbytes > bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(p)
            size += nbytes
        return buckets

    @torch.no_grad()
    def _grad_ready(self, p):
        i, offset = self.where[p]
        if self.buffers[i] is None:
            self.buffers[i] = self.tag(torch.zeros_like(self.flats[i]), "comm")
        self.buffers[i][offset:offset + p.numel()].copy_(p.grad.flatten())
        p.grad = None                            # the full gradient lives on in the buffer only
        self.arrived[i] += 1
        if self.arrived[i] == len(self.pieces[i]):
            self._reduce(i)

    def _reduce(self, i):
        """Reduce-scatter piece i's full gradient into this rank's shard of it; free the full."""
        if self.buffers[i] is None:              # no gradient arrived in this piece: zeros
            self.buffers[i] = self.tag(torch.zeros_like(self.flats[i]), "comm")
        shard = self.tag(torch.empty_like(self.shards[i].detach()), "grads")
        reduce_scatter_tensor(shard, self.buffers[i])
        self.grads[i], self.buffers[i], self.arrived[i] = shard, None, -1

    @torch.no_grad()
    def step(self):
        for i in range(len(self.pieces)):        # pieces that did not complete in backward
            if self.arrived[i] != -1:
                self._reduce(i)
        self.arrived = [0] * len(self.pieces)
        self._update(self.grads)
        self._gather()

    def zero_grad(self):
        self.grads = [None] * len(self.pieces)
        for w in self.weights:
            w.grad = None


class ZeRO3(ZeRO2):
    """Stage 3 (P_os+g+p, notebook 08): each unit (a child module of the model, by default) has
    its flat parameters padded and sharded, and a rank keeps only slice r. Before a unit's
    forward the unit is all-gathered, after it freed; when the gradient of its output arrives
    it is all-gathered again for its backward; when its last gradient arrives the gradient is
    reduce-scattered into the shard (as in ZeRO2) and the unit freed. ``step``: update the
    shards; nothing is gathered until the next forward."""
    stage = 3

    def __init__(self, model, optimizer_class=torch.optim.Adam, *, mixed=False, tag=None,
                 units=None, **kwargs):
        self._setup(model, mixed, tag)
        self.units = list(units) if units is not None else units_of(model)
        pieces = [[p for p in unit.parameters() if p.requires_grad] for unit in self.units]
        if sum(map(len, pieces)) != len(self.params):
            raise ValueError("every trainable parameter must be in exactly one unit")
        self._shard(pieces, optimizer_class, **kwargs)
        self.buffers = [None] * len(self.pieces)
        self.grads = [None] * len(self.pieces)
        self.arrived = [0] * len(self.pieces)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)
        for i, unit in enumerate(self.units):
            unit.register_forward_pre_hook(lambda *_, i=i: self._all_gather(i))
            unit.register_forward_hook(lambda _, __, out, i=i: self._after_forward(i, out))
        for i in range(len(self.units)):
            self._free(i)

    def _slice(self, flat):
        """Slice r, copied into memory of its own: the flat buffer itself is freed."""
        return nn.Parameter(self.tag(super()._slice(flat).detach().clone(), "params"))

    def _free(self, i):
        self.flats[i].untyped_storage().resize_(0)   # the parameters' views stay, 0 bytes under

    @torch.no_grad()
    def _all_gather(self, i):
        flat = self.flats[i]
        if flat.untyped_storage().nbytes() == 0:
            flat.untyped_storage().resize_(flat.numel() * flat.element_size())
            all_gather_into_tensor(flat, self.shards[i].detach())

    def _after_forward(self, i, out):
        self._free(i)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad, i=i: self._all_gather(i))   # before its backward

    def _reduce(self, i):
        super()._reduce(i)
        self._free(i)

    @torch.no_grad()
    def step(self):
        for i in range(len(self.pieces)):
            if self.arrived[i] != -1:
                self._reduce(i)
        self.arrived = [0] * len(self.pieces)
        self._update(self.grads)   # the shards only; the next forward gathers


STAGES = {0: DDP, 1: ZeRO1, 2: ZeRO2, 3: ZeRO3}


def units_of(model):
    """ZeRO-3's units: the model's child modules that have parameters (its blocks), or the whole
    model if it has parameters of its own (outside any child)."""
    children = [m for m in model.children() if any(True for _ in m.parameters())]
    if sum(1 for _ in model.parameters(recurse=False)) or not children:
        return [model]
    return children
