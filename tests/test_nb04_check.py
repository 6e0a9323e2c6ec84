"""labkit.check for notebook 04: accumulation_step, no_sync_ddp, token_accumulation and the three
predictions.

Valid solutions pass (zero_grad before or after the step, set_to_none or not; a no_sync flag on
the instance or the class; the token count all-reduced as a float or an int); each planted bug
gets its own hint: no 1/k, zero_grad inside the loop, no zero_grad between steps, a step per
micro-batch, one backward of the whole batch; a no_sync that still communicates, one that never
restores the flag (skips the last sync too), one that never syncs; the mean of per-micro-batch
means, this rank's token count only, no factor N, no no_sync, a count all-reduce per micro-batch.
"""
import contextlib
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from labkit.check import _hints, nb04_accumulation as nb04
from labkit.check.nb04_accumulation import (accumulation_step, activation_memory_ratio,
                                            model_state_bytes, no_sync_ddp, sync_bytes_per_step,
                                            token_accumulation)

WAIT = datetime.timedelta(seconds=10)


# --- exercise 1 ----------------------------------------------------------------------------------

def step_ok(model, optimizer, micro_batches):
    optimizer.zero_grad()
    for x, y in micro_batches:
        (model.loss(model(x), y) / len(micro_batches)).backward()
    optimizer.step()


def step_zero_after(model, optimizer, micro_batches):
    for x, y in micro_batches:
        loss = model.loss(model(x), y) * (1.0 / len(micro_batches))
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


def step_no_scale(model, optimizer, micro_batches):
    optimizer.zero_grad()
    for x, y in micro_batches:
        model.loss(model(x), y).backward()
    optimizer.step()


def step_zero_inside(model, optimizer, micro_batches):
    for x, y in micro_batches:
        optimizer.zero_grad()
        (model.loss(model(x), y) / len(micro_batches)).backward()
    optimizer.step()


def step_never_zero(model, optimizer, micro_batches):
    for x, y in micro_batches:
        (model.loss(model(x), y) / len(micro_batches)).backward()
    optimizer.step()


def step_each(model, optimizer, micro_batches):
    optimizer.zero_grad()
    for x, y in micro_batches:
        (model.loss(model(x), y) / len(micro_batches)).backward()
        optimizer.step()


def step_one_backward(model, optimizer, micro_batches):
    optimizer.zero_grad()
    sum(model.loss(model(x), y) for x, y in micro_batches).div(len(micro_batches)).backward()
    optimizer.step()


def step_no_step(model, optimizer, micro_batches):
    optimizer.zero_grad()
    for x, y in micro_batches:
        (model.loss(model(x), y) / len(micro_batches)).backward()


def step_stub(model, optimizer, micro_batches):
    raise NotImplementedError()


@pytest.mark.parametrize("fn", [step_ok, step_zero_after])
def test_accumulation_solutions_pass(fn):
    assert accumulation_step(fn).passed


@pytest.mark.parametrize("fn, hint", [
    (step_no_scale, "k times too far"),
    (step_zero_inside, "zero_grad() ran inside the loop"),
    (step_never_zero, "earlier optimizer steps"),
    (step_each, "step ONCE"),
    (step_one_backward, "activations alive"),
    (step_no_step, "never changed"),
])
def test_each_accumulation_bug_gets_its_hint(fn, hint):
    result = accumulation_step(fn)
    assert not result.passed and hint in result.hint, result.hint


def test_accumulation_stub_is_not_implemented():
    assert accumulation_step(step_stub).status == "not implemented"


# --- exercise 2: the notebook's OverlappedDDP, and no_sync on top --------------------------------

class OverlappedDDP(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t, src=0)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.handles, self.launched = [], set()
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _hook(self, p):
        self.launched.add(p)
        self.handles.append(dist.all_reduce(p.grad, async_op=True))

    def finish_gradient_sync(self):
        for p in self.params:
            if p not in self.launched:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.handles.append(dist.all_reduce(p.grad, async_op=True))
        for handle in self.handles:
            handle.wait(timeout=WAIT)
        for p in self.params:
            p.grad /= dist.get_world_size()
        self.handles, self.launched = [], set()


