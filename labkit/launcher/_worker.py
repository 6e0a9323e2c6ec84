"""What runs inside one rank: set up like torchrun does, run the learner's function, report back.

The launcher sends a *job* (the cloudpickled function and its settings) on the rank's stdin and
keeps that pipe open as a lifeline: when the notebook's kernel dies, the pipe closes and the rank
exits on its own. The outcome travels back on a private result pipe, never through the store, in
the messages described in ``_results`` (the function returned; the outcome; the pickled value).
"""
import faulthandler
import linecache
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta

import cloudpickle

from labkit.launcher import _collective_hooks, _pickling
from labkit.launcher._framing import read_message, write_message
from labkit.launcher._results import (DEFAULT_MAX_RESULT_BYTES, largest_part, too_large_message,
                                      too_large_outcome)

RESULT_FD = 3  # the launcher places the result pipe on this descriptor


def _exit_when_parent_goes(stdin_fd: int) -> None:
    """Block on the lifeline pipe; EOF means the launcher (or its kernel) is gone."""
    def watch():
        try:
            while os.read(stdin_fd, 4096):
                pass
        except OSError:
            pass
        os._exit(70)
    threading.Thread(target=watch, name="labkit-lifeline", daemon=True).start()


def _skip_own_frames(exc: BaseException):
    """The traceback from the learner's function on, without the frames of this file."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__ and tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def describe_exception(exc: BaseException, rank: int) -> dict:
    """A picklable account of an exception: type, message, traceback text, when it happened."""
    return {
        "status": "error",
        "rank": rank,
        "time": time.time(),
        "type": type(exc).__qualname__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, _skip_own_frames(exc))),
    }


def set_up_process_group(job: dict) -> None:
    """Join the default process group through the launcher's store, never hosting one ourselves."""
    import torch
    import torch.distributed as dist

    timeout = timedelta(seconds=job["collective_timeout"])
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    place_rank(job, rank)
    store_path = os.environ.get("LABKIT_FILE_STORE")
    if job.get("store_address"):  # under torchrun, whose env:// has rank 0 host a store
        from labkit.launcher._rendezvous import join
        store = join(job["store_address"], os.environ["TORCHELASTIC_RUN_ID"], world_size,
                     job["collective_timeout"])
        dist.init_process_group(job["backend"], store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
    elif store_path:  # fallback for torch builds whose TCPStore cannot take a loopback socket
        dist.init_process_group(job["backend"], init_method=f"file://{store_path}",
                                rank=rank, world_size=world_size, timeout=timeout)
    else:  # a client of the launcher's loopback store, through torchrun's env:// contract
        dist.init_process_group(job["backend"], timeout=timeout)


def place_rank(job: dict, rank: int) -> None:
    """Put this rank on the device the launch planned for it (``labkit.placement``)."""
    from labkit.placement import enter
    planned = job.get("devices") or ()
    enter(planned[rank] if rank < len(planned) else "cpu", job["backend"])


def tear_down_process_group() -> None:
    """Wait for the others, then close: a rank that leaves early breaks its peers' last collective."""
    import torch.distributed as dist
    if dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:
            pass


def run_job(job: dict, on_return=None) -> dict:
    """Run the learner's function inside an initialised process group; return the outcome.

    ``on_return()`` is called as soon as the function returned, before its result is pickled, so
    the launcher can tell time spent in the function from time spent sending its result.
    """
    rank = int(os.environ["RANK"])
    try:
        fn, args, kwargs = cloudpickle.loads(job["function"])
        set_up_process_group(job)
        value = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, KeyboardInterrupt too
        return describe_exception(exc, rank)
    if on_return is not None:
        on_return()
    try:
        data = _pickling.dumps_result(value)  # once; tensors as CPU tensors of their own elements
    except Exception as exc:  # noqa: BLE001
        return {"status": "unpicklable", "rank": rank, "time": time.time(),
                "type": type(value).__qualname__, "message": f"{type(exc).__name__}: {exc}"}
    return _result_outcome(value, data, rank, job.get("max_result_bytes", DEFAULT_MAX_RESULT_BYTES))


def _result_outcome(value, data: bytes, rank: int, limit: int) -> dict:
    """"ok" with the pickled value, or "too_large" when it alone is over ``max_result_bytes``.

    A result above this rank's share of the limit also names its largest part, for the launcher's
    message when the ranks' results are too large together.
    """
    largest = None
    if len(data) > limit / int(os.environ.get("WORLD_SIZE", "1")):
        try:
            largest = largest_part(value)
        except Exception:  # noqa: BLE001 - a strange object must not hide the size itself
            pass
    if len(data) > limit:
        return too_large_outcome(rank, too_large_message(rank, len(data), limit, largest),
                                 len(data))
    return {"status": "ok", "rank": rank, "size": len(data), "largest": largest, "value": data}


def _prepare_process(job: dict) -> None:
    """Match torchrun's environment and make stdout/stderr stream whole lines."""
    if "env" in job:  # under labkit.launch; under torchrun the environment is torchrun's own
        os.environ.clear()
        os.environ.update(job["env"])
    sys.path[:] = job["sys_path"]
    os.chdir(job["cwd"])
    linecache.cache.update(job.get("linecache", {}))  # notebook cells, so tracebacks show code
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    import torch
    torch.set_num_threads(job["threads"])
    import torch.distributed as dist
    dist.set_debug_level_from_env()
    _collective_hooks.install_from_job(job)   # before the function is unpickled: see the module
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


def main(stdin_fd: int = 0, result_fd: int = RESULT_FD) -> None:
    """Entry point of a rank started by labkit.launch (fresh interpreter or fork server child)."""
    raw = read_message(stdin_fd)
    if raw is None:
        os._exit(2)
    job = cloudpickle.loads(raw)
    if job.get("session"):  # persistent ranks (%%ranks): stdin goes on carrying commands
        from labkit.launcher._rank_loop import serve
        serve(job, stdin_fd, result_fd)  # never returns
    _exit_when_parent_goes(stdin_fd)
    _prepare_process(job)
    # the messages of labkit.launcher._results: "returned", the outcome, then the value alone
    outcome = run_job(job, on_return=lambda: write_message(
        result_fd, cloudpickle.dumps({"status": "returned", "rank": int(os.environ["RANK"])})))
    _collective_hooks.stop()   # labkit's own tear-down below is not the learner's
    value = outcome.pop("value", None)
    write_message(result_fd, cloudpickle.dumps(outcome))
    if value is not None:
        write_message(result_fd, value)
    if outcome["status"] == "ok":
        tear_down_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if outcome["status"] == "ok" else 1)


def main_under_torchrun(folder: str) -> None:
    """Entry point of a rank started by torchrun: the job and the results are files in ``folder``.

    The launcher holds the folder's lifeline open; when it closes, this rank exits, even when
    torchrun's agent is gone too.
    """
    from labkit.launcher._torchrun import open_lifeline
    try:
        lifeline = open_lifeline(folder)
    except OSError:  # the folder is gone: the launch is already over
        os._exit(70)
    _exit_when_parent_goes(lifeline)
    with open(os.path.join(folder, "job.pkl"), "rb") as f:
        job = cloudpickle.loads(f.read())
    _prepare_process(job)
    outcome = run_job(job)
    _collective_hooks.stop()   # labkit's own tear-down below is not the learner's
    path = os.path.join(folder, f"result-{os.environ['RANK']}.pkl")
    with open(path + ".part", "wb") as f:
        f.write(cloudpickle.dumps(outcome))
    os.replace(path + ".part", path)
    if outcome["status"] == "ok":
        tear_down_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if outcome["status"] == "ok" else 1)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main_under_torchrun(sys.argv[1])
    else:
        main()
