"""``labkit.launch``: run a function defined in a notebook on N ranks, and never hang.

How it works (details in docs/launcher.md):
1. the function is shipped by value with cloudpickle to fresh rank processes, forked from a warm
   server that already imported torch (or started from scratch with ``start_method="spawn"``);
2. the notebook's process owns a loopback-only rendezvous store on a free port; each rank gets
   torchrun's environment and joins the default process group before the function runs;
3. the launcher watches every rank's pipes: output is printed line by line as ``[rank r]``,
   results and errors come back on private pipes, and a crash, a hang or the stop button ends
   with every rank stopped and reaped, and one clear error.
"""
import linecache
import os
import select
import sys
import time

import cloudpickle

from labkit.launcher import _collective_record, _hang_doctor, _pickling
from labkit.placement import plan
from labkit.launcher._framing import frame
from labkit.launcher._ranks import START_METHODS, start_rank, stop_and_reap
from labkit.launcher._platform import (default_start_method, loopback_interface,
                                       refuse_unsupported_platform, threads_per_rank,
                                       usable_cores, with_labkit_importable)
from labkit.launcher._rendezvous import LoopbackStore
from labkit.launcher._results import DEFAULT_MAX_RESULT_BYTES
from labkit.launcher._watch import Watch, collect_stacks
from labkit.launcher.errors import LaunchError, LaunchTimeout, failure_message, timeout_hint

DRAIN_AFTER_FAILURE_S = 2.0  # the ranks are killed by then; this is for their last lines


def _check_arguments(fn, nprocs, args, kwargs, timeout, start_method, grace) -> None:
    if not callable(fn):
        raise ValueError(f"fn must be a function (or other callable), got {type(fn).__name__}. "
                         "Pass the function itself: labkit.launch(work), not labkit.launch(work()).")
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be a whole number >= 1, got {nprocs!r}.")
    if not isinstance(args, (tuple, list)):
        raise ValueError(f"args must be a tuple of positional arguments, got {type(args).__name__}; "
                         "for one argument write args=(x,).")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"kwargs must be a dict, got {type(kwargs).__name__}.")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    if start_method is not None and start_method not in START_METHODS:
        raise ValueError(f"start_method={start_method!r}; use one of {', '.join(START_METHODS)}.")
    if not grace >= 0:
        raise ValueError(f"grace must be >= 0 seconds, got {grace!r}.")


def _check_max_result_bytes(limit) -> int:
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 1:
        raise ValueError(f"max_result_bytes must be a number of bytes >= 1, got {limit!r}; "
                         "e.g. max_result_bytes=8 * 1024**3 for 8 GiB.")
    return int(limit)


def _notebook_cells() -> dict:
    """Source of code that exists only in this process (notebook cells), for rank tracebacks."""
    return {name: entry for name, entry in list(linecache.cache.items())
            if len(entry) == 4 and entry[1] is None}


def _pickle_function(fn, args, kwargs) -> bytes:
    try:
        return _pickling.dumps((fn, tuple(args), dict(kwargs or {})))
    except Exception as exc:
        raise ValueError(f"labkit.launch cannot send {getattr(fn, '__name__', fn)!r} and its arguments "
                         f"to the ranks: {type(exc).__name__}: {exc}. Everything the function uses "
                         "from the notebook is copied by value; open files, locks, sockets and "
                         "generators cannot be. Create them inside the function instead.") from None


def _common_environment(threads: int, debug: bool) -> dict:
    """What every rank gets: the notebook's environment, threads, loopback-only networking."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               LABKIT_PRESTART="0")  # a rank importing labkit must not start a fork server
    loopback = loopback_interface()
    if loopback:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
        env.setdefault("NCCL_SOCKET_IFNAME", loopback)
    with_labkit_importable(env)
    if debug:
        env["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
    else:
        env.pop("TORCH_DISTRIBUTED_DEBUG", None)
    return env


def _torchrun_variables(rank: int, nprocs: int, store_env: dict) -> dict:
    """The variables torchrun sets for a rank on a single machine."""
    return dict(store_env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                LOCAL_WORLD_SIZE=str(nprocs), GROUP_RANK="0", ROLE_RANK=str(rank),
                ROLE_WORLD_SIZE=str(nprocs), ROLE_NAME="default", GROUP_WORLD_SIZE="1",
                TORCHELASTIC_RUN_ID=f"labkit-{os.getpid()}-{store_env['MASTER_PORT']}")


def _describe(outcome: dict) -> dict:
    """Turn a rank's unusual outcome into an entry for LaunchError."""
    if outcome["status"] == "unpicklable":
        return dict(outcome, type="ResultNotPicklable",
                    message=f"rank {outcome['rank']} returned a {outcome['type']}, which cannot be "
                            f"sent back to the notebook ({outcome['message']}). Return plain values: "
                            "numbers, strings, lists, dicts, numpy arrays or tensors.")
    return outcome


