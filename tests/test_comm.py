"""labkit.comm (the communication ledger) and labkit.compat (torch-version shims).

Exact byte counts throughout: payload is a sum of tensor sizes and wire a formula of it, so
nothing here needs a tolerance. Times are only checked to be known (not None), never compared.
"""
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist

import labkit
from labkit import comm, compat, theory
from labkit.comm import CommCall, CommCounter

PSI = 1024 * 512 + 512 + 512 * 1024 + 1024       # parameters of mlp(): 1,050,112
FP32 = 4


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 1024))


def batch():
    torch.manual_seed(1 + dist.get_rank())
    return torch.randn(8, 1024)


def ring(op, size, n):
    return theory.wire_bytes(op, size, n)


# --- torch's own data parallelism: DDP, ZeRO-1 (ZeroRedundancyOptimizer), FSDP2 -------------
# One launch per world size runs all three: the first op under a dispatch mode costs each rank
# a one-off import of torch._dynamo (about 2 s here), so fewer launches keep the file fast.

def ddp_step():
    model = torch.nn.parallel.DistributedDataParallel(mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with CommCounter() as step:
        model(batch()).square().mean().backward()
        opt.step()
    return {"summary": step.summary(), "calls": step.calls}


def zero_step():
    from torch.distributed.optim import ZeroRedundancyOptimizer
    model = torch.nn.parallel.DistributedDataParallel(mlp())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=1e-3)
    with CommCounter() as step:
        model(batch()).square().mean().backward()
        opt.step()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"summary": step.summary(), "param_bytes": param_bytes}


def fsdp2_step():
    from torch.distributed.fsdp import fully_shard
    model = mlp()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with CommCounter() as step:
        model(batch()).square().mean().backward()
        opt.step()
    with CommCounter() as clip:             # DTensor gradients: the norm needs an all-reduce
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    return {"summary": step.summary(), "clip": clip.summary()}


def torch_parallel_steps():
    return {"ddp": ddp_step(), "zero": zero_step(), "fsdp2": fsdp2_step()}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def steps(request):
    return request.param, labkit.launch(torch_parallel_steps, nprocs=request.param, quiet=True)


def test_ddp_step_all_reduces_exactly_the_fp32_gradients(steps):
    nprocs, results = steps
    for result in results:
        summary, calls = result["ddp"]["summary"], result["ddp"]["calls"]
        assert list(summary) == ["all_reduce"], summary     # the reducer's buckets, from C++
        assert summary["all_reduce"]["payload_bytes"] == FP32 * PSI
        assert summary["all_reduce"]["wire_bytes"] == pytest.approx(
            2 * (nprocs - 1) / nprocs * FP32 * PSI, rel=1e-12)
        # DDP's all-reduce is asynchronous: the time comes from the op's future
        assert all(c.seconds is not None and c.seconds >= 0 for c in calls)
        assert all(c.world_size == nprocs for c in calls)


def test_zero_redundancy_optimizer_broadcasts_every_updated_partition(steps):
    for result in steps[1]:
        summary, param_bytes = result["zero"]["summary"], result["zero"]["param_bytes"]
        assert param_bytes == FP32 * PSI
        assert summary["all_reduce"]["payload_bytes"] == FP32 * PSI   # DDP, as before
        # after its local step each rank broadcasts the parameters it owns, whole tensors
        # (torch's ZeRO partitions parameters, not a flat buffer): together, every parameter
        assert summary["broadcast"]["payload_bytes"] == param_bytes
        assert summary["broadcast"]["calls"] == 4                   # 2 weights, 2 biases
        assert set(summary) == {"all_reduce", "broadcast"}


