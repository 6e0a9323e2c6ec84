"""labkit.launch in a plain Python process: results, output, errors, hangs, leaks, bad input."""
import functools
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist

import labkit
from conftest import fork_server_pid, leftover_processes
from labkit.launcher._platform import usable_cores


def rank_sum(offset=0.0):
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    return t.item() + offset


def describe_rank():
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "OMP_NUM_THREADS")
    return {"env": {k: os.environ.get(k) for k in keys}, "threads": torch.get_num_threads(),
            "rank": dist.get_rank(), "world": dist.get_world_size(),
            "backend": dist.get_backend()}


@pytest.mark.parametrize("nprocs", [1, 2, 4])
def test_results_come_back_by_rank(nprocs, no_leftovers):
    results = labkit.launch(describe_rank, nprocs=nprocs, quiet=True)
    assert [r["rank"] for r in results] == list(range(nprocs))
    threads = max(1, usable_cores() // nprocs)
    for rank, r in enumerate(results):
        assert r["world"] == nprocs and r["backend"] == "gloo"
        assert r["threads"] == threads and r["env"]["OMP_NUM_THREADS"] == str(threads)
        env = r["env"]
        assert (env["RANK"], env["LOCAL_RANK"]) == (str(rank), str(rank))
        assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (str(nprocs), str(nprocs))
        assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0


def test_a_collective_really_runs_across_ranks():
    assert labkit.launch(rank_sum, nprocs=4, args=(0.5,), quiet=True) == [10.5] * 4


class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def scaled_sum(self):
        return rank_sum() * self.factor


def test_lambdas_closures_methods_and_partials_are_shipped_by_value():
    base = 100.0
    closure = lambda: rank_sum() + base  # noqa: E731
    assert labkit.launch(closure, 2, quiet=True) == [103.0, 103.0]
    assert labkit.launch(Scaler(2).scaled_sum, 2, quiet=True) == [6.0, 6.0]
    assert labkit.launch(functools.partial(rank_sum, offset=1), 2, quiet=True) == [4.0, 4.0]
    assert labkit.launch(rank_sum, 2, kwargs={"offset": 2}, quiet=True) == [5.0, 5.0]


def chatty():
    print(f"first line from {dist.get_rank()}")
    print("partial ", end="")
    print("then whole")
    import sys
    print(f"to stderr from {dist.get_rank()}", file=sys.stderr)
    return None


def test_output_is_rank_tagged_whole_lines(capsys):
    labkit.launch(chatty, 2, quiet=True)
    out, err = capsys.readouterr()
    for rank in (0, 1):
        assert f"[rank {rank}] first line from {rank}\n" in out
        assert f"[rank {rank}] partial then whole\n" in out
        assert f"[rank {rank}] to stderr from {rank}\n" in err
    assert "to stderr" not in out


def fails_on_rank_2(delay):
    if dist.get_rank() == 2:
        time.sleep(delay)  # the others are already waiting in the collective
        raise ValueError("rank 2 is unhappy")
    t = torch.ones(3)
    dist.all_reduce(t)
    return t.sum().item()


@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_a_crash_names_the_root_cause_rank_fast(delay, no_leftovers):
    start = time.monotonic()
    with pytest.raises(labkit.LaunchError) as info:
        labkit.launch(fails_on_rank_2, 4, args=(delay,), quiet=True)
    assert time.monotonic() - start < 10
    error = info.value
    assert isinstance(error, RuntimeError) and not isinstance(error, labkit.LaunchTimeout)
    assert error.rank == 2
    message = str(error)
    assert message.startswith("ROOT CAUSE: rank 2 of 4: ValueError: rank 2 is unhappy")
    assert 'raise ValueError("rank 2 is unhappy")' in message  # the learner's own line
    assert "_worker.py" not in message  # labkit's frames are trimmed
    consequences = message.split("as consequences")[1]
    assert all(f"rank {r}:" in consequences for r in (0, 1, 3))


def exits_without_a_word():
    if dist.get_rank() == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(1))


def test_a_rank_that_dies_silently_is_the_root_cause(no_leftovers):
    with pytest.raises(labkit.LaunchError) as info:
        labkit.launch(exits_without_a_word, 3, quiet=True)
    assert info.value.rank == 1
    assert "ended without returning or raising" in str(info.value)


def skips_the_collective():
    if dist.get_rank() != 1:
        dist.all_reduce(torch.ones(2))
    return dist.get_rank()


def test_a_hang_times_out_with_each_stuck_ranks_stack(no_leftovers):
    start = time.monotonic()
    with pytest.raises(labkit.LaunchTimeout) as info:
        labkit.launch(skips_the_collective, 4, timeout=3, quiet=True)
    elapsed = time.monotonic() - start
    assert 3 <= elapsed < 10
    error = info.value
    assert isinstance(error, labkit.LaunchError)
    assert sorted(error.stacks) == [0, 2, 3]
    for rank in (0, 2, 3):
        assert "in all_reduce" in error.stacks[rank]
        assert "dist.all_reduce(torch.ones(2))" in error.stacks[rank]
    assert str(error).startswith("TIMEOUT: rank(s) 0, 2, 3 of 4 were still running after 3 s; "
                                 "rank(s) 1 had returned from the function")
    assert "debug=True" in str(error)                  # the collective advice, ...
    assert "point-to-point" not in str(error)          # ... not the send/recv one