def _finish_failed_launch(watch: Watch, nprocs: int):
    failures = {r: _describe(o) for r, o in watch.failures().items()}
    for rank in watch.ranks:
        if rank not in watch.outcomes:
            failures[rank] = {"status": "stopped", "rank": rank, "time": float("inf"),
                              "type": "Stopped", "message": "still running after the root cause "
                              "failed; stopped by the launcher (a Connection closed by peer "
                              "consequence)", "traceback": ""}
    message, cause = failure_message(failures, nprocs)
    raise LaunchError(message, rank=cause, failures=failures)


def _rank_list(ranks) -> str:
    return ", ".join(map(str, ranks))


def _raise_timeout(watch: Watch, nprocs: int, timeout: float, record_folder: str | None) -> None:
    unfinished = watch.running()  # ranks sending their result have their own time
    collectives = _collective_record.read_all(record_folder, nprocs)  # read while they are stuck
    stacks = collect_stacks(watch, unfinished)
    finished = [r for r in sorted(watch.ranks) if r not in unfinished]
    lines = [f"TIMEOUT: rank(s) {_rank_list(unfinished)} of {nprocs} were still running after "
             f"{timeout:g} s" + (f"; rank(s) {_rank_list(finished)} had returned from the function and "
                                  "were waiting for the others to finish" if finished else "")
             + ". All ranks have been stopped.", ""]
    diagnosis = _hang_doctor.diagnose(collectives, nprocs, unfinished)
    if diagnosis:
        lines += [diagnosis, ""]
    lines += ["Where each unfinished rank was waiting (most recent call first):"]
    for rank in unfinished:
        lines += [f"[rank {rank}]", stacks.get(rank) or "  (no stack: the rank did not answer)"]
    lines += ["", timeout_hint(stacks)]   # send/recv advice, or the collective advice
    raise LaunchTimeout("\n".join(lines), rank=unfinished[0] if unfinished else None,
                        failures=watch.failures(), stacks=stacks, collectives=collectives)


def _watch_until_done(watch: Watch, nprocs: int, deadline: float, timeout: float, grace: float,
                      record_folder: str | None = None):
    first_failure = None
    while len(watch.outcomes) < nprocs:
        now = time.monotonic()
        if now >= deadline and watch.running():
            _raise_timeout(watch, nprocs, timeout, record_folder)
        _raise_if_a_result_is_late(watch, now)
        if first_failure is not None and now >= first_failure + grace:
            break
        watch.pump(min(0.1, deadline - now) if now < deadline else 0.1)
        if first_failure is None and watch.failures():
            first_failure = time.monotonic()
    if watch.failures() or len(watch.outcomes) < nprocs:
        stop_and_reap(list(watch.ranks.values()))
        watch.drain(until=min(deadline, time.monotonic() + DRAIN_AFTER_FAILURE_S))
        _finish_failed_launch(watch, nprocs)
    # every rank reported success; let them finish tearing down and flush their output
    watch.drain(until=min(deadline, time.monotonic() + 10.0))


def _raise_if_a_result_is_late(watch: Watch, now: float) -> None:
    """The timeout counts the function; a result being sent has its own budget (``_results``)."""
    rank = watch.late_sender(now)
    if rank is not None:
        raise LaunchTimeout(watch.incoming[rank].late_message(now), rank=rank,
                            failures=watch.failures())


def _results(watch: Watch, nprocs: int) -> list:
    values = []
    for rank in range(nprocs):
        try:
            values.append(cloudpickle.loads(watch.outcomes[rank]["value"]))
        except Exception as exc:
            raise LaunchError(f"ROOT CAUSE: rank {rank}'s return value could not be rebuilt in the "
                              f"notebook: {type(exc).__name__}: {exc}. Return plain values: "
                              "numbers, strings, lists, dicts, numpy arrays or tensors.",
                              rank=rank) from None
    return values