class NoSync(OverlappedDDP):
    require_sync = True

    def _hook(self, p):
        if self.require_sync:
            super()._hook(p)

    @contextlib.contextmanager
    def no_sync(self):
        before, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = before


class NoSyncOnInstance(OverlappedDDP):
    """A valid alternative: a flag set in __init__, a class-based context manager."""

    def __init__(self, module):
        super().__init__(module)
        self.syncing = True

    def _hook(self, p):
        if self.syncing:
            super()._hook(p)

    def no_sync(self):
        return _Pause(self)


class _Pause:
    def __init__(self, ddp):
        self.ddp = ddp

    def __enter__(self):
        self.ddp.syncing = False

    def __exit__(self, *exc):
        self.ddp.syncing = True


class StillCommunicates(OverlappedDDP):
    def no_sync(self):
        return contextlib.nullcontext()


class NeverRestores(NoSync):
    @contextlib.contextmanager
    def no_sync(self):
        self.require_sync = False
        yield


class NeverSyncs(NeverRestores):
    def finish_gradient_sync(self):
        self.handles, self.launched = [], set()


class NotAContext(NoSync):
    def no_sync(self):
        self.require_sync = False


class NoSyncStub(OverlappedDDP):
    def no_sync(self):
        raise NotImplementedError()


@pytest.mark.parametrize("cls", [NoSync, NoSyncOnInstance])
def test_no_sync_solutions_pass(cls):
    result = no_sync_ddp(cls)
    assert result.passed, result.hint
    assert result.figures[f"2 ranks: all-reduces per optimizer step, plain model (k={nb04.K})"] \
        == 4


@pytest.mark.parametrize("cls, hint", [
    (StillCommunicates, "no_sync() still communicates"),
    (NeverRestores, "no all-reduce started during the last micro-batch's backward"),
    (NeverSyncs, "nothing was all-reduced in the last micro-batch either"),
    (NotAContext, "not a context manager"),
])
def test_each_no_sync_bug_gets_its_hint(cls, hint):
    result = no_sync_ddp(cls)
    assert not result.passed and hint in result.hint, result.hint


class HookStub(NoSync):
    """The learner notebook's stub shape: no_sync written, _hook still the stub."""

    def _hook(self, p):
        raise NotImplementedError()


@pytest.mark.parametrize("cls", [NoSyncStub, HookStub])
def test_no_sync_stub_is_not_implemented(cls):
    assert no_sync_ddp(cls).status == "not implemented"


# --- exercise 3: tokens --------------------------------------------------------------------------

