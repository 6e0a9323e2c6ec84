"""labkit.check for notebook 03: overlapped_ddp, bucketed_ddp and the two predictions.

Valid designs pass (gradients copied back from the buckets or left as views into them; handles
waited in launch order or in reverse); each planted bug gets its own hint: buckets not reversed,
a hook that never waits, waiting inside the hook, no averaging, every all-reduce launched at the
end, the wrong bucket count, the right parameters without the bucketed communication."""
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from labkit.check import nb03_buckets
from labkit.check.nb03_buckets import (backward_and_sync_time, bucket_sizes, bucketed_ddp,
                                       overlapped_ddp)

WAIT = datetime.timedelta(seconds=10)


def _broadcast(module):
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t, src=0)


# --- exercise 1: one async all-reduce per parameter ----------------------------------------------

class Overlapped(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module
        _broadcast(module)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.handles = []
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _hook(self, p):
        self.handles.append((p, dist.all_reduce(p.grad, async_op=True)))

    def finish_gradient_sync(self):
        fired = {id(p) for p, _ in self.handles}
        for p in self.params:                      # not used this step: zeros, after the others
            if id(p) not in fired:
                p.grad = torch.zeros_like(p)
                self.handles.append((p, dist.all_reduce(p.grad, async_op=True)))
        for p, handle in self.handles:
            handle.wait(timeout=WAIT)
            p.grad /= dist.get_world_size()
        self.handles = []


class OverlappedWaitingInReverse(Overlapped):
    def finish_gradient_sync(self):
        fired = {id(p) for p, _ in self.handles}
        for p in self.params:
            if id(p) not in fired:
                p.grad = torch.zeros_like(p)
                self.handles.append((p, dist.all_reduce(p.grad, async_op=True)))
        while self.handles:
            p, handle = self.handles.pop()
            handle.wait(timeout=WAIT)
            p.grad /= dist.get_world_size()


class OverlappedWaitsInHook(Overlapped):
    def _hook(self, p):
        handle = dist.all_reduce(p.grad, async_op=True)
        handle.wait(timeout=WAIT)
        self.handles.append((p, handle))


class OverlappedBlocking(Overlapped):
    def _hook(self, p):
        dist.all_reduce(p.grad)
        self.handles.append((p, _Done()))


class _Done:
    def wait(self, timeout=None):
        return True


class OverlappedNeverWaits(Overlapped):
    def finish_gradient_sync(self):
        fired = {id(p) for p, _ in self.handles}
        for p in self.params:
            if id(p) not in fired:
                p.grad = torch.zeros_like(p)
                self.handles.append((p, dist.all_reduce(p.grad, async_op=True)))
        for p, _ in self.handles:
            p.grad /= dist.get_world_size()
        self.handles = []


class OverlappedNoAverage(Overlapped):
    def finish_gradient_sync(self):
        super().finish_gradient_sync()
        for p in self.params:
            p.grad *= dist.get_world_size()


class OverlappedAtTheEnd(Overlapped):
    """Hooks record nothing; finish launches every all-reduce (async) and waits: no overlap."""

    def _hook(self, p):
        pass


# --- exercise 2: buckets -------------------------------------------------------------------------

class Bucket:
    def __init__(self, params):
        self.params = params
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype)
        self.view, offset = {}, 0
        for p in params:
            self.view[p] = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.arrived, self.handle = set(), None

    def complete(self):
        return len(self.arrived) == len(self.params)