def launch(fn, nprocs: int = 2, args=(), kwargs=None, backend: str = "auto", timeout: float = 120,
           *, device: str = "auto", debug: bool = False, start_method: str | None = None, threads: int | None = None,
           collective_timeout: float | None = None, grace: float = 3.0, quiet: bool = False,
           max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES) -> list:
    """Run ``fn(*args, **kwargs)`` on ``nprocs`` ranks; return their results, index = rank.

    Inside each rank the default process group is ready (``torch.distributed`` works at once)
    and the environment is torchrun's, so the same function also runs under ``torchrun``.

    backend: "auto" (NCCL if every rank has its own GPU, else gloo), "gloo" or "nccl".
    device: where the ranks' tensors live: "auto" (a GPU when there is one, shared by several
        ranks under gloo when there are fewer GPUs than ranks; else the CPU), "cpu" or "cuda".
        Inside a rank ``labkit.device()`` answers; see ``labkit.placement``. ``LABKIT_DEVICE``
        in the environment sets what "auto" means.
    timeout: seconds for the whole launch; then LaunchTimeout shows where each rank waits.
    debug: torch's detailed collective checks (TORCH_DISTRIBUTED_DEBUG=DETAIL): mismatched
        collectives fail at once with a clear message.
    start_method: "forkserver" (fast: forked from a process that already imported torch; the
        default on Linux), "spawn" (a fresh interpreter per rank; the default elsewhere) or
        "torchrun" (real torchrun on this machine, its rendezvous kept off the network).
    threads: torch threads per rank; default max(1, usable cores // nprocs), where usable cores
        count CPU affinity and a container's CPU quota.
    collective_timeout: seconds a collective may wait inside a rank (default: timeout + 10, so
        the launcher's own timeout, which shows the stacks, comes first).
    grace: seconds the other ranks get, after the first failure, to report their own errors.
    quiet: no banner line.
    max_result_bytes: the most bytes all ranks' results may take together (default 2 GiB);
        tensors travel as CPU tensors of their own elements (a shard, not its whole base). A
        larger result is a LaunchError naming the rank and its largest part. Sending a result
        does not count against ``timeout``: it has its own, 60 s plus 1 s per 20 MiB.
    """
    _check_arguments(fn, nprocs, args, kwargs, timeout, start_method, grace)
    max_result_bytes = _check_max_result_bytes(max_result_bytes)
    refuse_unsupported_platform()
    start_method, why = (start_method, "as asked") if start_method else default_start_method()
    placement = plan(nprocs, backend, device)
    threads = threads or threads_per_rank(nprocs)
    function = _pickle_function(fn, args, kwargs)
    if not quiet:
        print(f"labkit.launch: {nprocs} rank(s), backend {placement.backend}, tensors on "
              f"{_where(placement)}, {threads} thread(s) per rank ({usable_cores()} usable "
              f"cores), start method {start_method} ({why})", flush=True)
    job = {"function": function, "backend": placement.backend, "devices": placement.devices,
           "threads": threads,
           "collective_timeout": collective_timeout or timeout + 10,
           "linecache": _notebook_cells(), "sys_path": list(sys.path), "cwd": os.getcwd(),
           "max_result_bytes": max_result_bytes}
    common_env = _common_environment(threads, debug)
    if start_method == "torchrun":
        from labkit.launcher._torchrun import launch_with_torchrun
        return launch_with_torchrun(job, nprocs, timeout, common_env)
    ranks, watch = [], None
    deadline = time.monotonic() + timeout
    record_folder = None
    with LoopbackStore(nprocs, timeout_s=timeout + 10) as store:
        try:
            # each rank notes the collectives it enters there, for a timeout's diagnosis
            record_folder = job[_collective_record.JOB_KEY] = _collective_record.create_folder()
            for rank in range(nprocs):
                env = dict(common_env, **_torchrun_variables(rank, nprocs, store.env))
                ranks.append(start_rank(rank, start_method, env, deadline))
                _send_job(ranks[-1], cloudpickle.dumps(dict(job, env=env)), deadline)
            watch = Watch(ranks, max_result_bytes)
            _watch_until_done(watch, nprocs, deadline, timeout, grace, record_folder)
            return _results(watch, nprocs)
        finally:
            stop_and_reap(ranks)
            if watch is not None:
                watch.close()
            for rank in ranks:
                rank.close_pipes()
            _collective_record.remove_folder(record_folder)


def _where(placement) -> str:
    """"cpu", "cuda:0-1 (a GPU per rank)", "cuda:0 (4 ranks share 1 GPU)" for the banner."""
    devices = sorted(set(placement.devices))
    if devices == ["cpu"]:
        return "cpu"
    indices = sorted(int(d.split(":")[1]) for d in devices)
    named = f"cuda:{indices[0]}" + (f"-{indices[-1]}" if len(indices) > 1 else "")
    return f"{named} ({placement.why})"


def _send_job(rank, job: bytes, deadline: float) -> None:
    """Write the job on the rank's stdin without ever blocking past the launch's deadline."""
    data = memoryview(frame(job))
    os.set_blocking(rank.stdin_w, False)
    while data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LaunchTimeout(f"TIMEOUT: rank {rank.rank} did not take its job before the "
                                "launch's timeout (it never started reading). All ranks have "
                                "been stopped.", rank=rank.rank)
        if not select.select([], [rank.stdin_w], [], min(remaining, 0.5))[1]:
            continue
        try:
            data = data[os.write(rank.stdin_w, data):]
        except BlockingIOError:
            continue
        except BrokenPipeError:
            return  # the rank died at once; the watcher reports it