def test_fsdp2_gathers_params_twice_and_reduce_scatters_grads_once(steps):
    nprocs, results = steps
    full = FP32 * PSI
    for result in results:
        summary, clip = result["fsdp2"]["summary"], result["fsdp2"]["clip"]
        assert set(summary) == {"all_gather", "reduce_scatter"}, summary
        # Each Linear is gathered before its forward and again before its backward (FSDP2
        # frees non-root parameters after forward), and its gradients are reduce-scattered once.
        # Exact, because every parameter's first dim (512 or 1024) divides by 2 and 4, so FSDP2
        # adds no padding; with a shape that does not divide, the payload would grow by the pad.
        assert summary["all_gather"]["calls"] == 4
        assert summary["all_gather"]["payload_bytes"] == 2 * full
        assert summary["reduce_scatter"]["calls"] == 2
        assert summary["reduce_scatter"]["payload_bytes"] == full
        assert summary["all_gather"]["wire_bytes"] == pytest.approx(
            ring("all_gather", 2 * full, nprocs))
        # ZeRO-3's price: 1.5x the wire bytes of DDP's single all-reduce
        wire = summary["all_gather"]["wire_bytes"] + summary["reduce_scatter"]["wire_bytes"]
        assert wire == pytest.approx(1.5 * ring("all_reduce", full, nprocs))
        # the gradient norm is a functional all-reduce of a few scalars, not of gradients
        assert clip["all_reduce"]["calls"] >= 1
        assert 0 < clip["all_reduce"]["payload_bytes"] <= 64


# --- each primitive on 3 ranks (so the ring factors are 2/3 and 4/3, not 1/2 and 1) -----------

N3 = 3
ELEMS = 12                     # float32 -> 48 bytes, divisible by 3 for the scatters


def counted(fn):
    """(op, payload, wire, world_size, peer) of each op fn runs; whether every time is known."""
    with CommCounter() as ledger:
        fn()
    calls = ledger.calls
    return [(c.op, c.payload_bytes, c.wire_bytes, c.world_size, c.peer) for c in calls], \
        all(c.seconds is not None for c in calls)


def primitives():
    from torch.distributed._functional_collectives import all_reduce as functional_all_reduce
    from torch.distributed._functional_collectives import irecv_inplace, isend_inplace, wait_tensor
    rank, n = dist.get_rank(), dist.get_world_size()
    x = torch.full((ELEMS,), float(rank))
    out = {}

    out["all_reduce"] = counted(lambda: dist.all_reduce(x.clone()))
    out["all_reduce_fp16"] = counted(lambda: dist.all_reduce(x.half()))
    out["async_all_reduce"] = counted(lambda: dist.all_reduce(x.clone(), async_op=True).wait())
    out["broadcast"] = counted(lambda: dist.broadcast(x.clone(), src=0))
    out["reduce"] = counted(lambda: dist.reduce(x.clone(), dst=0))
    out["all_gather_list"] = counted(
        lambda: dist.all_gather([torch.empty(ELEMS) for _ in range(n)], x))
    out["all_gather_tensor"] = counted(
        lambda: compat.all_gather_into_tensor(torch.empty(n * ELEMS), x))
    out["reduce_scatter_list"] = counted(
        lambda: dist.reduce_scatter(torch.empty(ELEMS), [x.clone() for _ in range(n)]))
    out["reduce_scatter_tensor"] = counted(
        lambda: compat.reduce_scatter_tensor(torch.empty(ELEMS), x.repeat(n)))
    out["all_to_all"] = counted(lambda: dist.all_to_all_single(torch.empty(ELEMS), x))
    out["barrier"] = counted(dist.barrier)
    out["functional_all_reduce"] = counted(
        lambda: functional_all_reduce(x, "sum", dist.group.WORLD) + 0)   # "+ 0" waits

    def point_to_point():
        if rank == 0:
            dist.send(x, dst=1)
        elif rank == 1:
            dist.recv(torch.empty(ELEMS), src=0)
    out["send_recv"] = counted(point_to_point)

    def ring_shift():                        # send right, receive from the left
        request = dist.isend(x, (rank + 1) % n)
        dist.recv(torch.empty(ELEMS), (rank - 1) % n)
        request.wait()
    out["ring_shift"] = counted(ring_shift)

    def functional_ring_shift():
        sent = isend_inplace(x.clone(), (rank + 1) % n)
        received = irecv_inplace(torch.empty(ELEMS), (rank - 1) % n)
        wait_tensor(sent), wait_tensor(received)
    out["functional_ring_shift"] = counted(functional_ring_shift)

    def from_any_source():
        if rank == 0:
            dist.send(x, dst=2)
        elif rank == 2:
            dist.recv(torch.empty(ELEMS))    # src=None: the op does not name the sender
    out["any_source"] = counted(from_any_source)

    pair = dist.new_group([0, 1])            # every rank must create it; ranks 0, 1 use it
    out["subgroup"] = counted(lambda: dist.all_reduce(x.clone(), group=pair) if rank < 2 else None)

    tail = dist.new_group([1, 2])            # its group ranks 0, 1 are global ranks 1, 2

    def subgroup_send():                     # dist takes global ranks; the op carries 1 and 0
        if rank == 1:
            dist.send(x, dst=2, group=tail)
        elif rank == 2:
            dist.recv(torch.empty(ELEMS), src=1, group=tail)
    out["subgroup_send"] = counted(subgroup_send)
    return out


