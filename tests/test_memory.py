"""labkit.MemoryTracer: exact bytes by category, peak, timeline, tags, threads, DDP on 2 ranks,
CUDA."""
import gc
import pickle
import random
import sys
import threading
import weakref

import pytest
import torch
import torch.distributed as dist

import labkit
from labkit._torch_private import current_dispatch_mode as _get_current_dispatch_mode
from labkit.memory import CATEGORIES, MemoryTracer

PSI = 1_050_112  # parameters of Linear(1024, 512), ReLU, Linear(512, 1024)
ADAM_STEPS = 4 * 4  # Adam keeps one fp32 `step` scalar per parameter tensor (4 of them)
BATCH = 64


def mlp(seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 1024)).to(device)
    return model, torch.randn(BATCH, 1024, device=device)


def train_step(model, optimizer, x):
    loss = model(x).sum()
    loss.backward()
    optimizer.step()
    return loss


def test_one_adam_step_is_4_4_8_psi_to_the_byte():
    model, x = mlp()
    assert sum(p.numel() for p in model.parameters()) == PSI
    optimizer = torch.optim.Adam(model.parameters())  # on CPU the default is the for-loop Adam
    with MemoryTracer(model, optimizer) as mem:
        train_step(model, optimizer, x)
        after_step = mem.current
        optimizer.zero_grad()
    assert after_step == {"params": 4 * PSI, "grads": 4 * PSI, "optimizer": 8 * PSI + ADAM_STEPS,
                          "activations": 0, "comm": 0, "other": BATCH * 1024 * 4}  # x
    assert mem.current["grads"] == 0  # zero_grad() sets them to None: freed
    # The peak is in Adam's update of the first weight: sqrt and div temporaries of 2 MiB each.
    assert mem.peak_total == 21_260_308 and mem.peak_event == "optimizer.step aten.div.Tensor"
    assert mem.peak["optimizer"] == 8 * PSI + ADAM_STEPS and mem.peak["grads"] == 4 * PSI
    assert list(mem.peak) == list(CATEGORIES)
    assert mem.cuda_allocated is None and mem.cuda_peak is None  # no CUDA here


@pytest.mark.parametrize("foreach", [False, True])
def test_peak_equals_torch_memtracker(foreach):
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as error:  # a private torch API: it may move
        pytest.skip(f"torch.distributed._tools.mem_tracker.MemTracker unavailable: {error}")
    peaks = []
    for tracer in ("memtracker", "labkit"):
        model, x = mlp()
        optimizer = torch.optim.Adam(model.parameters(), foreach=foreach)
        if tracer == "memtracker":
            reference = MemTracker()
            reference.track_external(model, optimizer, x)
            with reference:
                for _ in range(2):
                    reference.reset_mod_stats()  # MemTracker needs this every iteration
                    train_step(model, optimizer, x)
                    optimizer.zero_grad()
            snapshot = reference.get_tracker_snapshot("peak")
            peaks.append(sum(s["Total"] for s in snapshot.values()))
        else:
            with MemoryTracer(model, optimizer) as mem:
                for _ in range(2):
                    train_step(model, optimizer, x)
                    optimizer.zero_grad()
            peaks.append(mem.peak_total)
    print(f"foreach={foreach}: MemTracker peak {peaks[0]:,} B, MemoryTracer peak {peaks[1]:,} B")
    assert peaks[0] == peaks[1] == (21_264_404 if foreach else 21_260_308)


def test_activations_are_saved_in_forward_and_released_by_backward():
    model, x = mlp()
    with MemoryTracer(model) as mem:
        loss = model(x).sum()
        saved = mem.current["activations"]
        loss.backward()
        released = mem.current["activations"]
    # Linear 1 saves x, ReLU its output, which Linear 2 saves too (one storage); the weights
    # are saved as well, but they are parameters.
    assert saved == BATCH * 1024 * 4 + BATCH * 512 * 4
    assert released == 0 and mem.current["other"] == BATCH * 1024 * 4 + 4  # x and loss live on
    events = [event for event, _, _ in mem.timeline]
    assert events[0] == "enter" and events[-1] == "exit" and "after forward" in events
    assert any(e.startswith("forward aten.addmm") for e in events)
    assert any(e.startswith("backward aten.mm") for e in events)
    assert max(by["activations"] for _, _, by in mem.timeline) == saved
    assert all(total == sum(by.values()) for _, total, by in mem.timeline)


