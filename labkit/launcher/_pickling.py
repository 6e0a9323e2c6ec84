"""cloudpickle, keeping each function's file name so tracebacks from a rank show notebook lines.

cloudpickle 3.1 renames every code object it ships to "<dynamic-code>"; with the real name
(e.g. the notebook cell's) and the cell's source sent along, a rank's traceback shows the
learner's own lines.

A rank's result is pickled with ``dumps_result``: every tensor in it, wherever it sits (a
``state_dict()``'s OrderedDict, a namedtuple, a dataclass, an object's attribute), travels as a
CPU tensor holding only its own elements. torch pickles a tensor with its whole storage, so a
10-element view of a 1M-element tensor (a ZeRO shard) would ship 4 MB, and a CUDA tensor would
reach a notebook that may have no GPU.
"""
import sys
import types
from collections import ChainMap

import cloudpickle

try:
    from cloudpickle.cloudpickle import _code_reduce
except ImportError:  # another cloudpickle layout: fall back to its default behaviour
    _code_reduce = None


def _code_reduce_keeping_filename(code: types.CodeType):
    rebuild, args = _code_reduce(code)
    args = tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)
    return rebuild, args


class _Pickler(cloudpickle.Pickler):
    if _code_reduce is not None:
        dispatch_table = ChainMap({types.CodeType: _code_reduce_keeping_filename},
                                  cloudpickle.Pickler.dispatch_table)


def dumps(obj) -> bytes:
    import io
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _reaches(t) -> int:
    """How many elements of its storage a strided tensor can reach, from its first one on."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def _compact(t):
    """``t`` itself when its storage holds just what it reaches, else a copy that does."""
    import torch
    reach = _reaches(t)
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == reach * t.element_size():
        return t
    if reach <= t.numel() and type(t) is torch.Tensor and not t.is_quantized:
        # a dense view (a shard) or an expanded one: copy the window it reaches, keep its strides
        window = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(),
                                                     (reach,), (1,))
        return window.clone().as_strided(t.shape, t.stride())
    return t.clone(memory_format=torch.contiguous_format)  # gaps between elements: just its own


def portable(t):
    """A detached CPU tensor holding only ``t``'s own elements (a DTensor: this rank's shard)."""
    import torch
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(t, dtensor.DTensor):
        t = t.to_local()  # the full tensor would need a collective; the rank sends what it holds
    t = t.detach()
    if t.device.type not in ("cpu", "meta"):
        t = t.cpu()
    if t.device.type == "cpu" and t.layout == torch.strided and not t.is_nested:
        t = _compact(t.resolve_conj().resolve_neg())
    return t


def _reduce_tensor(t, protocol: int):
    import torch
    if isinstance(t, torch.nn.Parameter):  # stays a Parameter, with its requires_grad
        t = torch.nn.Parameter(portable(t), requires_grad=t.requires_grad)
    else:
        t = portable(t)
    return t.__reduce_ex__(protocol)  # torch's own format; the tensors inside come back here


class _ResultPickler(_Pickler):
    def reducer_override(self, obj):
        torch = sys.modules.get("torch")  # no torch imported: no tensor to look for
        if torch is not None and isinstance(obj, torch.Tensor):
            return _reduce_tensor(obj, self.proto)
        return super().reducer_override(obj)


def dumps_result(obj) -> bytes:
    """Pickle a rank's result once, every tensor in it portable (see the module's docstring)."""
    import io
    buffer = io.BytesIO()
    _ResultPickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
    return buffer.getvalue()


loads = cloudpickle.loads
