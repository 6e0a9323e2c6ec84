"""Every private torch API that labkit's instruments use, in one place.

torch promises nothing about names that start with an underscore, and the instruments need a
few: the dispatch mode that sees every op, the current autograd node, the names inside an op's
schema, the process-group classes, fake tensors and the fake process group. ``labkit.memory``,
``labkit.comm`` and ``labkit.simulate`` import them from here only, so when torch moves one, the
error says which labkit tool needs what, and on which torch, instead of an AttributeError deep
inside an instrument:

    labkit.MemoryTracer needs torch._C._current_autograd_node, which this torch (2.14.0) does
    not have (AttributeError: ...); labkit is tested with torch 2.13: pip install 'torch==2.13.*'

Names are looked up when imported (``from labkit._torch_private import FakeTensorMode``), so
one that moved breaks only the tool that needs it. Beside torch's own names (the table
``_APIS``), this module gives ``DispatchMode`` (torch's TorchDispatchMode without the first-op
import of ``torch._dynamo``, see ``_dispatch_mode_without_dynamo``) and small functions for the
private attributes of ops and tensors (``op_name``, ``op_argument_names``, ``unbox``,
``tensor_version``, ``inner_tensors``, ``detach_unseen``).
"""
import functools
import importlib
from typing import NamedTuple, Optional

import torch

TESTED_TORCH = "2.13"


class MissingTorchAPI(RuntimeError, ImportError):
    """A private torch API that labkit needs is not where torch 2.13 keeps it.

    An ImportError (it is one) and a RuntimeError (what labkit.simulate raised before)."""


class _API(NamedTuple):
    module: str                   # the module torch 2.13 keeps it in
    name: Optional[str]           # its name there (None: the module itself)
    users: str                    # the labkit tools that need it, for the message
    since: Optional[str] = None   # the oldest torch that has it, where labkit states one

    @property
    def path(self):
        return f"{self.module}.{self.name}" if self.name else self.module


_DISPATCH = "torch.utils._python_dispatch"
_APIS = {
    "TorchDispatchMode": _API(_DISPATCH, "TorchDispatchMode",
                              "labkit.MemoryTracer and labkit.CommCounter"),
    "is_traceable_wrapper_subclass": _API(_DISPATCH, "is_traceable_wrapper_subclass",
                                          "labkit.MemoryTracer"),
    "current_dispatch_mode": _API(_DISPATCH, "_get_current_dispatch_mode", "labkit's tests"),
    "current_autograd_node": _API("torch._C", "_current_autograd_node", "labkit.MemoryTracer"),
    "resolve_process_group": _API("torch.distributed.distributed_c10d", "_resolve_process_group",
                                  "labkit.CommCounter"),
    "c10d_classes": _API("torch._C._distributed_c10d", None, "labkit.CommCounter"),
    "all_op_names": _API("torch._C", "_dispatch_get_all_op_names", "labkit's tests"),
    "FakeTensorMode": _API("torch._subclasses.fake_tensor", "FakeTensorMode", "labkit.simulate",
                           "2.4"),
    "FakeStore": _API("torch.testing._internal.distributed.fake_pg", "FakeStore",  # and "fake"
                      "labkit.simulate", "2.4"),
}


def missing(api, users, cause=None, since=None):
    """The error for a private torch API this torch does not have."""
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    need = f"{users} needs torch >= {since} and " if since else ""
    verb = "need" if " and " in users else "needs"
    return MissingTorchAPI(
        f"{users} {verb} {api}, which this torch ({torch.__version__}) does not have{why}; "
        f"{need}labkit is tested with torch {TESTED_TORCH}: pip install 'torch=={TESTED_TORCH}.*'")


def _resolve(name):
    """Look ``name`` up in torch, or raise MissingTorchAPI naming who needs it."""
    api = _APIS[name]
    try:
        module = importlib.import_module(api.module)
        return getattr(module, api.name) if api.name else module
    except (ImportError, AttributeError) as cause:
        raise missing(api.path, api.users, cause, api.since) from cause


