"""Learner code the sharded graders' tests share: notebook 01's ring of send/recv (in place,
chunks = torch.tensor_split(tensor, N)), and the ZeRO-3 wrappers of tests/test_nb08_check.py
(valid designs and planted bugs start from ``ZeRO3``)."""
import datetime
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from labkit.compat import all_gather_into_tensor, reduce_scatter_tensor

WAIT = datetime.timedelta(seconds=10)


def ring_reduce_scatter(tensor):
    n, r = dist.get_world_size(), dist.get_rank()
    chunks = torch.tensor_split(tensor, n)
    for s in range(n - 1):
        i, j = (r - s - 1) % n, (r - s - 2) % n
        buf = torch.empty_like(chunks[j])
        req = dist.isend(chunks[i], (r + 1) % n)
        dist.recv(buf, (r - 1) % n)
        req.wait()
        chunks[j].add_(buf)


def ring_all_gather(tensor):
    n, r = dist.get_world_size(), dist.get_rank()
    chunks = torch.tensor_split(tensor, n)
    for s in range(n - 1):
        i, j = (r - s) % n, (r - s - 1) % n
        buf = torch.empty_like(chunks[j])
        req = dist.isend(chunks[i], (r + 1) % n)
        dist.recv(buf, (r - 1) % n)
        req.wait()
        chunks[j].copy_(buf)


# --- ZeRO-3 ---------------------------------------------------------------------------------------

class ZeRO3(nn.Module):
    """One padded flat storage per unit, the unit's parameters views into it, freed with
    untyped_storage().resize_(0) and gathered again into the same storage (as FSDP does);
    a full backward pre-hook gathers before each unit's backward; post-accumulate-grad hooks
    reduce-scatter a unit once all its gradients are in (synchronously) and free them."""
    ASYNC_RS = False
    KEEP_LAST = False

    def __init__(self, module, optimizer_class, *, prefetch=False, **kwargs):
        super().__init__()
        self.module, self.prefetch = module, prefetch
        self.n, self.r = dist.get_world_size(), dist.get_rank()
        self.units = list(module.children())
        self.params = [list(u.parameters()) for u in self.units]
        self.sizes = [sum(p.numel() for p in ps) for ps in self.params]
        self.shapes = [[p.shape for p in ps] for ps in self.params]
        self.s = [self.shard_size(k) for k in self.sizes]
        shards, self.fulls = [], []
        for i, ps in enumerate(self.params):
            flat = self.flat(i, [p.detach() for p in ps])
            shards.append(nn.Parameter(flat[self.mine(i)].clone()))
            self.fulls.append(self.bind(i, flat.new_empty(self.s[i] * self.n)))
            self.release(i)
        self.shards = nn.ParameterList(shards)
        self.optim = self.make_optimizer(optimizer_class, kwargs)
        self.handles, self.pending, self.arrived = {}, [], [0] * len(self.units)
        for i, unit in enumerate(self.units):
            unit.register_full_backward_pre_hook(lambda m, g, i=i: self.before_backward(i))
            for p in self.params[i]:
                p.register_post_accumulate_grad_hook(lambda p, i=i: self.arrive(i))

    def shard_size(self, k):
        return math.ceil(k / self.n)

    def mine(self, i):
        return slice(self.r * self.s[i], (self.r + 1) * self.s[i])

    def make_optimizer(self, optimizer_class, kwargs):
        return optimizer_class(list(self.shards), **kwargs)

    def flat(self, i, tensors):
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return torch.cat([flat, flat.new_zeros(self.s[i] * self.n - self.sizes[i])])

    def bind(self, i, full):
        """Point unit i's parameters at slices of ``full``."""
        offset = 0
        for p, shape in zip(self.params[i], self.shapes[i]):
            k = math.prod(shape)
            p.data = full[offset:offset + k].view(shape)
            offset += k
        return full

    # gather and free
    def release(self, i):
        self.fulls[i].untyped_storage().resize_(0)

    def gathered(self, i):
        return self.fulls[i].untyped_storage().nbytes() > 0

    def start_gather(self, i, async_op=False):
        full = self.fulls[i]
        full.untyped_storage().resize_(full.numel() * full.element_size())
        return self.all_gather(full, self.shards[i].detach(), async_op)

    def all_gather(self, full, shard, async_op):
        return all_gather_into_tensor(full, shard, async_op=async_op)

    def ready(self, i):
        """Unit i gathered: wait for its prefetch, or gather it now."""
        handle = self.handles.pop(i, None)
        if handle is not None:
            handle.wait(timeout=WAIT)
        elif not self.gathered(i):
            with torch.no_grad():
                self.start_gather(i)

    def prefetch_unit(self, i):
        if self.prefetch and 0 <= i < len(self.units) and i not in self.handles \
                and not self.gathered(i):
            with torch.no_grad():
                self.handles[i] = self.start_gather(i, async_op=True)

    def forward(self, x):
        last = len(self.units) - 1
        for i, unit in enumerate(self.units):
            self.ready(i)
            self.prefetch_unit(i + 1)
            x = unit(x)
            if not (self.KEEP_LAST and i == last):
                self.release(i)
        return x

    def before_backward(self, i):
        self.ready(i)
        self.prefetch_unit(i - 1)

    # gradients
    def arrive(self, i):
        self.arrived[i] += 1
        if self.arrived[i] == len(self.params[i]):
            self.arrived[i] = 0
            self.reduce(i)
            self.free_grads(i)
            self.release(i)

    def reduce(self, i):
        flat = self.flat(i, [p.grad for p in self.params[i]])
        out = flat.new_empty(self.s[i])
        if self.ASYNC_RS:
            handle = reduce_scatter_tensor(out, flat, async_op=True)
            self.pending.append((handle, i, out))
        else:
            self.reduce_scatter(out, flat)
            self.shards[i].grad = out

    def reduce_scatter(self, out, flat):
        reduce_scatter_tensor(out, flat)

    def free_grads(self, i):
        for p in self.params[i]:
            p.grad = None

    def average(self, grad):
        return grad.div_(self.n)

    @torch.no_grad()
    def step(self):
        for handle, i, out in self.pending:
            handle.wait(timeout=WAIT)
            self.shards[i].grad = out
        self.pending = []
        for shard in self.shards:
            self.average(shard.grad)
        self.optim.step()

    def zero_grad(self, set_to_none=True):
        for ps in self.params:
            for p in ps:
                p.grad = None
        self.optim.zero_grad(set_to_none=True)

    @torch.no_grad()
    def full_state_dict(self):
        out, names = {}, iter(n for n, _ in self.module.named_parameters())
        for i, shapes in enumerate(self.shapes):
            full = self.shards[i].new_empty(self.s[i] * self.n).detach()
            all_gather_into_tensor(full, self.shards[i].detach())
            offset = 0
            for shape in shapes:
                k = math.prod(shape)
                out[next(names)] = full[offset:offset + k].view(shape).clone()
                offset += k
        return out


