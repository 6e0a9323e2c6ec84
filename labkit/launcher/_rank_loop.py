"""What a persistent rank runs (``%%ranks``): cells, one after another, in a namespace of its own.

The rank starts like a launch's rank (same pipes, environment and process group), but its job says
``"session"``: then its stdin carries commands, one framed message each, and stays its lifeline
(end of file: the kernel is gone, the rank exits at once). A reader thread takes the commands:
``status`` it answers at once, even while a cell runs (where the main thread is, live tensor
bytes); ``run``, ``push`` and ``pull`` it hands to the main thread, which runs them in order.
Every reply goes back framed on the private result pipe, as a launch's result does.

SIGINT interrupts the cell being run (a ``KeyboardInterrupt`` in the cell, at most one per cell)
and is ignored between cells. A rank blocked inside a collective (C++) does not see it until the
collective returns: the kernel then stops every rank and starts fresh ones.
"""
import ast
import builtins
import linecache
import os
import queue
import signal
import sys
import threading
import time
import traceback

import cloudpickle

from labkit.launcher import _pickling
from labkit.launcher._framing import read_message, write_message
from labkit.launcher._results import DEFAULT_MAX_RESULT_BYTES, human_size
from labkit.launcher._worker import _prepare_process, set_up_process_group

CELL_PREFIX = "<ranks cell "  # cells' file names: "<ranks cell 3>", in tracebacks and stacks
SMALL_TENSOR = 32             # elements: a tensor this small is shown whole
SHOWN_VALUES = 6              # of a larger tensor: its first few values, then min, max, mean
MAX_REPR = 600                # characters of any other value's repr


# ---- pure helpers, also used by the kernel (and tested without ranks) ----

def split_cell(code: str, filename: str):
    """(the cell's statements, its last expression or None), compiled, as a REPL runs a cell.

    The value of a last expression is shown, unless the cell ends with ``;`` (as in IPython).
    Raises SyntaxError with the cell's file name and line.
    """
    tree = ast.parse(code, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr) and not code.rstrip().endswith(";"):
        last = ast.Expression(tree.body.pop().value)
    statements = compile(tree, filename, "exec")
    return statements, (compile(last, filename, "eval") if last is not None else None)


def _shortened(text: str, most: int = MAX_REPR) -> str:
    if len(text) <= most:
        return text
    return f"{text[:most // 2]} ... {text[-(most // 2 - 5):]}"


def _safe_repr(value) -> str:
    try:
        return repr(value)
    except Exception as exc:  # noqa: BLE001 - a broken __repr__ must not hide the cell's result
        return f"<{type(value).__name__}: repr failed with {type(exc).__name__}: {exc}>"


def _number(x: float) -> str:
    return f"{x:.4g}"


def _tensor_summary(t) -> str:
    """A small tensor whole (torch's repr); a larger one as shape, dtype, device, its first
    values and min/max/mean, so four ranks' answers fit on four lines."""
    import torch
    if isinstance(t, torch.Tensor) and type(t).__name__ == "DTensor":
        return f"DTensor, local shard {_tensor_summary(t.to_local())}"
    if t.numel() <= SMALL_TENSOR or t.layout != torch.strided or t.is_meta:
        return _safe_repr(t)
    kind = "Parameter" if isinstance(t, torch.nn.Parameter) else "tensor"
    dtype = str(t.dtype).removeprefix("torch.")
    head = f"{kind} {list(t.shape)} {dtype} on {t.device}"
    if t.requires_grad:
        head += ", requires_grad"
    try:
        flat = t.detach().reshape(-1)
        first = ", ".join(_number(v) if isinstance(v, float) else str(v)
                          for v in flat[:SHOWN_VALUES].tolist())
        head += f": [{first}, ...]"
        if t.dtype == torch.bool:
            return head + f"; {int(flat.sum())} of {flat.numel()} True"
        if not t.is_complex():
            values = flat.double()
            head += (f"; min {_number(values.min().item())}, max {_number(values.max().item())},"
                     f" mean {_number(values.mean().item())}")
    except Exception:  # noqa: BLE001 - an exotic tensor: its shape alone is still useful
        pass
    return head


