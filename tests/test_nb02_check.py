"""labkit.check for notebook 02: shard_indices, naive_ddp and the DDP predictions.

Each planted bug gets its own hint; the valid designs pass (per-tensor or flat all-reduce, hooks
or an explicit loop, SUM then divide or ReduceOp.AVG); torch's own DDP, trained by the shared
``_training`` module, equals the one-process reference; and the tolerance that module derives
holds with a wide margin on many fresh runs."""
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import labkit
from labkit import models
from labkit.check import _training, nb02_ddp, predictions
from labkit.check._core import Failed

# --- valid wrappers ------------------------------------------------------------------------------


class PerTensor(nn.Module):
    """The reference solution: broadcast at construction, one all-reduce per gradient."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t, src=0)

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    def trainable(self):
        return [p for p in self.module.parameters() if p.requires_grad]

    def sync_gradients(self):
        for p in self.trainable():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


class Flat(PerTensor):
    """One all-reduce of every gradient flattened into one buffer; state_dict() broadcast (the
    tied weight twice: harmless)."""

    def __init__(self, module):
        nn.Module.__init__(self)
        self.module = module
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)

    def sync_gradients(self):
        params = self.trainable()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.AVG)
        for p, piece in zip(params, flat.split([p.numel() for p in params])):
            p.grad = piece.view_as(p).clone()


class Hooks(PerTensor):
    """All-reduce each gradient from a hook as soon as it is ready; sync_gradients all-reduces
    zeros for the parameters whose hook did not fire, in parameter order."""

    def __init__(self, module):
        super().__init__(module)
        self.ready = set()
        for p in self.trainable():
            p.register_post_accumulate_grad_hook(self._reduce)

    def _reduce(self, p):
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()
        self.ready.add(p)

    def sync_gradients(self):
        for p in self.trainable():
            if p not in self.ready:
                p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        self.ready.clear()


class AsyncHooks(Hooks):
    """Hooks start async all-reduces; sync_gradients waits for them (notebook 03's shape)."""

    def __init__(self, module):
        super().__init__(module)
        self.pending = []

    def _reduce(self, p):
        self.pending.append((p, dist.all_reduce(p.grad, async_op=True)))
        self.ready.add(p)

    def sync_gradients(self):
        Hooks.sync_gradients(self)
        for p, work in self.pending:
            work.wait()
            p.grad /= dist.get_world_size()
        self.pending.clear()


# --- planted bugs --------------------------------------------------------------------------------


class SumNotMean(PerTensor):
    def sync_gradients(self):
        for p in self.trainable():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


class NoBroadcast(PerTensor):
    def __init__(self, module):
        nn.Module.__init__(self)
        self.module = module


class ParametersOnly(PerTensor):
    def __init__(self, module):
        nn.Module.__init__(self)
        self.module = module
        for p in module.parameters():
            dist.broadcast(p.data, src=0)


class ReducesFrozen(PerTensor):
    def trainable(self):
        return list(self.module.parameters())


class ReducesFrozenCopy(PerTensor):
    """All-reduces a zero buffer for the frozen parameter, without giving it a grad."""

    def sync_gradients(self):
        super().sync_gradients()
        for p in self.module.parameters():
            if not p.requires_grad:
                dist.all_reduce(torch.zeros_like(p))


class TiedTwice(PerTensor):
    def trainable(self):
        return [p for m in self.module.modules() for p in m.parameters(recurse=False)
                if p.requires_grad]


class SkipsNone(PerTensor):
    def sync_gradients(self):
        for p in self.trainable():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


class HooksOnly(Hooks):
    def sync_gradients(self):
        self.ready.clear()


class NoCommunication(PerTensor):
    def sync_gradients(self):
        pass


class GathersGradients(PerTensor):
    def sync_gradients(self):
        for p in self.trainable():
            g = torch.zeros_like(p) if p.grad is None else p.grad
            parts = [torch.empty_like(g) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, g)
            p.grad = torch.stack(parts).mean(dim=0)


class AveragesParameters(PerTensor):
    """Parameter averaging in forward: right with plain SGD, not DDP."""

    def forward(self, *inputs):
        with torch.no_grad():
            for p in self.trainable():
                dist.all_reduce(p, op=dist.ReduceOp.AVG)
        return self.module(*inputs)

    def sync_gradients(self):
        pass


class BroadcastsEveryForward(PerTensor):
    def forward(self, *inputs):
        with torch.no_grad():
            for p in self.module.parameters():
                dist.broadcast(p, src=0)
        return self.module(*inputs)


class Float32Buffer(Flat):
    def sync_gradients(self):
        params = self.trainable()
        flat = torch.zeros(sum(p.numel() for p in params))
        offset = 0
        for p in params:
            if p.grad is not None:
                flat[offset:offset + p.numel()] = p.grad.reshape(-1)
            offset += p.numel()
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for p, piece in zip(params, flat.split([p.numel() for p in params])):
            p.grad = piece.view_as(p).to(p.dtype)


class GathersTheState(PerTensor):
    """Right state after construction, but from an all_gather instead of a broadcast."""

    def __init__(self, module):
        nn.Module.__init__(self)
        self.module = module
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, t)
                t.copy_(parts[0])