def test_views_count_once_and_tags_follow_the_documented_priority():
    flat = torch.zeros(1000)  # a learner's flat buffer, made before the tracer
    weight = torch.nn.Parameter(flat[:600].view(20, 30))
    bias = torch.nn.Parameter(flat[600:620])
    with MemoryTracer([torch.nn.ParameterList([weight, bias])]) as mem:
        assert mem.current["params"] == 4000  # one storage, however many views
        mem.tag(flat[900:], "comm")  # a tag covers the whole storage, and beats "params"
        assert mem.current["params"] == 0 and mem.current["comm"] == 4000
        mem.tag(flat, "params")
        bucket = mem.tag(torch.empty(250), "comm")
        assert mem.current == {"params": 4000, "grads": 0, "optimizer": 0, "activations": 0,
                               "comm": 1000, "other": 0}
        mem.tag(bucket.untyped_storage(), None)  # by storage; None removes the tag
        assert mem.current["comm"] == 0 and mem.current["other"] == 1000
        bucket.untyped_storage().resize_(0)  # how FSDP frees a buffer but keeps its storage
        assert mem.current["other"] == 0
        with pytest.raises(ValueError, match="category must be one of"):
            mem.tag(bucket, "activation")
        del bucket
    assert mem.peak_total == 5000 and mem.current["other"] == 0


def test_several_models_and_optimizers_and_none():
    model_a, x = mlp(seed=1)
    model_b, _ = mlp(seed=2)
    optimizers = [torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9),
                  torch.optim.Adam(model_b.parameters())]
    with MemoryTracer([model_a, model_b], optimizers) as mem:
        loss = model_a(x).sum() + model_b(x).sum()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
    assert mem.current["params"] == mem.current["grads"] == 8 * PSI
    assert mem.current["optimizer"] == 4 * PSI + 8 * PSI + ADAM_STEPS  # momentum + Adam
    with MemoryTracer([model_a, model_b], optimizers) as again:  # all made before this `with`
        pass
    assert [event for event, _, _ in again.timeline] == ["enter", "exit"]
    assert again.current == dict(mem.current, other=0) and again.peak == again.current
    with MemoryTracer() as plain:  # no model, no optimizer: everything is "other"
        y = torch.ones(1000)
        z = y * 2
        del y
    assert plain.peak == dict(dict.fromkeys(CATEGORIES, 0), other=8000)
    assert plain.peak_event == "aten.mul.Tensor" and plain.current["other"] == 4000
    assert z.sum() == 2000


def test_tracer_leaves_nothing_behind_and_keeps_autograd_checks():
    model, x = mlp()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        with MemoryTracer(model) as mem:
            y = model(x).sigmoid()  # sigmoid saves its output
            y.add_(1)
            y.sum().backward()
    assert _get_current_dispatch_mode() is None
    length = len(mem.timeline)
    model(x).sum().backward()  # not traced any more: hooks and mode are gone
    assert len(mem.timeline) == length and mem.current == mem.timeline[-1][2]
    with pytest.raises(RuntimeError, match="already active"):
        with mem:
            mem.__enter__()


def test_wrapper_subclasses_count_their_inner_tensors_and_sparse_is_skipped():
    try:  # TwoTensor: torch's own test subclass, built like DTensor (a private module)
        from torch.testing._internal.two_tensor import TwoTensor
    except ImportError as error:
        pytest.skip(f"torch.testing._internal.two_tensor unavailable: {error}")
    pair = TwoTensor(torch.zeros(100), torch.zeros(100))
    embedding = torch.nn.Embedding(10, 4, sparse=True)  # its grad is a sparse tensor
    with MemoryTracer(embedding) as mem:
        doubled = pair * 2
        embedding(torch.tensor([1, 2])).sum().backward()
    assert isinstance(doubled, TwoTensor) and mem.current["params"] == 160
    assert mem.current["grads"] == 0  # sparse: no plain storage to count
    assert mem.current["other"] == 2 * 400 + 2 * 400  # pair and doubled, two storages each


