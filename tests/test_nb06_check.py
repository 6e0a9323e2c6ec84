"""labkit.check for notebook 06: zero1 and the two predictions.

Valid designs pass: a plain class or a torch.optim.Optimizer subclass; labkit.compat's collectives,
torch 2.13's reduce_scatter_single/all_gather_single, or a ring of send/recv from notebook 01; the
shard a fresh tensor or a view into a persistent flat buffer the parameters also live in; a
broadcast at construction or none. Each planted bug gets its own hint: an uneven partition, no
padding (a crash, or a tail cut off), an all-reduce, the wrong shard stepped, optimizer state for
every parameter (as self.optim, or hidden beside it), no division by N, the all-gather forgotten
or never written back, zero_grad that clears nothing, a crash, a hang. The tolerance that
``_sharded`` derives holds with a wide margin on many fresh runs.
"""
import math

import pytest
import torch
import torch.distributed as dist

from labkit.check import _sharded, hint, nb06_zero1
from labkit.check.nb06_zero1 import zero1, zero1_optimizer_bytes, zero1_wire_bytes
from labkit.compat import all_gather_into_tensor, reduce_scatter_tensor
from sharded_solutions import ring_all_gather, ring_reduce_scatter


# --- valid solutions ------------------------------------------------------------------------------