class Bucketed(nn.Module):
    ORDER = staticmethod(reversed)

    def __init__(self, module, bucket_bytes):
        super().__init__()
        self.module = module
        _broadcast(module)
        groups, size = [[]], 0
        for p in self.ORDER([p for p in module.parameters() if p.requires_grad]):
            groups[-1].append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                groups.append([])
                size = 0
        self.buckets = [Bucket(g) for g in groups if g]
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        self.next = 0
        for p in self.bucket_of:
            p.register_post_accumulate_grad_hook(self._hook)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _launch(self, bucket):
        bucket.handle = dist.all_reduce(bucket.buffer, async_op=True)

    def _hook(self, p):
        bucket = self.bucket_of[p]
        bucket.view[p].copy_(p.grad)
        bucket.arrived.add(p)
        while self.next < len(self.buckets) and self.buckets[self.next].complete():
            self._launch(self.buckets[self.next])
            self.next += 1

    def _launch_the_rest(self):
        for bucket in self.buckets[self.next:]:
            for p in bucket.params:
                if p not in bucket.arrived:
                    bucket.view[p].zero_()
            self._launch(bucket)
        self.next = len(self.buckets)

    def _wait(self, bucket):
        bucket.handle.wait(timeout=WAIT)
        bucket.buffer /= dist.get_world_size()

    def finish_gradient_sync(self):
        self._launch_the_rest()
        for bucket in self.buckets:
            self._wait(bucket)
            for p in bucket.params:
                if p.grad is None:
                    p.grad = bucket.view[p].clone()
                else:
                    p.grad.copy_(bucket.view[p])
            bucket.arrived, bucket.handle = set(), None
        self.next = 0


class BucketedViews(Bucketed):
    """Gradients become views into the buckets (torch's gradient_as_bucket_view=True); waits in
    reverse order."""

    def finish_gradient_sync(self):
        self._launch_the_rest()
        for bucket in reversed(self.buckets):
            self._wait(bucket)
            for p in bucket.params:
                p.grad = bucket.view[p]
            bucket.arrived, bucket.handle = set(), None
        self.next = 0


class BucketedNotReversed(Bucketed):
    ORDER = staticmethod(list)


class BucketedNeverWaits(Bucketed):
    def _wait(self, bucket):
        bucket.buffer /= dist.get_world_size()


class BucketedWaitsInHook(Bucketed):
    def _launch(self, bucket):
        super()._launch(bucket)
        bucket.handle.wait(timeout=WAIT)


class BucketedNoAverage(Bucketed):
    def _wait(self, bucket):
        bucket.handle.wait(timeout=WAIT)


class BucketedAtTheEnd(Bucketed):
    def _hook(self, p):
        bucket = self.bucket_of[p]
        bucket.view[p].copy_(p.grad)
        bucket.arrived.add(p)


class BucketedForgetsUnused(Bucketed):
    """Launches only the buckets that completed: a parameter unused on one rank hangs the rest."""

    def _launch_the_rest(self):
        pass

    def finish_gradient_sync(self):
        for bucket in self.buckets[:self.next]:
            self._wait(bucket)
            for p in bucket.params:
                p.grad = bucket.view[p].clone()
            bucket.arrived, bucket.handle = set(), None
        for bucket in self.buckets[self.next:]:
            bucket.arrived = set()
        self.next = 0


class BucketedNoOvershoot(Bucketed):
    """Starts a new bucket before one would exceed the size: a different bucket count."""

    def __init__(self, module, bucket_bytes):
        nn.Module.__init__(self)
        self.module = module
        _broadcast(module)
        groups, size = [[]], 0
        for p in reversed([p for p in module.parameters() if p.requires_grad]):
            nbytes = p.numel() * p.element_size()
            if groups[-1] and size + nbytes > bucket_bytes:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += nbytes
        self.buckets = [Bucket(g) for g in groups if g]
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        self.next = 0
        for p in self.bucket_of:
            p.register_post_accumulate_grad_hook(self._hook)


class BucketedIgnoresTheSize(Bucketed):
    def __init__(self, module, bucket_bytes):
        super().__init__(module, float("inf"))


class Stub(nn.Module):
    def __init__(self, module, bucket_bytes=None):
        raise NotImplementedError()


class NaiveWithoutBuckets(nn.Module):
    """Notebook 02's answer: right parameters, one blocking all-reduce per gradient at the end."""

    def __init__(self, module, bucket_bytes):
        super().__init__()
        self.module = module
        _broadcast(module)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def finish_gradient_sync(self):
        for p in self.module.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


@pytest.mark.parametrize("cls", [Overlapped, OverlappedWaitingInReverse])
def test_overlapped_solutions_pass(cls):
    result = overlapped_ddp(cls)
    assert result.passed, result.hint