class ZeRO3AsyncKeepLast(ZeRO3):
    """Reduce-scatters with async_op=True, waited in step(); the last unit stays gathered from
    its forward to its backward (FSDP2 does not reshard it), so backward skips its gather."""
    ASYNC_RS = True
    KEEP_LAST = True


class ZeRO3Ring(ZeRO3):
    """Notebook 01's ring of send/recv for both collectives."""

    def all_gather(self, full, shard, async_op):
        full[self.r * shard.numel():(self.r + 1) * shard.numel()] = shard
        ring_all_gather(full)

    def reduce_scatter(self, out, flat):
        ring_reduce_scatter(flat)
        out.copy_(flat[self.r * out.numel():(self.r + 1) * out.numel()])


class _Gather(torch.autograd.Function):
    """shard -> the unit's gathered flat parameters; backward reduce-scatters their gradient
    into the shard's (autograd accumulates it into shard.grad)."""

    @staticmethod
    def forward(ctx, shard, owner, i):
        ctx.owner, ctx.i = owner, i
        owner.ready(i)
        return owner.fulls[i].view_as(owner.fulls[i])

    @staticmethod
    def backward(ctx, grad):
        owner, i = ctx.owner, ctx.i
        out = grad.new_empty(owner.s[i])
        reduce_scatter_tensor(out, grad.contiguous())
        owner.release(i)
        return out, None, None


class _Regather(torch.autograd.Function):
    """Identity on the unit's output; its backward gathers the unit before the unit's own."""

    @staticmethod
    def forward(ctx, x, owner, i):
        ctx.owner, ctx.i = owner, i
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.owner.ready(ctx.i)
        return grad, None, None


class ZeRO3Function(ZeRO3):
    """autograd.Function instead of hooks, parameters passed with torch.func.functional_call:
    the module's own parameters are freed at construction with p.data = torch.empty(0), and the
    shard's .grad comes from autograd. No prefetch."""

    def __init__(self, module, optimizer_class, *, prefetch=False, **kwargs):
        nn.Module.__init__(self)
        self.module, self.prefetch = module, False
        self.n, self.r = dist.get_world_size(), dist.get_rank()
        self.units = list(module.children())
        self.shapes = [[(name, p.shape) for name, p in u.named_parameters()] for u in self.units]
        self.sizes = [sum(math.prod(shape) for _, shape in s) for s in self.shapes]
        self.s = [math.ceil(k / self.n) for k in self.sizes]
        shards, self.fulls = [], []
        for i, unit in enumerate(self.units):
            flat = self.flat(i, [p.detach() for p in unit.parameters()])
            shards.append(nn.Parameter(flat[self.mine(i)].clone()))
            self.fulls.append(flat.new_empty(self.s[i] * self.n))
            self.release(i)
            for p in unit.parameters():
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.shards = nn.ParameterList(shards)
        self.optim = optimizer_class(list(self.shards), **kwargs)
        self.handles = {}

    def views(self, i, full):
        views, offset = {}, 0
        for name, shape in self.shapes[i]:
            k = math.prod(shape)
            views[name] = full[offset:offset + k].view(shape)
            offset += k
        return views

    def forward(self, x):
        for i, unit in enumerate(self.units):
            full = _Gather.apply(self.shards[i], self, i)
            x = torch.func.functional_call(unit, self.views(i, full), (x,))
            self.release(i)
            x = _Regather.apply(x, self, i)
        return x

    @torch.no_grad()
    def step(self):
        for shard in self.shards:
            shard.grad.div_(self.n)
        self.optim.step()

    def zero_grad(self, set_to_none=True):
        self.optim.zero_grad(set_to_none=True)

    @torch.no_grad()
    def full_state_dict(self):
        out = {}
        for i, unit in enumerate(self.units):
            full = self.shards[i].new_empty(self.s[i] * self.n).detach()
            all_gather_into_tensor(full, self.shards[i].detach())
            for name, view in self.views(i, full).items():
                out[f"{i}.{name}"] = view.clone()
        return out