@pytest.fixture
def frequent_thread_switches():
    """Let the interpreter switch threads every microsecond, so that races show up reliably."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_books_stay_exact_when_threads_tag_save_and_free_the_same_storages(
        frequent_thread_switches):
    """Autograd, DDP's comm hook and gloo's callbacks run on threads of their own: here six
    threads tag, save and release the same new storages at once, and the main thread frees
    them. Without one lock, two threads made two entries for one storage (counted twice) or
    read an entry another thread had not finished."""
    threads, rounds, errors = 6, 150, []
    mem = MemoryTracer()
    kept = mem.tag(torch.empty(10), "params")
    batch = []
    start, done = (threading.Barrier(threads + 1, timeout=60) for _ in range(2))

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(rounds):
                start.wait()
                for tensor in rng.sample(batch, len(batch)):  # all threads: the same storages
                    saved = mem._pack(tensor)  # autograd saves it for backward...
                    mem.tag(tensor, rng.choice(CATEGORIES))
                    del saved  # ...and lets it go
                done.wait()
        except BaseException as error:  # noqa: B902 - reported below, barriers released
            errors.append(error)
            start.abort()
            done.abort()

    workers = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for thread in workers:
        thread.start()
    try:
        for _ in range(rounds):
            batch[:] = [torch.empty(n + 1) for n in range(8)]  # storages nobody has seen yet
            start.wait()
            done.wait()
            batch.clear()  # freed on this thread while the workers' notes may still be queued
    except threading.BrokenBarrierError:
        pass
    for thread in workers:
        thread.join(timeout=60)
    assert not errors, errors
    assert mem.current == dict(dict.fromkeys(CATEGORIES, 0), params=kept.nbytes)


def test_finalisers_that_garbage_collection_runs_inside_the_books_neither_hang_nor_miscount():
    """A weak-reference callback fires wherever the collector happens to run: also inside the
    tracer's own bookkeeping, on the thread that holds its lock (the bookkeeping allocates, and
    any allocation may run the collector). The callback only leaves a note, so it neither waits
    on that lock (a deadlock) nor changes the books halfway through an update. Here the
    collector frees traced tensors in reference cycles while this thread holds the lock."""
    def traced():
        with MemoryTracer() as mem:
            kept = torch.ones(100) * 2
            for _ in range(3):
                cycle = [mem.tag(torch.ones(64), "comm")]  # only the collector frees a cycle
                cycle.append(cycle)
                del cycle
            with mem._lock:  # as if the bookkeeping had allocated and run the collector
                assert gc.collect() > 0 and len(mem._notes) == 3  # noted, not booked yet
            return mem.current, kept

    result = []
    runner = threading.Thread(target=lambda: result.append(traced()), daemon=True)
    runner.start()
    runner.join(timeout=60)
    assert not runner.is_alive(), "the tracer deadlocked on a finaliser"
    current, kept = result[0]
    assert current == dict(dict.fromkeys(CATEGORIES, 0), other=kept.nbytes)


def test_notes_waiting_to_be_booked_keep_no_memory_alive():
    """A save is booked by the next op; until then the tracer must not hold the saved tensor,
    or a graph dropped before that op would keep its memory (the tracer would change what it
    measures)."""
    with MemoryTracer():
        y = torch.ones(1000, requires_grad=True).sigmoid()  # autograd saves y for backward
        storage = weakref.ref(y.untyped_storage())
        del y  # the graph goes, and with it the saved tensor
        assert storage() is None


def test_a_dead_storages_id_reused_before_its_death_is_booked():
    """Deaths are booked after the fact, so a new storage can get the id (address) of one that
    died a moment ago while the note is still queued: it must not inherit the old entry."""
    mem = MemoryTracer()
    with mem._lock:  # as inside an op: nothing books the notes meanwhile
        old = torch.empty(1000)
        mem._register(old.untyped_storage())
        key = id(old.untyped_storage())
        del old
        for _ in range(1000):  # CPython reuses the freed object's memory for the next one
            new = torch.empty(10)
            if id(storage := new.untyped_storage()) == key:
                break
        else:
            pytest.skip("the allocator did not reuse the address this time")
        mem._register(storage)
    assert mem.current["other"] == 40


def ddp_memory():
    """One rank: torch DDP with default buckets, then with gradient_as_bucket_view=True."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    reports = []
    for as_view in (False, True):
        model, _ = mlp()  # the same start on every rank, as DDP checks
        x = torch.randn(BATCH, 1024, generator=torch.Generator().manual_seed(dist.get_rank()))
        ddp = DDP(model, gradient_as_bucket_view=as_view)
        optimizer = torch.optim.Adam(ddp.parameters())
        mem = MemoryTracer(ddp, optimizer)
        mem.tag_ddp_buckets(ddp)
        with mem:
            for _ in range(2):  # DDP rebuilds its buckets after the first step
                train_step(ddp, optimizer, x)
                after_step = mem.current
                optimizer.zero_grad()
        checksum = sum(p.double().sum().item() for p in model.parameters())
        reports.append(dict(mem.report(), after_step=after_step, checksum=checksum))
    return reports