@pytest.fixture(scope="module")
def prims():
    return labkit.launch(primitives, nprocs=N3, quiet=True)


S = ELEMS * FP32                                   # 48 bytes handed in by each rank
CASES = {   # name: (op, payload, wire) on every rank; all-gather/reduce-scatter: the full buffer
    "all_reduce": ("all_reduce", S, 2 * 2 / 3 * S),
    "all_reduce_fp16": ("all_reduce", S // 2, 2 * 2 / 3 * (S // 2)),
    "async_all_reduce": ("all_reduce", S, 2 * 2 / 3 * S),
    "broadcast": ("broadcast", S, 2 / 3 * S),
    "reduce": ("reduce", S, 2 / 3 * S),
    "all_gather_list": ("all_gather", N3 * S, 2 / 3 * N3 * S),
    "all_gather_tensor": ("all_gather", N3 * S, 2 / 3 * N3 * S),
    "reduce_scatter_list": ("reduce_scatter", N3 * S, 2 / 3 * N3 * S),
    "reduce_scatter_tensor": ("reduce_scatter", N3 * S, 2 / 3 * N3 * S),
    "all_to_all": ("all_to_all", S, 2 / 3 * S),
    "barrier": ("barrier", 0, 0.0),
    "functional_all_reduce": ("all_reduce", S, 2 * 2 / 3 * S),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_primitive_exact_payload_and_wire(prims, name):
    op, payload, wire = CASES[name]
    for rank, results in enumerate(prims):
        calls, timed = results[name]
        assert len(calls) == 1, (rank, calls)
        got_op, got_payload, got_wire, world, peer = calls[0]
        assert (got_op, got_payload, world, peer) == (op, payload, N3, None), (rank, calls)
        assert got_wire == pytest.approx(wire, rel=1e-12), (rank, calls)
        assert timed, f"rank {rank}: {name} finished but its time is unknown"


def test_send_counts_wire_bytes_and_recv_none(prims):
    # times: None on gloo, whose send/recv Work has no future to watch (see labkit.comm)
    assert prims[0]["send_recv"] == ([("send", S, float(S), N3, 1)], False)
    assert prims[1]["send_recv"] == ([("recv", S, 0.0, N3, 0)], False)
    assert prims[2]["send_recv"] == ([], True)


@pytest.mark.parametrize("name", ["ring_shift", "functional_ring_shift"])
def test_a_ring_shift_records_each_sends_and_recvs_peer(prims, name):
    for rank, results in enumerate(prims):
        calls, _ = results[name]
        assert calls == [("send", S, float(S), N3, (rank + 1) % N3),
                         ("recv", S, 0.0, N3, (rank - 1) % N3)], (rank, calls)


def test_a_subgroup_send_records_global_ranks_and_any_source_none(prims):
    assert prims[1]["subgroup_send"][0] == [("send", S, float(S), 2, 2)]
    assert prims[2]["subgroup_send"][0] == [("recv", S, 0.0, 2, 1)]
    assert prims[0]["subgroup_send"] == ([], True)
    assert prims[0]["any_source"][0] == [("send", S, float(S), N3, 2)]
    assert prims[2]["any_source"][0] == [("recv", S, 0.0, N3, None)]


def test_comm_call_keeps_its_five_positional_fields():
    call = CommCall("all_reduce", S, 2.0 * S, None, 2)
    assert call.peer is None and tuple(call)[:5] == ("all_reduce", S, 2.0 * S, None, 2)


def test_subgroup_ops_use_the_subgroup_size(prims):
    for rank in (0, 1):
        assert prims[rank]["subgroup"] == ([("all_reduce", S, 2 * 1 / 2 * S, 2, None)], True)
    assert prims[2]["subgroup"] == ([], True)     # not a member: torch issues nothing


# --- the ledger's behaviour: scope, reuse, nesting, pickling, unknown ops ----------------------

def scope_and_nesting():
    t = torch.ones(ELEMS)
    outer, inner, again = CommCounter(), CommCounter(), CommCounter()
    dist.all_reduce(t)                              # before: not counted
    with outer:
        dist.broadcast(t, 0)
        with inner:                                 # nested: both count what runs in here
            dist.all_reduce(t)
        try:
            with outer:                             # the same counter inside itself: refused
                pass
            refused = None
        except RuntimeError as error:
            refused = str(error)
    dist.all_reduce(t)                              # after: not counted
    with outer:                                     # entering again later adds to it
        dist.barrier()
    with again:
        pass
    summary = outer.summary()
    return {"outer": [c.op for c in outer.calls], "inner": [c.op for c in inner.calls],
            "refused": refused, "empty": again.summary(), "pickled": pickle.dumps(outer.calls),
            "totals": (outer.total_payload_bytes(), outer.total_wire_bytes()),
            "summary": summary, "table": outer.table()}


def test_counting_stops_outside_the_block_and_nesting_is_sane(behaviour):
    for result in (rank["scope"] for rank in behaviour):
        assert result["outer"] == ["broadcast", "all_reduce", "barrier"]
        assert result["inner"] == ["all_reduce"]
        assert "already counting" in result["refused"]
        assert result["empty"] == {}
        calls = pickle.loads(result["pickled"])
        assert all(isinstance(c, CommCall) for c in calls)
        assert result["totals"] == (2 * S, 1 / 2 * S + 2 * 1 / 2 * S)
        assert list(result["summary"]) == ["broadcast", "all_reduce", "barrier"]
        assert result["summary"]["all_reduce"]["calls"] == 1
        table = result["table"]
        assert "all_reduce" in table and "total" in table and f"{S:,}" in table


def unknown_op():
    del comm._C10D_OPS["broadcast_"]                # pretend torch grew an op we do not know
    with CommCounter() as ledger:
        dist.broadcast(torch.ones(ELEMS), 0)
    return ledger.summary()


def test_unknown_c10d_ops_are_counted_under_their_raw_name(behaviour):
    for summary in (rank["unknown"] for rank in behaviour):
        assert list(summary) == ["c10d.broadcast_"]
        row = summary["c10d.broadcast_"]
        assert (row["calls"], row["payload_bytes"], row["wire_bytes"]) == (1, S, 0.0)


def pending_async():
    rank = dist.get_rank()
    side = dist.new_group(backend="gloo")   # its own connections: cannot cross WORLD's ops
    t = torch.ones(ELEMS)
    if rank == 1:
        with CommCounter() as ledger:
            work = dist.all_reduce(t, async_op=True)   # rank 0 has not joined yet
        while_running = [c.seconds for c in ledger.calls]
        dist.barrier(group=side)            # only now does rank 0 go on to its all-reduce
        work.wait()
        return while_running, [c.seconds for c in ledger.calls]
    dist.barrier(group=side)
    dist.all_reduce(t)
    return None


def test_an_async_op_has_no_time_while_running_and_gets_one_when_done(behaviour):
    while_running, done = behaviour[1]["pending"]
    assert while_running == [None]
    assert len(done) == 1 and done[0] is not None and done[0] >= 0   # filled in after the block


def freed_inside_the_ledger():
    """Whether an async op's tensor is still alive once the learner's code let go of it, inside
    an open ledger (the ledger must not keep it: MemoryTracer would count it)."""
    import gc
    import weakref
    with CommCounter() as ledger:
        t = torch.ones(ELEMS)
        work = dist.all_reduce(t, async_op=True)
        work.wait()
        alive = weakref.ref(t)
        del t, work
        gc.collect()
        kept = alive() is not None
    return kept, [c.seconds is not None for c in ledger.calls]


def test_an_open_ledger_does_not_keep_a_finished_async_op_s_tensors(behaviour):
    for kept, timed in (rank["freed"] for rank in behaviour):
        assert not kept
        assert timed == [True]


def ledger_behaviour():
    return {"scope": scope_and_nesting(), "pending": pending_async(),
            "freed": freed_inside_the_ledger(),
            "unknown": unknown_op()}        # last: it edits the op table of this rank


@pytest.fixture(scope="module")
def behaviour():
    return labkit.launch(ledger_behaviour, nprocs=2, quiet=True)


def test_every_c10d_op_of_this_torch_is_mapped():
    import torch.distributed  # noqa: F401  (registers the c10d ops)
    from labkit._torch_private import all_op_names
    names = {n.split("::")[1] for n in all_op_names() if n.startswith("c10d::")}
    assert names, "no c10d ops registered"
    unmapped = names - set(comm._C10D_OPS) - comm._NOT_COMMUNICATION
    assert not unmapped, f"map these to course names in labkit.comm: {sorted(unmapped)}"


def test_summary_of_an_unused_counter_is_empty_and_picklable():
    ledger = CommCounter()
    assert ledger.summary() == {} and ledger.calls == [] and ledger.total_wire_bytes() == 0
    assert pickle.loads(pickle.dumps(ledger.summary())) == {}


# --- labkit.compat ----------------------------------------------------------------------------

def shims(legacy):
    if legacy:    # emulate torch < 2.13, which has only the old names
        for name in ("all_gather_single", "reduce_scatter_single"):
            if hasattr(dist, name):
                delattr(dist, name)
    rank, n = dist.get_rank(), dist.get_world_size()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gathered = torch.empty(n * 2)
        compat.all_gather_into_tensor(gathered, torch.tensor([rank, 10.0 * rank]))
        shard = torch.empty(2)
        compat.reduce_scatter_tensor(shard, torch.arange(2.0 * n) + rank)
        work = compat.reduce_scatter_tensor(torch.empty(2), torch.ones(2 * n),
                                                 op=dist.ReduceOp.MAX, async_op=True)
        work.wait()
    return gathered.tolist(), shard.tolist(), [w.category.__name__ for w in caught]


def test_compat_collectives_are_right_and_silent():
    n = 3
    for rank, (gathered, shard, warned) in enumerate(
            labkit.launch(shims, nprocs=n, args=(False,), quiet=True)):
        assert gathered == [v for r in range(n) for v in (r, 10.0 * r)]
        # sum over ranks of (arange(2n) + r), slice `rank`
        assert shard == [n * (2 * rank + i) + sum(range(n)) for i in range(2)]
        assert "FutureWarning" not in warned and "DeprecationWarning" not in warned, warned


def test_compat_collectives_fall_back_to_the_old_names():
    n = 2
    for rank, (gathered, shard, _) in enumerate(
            labkit.launch(shims, nprocs=n, args=(True,), quiet=True)):
        assert gathered == [0.0, 0.0, 1.0, 10.0]
        assert shard == [n * (2 * rank + i) + 1 for i in range(2)]


def test_compat_picks_the_new_name_when_torch_has_it():
    new = getattr(dist, "all_gather_single", None)
    expected = new if new is not None else dist.all_gather_into_tensor
    assert compat._newest("all_gather_single", "all_gather_into_tensor") is expected


def ddp_step_on_gpu():
    device = torch.device("cuda", torch.cuda.current_device())  # the launcher set LOCAL_RANK's
    model = torch.nn.parallel.DistributedDataParallel(mlp().to(device), device_ids=[device])
    with CommCounter() as step:
        model(batch().to(device)).square().mean().backward()
    torch.cuda.synchronize()
    return step.summary()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for NCCL")
def test_nccl_ddp_step_all_reduces_exactly_the_fp32_gradients():
    for summary in labkit.launch(ddp_step_on_gpu, 2, backend="nccl", quiet=True):
        assert summary["all_reduce"]["payload_bytes"] == FP32 * PSI
        assert summary["all_reduce"]["seconds"] is not None