def _run(ddp, micro_batches, scale):
    for i, (t, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with (contextlib.nullcontext() if last else ddp.no_sync()):
            scale(F.cross_entropy(ddp(t), y, reduction="sum"), len(t)).backward()


def tokens_ok(ddp, micro_batches):
    total = torch.tensor(float(sum(len(t) for t, _ in micro_batches)))
    dist.all_reduce(total)
    n = dist.get_world_size()
    _run(ddp, micro_batches, lambda s, m: s * n / total)


def tokens_float32_scale(ddp, micro_batches):
    """The notebook's solution: N / T as a float32 tensor, rounded (within TOKEN_TOL)."""
    total = torch.tensor(float(sum(len(t) for t, _ in micro_batches)))
    dist.all_reduce(total)
    scale = dist.get_world_size() / total
    _run(ddp, micro_batches, lambda s, m: s * scale)


def tokens_int_count(ddp, micro_batches):
    total = torch.tensor([sum(len(t) for t, _ in micro_batches)], dtype=torch.long)
    dist.all_reduce(total)
    mean_per_rank = total.item() / dist.get_world_size()
    _run(ddp, micro_batches, lambda s, m: s / mean_per_rank)


def tokens_mean_of_means(ddp, micro_batches):
    _run(ddp, micro_batches, lambda s, m: s / m / len(micro_batches))


def tokens_local(ddp, micro_batches):
    local = sum(len(t) for t, _ in micro_batches)
    _run(ddp, micro_batches, lambda s, m: s / local)


def tokens_no_n(ddp, micro_batches):
    total = torch.tensor(float(sum(len(t) for t, _ in micro_batches)))
    dist.all_reduce(total)
    _run(ddp, micro_batches, lambda s, m: s / total)


def tokens_no_no_sync(ddp, micro_batches):
    total = torch.tensor(float(sum(len(t) for t, _ in micro_batches)))
    dist.all_reduce(total)
    n = dist.get_world_size()
    for t, y in micro_batches:
        (F.cross_entropy(ddp(t), y, reduction="sum") * n / total).backward()


def tokens_count_per_micro(ddp, micro_batches):
    total = 0.0
    for t, _ in micro_batches:
        c = torch.tensor(float(len(t)))
        dist.all_reduce(c)
        total += c.item()
    n = dist.get_world_size()
    _run(ddp, micro_batches, lambda s, m: s * n / total)


def tokens_stub(ddp, micro_batches):
    raise NotImplementedError()


@pytest.mark.parametrize("fn", [tokens_ok, tokens_float32_scale, tokens_int_count])
def test_token_solutions_pass(fn):
    result = token_accumulation(fn)
    assert result.passed, result.hint


@pytest.mark.parametrize("fn, hint", [
    (tokens_mean_of_means, "mean of the per-micro-batch means"),
    (tokens_local, "this rank's own token count"),
    (tokens_no_n, "N times too little"),
    (tokens_no_no_sync, "ddp.no_sync()"),
    (tokens_count_per_micro, "ONE all-reduce"),
])
def test_each_token_bug_gets_its_hint(fn, hint):
    result = token_accumulation(fn)
    assert not result.passed and hint in result.hint, result.hint


def test_token_stub_is_not_implemented():
    assert token_accumulation(tokens_stub).status == "not implemented"


def test_the_mean_of_means_is_measurably_wrong():
    generator = torch.Generator().manual_seed(0)
    for n in nb04.TOKEN_WORLDS:
        run = nb04._token_run(n, generator)
        want = nb04.token_reference(run)
        correct = nb04.token_simulate(run, lambda m, local, total, k, n: n / total)
        wrong = nb04.token_simulate(run, nb04._TOKEN_MISTAKES[0][0])
        assert nb04._training.max_difference(correct, want) < \
            nb04._training.tolerance(run.dtype) / 20
        assert nb04._training.max_difference(wrong, want) > 1000 * nb04.TOKEN_TOL


# --- predictions ---------------------------------------------------------------------------------

def test_the_predictions_pass():
    assert sync_bytes_per_step(lambda s, k, n, ns: (1 if ns else k) * 2 * (n - 1) / n * s)
    assert activation_memory_ratio(lambda m, b: m / b)
    assert model_state_bytes(lambda p, k: 16 * p)


@pytest.mark.parametrize("check, fn, hint", [
    (sync_bytes_per_step, lambda s, k, n, ns: k * 2 * (n - 1) / n * s, "even with no_sync"),
    (sync_bytes_per_step, lambda s, k, n, ns: 2 * (n - 1) / n * s, "even without no_sync"),
    (sync_bytes_per_step, lambda s, k, n, ns: (1 if ns else k) * s, "2(N-1)/N"),
    (activation_memory_ratio, lambda m, b: 1.0, "samples in flight"),
    (activation_memory_ratio, lambda m, b: b / m, "upside down"),
    (model_state_bytes, lambda p, k: 16 * p / k, "partitioning"),
    (model_state_bytes, lambda p, k: (12 + 4 * k) * p, "gradient per micro-batch"),
    (model_state_bytes, lambda p, k: 12 * p, "leaves out one"),
])
def test_each_prediction_mistake_gets_its_hint(check, fn, hint):
    result = check(fn)
    assert not result.passed and hint in result.hint, result.hint


def test_hints_are_registered():
    for name in ("accumulation_step", "no_sync_ddp", "token_accumulation", "sync_bytes_per_step",
                 "activation_memory_ratio", "model_state_bytes"):
        assert name in _hints.exercises()
