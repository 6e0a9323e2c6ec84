"""cloudpickle, keeping each function's file name so tracebacks from a rank show notebook lines.

cloudpickle 3.1 renames every code object it ships to "<dynamic-code>"; with the real name
(e.g. the notebook cell's) and the cell's source sent along, a rank's traceback shows the
learner's own lines.
"""
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


loads = cloudpickle.loads
