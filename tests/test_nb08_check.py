"""labkit.check for notebook 08: zero3, zero3_prefetch and the prediction.

Valid designs pass (tests/sharded_solutions.py): one flat storage per unit freed with
untyped_storage().resize_(0) and gathered back into it from a full backward pre-hook, with
synchronous reduce-scatters or async ones waited in step() with the last unit kept gathered from
forward to backward, notebook 01's ring, and an autograd.Function design with
torch.func.functional_call; each with and without prefetch where it has one. Each planted bug gets
its own hint.
"""
import tempfile

import pytest
import torch
import torch.distributed as dist

import labkit
from labkit.check import _sharded, hint, nb08_zero3
from labkit.check.nb08_zero3 import zero3, zero3_bytes_per_step, zero3_prefetch
from sharded_solutions import ZeRO3, ZeRO3AsyncKeepLast, ZeRO3Function, ZeRO3Ring


# --- planted bugs ---------------------------------------------------------------------------------

class NeverFrees(ZeRO3):
    def release(self, i):
        if not hasattr(self, "optim"):      # at construction only
            super().release(i)


class FreesWithData(ZeRO3):
    """p.data = torch.empty(0) to free, a new buffer per gather: autograd's saved views keep
    every gathered unit alive until its backward."""

    def release(self, i):
        for p in self.params[i]:
            p.data = torch.empty(0, dtype=p.dtype)
        self.fulls[i] = None

    def gathered(self, i):
        return self.fulls[i] is not None

    def start_gather(self, i, async_op=False):
        self.fulls[i] = self.bind(i, self.shards[i].new_empty(self.s[i] * self.n).detach())
        return self.all_gather(self.fulls[i], self.shards[i].detach(), async_op)


class KeepsGrads(ZeRO3):
    def free_grads(self, i):
        pass

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)


class AllReduce(ZeRO3):
    def reduce(self, i):
        flat = self.flat(i, [p.grad for p in self.params[i]])
        dist.all_reduce(flat)
        self.shards[i].grad = flat[self.mine(i)].clone()


class NoBackwardGather(ZeRO3):
    def before_backward(self, i):
        pass


class Unpadded(ZeRO3):
    def flat(self, i, tensors):
        return torch.cat([t.reshape(-1) for t in tensors])


class NoDivision(ZeRO3):
    def average(self, grad):
        return grad


class WrongShard(ZeRO3):
    def mine(self, i):
        r = (self.r + 1) % self.n
        return slice(r * self.s[i], (r + 1) * self.s[i])


class FullOptimizer(ZeRO3):
    def make_optimizer(self, optimizer_class, kwargs):
        return optimizer_class(list(self.module.parameters()), **kwargs)


class GathersInStep(ZeRO3):
    """ZeRO-2's habit: all-gathers the updated shards after the step."""

    @torch.no_grad()
    def step(self):
        super().step()
        for i in range(len(self.units)):
            self.start_gather(i)
            self.release(i)


class Crashes(ZeRO3):
    def step(self):
        if self.r == 1:
            raise RuntimeError("boom")
        super().step()


class Stub(torch.nn.Module):
    def __init__(self, module, optimizer_class, *, prefetch=False, **kwargs):
        raise NotImplementedError()


# prefetch
class AlwaysPrefetches(ZeRO3AsyncKeepLast):
    def __init__(self, module, optimizer_class, *, prefetch=False, **kwargs):
        super().__init__(module, optimizer_class, prefetch=True, **kwargs)


class SyncPrefetch(ZeRO3):
    def prefetch_unit(self, i):
        if self.prefetch and 0 <= i < len(self.units) and not self.gathered(i):
            with torch.no_grad():
                self.start_gather(i)


class PrefetchesTwoAhead(ZeRO3):
    def prefetch_unit(self, i):
        super().prefetch_unit(i + 1 if i > self.forward_unit else i)

    def forward(self, x):
        self.forward_unit = -1
        for i, unit in enumerate(self.units):
            self.forward_unit = i
            self.ready(i)
            self.prefetch_unit(i + 1)
            x = unit(x)
            self.release(i)
        self.forward_unit = len(self.units)
        return x


# --- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [ZeRO3, ZeRO3AsyncKeepLast, ZeRO3Ring, ZeRO3Function,
                                 AlwaysPrefetches])
def test_valid_designs_pass(cls):
    result = zero3(cls)
    assert result.passed, result.hint


@pytest.mark.parametrize("cls", [ZeRO3, ZeRO3AsyncKeepLast])
def test_valid_prefetch_passes(cls):
    result = zero3_prefetch(cls)
    assert result.passed, result.hint


