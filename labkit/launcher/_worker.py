"""What runs inside one rank: set up like torchrun does, run the learner's function, report back.

The launcher sends a *job* (the cloudpickled function and its settings) on the rank's stdin and
keeps that pipe open as a lifeline: when the notebook's kernel dies, the pipe closes and the rank
exits on its own. The outcome travels back on a private result pipe, never through the store.
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

from labkit.launcher._framing import read_message, write_message

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


def _to_cpu(value):
    """Tensors come back on the CPU, so the notebook never needs the ranks' GPUs."""
    import torch
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if type(value) in (list, tuple):
        return type(value)(_to_cpu(v) for v in value)
    if type(value) is dict:
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


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
    import torch
    import torch.distributed as dist

    timeout = timedelta(seconds=job["collective_timeout"])
    if job["backend"] == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    store_path = os.environ.get("LABKIT_FILE_STORE")
    if store_path:  # fallback for torch builds whose TCPStore cannot take a loopback socket
        dist.init_process_group(job["backend"], init_method=f"file://{store_path}",
                                rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    else:
        dist.init_process_group(job["backend"], timeout=timeout)


def tear_down_process_group() -> None:
    """Wait for the others, then close: a rank that leaves early breaks its peers' last collective."""
    import torch.distributed as dist
    if dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:
            pass


def run_job(job: dict) -> dict:
    """Run the learner's function inside an initialised process group; return the outcome."""
    rank = int(os.environ["RANK"])
    try:
        fn, args, kwargs = cloudpickle.loads(job["function"])
        set_up_process_group(job)
        value = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, KeyboardInterrupt too
        return describe_exception(exc, rank)
    try:
        data = cloudpickle.dumps(_to_cpu(value))
    except Exception as exc:  # noqa: BLE001
        return {"status": "unpicklable", "rank": rank, "time": time.time(),
                "type": type(value).__qualname__, "message": f"{type(exc).__name__}: {exc}"}
    return {"status": "ok", "rank": rank, "value": data}


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
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


def main(stdin_fd: int = 0, result_fd: int = RESULT_FD) -> None:
    """Entry point of a rank started by labkit.launch (fresh interpreter or fork server child)."""
    raw = read_message(stdin_fd)
    if raw is None:
        os._exit(2)
    job = cloudpickle.loads(raw)
    _exit_when_parent_goes(stdin_fd)
    _prepare_process(job)
    outcome = run_job(job)
    write_message(result_fd, cloudpickle.dumps(outcome))
    if outcome["status"] == "ok":
        tear_down_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if outcome["status"] == "ok" else 1)


def main_under_torchrun(folder: str) -> None:
    """Entry point of a rank started by torchrun: the job and the results are files in ``folder``."""
    with open(os.path.join(folder, "job.pkl"), "rb") as f:
        job = cloudpickle.loads(f.read())
    _prepare_process(job)
    outcome = run_job(job)
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