@pytest.mark.parametrize("cls, hint", [
    (OverlappedWaitsInHook, "on rank 1, loss.backward() returned only after rank 0"),
    (OverlappedNeverWaits, "returned before rank 0 had even started"),
    (OverlappedBlocking, "not asynchronous"),
    (OverlappedNoAverage, "not averaged"),
    (OverlappedAtTheEnd, "after backward had ended"),
])
def test_each_overlap_bug_gets_its_hint(cls, hint):
    result = overlapped_ddp(cls)
    assert not result.passed and hint in result.hint, result.hint


@pytest.mark.parametrize("cls", [Bucketed, BucketedViews])
def test_bucketed_solutions_pass(cls):
    result = bucketed_ddp(cls)
    assert result.passed, result.hint


@pytest.mark.parametrize("cls, hint", [
    (BucketedNotReversed, "registration order"),
    (BucketedNeverWaits, "returned before rank 0 had even started"),
    (BucketedWaitsInHook, "waited for their all-reduces inside backward"),
    (BucketedNoAverage, "not averaged"),
    (BucketedAtTheEnd, "after backward had ended"),
    (BucketedNoOvershoot, "implies"),
    (BucketedIgnoresTheSize, "ignores bucket_bytes"),
    (BucketedForgetsUnused, "use zeros"),
    (NaiveWithoutBuckets, "one all-reduce per parameter"),
])
def test_each_bucket_bug_gets_its_hint(cls, hint):
    result = bucketed_ddp(cls)
    assert not result.passed and hint in result.hint, result.hint


def test_hints_are_registered():
    from labkit.check import hint
    for name in ("overlapped_ddp", "bucketed_ddp", "bucket_sizes", "backward_and_sync_time"):
        assert "register" in hint(name, 1) or len(hint(name, 1)) > 40


def test_a_stub_is_not_implemented():
    assert overlapped_ddp(Stub).status == "not implemented"
    assert bucketed_ddp(Stub).status == "not implemented"


# --- predictions ---------------------------------------------------------------------------------

def right_buckets(param_bytes, bucket_bytes):
    out, size = [], 0
    for b in reversed(param_bytes):
        size += b
        if size >= bucket_bytes:
            out.append(size)
            size = 0
    return out + ([size] if size else [])


def forward_buckets(param_bytes, bucket_bytes):
    return right_buckets(list(reversed(param_bytes)), bucket_bytes)


def no_overshoot(param_bytes, bucket_bytes):
    return nb03_buckets._no_overshoot(list(reversed(param_bytes)), bucket_bytes)


def right_time(buckets, backward_s, n, alpha, beta):
    total, done, end = sum(buckets), 0, 0.0
    for s in buckets:
        done += s
        end = max(end, backward_s * done / total) + 2 * (n - 1) * alpha + 2 * (n - 1) / n * s * beta
    return end


def no_overlap_time(buckets, backward_s, n, alpha, beta):
    return backward_s + sum(2 * (n - 1) * alpha + 2 * (n - 1) / n * s * beta for s in buckets)


def test_the_predictions_pass():
    assert bucket_sizes(right_buckets).passed
    assert backward_and_sync_time(right_time).passed


@pytest.mark.parametrize("check, fn, hint", [
    (bucket_sizes, forward_buckets, "registration order"),
    (bucket_sizes, no_overshoot, "REACHES the size"),
    (backward_and_sync_time, no_overlap_time, "no overlap"),
])
def test_each_prediction_mistake_gets_its_hint(check, fn, hint):
    result = check(fn)
    assert not result.passed and hint in result.hint, result.hint


def test_the_reference_layout_is_torchs_rule():
    # 4 float32 tensors of 30, 6, 18, 3 elements (the plain model), cap 64 bytes
    assert nb03_buckets.reference_buckets([120, 24, 72, 12], 64) == [84, 144]
    assert nb03_buckets.reference_buckets([120, 24, 72, 12], 1) == [12, 72, 24, 120]
    assert nb03_buckets.reference_buckets([120, 24, 72, 12], 10**6) == [228]