def summarise(value, depth: int = 0) -> str | None:
    """What a cell's last expression shows: None for None (as a REPL), tensors readable."""
    if value is None:
        return None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return _tensor_summary(value)
    if depth < 2 and torch is not None and isinstance(value, (list, tuple, dict)) \
            and len(value) <= 16:
        items = value.values() if isinstance(value, dict) else value
        if any(isinstance(item, torch.Tensor) for item in items):  # summarise each tensor in it
            if isinstance(value, dict):
                inner = ", ".join(f"{k!r}: {summarise(v, depth + 1)}" for k, v in value.items())
                return _shortened("{" + inner + "}")
            inner = ", ".join(str(summarise(v, depth + 1)) for v in value)
            if isinstance(value, tuple):
                return _shortened(f"({inner}{',' if len(value) == 1 else ''})")
            return _shortened(f"[{inner}]")
    return _shortened(_safe_repr(value))


def cell_traceback(exc: BaseException) -> str:
    """The traceback from the first frame of a cell on (labkit's own frames left out)."""
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith(CELL_PREFIX):
        tb = tb.tb_next
    if tb is None:  # raised before the cell's code ran (a SyntaxError): the exception alone
        return "".join(traceback.format_exception_only(type(exc), exc))
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _tracer_bytes() -> dict | None:
    """Live tensor bytes by category of the ``MemoryTracer`` inside its ``with`` now, if any."""
    memory = sys.modules.get("labkit.memory")
    tracers = memory.active_tracers() if memory is not None else []
    if not tracers:
        return None
    try:
        return tracers[-1].current
    except Exception:  # noqa: BLE001 - status must answer even if the tracer cannot
        return None


# ---- the rank ----