class CopiesTheModule(PerTensor):
    def __init__(self, module):
        super().__init__(copy.deepcopy(module))


class BroadcastsOnRankZeroOnly(PerTensor):
    def __init__(self, module):
        nn.Module.__init__(self)
        self.module = module
        if dist.get_rank() == 0:
            for p in module.parameters():
                dist.broadcast(p.data, src=0)


class Stub(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module
        raise NotImplementedError()


@pytest.mark.parametrize("wrapper", [PerTensor, Flat, Hooks, AsyncHooks])
def test_valid_wrappers_pass(wrapper):
    result = nb02_ddp.naive_ddp(wrapper)
    assert result.passed, result.hint


@pytest.mark.parametrize("wrapper, hint", [
    (SumNotMean, "times too far"),
    (NoBroadcast, "still had its own initial"),
    (ParametersOnly, "buffers"),
    (ReducesFrozen, "frozen parameter mix"),
    (ReducesFrozenCopy, "are the frozen mix"),
    (TiedTwice, "all-reduced twice"),
    (SkipsNone, "grad was None"),
    (HooksOnly, "grad was None"),
    (NoCommunication, "nothing was all-reduced"),
    (GathersGradients, "all_gather"),
    (AveragesParameters, "forward ran all_reduce"),
    (BroadcastsEveryForward, "Parameters are never broadcast"),
    (Float32Buffer, "float32 buffer"),
    (GathersTheState, "without a broadcast"),
    (CopiesTheModule, "self.module"),
])
def test_each_planted_bug_gets_its_hint(wrapper, hint):
    result = nb02_ddp.naive_ddp(wrapper, timeout=6)
    assert not result.passed and hint in result.hint, result.hint


def test_a_construction_deadlock_becomes_a_hint_and_a_stub_is_not_implemented():
    result = nb02_ddp.naive_ddp(BroadcastsOnRankZeroOnly, timeout=3)
    assert not result.passed and "in NaiveDDP(model)" in result.hint, result.hint
    assert nb02_ddp.naive_ddp(Stub).status == "not implemented"
    instance = nb02_ddp.naive_ddp(nn.Linear(2, 2))
    assert not instance.passed and "pass the class itself" in instance.hint


# --- the shared training module against torch's own DDP ------------------------------------------


class TorchDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module):
        super().__init__(module, find_unused_parameters=True)

    def sync_gradients(self):
        pass


def test_torch_ddp_trained_by_the_shared_module_equals_one_process(tmp_path):
    generator = torch.Generator().manual_seed(2)
    for n, dtype in nb02_ddp.WORLDS:
        runs = [_training.fresh_run(kind, n, dtype, generator) for kind in nb02_ddp.KINDS]
        per_rank = labkit.launch(_training.train_on_rank, n, quiet=True, timeout=60,
                                 args=(TorchDDP, runs, "sync_gradients", str(tmp_path), "DDP"))
        for i, run in enumerate(runs):
            want = _training.reference(run)
            for results in per_rank:
                assert _training.differing(results[i]["final"], want, dtype) == [], run.kind