class ZeRO1:
    """A plain class, labkit.compat's collectives, the shard a fresh tensor, buffers per step."""

    def __init__(self, params, optimizer_class, **kwargs):
        self.params = list(params)
        self.n, self.r = dist.get_world_size(), dist.get_rank()
        self.num = sum(p.numel() for p in self.params)
        self.s = self.shard_size()
        flat = self.flat([p.detach() for p in self.params])
        self.shard = torch.nn.Parameter(flat[self.r * self.s:(self.r + 1) * self.s].clone())
        self.optim = self.make_optimizer(optimizer_class, kwargs)

    def shard_size(self):
        return math.ceil(self.num / self.n)

    def make_optimizer(self, optimizer_class, kwargs):
        return optimizer_class([self.shard], **kwargs)

    def flat(self, tensors):
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return torch.cat([flat, flat.new_zeros(self.s * self.n - self.num)])

    def reduce_scatter(self):
        mine = self.shard.new_empty(self.s).detach()
        reduce_scatter_tensor(mine, self.flat([p.grad for p in self.params]))
        return mine

    def average(self, mine):
        return mine / self.n

    @torch.no_grad()
    def write_back(self, full):
        offset = 0
        for p in self.params:
            p.copy_(full[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    @torch.no_grad()
    def all_gather(self):
        full = self.shard.new_empty(self.s * self.n).detach()
        all_gather_into_tensor(full, self.shard.detach())
        self.write_back(full)

    def step(self):
        self.shard.grad = self.average(self.reduce_scatter())
        self.optim.step()
        self.all_gather()

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


class ZeRO1Views(torch.optim.Optimizer):
    """An Optimizer subclass: the parameters become views into one persistent padded flat
    buffer, the shard is a view of it too; a broadcast at construction; torch 2.13's names."""

    def __init__(self, params, optimizer_class, **kwargs):
        params = list(params)
        super().__init__(params, {})
        self.model_params = params
        n, r = dist.get_world_size(), dist.get_rank()
        self.s = math.ceil(sum(p.numel() for p in params) / n)
        self.buffer = torch.zeros(self.s * n, dtype=params[0].dtype)
        self.grads = torch.zeros_like(self.buffer)
        offset = 0
        for p in params:
            self.buffer[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
            p.data = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        dist.broadcast(self.buffer, src=0)
        self.mine = torch.nn.Parameter(self.buffer[r * self.s:(r + 1) * self.s])
        self.optim = optimizer_class([self.mine], **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        offset = 0
        for p in self.model_params:
            self.grads[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
            offset += p.numel()
        grad = torch.empty_like(self.mine)
        dist.reduce_scatter_single(grad, self.grads)
        self.mine.grad = grad.div_(dist.get_world_size())
        self.optim.step()
        dist.all_gather_single(self.buffer, self.mine.detach().clone())

    def zero_grad(self, set_to_none=True):
        for p in self.model_params:
            p.grad = None


class ZeRO1Ring(ZeRO1):
    """Notebook 01's ring instead of torch's collectives."""

    def reduce_scatter(self):
        flat = self.flat([p.grad for p in self.params])
        ring_reduce_scatter(flat)
        return torch.tensor_split(flat, self.n)[self.r].clone()

    @torch.no_grad()
    def all_gather(self):
        full = self.shard.new_zeros(self.s * self.n).detach()
        torch.tensor_split(full, self.n)[self.r].copy_(self.shard)
        ring_all_gather(full)
        self.write_back(full)


# --- planted bugs ---------------------------------------------------------------------------------

class UnevenRing(ZeRO1Ring):
    """No padding: the ring runs on tensor_split chunks of the bare flat vector."""

    def shard_size(self):
        return None

    def flat(self, tensors):
        return torch.cat([t.reshape(-1) for t in tensors])

    def __init__(self, params, optimizer_class, **kwargs):
        self.params = list(params)
        self.n, self.r = dist.get_world_size(), dist.get_rank()
        self.num = sum(p.numel() for p in self.params)
        flat = self.flat([p.detach() for p in self.params])
        self.shard = torch.nn.Parameter(torch.tensor_split(flat, self.n)[self.r].clone())
        self.optim = optimizer_class([self.shard], **kwargs)

    @torch.no_grad()
    def all_gather(self):
        full = self.shard.new_zeros(self.num).detach()
        torch.tensor_split(full, self.n)[self.r].copy_(self.shard)
        ring_all_gather(full)
        self.write_back(full)


class NoPadding(ZeRO1):
    """Shards of ceil(num / N), but the flat gradient is not padded: torch refuses."""

    def flat(self, tensors):
        return torch.cat([t.reshape(-1) for t in tensors])

    def __init__(self, params, optimizer_class, **kwargs):
        self.params = list(params)
        self.n, self.r = dist.get_world_size(), dist.get_rank()
        self.num = sum(p.numel() for p in self.params)
        self.s = math.ceil(self.num / self.n)
        flat = self.flat([p.detach() for p in self.params])
        self.shard = torch.nn.Parameter(flat[self.r * self.s:(self.r + 1) * self.s].clone())
        self.optim = optimizer_class([self.shard], **kwargs)


class Truncated(ZeRO1):
    """Shards of num // N: the last num % N elements belong to nobody."""

    def shard_size(self):
        return self.num // self.n

    def flat(self, tensors):
        return torch.cat([t.reshape(-1) for t in tensors])[:self.s * self.n]

    @torch.no_grad()
    def write_back(self, full):
        full = torch.cat([full, torch.cat([p.reshape(-1) for p in self.params])[full.numel():]])
        super().write_back(full)


class AllReduce(ZeRO1):
    def reduce_scatter(self):
        flat = self.flat([p.grad for p in self.params])
        dist.all_reduce(flat)
        return flat[self.r * self.s:(self.r + 1) * self.s].clone()


class WrongShard(ZeRO1):
    """The optimizer owns the parameters of the next shard but gets this rank's gradient."""

    def __init__(self, params, optimizer_class, **kwargs):
        super().__init__(params, optimizer_class, **kwargs)
        flat = self.flat([p.detach() for p in self.params])
        k = (self.r + 1) % self.n
        with torch.no_grad():
            self.shard.copy_(flat[k * self.s:(k + 1) * self.s])


class FullOptimizer(ZeRO1):
    """self.optim over every parameter: the averaged gradient shards are all-gathered back into
    every .grad (right values, right ledger, the whole optimizer state on every rank)."""

    def make_optimizer(self, optimizer_class, kwargs):
        return optimizer_class(self.params, **kwargs)

    @torch.no_grad()
    def step(self):
        mine = self.average(self.reduce_scatter())
        full = mine.new_empty(self.s * self.n)
        all_gather_into_tensor(full, mine)
        offset = 0
        for p in self.params:
            p.grad.copy_(full[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.optim.step()


class HiddenOptimizer(FullOptimizer):
    """self.optim is the shard's, as it should be, but a second optimizer over every parameter
    does the work."""

    def make_optimizer(self, optimizer_class, kwargs):
        self.hidden = optimizer_class(self.params, **kwargs)
        return optimizer_class([self.shard], **kwargs)

    @torch.no_grad()
    def step(self):
        mine = self.average(self.reduce_scatter())
        self.shard.grad = mine
        self.optim.step()
        full = mine.new_empty(self.s * self.n)
        all_gather_into_tensor(full, mine)
        offset = 0
        for p in self.params:
            p.grad.copy_(full[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.hidden.step()


class NoDivision(ZeRO1):
    def average(self, mine):
        return mine


class NoAllGather(ZeRO1):
    """Writes its own shard back, never gathers the others'."""

    @torch.no_grad()
    def all_gather(self):
        full = self.flat([p.detach() for p in self.params])
        full[self.r * self.s:(self.r + 1) * self.s] = self.shard.detach()
        self.write_back(full)


class NotWrittenBack(ZeRO1):
    """Gathers every shard, but into a buffer the parameters never see."""

    @torch.no_grad()
    def all_gather(self):
        self.full = self.shard.new_empty(self.s * self.n).detach()
        all_gather_into_tensor(self.full, self.shard.detach())


class KeepsGrads(ZeRO1):
    def zero_grad(self, set_to_none=True):
        pass


class Crashes(ZeRO1):
    def step(self):
        if dist.get_rank() == 1:
            raise RuntimeError("planted")
        super().step()


class Hangs(ZeRO1):
    def step(self):
        if dist.get_rank() == 1:
            dist.recv(torch.zeros(1), 0)
        super().step()


class Stub:
    def __init__(self, params, optimizer_class, **kwargs):
        raise NotImplementedError()


@pytest.mark.parametrize("cls", [ZeRO1, ZeRO1Views, ZeRO1Ring])
def test_valid_solutions_pass(cls):
    result = zero1(cls)
    assert result.passed, result.hint


@pytest.mark.parametrize("cls, hint_text", [
    (UnevenRing, "unequal shards"),
    (NoPadding, "the input must be exactly N shards"),
    (Truncated, "leave the last"),
    (AllReduce, "ran an all-reduce"),
    (WrongShard, "parameters stepped with its own gradient"),
    (FullOptimizer, "bytes of optimizer state; one shard's is"),
    (HiddenOptimizer, "over 1 tensor (81 elements) and SGD over 4 tensors"),
    (NoDivision, "times too large"),
    (NoAllGather, "a reduce-scatter but no all-gather"),
    (NotWrittenBack, "were still the initial ones"),
    (KeepsGrads, "still had gradients after zero_grad"),
    (Crashes, "raised RuntimeError on rank 1"),
])
def test_each_planted_bug_gets_its_hint(cls, hint_text):
    result = zero1(cls)
    assert not result.passed and hint_text in result.hint, result.hint


def test_a_hang_becomes_a_hint_placed_in_its_step_and_a_stub_is_not_implemented():
    result = zero1(Hangs, timeout=3)
    assert not result.passed and "with the MLP 7-12-5" in result.hint \
        and "step 0: in step()" in result.hint, result.hint
    assert zero1(Stub).status == "not implemented"
    assert "pass your function itself" in zero1(3).hint


def test_hints_are_registered():
    for name in ("zero1", "zero1_optimizer_bytes", "zero1_wire_bytes"):
        assert "hint 1 of" in hint(name, 1)


# --- the tolerance ---------------------------------------------------------------------------------

def simulated(run):
    """N ranks' arithmetic in one process: each rank's mean gradient, flat and padded, summed in
    rank order, divided by N, and one optimizer over the padded flat vector (element-wise, what
    the N shard optimizers compute together)."""
    n, num = run.world_size, _sharded.numel(run.widths)
    model = _sharded.make(run.widths, run.dtype)
    model.load_state_dict(run.init)
    pad = _sharded.padded(num, n) - num
    flat = torch.nn.Parameter(torch.cat([torch.cat([p.detach().reshape(-1)
                                                    for p in model.parameters()]),
                                         torch.zeros(pad, dtype=run.dtype)]))
    optimizer = getattr(torch.optim, run.optimizer)([flat], **run.options)
    for x, y in run.batches:
        total = torch.zeros_like(flat)
        for rank in range(n):
            model.zero_grad(set_to_none=True)
            model.loss(model(x[rank::n]), y[rank::n]).backward()
            total += torch.cat([torch.cat([p.grad.reshape(-1) for p in model.parameters()]),
                                torch.zeros(pad, dtype=run.dtype)])
        flat.grad = total / n
        optimizer.step()
        with torch.no_grad():
            offset = 0
            for p in model.parameters():
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
    return {k: p.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_tolerance_holds_with_a_wide_margin(dtype):
    generator = torch.Generator().manual_seed(6)
    worst = 0.0
    for _ in range(25):
        for widths in (_sharded.SMALL, _sharded.THREE):
            for optimizer in ("SGD", "Adam"):
                for n in (2, 4):
                    run = _sharded.fresh_run(widths, n, dtype, optimizer, generator)
                    worst = max(worst, _sharded.max_difference(simulated(run),
                                                               _sharded.reference(run)))
    assert worst < _sharded.tolerance(dtype) / 20, worst


def test_state_bytes_are_torchs():
    assert _sharded.state_bytes("SGD", _sharded.OPTIMIZERS["SGD"], 81, torch.float32) == 324
    # exp_avg and exp_avg_sq, and the step: a float32 scalar
    assert _sharded.state_bytes("Adam", _sharded.OPTIMIZERS["Adam"], 81, torch.float64) == \
        2 * 81 * 8 + 4


# --- predictions -----------------------------------------------------------------------------------

def right_optimizer_bytes(num_params, world_size, state_bytes_per_param):
    return -(-num_params // world_size) * state_bytes_per_param


def right_wire_bytes(num_params, world_size, elem_bytes):
    padded = -(-num_params // world_size) * world_size
    return 2 * (world_size - 1) / world_size * padded * elem_bytes


def test_the_predictions_pass_and_then_the_check_shows_the_measured_bytes():
    assert zero1_optimizer_bytes(right_optimizer_bytes).passed
    assert zero1_wire_bytes(right_wire_bytes).passed
    result = zero1(ZeRO1Views)
    assert result.passed and "bytes of optimizer state per rank" in result.summary, result.summary


@pytest.mark.parametrize("check, fn, hint_text", [
    (zero1_optimizer_bytes, lambda p, n, b: p / n * b, "rounded UP"),
    (zero1_optimizer_bytes, lambda p, n, b: p * b, "whole model's optimizer state"),
    (zero1_optimizer_bytes, lambda p, n, b: -(-p // n), "that counts elements"),
    (zero1_wire_bytes, lambda p, n, b: 2 * (n - 1) / n * p * b, "leaves out the padding"),
    (zero1_wire_bytes, lambda p, n, b: 4 * (n - 1) / n * -(-p // n) * n * b,
     "an all-reduce's factor"),
    (zero1_wire_bytes, lambda p, n, b: 2 * -(-p // n) * n * b, "that is the payload"),
    (zero1_wire_bytes, lambda p, n, b: (n - 1) / n * -(-p // n) * n * b, "that is one collective"),
    (zero1_wire_bytes, lambda p, n, b: 2 * (n - 1) / n * -(-p // n) * n, "counts elements"),
])
def test_each_prediction_mistake_gets_its_hint(check, fn, hint_text):
    result = check(fn)
    assert not result.passed and hint_text in result.hint, result.hint


def test_the_reference_formulas():
    assert nb06_zero1.reference_optimizer_bytes(161, 4, 8) == 41 * 8
    assert nb06_zero1.reference_wire_bytes(161, 4, 4) == 2 * 3 / 4 * 164 * 4
    assert nb06_zero1.reference_wire_bytes(7, 1, 4) == 0