class RankLoop:
    """One persistent rank: a namespace, a queue of commands, and the replies."""

    def __init__(self, rank: int, result_fd: int, max_reply_bytes: int):
        self.rank, self.result_fd, self.max_reply_bytes = rank, result_fd, max_reply_bytes
        self.namespace = {"__name__": "__main__", "__builtins__": builtins}
        self.inbox = queue.Queue()
        self.write_lock = threading.Lock()
        self.main_thread = threading.main_thread().ident
        self.current = None      # the command the main thread is running, for status
        self.executing = False   # True while a cell's own code runs: SIGINT may interrupt it

    def reply(self, message: dict) -> None:
        data = cloudpickle.dumps(dict(message, rank=self.rank))
        with self.write_lock:  # the main thread and the reader thread both reply
            write_message(self.result_fd, data)

    def _on_sigint(self, signum, frame):
        if self.executing:  # once per cell, and only inside it: never while a reply is written
            self.executing = False
            raise KeyboardInterrupt

    def read_commands(self, stdin_fd: int) -> None:
        """The reader thread: status at once, everything else to the main thread, in order."""
        try:
            while (raw := read_message(stdin_fd)) is not None:
                command = cloudpickle.loads(raw)  # from the kernel, on a pipe only it holds
                if command["op"] == "status":
                    self.reply(self.status(command["id"]))
                else:
                    self.inbox.put(command)
        except OSError:
            pass
        os._exit(70)  # the lifeline closed: the kernel is gone, or stopped this session

    def serve_forever(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        while True:
            command = self.inbox.get()
            self.current = command
            self.reply(getattr(self, command["op"])(command))
            self.current = None

    # ---- commands run on the main thread; each returns its reply ----

    def run(self, command: dict) -> dict:
        code, filename = command["code"], command["filename"]
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        reply = {"kind": "done", "id": command["id"], "status": "ok", "value": None}
        try:
            self.executing = True
            statements, last = split_cell(code, filename)
            exec(statements, self.namespace)
            value = eval(last, self.namespace) if last is not None else None
            self.executing = False
            reply["value"] = summarise(value)
        except BaseException as exc:  # noqa: BLE001 - every failure is reported, Ctrl-C too
            self.executing = False
            reply.update(self._error(exc))
        sys.stdout.flush()
        sys.stderr.flush()
        return reply

    def push(self, command: dict) -> dict:
        linecache.cache.update(command.get("linecache", {}))
        reply = {"kind": "done", "id": command["id"], "status": "ok"}
        try:
            self.namespace.update(cloudpickle.loads(command["values"]))
        except Exception as exc:  # noqa: BLE001
            reply.update(self._error(exc))
        return reply

    def pull(self, command: dict) -> dict:
        reply = {"kind": "done", "id": command["id"], "status": "ok"}
        name = command["name"]
        if name not in self.namespace:
            return dict(reply, status="error", type="NameError", time=time.time(), traceback="",
                        message=f"name {name!r} is not defined on rank {self.rank}")
        try:
            data = _pickling.dumps_result(self.namespace[name])
        except Exception as exc:  # noqa: BLE001
            return dict(reply, status="error", type="ResultNotPicklable", time=time.time(),
                        traceback="", message=f"{name} (a {type(self.namespace[name]).__name__})"
                        f" cannot be sent to the kernel: {type(exc).__name__}: {exc}")
        if len(data) > self.max_reply_bytes:
            return dict(reply, status="error", type="ResultTooLarge", time=time.time(),
                        traceback="", message=f"{name} on rank {self.rank} pickles to "
                        f"{human_size(len(data))}, over {human_size(self.max_reply_bytes)}")
        return dict(reply, data=data)

    def _error(self, exc: BaseException) -> dict:
        return {"status": "interrupted" if isinstance(exc, KeyboardInterrupt) else "error",
                "type": type(exc).__qualname__, "message": str(exc), "time": time.time(),
                "traceback": cell_traceback(exc)}

    # ---- answered by the reader thread, while the main thread may be busy ----

    def status(self, request_id) -> dict:
        command = self.current
        busy = command is not None and command["op"] == "run"
        reply = {"kind": "status", "id": request_id, "pid": os.getpid(), "busy": busy,
                 "cell": command["filename"] if busy else None, "line": None, "source": None,
                 "function": None, "tensors": _tracer_bytes()}
        frame = sys._current_frames().get(self.main_thread) if busy else None
        if frame is not None:
            reply["function"] = frame.f_code.co_name  # innermost, e.g. all_reduce or sleep
            while frame is not None and not frame.f_code.co_filename.startswith(CELL_PREFIX):
                frame = frame.f_back
            if frame is not None:  # the innermost line of a cell (it may call a pushed function)
                reply["cell"], reply["line"] = frame.f_code.co_filename, frame.f_lineno
                source = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
                reply["source"] = source.strip()
        return reply


def serve(job: dict, stdin_fd: int, result_fd: int) -> None:
    """Entry point of a persistent rank (``_worker.main`` hands over when the job says so)."""
    rank = int(job["env"]["RANK"])
    loop = RankLoop(rank, result_fd, job.get("max_result_bytes", DEFAULT_MAX_RESULT_BYTES))
    threading.Thread(target=loop.read_commands, args=(stdin_fd,), name="labkit-commands",
                     daemon=True).start()
    try:
        _prepare_process(job)
        set_up_process_group(job)
    except BaseException as exc:  # noqa: BLE001 - the kernel says why the rank could not start
        loop.reply({"kind": "ready", "status": "error", "type": type(exc).__qualname__,
                    "message": str(exc), "time": time.time(),
                    "traceback": "".join(traceback.format_exception(exc))})
        os._exit(1)
    loop.reply({"kind": "ready", "status": "ok", "pid": os.getpid()})
    loop.serve_forever()
