"""Results of any shape come back at the size of what they hold, within a limit, in their own time.

Every tensor in a rank's result, wherever it sits, comes back as a CPU tensor holding only its own
elements (a shard, not its whole base); results larger than ``max_result_bytes`` are a clear
error; sending a result does not count against the function's timeout but has a budget of its own.
"""
import collections
import dataclasses
import os
import re
import time

import cloudpickle
import pytest
import torch
import torch.distributed as dist

import labkit

BASE = 1_000_000  # elements of the tensor that shards are cut from (4 MB of float32)


@pytest.fixture
def pipe_bytes(monkeypatch):
    """rank -> bytes of its pickled result as they arrived on its result pipe."""
    from labkit.launcher import _launch
    seen, original = {}, _launch._results

    def recording(watch, nprocs):
        seen.update({r: len(o["value"]) for r, o in watch.outcomes.items()})
        return original(watch, nprocs)

    monkeypatch.setattr(_launch, "_results", recording)
    return seen


def base(seed=0):
    return torch.randn(BASE, generator=torch.Generator().manual_seed(seed))


def own_bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- the pickler itself ----

def test_a_shard_view_is_pickled_as_its_own_elements():
    from labkit.launcher._pickling import dumps_result
    whole = base()
    shards = {"slice": whole[10:20], "column": whole.view(1000, 1000)[:, 3],
              "transposed": whole.view(1000, 1000)[:10].t(), "every other": whole[::2][:7],
              "expanded": whole[:1].expand(500, 500), "empty": whole[:0],
              "bfloat16": whole.bfloat16()[100:110], "complex conj": torch.randn(8, dtype=torch.complex64).conj()}
    for name, shard in shards.items():
        data = dumps_result(shard)
        assert len(data) < own_bytes(shard[:1] if name == "expanded" else shard) + 1000, name
        back = cloudpickle.loads(data)
        assert type(back) is torch.Tensor and back.device.type == "cpu", name
        assert back.dtype == shard.dtype and back.shape == shard.shape, name
        assert torch.equal(back, shard), name
    assert len(dumps_result(whole)) < own_bytes(whole) + 1000  # a whole tensor is not copied twice


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_parameters_sparse_and_odd_tensors_survive_the_pickler():
    from labkit.launcher._pickling import dumps_result
    weight = torch.nn.Parameter(base()[:12].view(3, 4))
    sparse = torch.sparse_coo_tensor([[0, 3]], [1.0, 2.0], (5,), check_invariants=True)
    value = {"weight": weight, "sparse": sparse, "csr": torch.eye(3).to_sparse_csr(),
             "meta": torch.empty(2, 3, device="meta"), "long": torch.arange(5)[1:3],
             "non-leaf": base()[:4].requires_grad_() * 2}
    data = dumps_result(value)
    assert len(data) < 8000  # none of them dragged the 4 MB base along
    back = cloudpickle.loads(data)
    assert type(back["weight"]) is torch.nn.Parameter and back["weight"].requires_grad
    assert torch.equal(back["weight"].detach(), weight.detach())
    assert torch.equal(back["sparse"].to_dense(), sparse.to_dense())
    assert torch.equal(back["csr"].to_dense(), torch.eye(3))
    assert back["meta"].device.type == "meta" and back["meta"].shape == (2, 3)
    assert torch.equal(back["long"], torch.tensor([1, 2]))
    assert not back["non-leaf"].requires_grad and torch.equal(back["non-leaf"], base()[:4] * 2)


# ---- end to end through launch ----

def flat_state_dict():
    """A ZeRO-style model: every parameter is a view into one flat buffer of BASE elements."""
    model = torch.nn.Linear(10, 10)
    flat = base(dist.get_rank())
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.data = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
    return model.state_dict()


def test_a_state_dict_comes_back_as_an_ordered_dict_of_cpu_tensors_of_their_own_size(
        pipe_bytes, no_leftovers):
    results = labkit.launch(flat_state_dict, 2, quiet=True)
    for rank, state in enumerate(results):
        assert type(state) is collections.OrderedDict and list(state) == ["weight", "bias"]
        flat = base(rank)
        assert torch.equal(state["weight"], flat[:100].view(10, 10))
        assert torch.equal(state["bias"], flat[100:110])
        assert all(t.device.type == "cpu" for t in state.values())
        assert pipe_bytes[rank] < own_bytes(*state.values()) + 2000  # not the 4 MB flat buffer


def returns_a_shard():
    whole = base()
    per_rank = BASE // dist.get_world_size()
    return whole[dist.get_rank() * per_rank:][:10]