def __getattr__(name):
    """``from labkit._torch_private import X``: torch's X, looked up when imported (modules that
    use one in a hot path import it once, at their top)."""
    if name == "DispatchMode":  # a class: made once, so that every mode shares it
        globals()[name] = _dispatch_mode_without_dynamo(_resolve("TorchDispatchMode"))
        return globals()[name]
    if name in _APIS:
        return _resolve(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- attributes of torch objects that are private too ----------------------------------------

def _attribute(obj, name, api, users):
    try:
        return getattr(obj, name)
    except AttributeError as cause:
        raise missing(api, users, cause) from cause


@functools.lru_cache(maxsize=None)
def op_name(func):
    """``allreduce_`` for the op ``c10d.allreduce_.default``."""
    return _attribute(func, "_opname", "OpOverload._opname", "labkit.CommCounter")


@functools.lru_cache(maxsize=None)
def op_argument_names(func):
    """The names of an op's arguments, in its schema's order."""
    schema = _attribute(func, "_schema", "OpOverload._schema", "labkit.CommCounter")
    return tuple(argument.name for argument in schema.arguments)


@functools.lru_cache(maxsize=None)
def op_argument_default(func, name):
    """The default value of one argument in an op's schema (None if it has none): a dispatch
    mode is not passed the trailing arguments left at their defaults."""
    schema = _attribute(func, "_schema", "OpOverload._schema", "labkit.CommCounter")
    return next((argument.default_value for argument in schema.arguments
                 if argument.name == name), None)


def unbox(obj, class_name):
    """A c10d ``ProcessGroup`` or ``Work`` out of the ScriptObject a c10d op hands around."""
    classes = _resolve("c10d_classes")
    klass = _attribute(classes, class_name, f"torch._C._distributed_c10d.{class_name}",
                       "labkit.CommCounter")
    return klass.unbox(obj) if isinstance(obj, torch.ScriptObject) else obj


def tensor_version(tensor):
    """How many times ``tensor`` was changed in place (autograd's check for saved tensors)."""
    try:
        return tensor._version  # read for every saved tensor: no helper in between
    except AttributeError as cause:
        raise missing("Tensor._version", "labkit.MemoryTracer", cause) from cause


def inner_tensors(tensor):
    """The plain tensors inside a wrapper subclass such as DTensor (its flatten protocol)."""
    flatten = _attribute(tensor, "__tensor_flatten__", "Tensor.__tensor_flatten__",
                         "labkit.MemoryTracer")
    return [getattr(tensor, name) for name in flatten()[0]]


try:  # a speed-up only: without these, detach_unseen is a plain detach
    _PYTHON_KEY = torch._C.DispatchKey.Python
    _python_key_excluded = torch._C._dispatch_tls_is_dispatch_key_excluded
    _exclude_python_key = torch._C._dispatch_tls_set_dispatch_key_excluded
except AttributeError:
    _PYTHON_KEY = None


def detach_unseen(tensor):
    """``tensor.detach()`` that no dispatch mode sees, for a plain tensor.

    MemoryTracer keeps a detached alias of many tensors autograd saves; through the dispatch
    modes that costs a Python dispatch (about 14 us here) for an op that changes nothing. Taking
    the Python dispatch key out of this thread's dispatch for the one call costs under 1 us (a
    guard object costs 5 us). Tensor subclasses (DTensor, fake tensors) need their own detach:
    they get the normal one.
    """
    if _PYTHON_KEY is None or type(tensor) not in (torch.Tensor, torch.nn.Parameter) \
            or _python_key_excluded(_PYTHON_KEY):
        return tensor.detach()
    _exclude_python_key(_PYTHON_KEY, True)
    try:
        return tensor.detach()
    finally:
        _exclude_python_key(_PYTHON_KEY, False)


# ---- dispatch modes without torch._dynamo ------------------------------------------------------

def _dispatch_mode_without_dynamo(base):
    """``base`` (torch's TorchDispatchMode) with a cheaper guard against torch.compile.

    torch wraps every subclass's ``__torch_dispatch__`` in ``torch._disable_dynamo``, so that a
    torch.compile'd function run inside the mode does not compile the mode's own Python. That
    wrapper imports ``torch._dynamo`` at the first op (2-4 s on 2 cores) and adds a few
    microseconds to every op. The guard below does the two things torch's does, without the
    import: the mode's code runs with Dynamo's frame hook switched off, and the guard's own frame
    is marked for Dynamo to skip (tests/test_torch_private.py checks both with torch.compile).
    Safe because the modes never compile anything themselves. A torch without these pieces keeps
    its own wrapper (slower, same behaviour).
    """
    guard = _dynamo_guard()

    class DispatchMode(base):
        @classmethod
        def _should_skip_dynamo(cls):   # torch 2.13: False = do not wrap in _disable_dynamo
            return guard is None

        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__(**kwargs)
            dispatch = cls.__dict__.get("__torch_dispatch__")
            if guard is not None and dispatch is not None and not isinstance(dispatch,
                                                                             classmethod):
                cls.__torch_dispatch__ = guard(dispatch)
    return DispatchMode


def _dynamo_guard():
    """A decorator that runs a function with Dynamo off, or None if this torch lacks the parts."""
    try:
        from torch._C._dynamo.eval_frame import (_FrameAction, _FrameExecStrategy,
                                                 set_code_exec_strategy, set_eval_frame)
        skip = _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.DEFAULT)
    except (ImportError, AttributeError, TypeError):
        return None

    def guard(function):
        @functools.wraps(function)
        def without_dynamo(*args, **kwargs):
            hook = set_eval_frame(None)      # Dynamo's frame hook, None unless compiling
            try:
                return function(*args, **kwargs)
            finally:
                set_eval_frame(hook)
        set_code_exec_strategy(without_dynamo.__code__, skip)   # Dynamo never converts it
        return without_dynamo
    return guard