@pytest.mark.parametrize("cls, hint_text", [
    (NeverFrees, "units' worth were gathered"),
    (FreesWithData, "p.data = torch.empty(0), the memory stays"),
    (KeepsGrads, "bytes of .grad"),
    (AllReduce, "ran an all-reduce"),
    (NoBackwardGather, "all-gather each unit again before its backward"),
    (Unpadded, "pad the flat vector"),
    (NoDivision, "times too large"),
    (WrongShard, "rank r must keep slice r"),
    (FullOptimizer, "the whole model"),
    (GathersInStep, "step() communicated"),
    (Crashes, "raised RuntimeError on rank 1"),
])
def test_each_planted_bug_gets_its_hint(cls, hint_text):
    result = zero3(cls)
    assert not result.passed and hint_text in result.hint, result.hint


@pytest.mark.parametrize("cls, hint_text", [
    (ZeRO3Function, "issued after unit 0's forward had finished"),
    (SyncPrefetch, "without async_op=True"),
    (PrefetchesTwoAhead, "prefetch the NEXT unit"),
])
def test_each_prefetch_bug_gets_its_hint(cls, hint_text):
    result = zero3_prefetch(cls)
    assert not result.passed and hint_text in result.hint, result.hint


def test_a_stub_is_not_implemented_and_hints_are_registered():
    assert zero3(Stub).status == "not implemented"
    for name in ("zero3", "zero3_prefetch", "zero3_bytes_per_step"):
        assert "hint 1 of" in hint(name, 1)


# --- prediction ------------------------------------------------------------------------------------

def right_bytes(num_params, world_size, elem_bytes):
    padded = -(-num_params // world_size) * world_size
    return 3 * (world_size - 1) / world_size * padded * elem_bytes


def test_the_prediction_passes_and_the_reference():
    assert zero3_bytes_per_step(right_bytes).passed
    assert nb08_zero3.reference_bytes_per_step(165, 4, 4) == 3 * 3 / 4 * 168 * 4
    assert nb08_zero3.reference_bytes_per_step(7, 1, 4) == 0


@pytest.mark.parametrize("fn, hint_text", [
    (lambda p, n, b: 2 * (n - 1) / n * -(-p // n) * n * b, "backward gathers them a second"),
    (lambda p, n, b: 3 * (n - 1) / n * p * b, "leaves out the padding"),
    (lambda p, n, b: 3 * -(-p // n) * n * b, "that is the payload"),
    (lambda p, n, b: (n - 1) / n * -(-p // n) * n * b, "that is one collective"),
    (lambda p, n, b: 4 * (n - 1) / n * -(-p // n) * n * b, "a reduce-scatter is enough"),
])
def test_each_prediction_mistake_gets_its_hint(fn, hint_text):
    result = zero3_bytes_per_step(fn)
    assert not result.passed and hint_text in result.hint, result.hint


class Hangs(ZeRO3):
    """Rank 0 waits in step() for a message nobody sends."""

    @torch.no_grad()
    def step(self):
        super().step()
        if self.r == 0:
            dist.recv(torch.empty(1), src=1)


def test_a_hang_becomes_a_hint_placed_in_its_step():
    result = zero3(Hangs, timeout=4)
    assert not result.passed and "step 0: in step()" in result.hint, result.hint


# --- the memory bounds ------------------------------------------------------------------------------

def _ratios(cls, n, prefetch, repeats=2):
    """Per rank and run: (parameters over the in-flight cap, everything held over its cap)."""
    generator = torch.Generator().manual_seed(11)
    runs = [_sharded.fresh_run(_sharded.UNITS, n, torch.float32, "Adam", generator)
            for _ in range(repeats)]
    with tempfile.TemporaryDirectory() as folder:
        per_rank = labkit.launch(_sharded.train_module_on_rank, n,
                                 args=(cls, runs, folder, "ZeRO3", prefetch), timeout=120,
                                 quiet=True)
    k = 2 if prefetch else 1
    out = []
    for i, run in enumerate(runs):
        sizes = nb08_zero3._Sizes(run, n)
        hidden = _sharded.plain_hidden(run.widths, run.dtype)
        for r in range(n):
            samples = _sharded.measured(per_rank[r][i])["samples"]
            params = max(by["params"] for _, _, by in samples)
            held = max(nb08_zero3._held(by) for _, _, by in samples)
            out.append(((params - sizes.shards) / (k * sizes.unit),
                        (held - sizes.shards - hidden)
                        / ((k + nb08_zero3.GRADIENT_BUFFERS) * sizes.unit)))
    return out


@pytest.mark.parametrize("n, prefetch", [(2, True), (4, False)])
def test_the_memory_bounds_hold_for_valid_designs_and_not_for_leaks(n, prefetch):
    for cls in (ZeRO3, ZeRO3AsyncKeepLast):
        for params, held in _ratios(cls, n, prefetch):
            assert params <= 1.0 and held < 0.8, (cls.__name__, params, held)
    assert min(p for p, _ in _ratios(NeverFrees, n, prefetch, repeats=1)) > 2.5
    assert min(h for _, h in _ratios(FreesWithData, n, prefetch, repeats=1)) > 1.3