def mismatched_collective():
    dist.all_reduce(torch.ones(4 if dist.get_rank() == 0 else 3))


def test_debug_mode_names_a_mismatched_collective(no_leftovers):
    start = time.monotonic()
    with pytest.raises(labkit.LaunchError) as info:
        labkit.launch(mismatched_collective, 2, debug=True, timeout=30, quiet=True)
    assert time.monotonic() - start < 15
    assert "mismatch" in str(info.value).lower()
    assert "Every rank must call the same collectives" in str(info.value)
    assert not isinstance(info.value, labkit.LaunchTimeout)


def initialises_again():
    dist.init_process_group("gloo")


def test_calling_init_process_group_again_gets_a_hint(no_leftovers):
    with pytest.raises(labkit.LaunchError) as info:
        labkit.launch(initialises_again, 2, quiet=True)
    assert "already initialised the process group" in str(info.value)


def returns_a_lock():
    return threading.Lock() if dist.get_rank() == 1 else 1


def test_an_unpicklable_result_names_rank_and_type(no_leftovers):
    with pytest.raises(labkit.LaunchError) as info:
        labkit.launch(returns_a_lock, 2, quiet=True)
    assert info.value.rank == 1
    assert "rank 1 returned a lock" in str(info.value)


@pytest.mark.parametrize("bad", [
    dict(fn=5), dict(nprocs=0), dict(nprocs=-2), dict(nprocs=1.5), dict(nprocs="2"),
    dict(backend="mpi"), dict(backend="nccl", nprocs=2), dict(timeout=0), dict(args=3),
    dict(start_method="fork"),
])
def test_bad_input_is_a_clear_value_error_before_anything_starts(bad):
    before = {p.pid for p in leftover_processes(wait_s=0)}
    arguments = dict(fn=rank_sum, nprocs=2)
    arguments.update(bad)
    if bad.get("backend") == "nccl" and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs for NCCL")
    with pytest.raises(ValueError) as info:
        labkit.launch(arguments.pop("fn"), **arguments)
    assert len(str(info.value)) > 30  # says what to do, not just "invalid"
    assert {p.pid for p in leftover_processes(wait_s=0)} <= before


def test_an_argument_that_cannot_be_sent_is_a_clear_error():
    lock = threading.Lock()
    with pytest.raises(ValueError, match="cannot send"):
        labkit.launch(lambda: lock.locked(), 2, quiet=True)


def test_twenty_launches_leak_no_process_or_descriptor(no_leftovers):
    labkit.launch(rank_sum, 2, quiet=True)  # the fork server is up
    fds_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    threads_before = threading.active_count()
    for _ in range(20):
        assert labkit.launch(rank_sum, 2, quiet=True) == [3.0, 3.0]
    assert leftover_processes() == []
    if fds_before is not None:
        assert len(os.listdir("/proc/self/fd")) == fds_before
    assert threading.active_count() == threads_before


def test_two_concurrent_launches_both_succeed(no_leftovers):
    results = {}

    def run(name, n):
        results[name] = labkit.launch(rank_sum, n, quiet=True)

    threads = [threading.Thread(target=run, args=("a", 2)), threading.Thread(target=run, args=("b", 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {"a": [3.0, 3.0], "b": [6.0, 6.0, 6.0]}


def test_spawn_start_method_gives_the_same_results(no_leftovers):
    assert labkit.launch(rank_sum, 2, start_method="spawn", quiet=True) == [3.0, 3.0]


def test_a_dead_fork_server_is_replaced_and_shutdown_stops_it(no_leftovers):
    labkit.launch(rank_sum, 2, quiet=True)
    first = fork_server_pid()
    os.kill(first, 9)
    time.sleep(0.2)
    assert labkit.launch(rank_sum, 2, quiet=True) == [3.0, 3.0]
    second = fork_server_pid()
    assert second is not None and second != first
    labkit.shutdown()
    assert fork_server_pid() is None
    assert leftover_processes() == []
    assert labkit.launch(rank_sum, 2, quiet=True) == [3.0, 3.0]  # starts again on demand


def test_the_banner_says_ranks_backend_device_and_threads(capsys):
    labkit.launch(rank_sum, 2)
    out = capsys.readouterr().out
    threads = max(1, usable_cores() // 2)
    assert f"2 rank(s), backend gloo, tensors on cpu, {threads} thread(s) per rank" in out


def test_torch_without_a_loopback_socket_store_falls_back_to_a_private_file_store(monkeypatch):
    from labkit.launcher import _rendezvous
    monkeypatch.setattr(_rendezvous, "_tcp_store_takes_a_socket", lambda: False)
    env = labkit.launch(describe_rank, 2, quiet=True)[0]["env"]
    assert env["MASTER_PORT"] == "0"  # no port was opened at all
    assert labkit.launch(rank_sum, 2, quiet=True) == [3.0, 3.0]


def gpu_rank():
    value = torch.ones(1, device="cuda") * (dist.get_rank() + 1)
    dist.all_reduce(value)
    return dist.get_backend(), torch.cuda.current_device(), value


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for NCCL")
def test_auto_backend_on_gpus_is_nccl_with_one_gpu_per_rank(no_leftovers):
    results = labkit.launch(gpu_rank, 2, quiet=True)
    for rank, (backend, device, value) in enumerate(results):
        assert (backend, device) == ("nccl", rank)
        assert value.device.type == "cpu" and value.item() == 3.0  # results come back on the CPU