def _simulated(run):
    """N ranks' arithmetic in one process: each shard's mean gradient, summed, divided by N."""
    model = models.make(run.kind, run.dtype)
    model.load_state_dict(run.init[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)
    n = run.world_size
    for x, y in run.batches:
        total = {}
        for rank in range(n):
            model.zero_grad(set_to_none=True)
            model.loss(model(_training.shard(x, rank, n)), _training.shard(y, rank, n)).backward()
            for name, p in model.named_parameters():
                if p.grad is not None:
                    total[name] = total.get(name, 0) + p.grad
        for name, p in model.named_parameters():
            p.grad = total[name] / n if name in total else None
        optimizer.step()
    return _training.snapshot(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_tolerance_holds_with_a_wide_margin(dtype):
    generator = torch.Generator().manual_seed(3)
    worst = 0.0
    for _ in range(40):
        for kind in nb02_ddp.KINDS:
            for n in (2, 4):
                run = _training.fresh_run(kind, n, dtype, generator)
                worst = max(worst, _training.max_difference(_simulated(run),
                                                            _training.reference(run)))
    assert worst < _training.tolerance(dtype) / 20, worst


def test_layout_names_frozen_tied_and_buffers():
    lay = _training.layout(models.make("tied"))
    assert lay.tied == {"embed.weight": 44 * 8} and "head.weight" not in lay.params
    assert _training.layout(models.make("frozen")).frozen == {"mix": 49 * 8}
    assert set(_training.layout(models.make("batchnorm")).buffers) == {
        "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}


# --- shard_indices -------------------------------------------------------------------------------


def shard_right(size, rank, n):
    total = math.ceil(size / n) * n
    return (list(range(size)) * math.ceil(total / size))[:total][rank:total:n]


def shard_tensor(size, rank, n):
    return torch.tensor(shard_right(size, rank, n))


def whole_dataset(size, rank, n):
    return list(range(size))


def contiguous(size, rank, n):
    k = math.ceil(size / n)
    padded = (list(range(size)) * math.ceil(k * n / size))[:k * n]
    return padded[rank * k:(rank + 1) * k]


def no_padding(size, rank, n):
    return list(range(size))[rank::n]


def drops_the_tail(size, rank, n):
    k = size // n
    return list(range(k * n))[rank::n] if k else []


def pads_with_the_last(size, rank, n):
    total = math.ceil(size / n) * n
    return (list(range(size)) + [size - 1] * (total - size))[rank:total:n]


@pytest.mark.parametrize("fn", [shard_right, shard_tensor])
def test_shard_indices_passes(fn):
    result = nb02_ddp.shard_indices(fn)
    assert result.passed, result.hint


@pytest.mark.parametrize("fn, hint", [
    (whole_dataset, "whole dataset"),
    (contiguous, "round robin"),
    (no_padding, "not the same number"),
    (drops_the_tail, "drop_last=True"),
    (pads_with_the_last, "padding is wrong"),
    (lambda size, rank, n: shard_right(size, 0, n), "same indices"),
    (lambda size, rank, n: None, "return a list of ints"),
])
def test_each_sharding_mistake_gets_its_hint(fn, hint):
    result = nb02_ddp.shard_indices(fn)
    assert not result.passed and hint in result.hint, result.hint


# --- predictions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, fn", [
    ("ddp_payload_bytes", lambda p, n, b: p * b),
    ("ddp_bytes_per_step", lambda p, n, b: 2 * (n - 1) / n * p * b),
])
def test_the_ddp_predictions_pass(name, fn):
    result = getattr(predictions, name)(fn)
    assert result.passed, result.hint


@pytest.mark.parametrize("name, fn, hint", [
    ("ddp_payload_bytes", lambda p, n, b: p * b / n, "does not shard"),
    ("ddp_payload_bytes", lambda p, n, b: p, "counts elements"),
    ("ddp_bytes_per_step", lambda p, n, b: p * b, "that is the payload"),
    ("ddp_bytes_per_step", lambda p, n, b: (n - 1) / n * p * b, "one phase"),
])
def test_each_ddp_prediction_mistake_gets_its_hint(name, fn, hint):
    result = getattr(predictions, name)(fn)
    assert not result.passed and hint in result.hint, result.hint


def test_failed_is_what_a_hang_in_the_partial_step_turns_into(tmp_path):
    (tmp_path / "rank0").write_text(f"unused step {_training.PARTIAL_STEP}")
    stuck = nb02_ddp._stuck(Failed("the ranks were still waiting"), str(tmp_path), 2)
    assert "use zeros" in stuck.hint and "find_unused_parameters" in stuck.hint
