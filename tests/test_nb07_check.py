"""labkit.check for notebook 07: zero2 and its prediction.

Valid designs pass: each bucket padded and split N ways with synchronous reduce-scatters, the same
with async_op=True (one bucket in flight), ZeRO-1's contiguous shards reduce-scattered bucket by
bucket (torch's list form, uneven pieces), and notebook 01's ring of send/recv. Each planted bug
gets its own hint: ZeRO-1 used as ZeRO-2 (full gradients until step), gradients reduce-scattered
during backward but never freed, all-reduce keeping the full gradients, every async bucket kept
until step(), all-reduced buckets, the bucket size ignored, an uneven partition, no division by N,
the all-gather forgotten, a .grad read after it was freed (a crash). The memory bound holds for
the valid designs on many runs, with room; the tolerance holds on the deep models.
"""
import math
import tempfile

import pytest
import torch
import torch.distributed as dist

import labkit
from labkit.check import _sharded, hint, nb07_zero2
from labkit.check.nb07_zero2 import zero2, zero2_state_bytes
from labkit.compat import all_gather_into_tensor, reduce_scatter_tensor
from sharded_solutions import WAIT, ring_all_gather, ring_reduce_scatter


def buckets_of(params, bucket_bytes):
    """Reverse order, at most bucket_bytes, a larger parameter alone."""
    out, current, size = [], [], 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if current and size + nbytes > bucket_bytes:
            out.append(current)
            current, size = [], 0
        current.append(p)
        size += nbytes
    return out + ([current] if current else [])


# --- valid solutions ------------------------------------------------------------------------------

