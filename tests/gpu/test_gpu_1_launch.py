"""labkit.launch on CUDA: the placement each rank gets, and every collective and point-to-point
call on CUDA tensors, with exact values (small integers in float32).

One rank per GPU under NCCL (needs 2 GPUs), and 2 and 4 ranks sharing one GPU under gloo, where
labkit routes send/recv/isend/irecv through host memory (``labkit/launcher/_staging.py``). Each
rank runs every operation and notes what raised instead of stopping at the first, so one run
names every operation that fails on this machine. What the ranks return comes back to this
process as CPU tensors (``labkit/launcher/_pickling.py``).
"""
import pytest
import torch
import torch.distributed as dist

import labkit
from labkit.compat import all_gather_into_tensor, reduce_scatter_tensor

from ._util import LAUNCH_TIMEOUT, gpus, timeout

E = 6   # elements per rank's piece; float32, small integers: every sum is exact


def every_collective_on_cuda():
    """Runs in each rank: (where the rank is, {operation: result tensor on the GPU}, errors)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    where = labkit.device()
    facts = {"device": str(where), "current_device": torch.cuda.current_device(),
             "backend": dist.get_backend(), "world": n,
             "cuda_initialized": torch.cuda.is_initialized()}
    right, left = (rank + 1) % n, (rank - 1) % n
    out, errors = {}, {}

    def arange(k, plus=0.0, times=1.0):
        return torch.arange(k, dtype=torch.float32, device=where) * times + plus

    def full(value):
        return torch.full((E,), float(value), device=where)

    def all_reduce():
        x = arange(E, plus=10 * rank)
        dist.all_reduce(x)
        return x

    def broadcast():
        x = full(rank + 1)
        dist.broadcast(x, src=n - 1)
        return x

    def all_gather_list():
        parts = [full(-1) for _ in range(n)]
        dist.all_gather(parts, full(rank))
        return torch.stack(parts)

    def all_gather_tensor():
        flat = torch.full((n * E,), -1.0, device=where)
        all_gather_into_tensor(flat, arange(E, plus=100 * rank))
        return flat

    def reduce_scatter_tensor_():
        shard = full(-1)
        reduce_scatter_tensor(shard, arange(n * E, times=rank + 1))
        return shard

    def ring_send_recv():     # blocking: even ranks send first, odd ranks receive first
        got, mine = full(-1), full(rank)
        if rank % 2 == 0:
            dist.send(mine, right)
            dist.recv(got, left)
        else:
            dist.recv(got, left)
            dist.send(mine, right)
        return got

    def ring_isend_irecv():
        got, mine = full(-1), full(10 * rank)
        requests = [dist.irecv(got, left), dist.isend(mine, right)]
        for request in requests:
            request.wait()
        return got

    def ring_batch_isend_irecv():
        got, mine = full(-1), full(rank + 100)
        ops = [dist.P2POp(dist.isend, mine, right), dist.P2POp(dist.irecv, got, left)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        return got

    for name, op in [("all_reduce", all_reduce), ("broadcast", broadcast),
                     ("all_gather_list", all_gather_list),
                     ("all_gather_into_tensor", all_gather_tensor),
                     ("reduce_scatter_tensor", reduce_scatter_tensor_),
                     ("ring_send_recv", ring_send_recv), ("ring_isend_irecv", ring_isend_irecv),
                     ("ring_batch_isend_irecv", ring_batch_isend_irecv)]:
        try:
            out[name] = op()
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001 - reported, with the others, by the test
            errors[name] = f"{type(error).__name__}: {error}"[:500]
    facts["result_devices"] = {name: str(t.device) for name, t in out.items()}
    return facts, out, errors


def expected(rank: int, n: int) -> dict:
    """What each operation must leave on ``rank``, computed on the CPU."""
    left = (rank - 1) % n
    return {
        "all_reduce": torch.arange(E, dtype=torch.float32) * n + 10 * sum(range(n)),
        "broadcast": torch.full((E,), float(n)),
        "all_gather_list": torch.stack([torch.full((E,), float(r)) for r in range(n)]),
        "all_gather_into_tensor": torch.cat([torch.arange(E, dtype=torch.float32) + 100 * r
                                             for r in range(n)]),
        "reduce_scatter_tensor": torch.arange(rank * E, (rank + 1) * E, dtype=torch.float32)
        * sum(r + 1 for r in range(n)),
        "ring_send_recv": torch.full((E,), float(left)),
        "ring_isend_irecv": torch.full((E,), float(10 * left)),
        "ring_batch_isend_irecv": torch.full((E,), float(left + 100)),
    }


def assert_every_value_exact(results, n):
    failures = []
    for rank, (facts, out, errors) in enumerate(results):
        failures += [f"rank {rank}: {name} raised {error}" for name, error in errors.items()]
        assert facts["cuda_initialized"], f"rank {rank} never used CUDA: {facts}"
        for name, want in expected(rank, n).items():
            if name in errors:
                continue
            got = out[name]
            if facts["result_devices"][name] != facts["device"]:
                failures.append(f"rank {rank}: {name} left its result on "
                                f"{facts['result_devices'][name]}, not {facts['device']}")
            if got.device.type != "cpu":
                failures.append(f"rank {rank}: {name} came back on {got.device}, not the CPU")
            if not torch.equal(got.cpu(), want):
                failures.append(f"rank {rank}: {name} gave {got.tolist()}, expected "
                                f"{want.tolist()}")
    assert not failures, "\n".join(failures)


@timeout(3 * LAUNCH_TIMEOUT)
def test_nccl_one_rank_per_gpu_every_collective_and_p2p_exact():
    if gpus() < 2:
        pytest.skip(f"NCCL needs a GPU per rank: 2 ranks, but this machine has {gpus()} GPU "
                    "(the shared-GPU tests below cover one GPU)")
    if not dist.is_nccl_available():
        pytest.skip(f"torch {torch.__version__} is built without NCCL")
    n = 2
    results = labkit.launch(every_collective_on_cuda, n, backend="auto", timeout=LAUNCH_TIMEOUT,
                            quiet=True)
    for rank, (facts, _, _) in enumerate(results):
        assert (facts["backend"], facts["device"], facts["current_device"]) == \
            ("nccl", f"cuda:{rank}", rank), facts
    assert_every_value_exact(results, n)


@timeout(3 * LAUNCH_TIMEOUT)
@pytest.mark.parametrize("nprocs", [2, 4])
def test_shared_gpu_gloo_every_collective_and_p2p_exact(nprocs, capsys):
    count = gpus()
    # One GPU: "auto" must choose gloo with every rank on cuda:0. With more GPUs "auto" gives
    # each rank its own (NCCL) when it can, so ask for gloo: ranks then take cuda:(r % GPUs).
    backend = "auto" if count == 1 else "gloo"
    results = labkit.launch(every_collective_on_cuda, nprocs, backend=backend,
                            timeout=LAUNCH_TIMEOUT)
    banner = capsys.readouterr().out
    assert f"{nprocs} rank(s), backend gloo, tensors on cuda" in banner, banner
    if count == 1:
        assert "cuda:0" in banner and f"{nprocs} ranks share 1 GPU" in banner, banner
    for rank, (facts, _, _) in enumerate(results):
        assert (facts["backend"], facts["device"], facts["current_device"]) == \
            ("gloo", f"cuda:{rank % count}", rank % count), facts
    assert_every_value_exact(results, nprocs)


def returns_cuda_tensors_in_containers():
    where = labkit.device()
    model = torch.nn.Linear(4, 3).to(where)
    with torch.no_grad():
        model.weight.copy_(torch.arange(12, dtype=torch.float32).view(3, 4))
    big = torch.arange(1000.0, device=where)
    return {"state": model.state_dict(), "shard": big[10:20], "pair": (big[:2], str(where))}


@timeout(2 * LAUNCH_TIMEOUT)
def test_results_from_cuda_tensors_arrive_on_the_cpu():
    results = labkit.launch(returns_cuda_tensors_in_containers, 2, timeout=LAUNCH_TIMEOUT,
                            quiet=True)
    for rank, result in enumerate(results):
        assert result["pair"][1].startswith("cuda"), result["pair"][1]
        weight = result["state"]["weight"]
        assert weight.device.type == "cpu"
        assert torch.equal(weight, torch.arange(12, dtype=torch.float32).view(3, 4))
        shard = result["shard"]
        assert shard.device.type == "cpu" and torch.equal(shard, torch.arange(10.0, 20.0))
        assert shard.untyped_storage().nbytes() == 10 * 4   # the shard alone, not its base
        assert result["pair"][0].device.type == "cpu"
