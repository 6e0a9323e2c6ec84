"""labkit._torch_private: one place for torch's private APIs, a clear error when one moves, and
dispatch modes that keep Dynamo out without importing it."""
import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

from labkit import _torch_private
from labkit._torch_private import DispatchMode, MissingTorchAPI


def test_a_moved_api_names_the_tool_the_api_and_the_torch_version(monkeypatch):
    monkeypatch.delattr(torch._C, "_current_autograd_node")  # as if torch moved it
    with pytest.raises(MissingTorchAPI) as error:
        from labkit._torch_private import current_autograd_node  # noqa: F401
    assert str(error.value).startswith(
        f"labkit.MemoryTracer needs torch._C._current_autograd_node, which this torch "
        f"({torch.__version__}) does not have (AttributeError: ")
    assert str(error.value).endswith(
        "; labkit is tested with torch 2.13: pip install 'torch==2.13.*'")
    assert isinstance(error.value, ImportError) and isinstance(error.value, RuntimeError)


def test_importing_the_memory_tracer_without_torchs_dispatch_mode_says_so(monkeypatch):
    monkeypatch.delattr(torch.utils._python_dispatch, "TorchDispatchMode")
    monkeypatch.delitem(vars(_torch_private), "DispatchMode", raising=False)  # made once
    monkeypatch.delitem(sys.modules, "labkit.memory", raising=False)  # restored afterwards
    with pytest.raises(ImportError, match=(
            r"^labkit.MemoryTracer and labkit.CommCounter need "
            r"torch.utils._python_dispatch.TorchDispatchMode, which this torch \(.+\) does not "
            r"have \(AttributeError: .*\); labkit is tested with torch 2.13")):
        importlib.import_module("labkit.memory")


def test_a_missing_module_states_the_oldest_torch_where_labkit_knows_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch._subclasses.fake_tensor", None)
    with pytest.raises(MissingTorchAPI, match=(
            r"^labkit.simulate needs torch._subclasses.fake_tensor.FakeTensorMode, which this "
            r"torch \(.+\) does not have \(ModuleNotFoundError: .*\); labkit.simulate needs "
            r"torch >= 2.4 and labkit is tested with torch 2.13")):
        from labkit._torch_private import FakeTensorMode  # noqa: F401


def test_private_attributes_of_ops_and_tensors_that_moved_are_named():
    class NotAnOp:
        pass
    with pytest.raises(MissingTorchAPI, match="labkit.CommCounter needs OpOverload._opname"):
        _torch_private.op_name(NotAnOp())
    with pytest.raises(MissingTorchAPI, match="labkit.CommCounter needs OpOverload._schema"):
        _torch_private.op_argument_names(NotAnOp())
    with pytest.raises(MissingTorchAPI, match="labkit.MemoryTracer needs Tensor._version"):
        _torch_private.tensor_version(NotAnOp())
    op = torch.ops.c10d.allreduce_.default
    assert _torch_private.op_name(op) == "allreduce_"
    assert _torch_private.op_argument_names(op)[:2] == ("tensors", "process_group")


def test_every_private_api_resolves_on_this_torch():
    for name in _torch_private._APIS:
        assert getattr(_torch_private, name) is not None, name


class Recorder(DispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_compiled_function_inside_a_labkit_mode_does_not_compile_the_mode():
    """What torch's own wrapper (torch._disable_dynamo) is for: Dynamo must not compile the
    mode's Python when a torch.compile'd function runs inside the mode."""
    from torch._dynamo.testing import CompileCounter
    backend = CompileCounter()
    compiled = torch.compile(lambda x: (x.sin() + 1).cos(), backend=backend)
    x = torch.ones(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Dynamo warns when it meets code it cannot trace
        with Recorder() as mode:
            compiled(x)
    assert backend.frame_count == 0
    assert mode.ops == ["aten.sin.default", "aten.add.Tensor", "aten.cos.default"]
    torch.compile(lambda x: x.sin() * 2, backend=backend)(x)  # outside a mode: compiled
    assert backend.frame_count == 1


def test_labkit_modes_run_ops_without_importing_dynamo():
    """torch's wrapper imports torch._dynamo (2-4 s) at the first op under any dispatch mode;
    labkit's modes do not. A fresh interpreter, so that nothing imported it before."""
    code = ("import sys, torch\n"
            "from labkit.memory import MemoryTracer\n"
            "from labkit.comm import CommCounter\n"
            "with MemoryTracer() as mem, CommCounter():\n"
            "    y = torch.ones(3) * 2\n"
            "print(mem.peak_total, 'torch._dynamo' in sys.modules)\n")
    env = dict(os.environ, LABKIT_PRESTART="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout
    assert out.split() == ["24", "False"]


def test_without_the_pieces_for_its_own_guard_a_mode_keeps_torchs(monkeypatch):
    monkeypatch.delattr(torch._C._dynamo.eval_frame, "set_code_exec_strategy")
    base = _torch_private._dispatch_mode_without_dynamo(torch.utils._python_dispatch
                                                        .TorchDispatchMode)
    assert base._should_skip_dynamo() is True  # torch wraps __torch_dispatch__ as usual

    class Doubling(base):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {})) * 2 if func is torch.ops.aten.add.Tensor \
                else func(*args, **(kwargs or {}))

    with Doubling():
        assert (torch.ones(2) + 1).tolist() == [4.0, 4.0]
