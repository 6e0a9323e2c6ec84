"""Compatibility shim: one name per collective for every torch the course supports (2.4 to current).

torch 2.13 renamed the tensor forms of all-gather and reduce-scatter:
``all_gather_into_tensor`` -> ``all_gather_single`` and ``reduce_scatter_tensor`` ->
``reduce_scatter_single``; the old names still work but warn (``FutureWarning``), and older
torch has only the old names. Course code calls the functions below, which pick whichever
exists, so it runs silently on both. Same arguments and return value as torch's own.

    from labkit.compat import all_gather_into_tensor, reduce_scatter_tensor
    all_gather_into_tensor(full, shard)      # full = torch.cat of every rank's shard
    reduce_scatter_tensor(shard, full)       # shard = this rank's slice of the sum of fulls
"""
import torch.distributed as dist


def _newest(new_name, old_name):
    """torch's function under its new name when this torch has it, else under the old one."""
    return getattr(dist, new_name, None) or getattr(dist, old_name)


def all_gather_into_tensor(output, input, group=None, async_op=False):
    """Gather every rank's ``input`` into ``output`` (``world_size`` x ``input``, rank order).

    Returns a Work handle when ``async_op=True``, else None.
    """
    gather = _newest("all_gather_single", "all_gather_into_tensor")
    return gather(output, input, group=group, async_op=async_op)


def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """Reduce ``input`` (``world_size`` x ``output``) over the ranks; rank r keeps slice r.

    Returns a Work handle when ``async_op=True``, else None.
    """
    scatter = _newest("reduce_scatter_single", "reduce_scatter_tensor")
    return scatter(output, input, op=op, group=group, async_op=async_op)


__all__ = ["all_gather_into_tensor", "reduce_scatter_tensor"]