def test_a_shard_view_crosses_the_pipe_as_its_own_elements(pipe_bytes, no_leftovers):
    results = labkit.launch(returns_a_shard, 2, quiet=True)
    for rank, shard in enumerate(results):
        assert torch.equal(shard, base()[rank * BASE // 2:][:10])
        assert pipe_bytes[rank] < 1000  # 40 bytes of elements, not the 4,000,000 of the base


Pair = collections.namedtuple("Pair", ["weight", "grad"])


@dataclasses.dataclass
class ShardState:
    step: int
    params: torch.Tensor
    extras: dict


class Holder:
    def __init__(self, tensor):
        self.tensor = tensor


def returns_a_namedtuple_and_a_dataclass():
    whole = base()
    rank = dist.get_rank()
    return {"pair": Pair(whole[rank:rank + 3], whole[rank + 3:rank + 5]),
            "state": ShardState(step=rank, params=whole[100:104],
                                extras={"moments": [whole[200:202]], "holder": Holder(whole[300:301])})}


def test_a_namedtuple_and_a_dataclass_of_shards_come_back_whole_and_small(pipe_bytes, no_leftovers):
    results = labkit.launch(returns_a_namedtuple_and_a_dataclass, 2, quiet=True)
    whole = base()
    for rank, result in enumerate(results):
        pair, state = result["pair"], result["state"]
        assert type(pair) is Pair and type(state) is ShardState and state.step == rank
        assert torch.equal(pair.weight, whole[rank:rank + 3])
        assert torch.equal(pair.grad, whole[rank + 3:rank + 5])
        assert torch.equal(state.params, whole[100:104])
        assert torch.equal(state.extras["moments"][0], whole[200:202])
        assert type(state.extras["holder"]) is Holder
        assert torch.equal(state.extras["holder"].tensor, whole[300:301])
        assert pipe_bytes[rank] < 5000  # five shards of a few elements each


def returns_a_dtensor():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return {"w": distribute_tensor(torch.arange(8.0), mesh, [Shard(0)])}


def test_a_dtensor_comes_back_as_this_ranks_local_shard(no_leftovers):
    results = labkit.launch(returns_a_dtensor, 2, quiet=True)
    for rank, result in enumerate(results):
        assert type(result["w"]) is torch.Tensor
        assert torch.equal(result["w"], torch.arange(8.0)[4 * rank:4 * rank + 4])


def returns_a_weight(size_on_rank_1):
    if dist.get_rank() == 1:
        return {"model.weight": torch.zeros(size_on_rank_1), "step": 3}
    return {"step": 3}


def test_a_result_over_the_limit_names_rank_size_and_largest_part(no_leftovers):
    with pytest.raises(labkit.LaunchError) as info:
        labkit.launch(returns_a_weight, 2, args=((1000, 1000),), max_result_bytes=100_000,
                      quiet=True)
    error = info.value
    assert error.rank == 1 and not isinstance(error, labkit.LaunchTimeout)
    message = str(error)
    assert message.startswith("ROOT CAUSE: rank 1 of 2: ResultTooLarge: rank 1 returned 3.8 MiB")
    assert "max_result_bytes (97.7 KiB, all ranks together)" in message
    assert "the largest part is result['model.weight'], a float32 tensor [1000, 1000] of 3.8 MiB" in message
    assert "raise max_result_bytes" in message


def returns_60_kb():
    return torch.zeros(15_000)


def test_results_over_the_limit_together_are_refused_by_the_launcher(no_leftovers):
    with pytest.raises(labkit.LaunchError) as info:
        labkit.launch(returns_60_kb, 2, max_result_bytes=100_000, quiet=True)
    message, rank = str(info.value), info.value.rank  # whichever rank's value came second
    assert re.match(rf"ROOT CAUSE: rank {rank} of 2: ResultTooLarge: rank {rank} returned "
                    r"59\.\d KiB; with the other ranks' 59\.\d KiB that is over max_result_bytes "
                    r"\(97\.7 KiB, all ranks together\); the largest part is result, a float32 "
                    r"tensor \[15000\] of 58\.6 KiB", message), message  # 60,000 B + pickle's own


def test_the_launcher_refuses_a_message_from_its_length_alone():
    """After the 8-byte length, before the body: the launcher never reads an oversized value."""
    from labkit.launcher._framing import frame
    from labkit.launcher._results import Allowance, IncomingResult
    allowance = Allowance(1000)
    first, second = IncomingResult(0, allowance), IncomingResult(1, allowance)
    report = lambda rank, **kw: frame(cloudpickle.dumps(dict(kw, rank=rank)))  # noqa: E731
    value = cloudpickle.dumps(bytes(600))
    wire = (report(0, status="returned") + report(0, status="ok", size=len(value), largest=None)
            + frame(value))
    for i in range(len(wire)):  # any chunking, several messages in one chunk
        outcome = first.feed(wire[i:i + 1])
    assert outcome["status"] == "ok" and outcome["value"] == value
    wire = (report(1, status="returned")
            + report(1, status="ok", size=len(value), largest="result, a bytes of 600 B")
            + frame(value)[:20])  # the length and 12 bytes of the body
    outcome = second.feed(wire)
    assert second.refused and outcome["status"] == "too_large"
    assert outcome["message"].startswith("rank 1 returned 6")
    assert "with the other ranks' 6" in outcome["message"] and "result, a bytes" in outcome["message"]


def returns_a_bad_limit():
    return 1


@pytest.mark.parametrize("limit", [0, -1, "1 GB", True])
def test_a_bad_max_result_bytes_is_a_value_error(limit):
    with pytest.raises(ValueError, match="max_result_bytes"):
        labkit.launch(returns_a_bad_limit, 1, max_result_bytes=limit, quiet=True)


class SlowToPickle:
    """Pickling it takes until ``until`` (a ``time.time()``)."""

    def __init__(self, until):
        self.until = until

    def __reduce__(self):
        time.sleep(max(0.0, self.until - time.time()))
        return (SlowToPickle, (0,))


def returns_something_slow_to_pickle(until):
    return SlowToPickle(until) if dist.get_rank() == 1 else None


def test_sending_a_result_does_not_count_against_the_functions_timeout(no_leftovers):
    labkit.warm_up()
    after_the_deadline = time.time() + 6 + 1
    results = labkit.launch(returns_something_slow_to_pickle, 2, args=(after_the_deadline,),
                            timeout=6, quiet=True)
    assert time.time() > after_the_deadline  # the result really arrived after the timeout
    assert results[0] is None and type(results[1]) is SlowToPickle


def test_a_result_that_never_finishes_pickling_ends_in_its_own_timeout(monkeypatch, no_leftovers):
    from labkit.launcher import _results
    monkeypatch.setattr(_results, "TRANSFER_BASE_S", 1.0)
    with pytest.raises(labkit.LaunchTimeout) as info:
        labkit.launch(returns_something_slow_to_pickle, 2, args=(time.time() + 600,), timeout=30,
                      quiet=True)
    assert info.value.rank == 1
    assert str(info.value).startswith("TIMEOUT: rank 1 finished its function but was still "
                                      "pickling its result")
    assert "timeout counts only the function" in str(info.value)


def stalls_while_sending(then):
    """Rank 1's result pipe stops (``then="stall"``) or the rank dies (``"die"``) mid-value."""
    from labkit.launcher import _framing, _worker
    write = _worker.write_message

    def writing(fd, data):
        if len(data) > 100_000 and dist.get_rank() == 1:
            os.write(fd, _framing.frame(data)[:50_000])  # the value's full length, then a part
            if then == "die":
                os._exit(3)
            time.sleep(600)
        write(fd, data)

    _worker.write_message = writing
    return torch.zeros(1_000_000)


def test_a_result_stuck_on_its_way_says_so(monkeypatch, no_leftovers):
    from labkit.launcher import _results
    monkeypatch.setattr(_results, "TRANSFER_BASE_S", 1.0)
    with pytest.raises(labkit.LaunchTimeout) as info:
        labkit.launch(stalls_while_sending, 2, args=("stall",), timeout=30, quiet=True)
    assert info.value.rank == 1
    assert str(info.value).startswith("TIMEOUT: rank 1 finished its function but was still "
                                      "sending its 3.8 MiB result (")


def test_a_rank_that_dies_while_sending_says_so(no_leftovers):
    with pytest.raises(labkit.LaunchError) as info:
        labkit.launch(stalls_while_sending, 2, args=("die",), timeout=30, quiet=True)
    assert info.value.rank == 1
    assert "rank 1 finished its function but ended while sending its 3.8 MiB result" in str(info.value)


def returns_cuda_tensors():
    model = torch.nn.Linear(4, 3).cuda()
    big = torch.arange(1000.0, device="cuda")
    return {"state": model.state_dict(), "shard": big[10:20], "pair": Pair(big[:2], big[2:4])}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_anywhere_in_a_result_come_back_on_the_cpu(pipe_bytes, no_leftovers):
    (result,) = labkit.launch(returns_cuda_tensors, 1, quiet=True)
    state = result["state"]
    assert type(state) is collections.OrderedDict and list(state) == ["weight", "bias"]
    tensors = [*state.values(), result["shard"], *result["pair"]]
    assert all(t.device.type == "cpu" for t in tensors)
    assert torch.equal(result["shard"], torch.arange(10.0, 20.0))
    assert torch.equal(result["pair"].grad, torch.tensor([2.0, 3.0]))
    assert pipe_bytes[0] < own_bytes(*tensors) + 5000