class ZeRO2:
    """Each bucket padded to a multiple of N and split N ways; rank r owns slice r of every
    bucket, its shard is those slices end to end. Synchronous reduce-scatters from the hooks."""
    ASYNC = False

    def __init__(self, params, optimizer_class, bucket_bytes=2**20, **kwargs):
        self.params = list(params)
        self.n, self.r = dist.get_world_size(), dist.get_rank()
        self.buckets = buckets_of(self.params, bucket_bytes)
        self.bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b}
        self.sizes = [sum(p.numel() for p in b) for b in self.buckets]
        self.slices = [self.slice_size(k) for k in self.sizes]
        self.offsets = [sum(self.slices[:i]) for i in range(len(self.slices))]
        with torch.no_grad():
            mine = [self.flat(i, [p.detach() for p in b])[self.mine(i)]
                    for i, b in enumerate(self.buckets)]
        self.shard = torch.nn.Parameter(torch.cat(mine))
        self.grad_shard = torch.zeros_like(self.shard.detach())
        self.optim = self.make_optimizer(optimizer_class, kwargs)
        self.arrived = [0] * len(self.buckets)
        self.pending = []
        for p in self.params:
            p.register_post_accumulate_grad_hook(self.hook)

    def make_optimizer(self, optimizer_class, kwargs):
        return optimizer_class([self.shard], **kwargs)

    def set_grads(self):
        self.shard.grad = self.average()

    def slice_size(self, k):
        return math.ceil(k / self.n)

    def mine(self, i):
        return slice(self.r * self.slices[i], (self.r + 1) * self.slices[i])

    def flat(self, i, tensors):
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return torch.cat([flat, flat.new_zeros(self.slices[i] * self.n - self.sizes[i])])

    def hook(self, p):
        i = self.bucket_of[p]
        self.arrived[i] += 1
        if self.arrived[i] == len(self.buckets[i]):
            self.reduce(i)

    def out(self, i):
        return self.grad_shard[self.offsets[i]:self.offsets[i] + self.slices[i]]

    def reduce(self, i):
        flat = self.flat(i, [q.grad for q in self.buckets[i]])
        if self.ASYNC:
            handle = reduce_scatter_tensor(self.out(i), flat, async_op=True)
            for h, _ in self.pending:           # one in flight: the previous one is done
                h.wait(timeout=WAIT)
            self.pending = [(handle, flat)]
        else:
            reduce_scatter_tensor(self.out(i), flat)
        self.free(i)

    def free(self, i):
        for q in self.buckets[i]:
            q.grad = None

    def average(self):
        return self.grad_shard / self.n

    @torch.no_grad()
    def gather(self, i):
        full = self.shard.new_empty(self.slices[i] * self.n).detach()
        all_gather_into_tensor(full, self.shard[self.offsets[i]:
                                                self.offsets[i] + self.slices[i]].detach())
        return full

    @torch.no_grad()
    def step(self):
        for h, _ in self.pending:
            h.wait(timeout=WAIT)
        self.pending = []
        self.set_grads()
        self.optim.step()
        for i, bucket in enumerate(self.buckets):
            full, offset = self.gather(i), 0
            for p in bucket:
                p.copy_(full[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        self.arrived = [0] * len(self.buckets)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None
        self.shard.grad = None


class ZeRO2Async(ZeRO2):
    """async_op=True with one bucket in flight; the optimizer over one shard tensor per bucket
    (views into the shard), as the notebook's own solution has it."""
    ASYNC = True

    def make_optimizer(self, optimizer_class, kwargs):
        self.pieces = [torch.nn.Parameter(self.shard.detach()[o:o + k])
                       for o, k in zip(self.offsets, self.slices)]
        return optimizer_class(self.pieces, **kwargs)

    def set_grads(self):
        mean = self.average()
        for piece, o, k in zip(self.pieces, self.offsets, self.slices):
            piece.grad = mean[o:o + k]

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)
        for piece in self.pieces:
            piece.grad = None


class ZeRO2Ring(ZeRO2):
    """Notebook 01's ring, bucket by bucket."""

    def reduce(self, i):
        flat = self.flat(i, [q.grad for q in self.buckets[i]])
        ring_reduce_scatter(flat)
        self.out(i).copy_(flat[self.mine(i)])
        self.free(i)

    @torch.no_grad()
    def gather(self, i):
        full = self.shard.new_zeros(self.slices[i] * self.n).detach()
        full[self.mine(i)] = self.shard[self.offsets[i]:self.offsets[i] + self.slices[i]]
        ring_all_gather(full)
        return full


class ZeRO2Contiguous:
    """ZeRO-1's layout (rank r owns elements r·s to (r+1)·s - 1 of the padded flat vector); each
    bucket, a contiguous range of it, is reduce-scattered in uneven pieces (torch's list form),
    each rank receiving the part of the bucket inside its shard; one all-gather in step()."""

    def __init__(self, params, optimizer_class, bucket_bytes=2**20, **kwargs):
        self.params = list(params)
        self.n, self.r = dist.get_world_size(), dist.get_rank()
        self.num = sum(p.numel() for p in self.params)
        self.s = math.ceil(self.num / self.n)
        starts, offset = {}, 0
        for p in self.params:
            starts[p], offset = offset, offset + p.numel()
        self.buckets = [list(reversed(b)) for b in buckets_of(self.params, bucket_bytes)]
        self.ranges = [(starts[b[0]], starts[b[-1]] + b[-1].numel()) for b in self.buckets]
        self.bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b}
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        flat = torch.cat([flat, flat.new_zeros(self.s * self.n - self.num)])
        self.shard = torch.nn.Parameter(flat[self.r * self.s:(self.r + 1) * self.s].clone())
        self.grad_shard = torch.zeros(self.s, dtype=flat.dtype)
        self.optim = optimizer_class([self.shard], **kwargs)
        self.arrived = [0] * len(self.buckets)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self.hook)

    def hook(self, p):
        i = self.bucket_of[p]
        self.arrived[i] += 1
        if self.arrived[i] < len(self.buckets[i]):
            return
        a, b = self.ranges[i]
        flat = torch.cat([q.grad.reshape(-1) for q in self.buckets[i]])
        pieces = []
        for q in range(self.n):
            lo, hi = max(a, q * self.s), min(b, (q + 1) * self.s)
            pieces.append(flat[max(lo, a) - a:max(hi, lo) - a])
        lo, hi = max(a, self.r * self.s), min(b, (self.r + 1) * self.s)
        out = self.grad_shard[max(lo, self.r * self.s) - self.r * self.s:
                              max(hi, lo) - self.r * self.s]
        dist.reduce_scatter(out, pieces)
        for q in self.buckets[i]:
            q.grad = None

    @torch.no_grad()
    def step(self):
        self.shard.grad = self.grad_shard / self.n
        self.optim.step()
        full = self.shard.new_empty(self.s * self.n).detach()
        dist.all_gather_single(full, self.shard.detach())
        offset = 0
        for p in self.params:
            p.copy_(full[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.arrived = [0] * len(self.buckets)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None
        self.grad_shard.zero_()     # the reduce-scatters write into it; the next step starts clean
        self.shard.grad = None


# --- planted bugs ---------------------------------------------------------------------------------

class ZeRO1AsZeRO2:
    """ZeRO-1: the full gradients live until step(), one reduce-scatter there."""

    def __init__(self, params, optimizer_class, bucket_bytes=2**20, **kwargs):
        self.params = list(params)
        self.n, self.r = dist.get_world_size(), dist.get_rank()
        self.num = sum(p.numel() for p in self.params)
        self.s = math.ceil(self.num / self.n)
        flat = self.flat([p.detach() for p in self.params])
        self.shard = torch.nn.Parameter(flat[self.r * self.s:(self.r + 1) * self.s].clone())
        self.optim = optimizer_class([self.shard], **kwargs)

    def flat(self, tensors):
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return torch.cat([flat, flat.new_zeros(self.s * self.n - self.num)])

    def reduce(self):
        mine = self.shard.new_empty(self.s).detach()
        reduce_scatter_tensor(mine, self.flat([p.grad for p in self.params]))
        return mine

    @torch.no_grad()
    def step(self):
        self.shard.grad = self.reduce() / self.n
        self.optim.step()
        full = self.shard.new_empty(self.s * self.n).detach()
        all_gather_into_tensor(full, self.shard.detach())
        offset = 0
        for p in self.params:
            p.copy_(full[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


class AllReduceKeepsFull(ZeRO1AsZeRO2):
    """Every gradient all-reduced from its hook and kept whole until step()."""

    def __init__(self, params, optimizer_class, bucket_bytes=2**20, **kwargs):
        super().__init__(params, optimizer_class, **kwargs)
        for p in self.params:
            p.register_post_accumulate_grad_hook(lambda p: dist.all_reduce(p.grad))

    def reduce(self):
        return self.flat([p.grad for p in self.params])[self.r * self.s:(self.r + 1) * self.s]


class NeverFreed(ZeRO2):
    def free(self, i):
        pass


class AsyncKeepsAll(ZeRO2):
    """async_op=True, every bucket kept until step() waits."""

    def reduce(self, i):
        flat = self.flat(i, [q.grad for q in self.buckets[i]])
        self.pending.append((reduce_scatter_tensor(self.out(i), flat, async_op=True), flat))
        self.free(i)


class AllReducedBuckets(ZeRO2):
    def reduce(self, i):
        flat = self.flat(i, [q.grad for q in self.buckets[i]])
        dist.all_reduce(flat)
        self.out(i).copy_(flat[self.mine(i)])
        self.free(i)


class IgnoresBucketBytes(ZeRO2):
    def __init__(self, params, optimizer_class, bucket_bytes=2**20, **kwargs):
        super().__init__(params, optimizer_class, bucket_bytes=2**30, **kwargs)


class UnevenRing(ZeRO2Ring):
    """Buckets not padded: the ring cuts each into torch.tensor_split's unequal chunks."""

    def chunks(self, k):
        return [len(c) for c in torch.tensor_split(torch.empty(k), self.n)]

    def slice_size(self, k):
        return self.chunks(k)[self.r]

    def mine(self, i):
        start = sum(self.chunks(self.sizes[i])[:self.r])
        return slice(start, start + self.slices[i])

    def flat(self, i, tensors):
        return torch.cat([t.reshape(-1) for t in tensors])

    @torch.no_grad()
    def gather(self, i):
        full = self.shard.new_zeros(self.sizes[i]).detach()
        full[self.mine(i)] = self.shard[self.offsets[i]:self.offsets[i] + self.slices[i]]
        ring_all_gather(full)
        return full


class KeepsShardGrad(ZeRO2):
    """ZeRO-1's zero_grad: the shard's .grad (grad_shard / N, a tensor of its own) survives."""

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


class NoDivision(ZeRO2):
    def average(self):
        return self.grad_shard.clone()


class NoAllGather(ZeRO2):
    @torch.no_grad()
    def gather(self, i):
        full = self.flat(i, [p.detach() for p in self.buckets[i]])
        full[self.mine(i)] = self.shard[self.offsets[i]:self.offsets[i] + self.slices[i]]
        return full


class ReadsFreedGrad(ZeRO2):
    def step(self):
        assert self.params[0].grad.shape is not None
        super().step()


class Stub:
    def __init__(self, params, optimizer_class, bucket_bytes=2**20, **kwargs):
        raise NotImplementedError()


class StubHook(ZeRO2):
    """A finished constructor, the hook still the notebook's stub (it raises inside backward)."""

    def hook(self, p):
        raise NotImplementedError()


@pytest.mark.parametrize("cls", [ZeRO2, ZeRO2Async, ZeRO2Contiguous, ZeRO2Ring])
def test_valid_solutions_pass(cls):
    result = zero2(cls)
    assert result.passed, result.hint


@pytest.mark.parametrize("cls, hint_text", [
    (ZeRO1AsZeRO2, "keeping them until step() is ZeRO-1's memory"),
    (NeverFreed, "but the .grad tensors were never freed"),
    (AllReduceKeepsFull, "and all-reducing them"),
    (AsyncKeepsAll, "keeps its input bucket alive until it is waited for"),
    (AllReducedBuckets, "ran an all-reduce"),
    (IgnoresBucketBytes, "more than a bucket"),
    (UnevenRing, "Pad each bucket to a multiple of N"),
    (KeepsShardGrad, "the shard's .grad from the step before"),
    (NoDivision, "times too large"),
    (NoAllGather, "no all-gather"),
    (ReadsFreedGrad, ".grad was None"),
])
def test_each_planted_bug_gets_its_hint(cls, hint_text):
    result = zero2(cls)
    assert not result.passed and hint_text in result.hint, result.hint


def test_a_stub_is_not_implemented_and_hints_are_registered():
    assert zero2(Stub).status == "not implemented"
    assert zero2(StubHook).status == "not implemented"
    for name in ("zero2", "zero2_state_bytes"):
        assert "hint 1 of" in hint(name, 1)


# --- the memory bound and the tolerance ------------------------------------------------------------

def _peaks(cls, n, widths, repeats):
    """Backward peaks over the bound, per rank and run, for both bucket sizes, in one launch."""
    generator = torch.Generator().manual_seed(7)
    jobs = [_sharded.fresh_run(widths, n, torch.float32, "SGD", generator, bucket_bytes=cap * 4)
            for cap in (nb07_zero2.LAYER, nb07_zero2.BELOW_A_WEIGHT) for _ in range(repeats)]
    with tempfile.TemporaryDirectory() as folder:
        per_rank = labkit.launch(_sharded.train_on_rank, n, args=(cls, jobs, folder, "ZeRO2"),
                                 timeout=120, quiet=True)
    out = []
    for i, run in enumerate(jobs):
        for result in (per_rank[r][i] for r in range(n)):
            k = nb07_zero2._step_shape([ledgers for _, ledgers in _sharded.counted(result)], n,
                                       _sharded.numel(widths), 4)[0]
            _, allowed, _ = nb07_zero2._limits(run, n, k)
            out.append(_sharded.measured(result)["backward_peak"] / allowed)
    return out


@pytest.mark.parametrize("n, widths", [(2, _sharded.DEEP), (4, _sharded.MID)])
def test_the_memory_bound_leaves_room_for_valid_designs_and_none_for_full_gradients(n, widths):
    for cls in (ZeRO2, ZeRO2Async):
        ratios = _peaks(cls, n, widths, repeats=2)
        assert max(ratios) < 0.95, (cls.__name__, ratios)
    assert min(_peaks(ZeRO1AsZeRO2, n, widths, repeats=1)) > 1.1


def simulated(run):
    """The N ranks' arithmetic in one process (as in tests/test_nb06_check.py)."""
    n, num = run.world_size, _sharded.numel(run.widths)
    model = _sharded.make(run.widths, run.dtype)
    model.load_state_dict(run.init)
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    optimizer = getattr(torch.optim, run.optimizer)([flat], **run.options)
    for x, y in run.batches:
        total = torch.zeros(num, dtype=run.dtype)
        for rank in range(n):
            model.zero_grad(set_to_none=True)
            model.loss(model(x[rank::n]), y[rank::n]).backward()
            total += torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        flat.grad = total / n
        optimizer.step()
        with torch.no_grad():
            offset = 0
            for p in model.parameters():
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
    return {k: p.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_tolerance_holds_on_the_deep_models(dtype):
    generator = torch.Generator().manual_seed(8)
    worst = 0.0
    for _ in range(8):
        for widths, n in ((_sharded.DEEP, 2), (_sharded.MID, 4)):
            for optimizer in ("SGD", "Adam"):
                run = _sharded.fresh_run(widths, n, dtype, optimizer, generator)
                worst = max(worst, _sharded.max_difference(simulated(run),
                                                           _sharded.reference(run)))
    assert worst < _sharded.tolerance(dtype) / 20, worst


def test_autograd_temporaries_are_what_the_docstring_says():
    for widths in (_sharded.DEEP, _sharded.MID):
        assert _sharded.autograd_temporaries(widths, torch.float32) == 131 * 4


# --- prediction ------------------------------------------------------------------------------------

def right_state_bytes(num_params, world_size, param_bytes, grad_bytes, state_bytes):
    return param_bytes * num_params + (grad_bytes + state_bytes) * -(-num_params // world_size)


def test_the_prediction_passes_and_then_the_check_shows_the_measured_bytes():
    assert zero2_state_bytes(right_state_bytes).passed
    result = zero2(ZeRO2Contiguous)
    assert result.passed and "gradient memory peaked at" in result.summary, result.summary


@pytest.mark.parametrize("fn, hint_text", [
    (lambda p, n, pb, gb, sb: (pb + gb) * p + sb * -(-p // n), "that is ZeRO-1"),
    (lambda p, n, pb, gb, sb: (pb + gb + sb) * -(-p // n), "(ZeRO-3)"),
    (lambda p, n, pb, gb, sb: (pb + gb + sb) * p, "that is DDP"),
    (lambda p, n, pb, gb, sb: pb * p + (gb + sb) * p / n, "rounded UP"),
])
def test_each_prediction_mistake_gets_its_hint(fn, hint_text):
    result = zero2_state_bytes(fn)
    assert not result.passed and hint_text in result.hint, result.hint