def test_ddp_on_two_ranks_grads_and_buckets(no_leftovers):
    results = labkit.launch(ddp_memory, nprocs=2, quiet=True)
    for rank, (default, as_view) in enumerate(results):
        assert default["rank"] == rank and len(pickle.dumps(default)) < 2000
        # Default DDP: the grads, and a second copy of them in DDP's buckets.
        assert default["after_step"] == {"params": 4 * PSI, "grads": 4 * PSI,
                                         "optimizer": 8 * PSI + ADAM_STEPS, "activations": 0,
                                         "comm": 4 * PSI, "other": BATCH * 1024 * 4}
        assert default["peak"]["comm"] == 4 * PSI
        assert default["peak_total"] == 21_260_308 + 4 * PSI
        # gradient_as_bucket_view=True: the buckets are the grads; no copy.
        assert as_view["after_step"]["grads"] == 4 * PSI and as_view["after_step"]["comm"] == 0
        assert as_view["peak_total"] == 21_260_308
        assert as_view["current"]["grads"] == 4 * PSI  # buckets outlive zero_grad()
    # The tagging hook still all-reduces: different data on each rank, same parameters.
    assert results[0][0]["checksum"] == results[1][0]["checksum"]
    assert results[0][1]["checksum"] == results[1][1]["checksum"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_traced_bytes_beside_torch_allocator():
    model, x = mlp(device="cuda")
    optimizer = torch.optim.Adam(model.parameters())
    with MemoryTracer(model, optimizer, device="cuda") as mem:  # Adam's steps stay on the CPU
        train_step(model, optimizer, x)
        after_step = mem.current
    assert after_step["params"] == after_step["grads"] == 4 * PSI
    assert after_step["optimizer"] == 8 * PSI
    print(f"traced peak {mem.peak_total:,} B, torch.cuda.max_memory_allocated {mem.cuda_peak:,} B;"
          f" traced now {sum(mem.current.values()):,} B, allocated {mem.cuda_allocated:,} B")
    # The allocator rounds blocks up to 512 B and holds cuBLAS's workspace: never less.
    assert mem.cuda_peak >= mem.peak_total and mem.cuda_allocated >= sum(mem.current.values())


def test_the_end_of_a_forward_rereads_params_and_grads_and_keeps_optimizer_state():
    """The mark after each forward is cheap (parameters and grads only) yet still right: a
    parameter given new data in the forward counts as params from then on, a grad set by hand as
    grads, and the optimizer state found at the last full mark stays optimizer state."""
    model, x = mlp()
    optimizer = torch.optim.Adam(model.parameters())
    train_step(model, optimizer, x)              # Adam's state exists before the with
    first = model[0]
    grown = torch.zeros(512, 1024)

    def swap_in_new_data(module, args):
        first.weight.data = grown                # a new storage, assigned inside the forward
        first.bias.grad = torch.zeros(512)       # a grad written by hand, no hook sees it

    handle = first.register_forward_pre_hook(swap_in_new_data)
    with MemoryTracer(model, optimizer) as mem:
        model(x)
        after_forward = dict(mem.timeline[-1][2])
    handle.remove()
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                      for t in s.values())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert mem.timeline[-1][0] == "exit" and after_forward["params"] == param_bytes
    assert after_forward["grads"] >= 512 * 4 and after_forward["optimizer"] == state_bytes


def test_a_dispatch_mode_does_not_see_the_tracers_own_detach():
    """The tracer detaches many saved tensors; through the dispatch modes that would cost a
    Python dispatch each. ``detach_unseen`` skips them, keeps what detach keeps (storage,
    version counter), and leaves the thread's dispatch state as it found it."""
    from labkit._torch_private import DispatchMode, detach_unseen

    seen = []

    class Watch(DispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    key = torch._C.DispatchKey.Python
    x = torch.randn(4, requires_grad=True) * 2
    with Watch():
        alias = detach_unseen(x)
        assert not torch._C._dispatch_tls_is_dispatch_key_excluded(key)
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, True)
        try:
            detach_unseen(x)                     # already excluded: stays excluded after
            assert torch._C._dispatch_tls_is_dispatch_key_excluded(key)
        finally:
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
        x.detach()                               # the normal detach is seen
    assert seen == ["aten.detach.default"]
    assert alias.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert not alias.requires_grad and alias._version == x._version
    alias.add_(1)                                # in place through the alias: shared counter
    assert x._version == alias._version == 1


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
def test_fake_tensors_count_only_when_asked():
    """A fake tensor's storage is on the meta device, which holds no memory and is skipped;
    labkit.simulate measures fake tensors with fake=True."""
    from labkit._torch_private import FakeTensorMode
    with FakeTensorMode():
        layer = torch.nn.Linear(100, 10, bias=False)
        counted = {}
        for fake in (False, True):
            with MemoryTracer(layer, fake=fake, timeline=False) as mem:
                layer(torch.ones(4, 100)).sum().backward()
            counted[fake] = mem.current
            layer.weight.grad = None
    assert counted[False]["params"] == counted[False]["grads"] == 0
    assert counted[True]["params"] == counted[True]["grads"] == 100 * 10 * 4
