"""Where ranks' tensors live (labkit.placement), tested without a GPU.

The rule is a pure function of the machine (GPUs, NCCL), so every row of it is checked here with
the machine's answers given; the launch carries the plan into each rank; and the host-memory path
that point-to-point takes when ranks share a GPU runs here on CPU tensors (forced), through the
same functions a GPU rank uses. What needs a GPU is in tests/gpu/.
"""
import pytest
import torch
import torch.distributed as dist

import labkit
from labkit.placement import Placement, plan, to_device


@pytest.fixture(autouse=True)
def auto_means_this_machine(monkeypatch):
    """Every test starts without LABKIT_DEVICE: importing bench/_report.py or slides/build.py
    in this pytest process (other tests do) sets it to "cpu" for the rest of the run."""
    monkeypatch.delenv("LABKIT_DEVICE", raising=False)


@pytest.mark.parametrize("nprocs, gpus, nccl, expected", [
    (2, 0, False, Placement("gloo", ("cpu", "cpu"), "no GPU")),
    (4, 0, False, Placement("gloo", ("cpu",) * 4, "no GPU")),
    (2, 2, True, Placement("nccl", ("cuda:0", "cuda:1"), "a GPU per rank")),
    (2, 8, True, Placement("nccl", ("cuda:0", "cuda:1"), "a GPU per rank")),
    (4, 1, True, Placement("gloo", ("cuda:0",) * 4, "4 ranks share 1 GPU")),
    (3, 2, True, Placement("gloo", ("cuda:0", "cuda:1", "cuda:0"), "3 ranks share 2 GPUs")),
    (2, 2, False, Placement("gloo", ("cuda:0", "cuda:1"), "a GPU per rank, gloo (no NCCL)")),
])
def test_auto_picks_nccl_with_a_gpu_per_rank_and_gloo_on_shared_gpus(nprocs, gpus, nccl, expected,
                                                                     monkeypatch):
    monkeypatch.delenv("LABKIT_DEVICE", raising=False)
    assert plan(nprocs, gpus=gpus, nccl=nccl) == expected


def test_a_shared_gpu_is_named_as_such():
    assert plan(4, gpus=1, nccl=True).shared_gpu
    assert not plan(2, gpus=2, nccl=True).shared_gpu
    assert not plan(2, gpus=0, nccl=False).shared_gpu


def test_device_cpu_keeps_a_gpu_machine_on_the_cpu(monkeypatch):
    monkeypatch.delenv("LABKIT_DEVICE", raising=False)
    assert plan(2, device="cpu", gpus=2, nccl=True) == Placement("gloo", ("cpu", "cpu"), "as asked")
    monkeypatch.setenv("LABKIT_DEVICE", "cpu")
    assert plan(2, gpus=2, nccl=True).devices == ("cpu", "cpu")
    # an explicit argument wins over the environment
    assert plan(2, device="cuda", gpus=2, nccl=True).backend == "nccl"


def test_backend_gloo_on_gpus_keeps_cuda_tensors(monkeypatch):
    monkeypatch.delenv("LABKIT_DEVICE", raising=False)
    assert plan(2, backend="gloo", gpus=2, nccl=True) == Placement(
        "gloo", ("cuda:0", "cuda:1"), "a GPU per rank, gloo as asked")


@pytest.mark.parametrize("kwargs, words", [
    (dict(backend="nccl", gpus=0, nccl=False), "needs a CUDA build"),
    (dict(backend="nccl", gpus=1, nccl=True), "one GPU per rank: 2 ranks but 1 GPU"),
    (dict(backend="nccl", device="cpu", gpus=2, nccl=True), "GPU tensors only"),
    (dict(device="cuda", gpus=0, nccl=False), "no GPU is visible"),
    (dict(device="tpu", gpus=0, nccl=False), "device='tpu' is not supported"),
    (dict(backend="mpi", gpus=0, nccl=False), "backend='mpi' is not supported"),
])
def test_a_choice_the_machine_cannot_honour_says_what_to_do(kwargs, words, monkeypatch):
    monkeypatch.delenv("LABKIT_DEVICE", raising=False)
    with pytest.raises(ValueError, match="[Uu]se ") as error:
        plan(2, **kwargs)
    assert words in str(error.value)


def test_a_wrong_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv("LABKIT_DEVICE", "gpu")
    with pytest.raises(ValueError, match="LABKIT_DEVICE='gpu'"):
        plan(2, gpus=0, nccl=False)


def where_am_i():
    return str(labkit.device()), dist.get_backend()


def test_each_rank_knows_its_device(no_leftovers):
    assert labkit.launch(where_am_i, 3, quiet=True) == [("cpu", "gloo")] * 3
    assert str(labkit.device()) == "cpu"   # the notebook itself is no rank


def test_launch_refuses_a_gpu_this_machine_does_not_have(no_leftovers):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no GPU is visible"):
        labkit.launch(where_am_i, 2, device="cuda", quiet=True)


def test_to_device_moves_what_it_finds_and_keeps_the_shape_of_containers():
    from collections import namedtuple
    Pair = namedtuple("Pair", "x y")
    value = {"a": [torch.ones(2), (torch.zeros(1), 3)], "b": Pair(torch.ones(1), "text"),
             "m": torch.nn.Linear(2, 2)}
    moved = to_device(value, "meta")
    assert moved["a"][0].device.type == "meta" and moved["a"][1][0].device.type == "meta"
    assert moved["a"][1][1] == 3 and isinstance(moved["a"][1], tuple)
    assert isinstance(moved["b"], Pair) and moved["b"].y == "text"
    assert moved["b"].x.device.type == "meta"
    assert moved["m"].weight.device.type == "meta"


def point_to_point_through_host():
    """The ring, its async form, a batch and a receive from any source, every tensor staged."""
    from labkit.comm import CommCounter
    from labkit.launcher import _staging
    staged = []
    _staging.install(condition=lambda t: staged.append(tuple(t.shape)) or True)
    rank, world = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % world, (rank - 1) % world
    mine = torch.full((3,), float(rank + 1))
    got = {name: torch.zeros(3) for name in ("ring", "async", "batch", "any")}
    with CommCounter() as comm:
        if rank % 2 == 0:
            dist.send(mine, right)
            dist.recv(got["ring"], left)
        else:
            dist.recv(got["ring"], left)
            dist.send(mine, right)
        receiving = dist.irecv(got["async"], left)
        sending = dist.isend(mine * 10, right)
        receiving.wait()
        sending.wait()
        ops = [dist.P2POp(dist.isend, mine * 100, right), dist.P2POp(dist.irecv, got["batch"], left)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        sender = None
        if rank == 0:
            sender = dist.recv(got["any"])
        elif rank == 1:
            dist.send(mine + 1000, 0)
    payload = sum(c.payload_bytes for c in comm.calls if c.op in ("send", "recv"))
    return {k: v.tolist() for k, v in got.items()}, sender, len(staged), payload


def test_point_to_point_through_host_memory_delivers_into_the_callers_tensors(no_leftovers):
    results = labkit.launch(point_to_point_through_host, 2, quiet=True)
    for rank, (got, sender, staged, payload) in enumerate(results):
        left = (rank - 1) % 2 + 1.0
        assert got["ring"] == [left] * 3
        assert got["async"] == [left * 10] * 3
        assert got["batch"] == [left * 100] * 3
        assert staged >= 6            # every send and receive above went through the host copy
        assert payload >= 6 * 3 * 4   # the ledger still sees each send and recv with its bytes
    assert results[0][0]["any"] == [1002.0] * 3 and results[0][1] == 1
