"""The graders behind the notebooks' exercises, and hints on request.

A notebook's check cell passes the learner's function to its check::

    result = labkit.check.ring_all_reduce(ring_all_reduce)

The check runs the function on N ranks, on inputs drawn afresh in the notebook for every run,
against an independent reference computed there (a float64 sum, torch's own collective, or a
formula), reads the mechanism from each rank's ``CommCounter`` ledger (which ops, how many
bytes, to which rank), prints one line and returns a ``CheckResult``::

    ✓ ring_all_reduce: matches dist.all_reduce on 2, 3, 4 ranks ... (the measured figures)
    ✗ ring_all_reduce: <a hint that names the likely bug>
    … ring_all_reduce: not implemented yet

It never raises for a wrong or unfinished exercise, so "Run all" reaches the end of the
notebook; a deadlock or crash on the ranks is stopped after a few seconds and becomes a hint.
The hidden nbgrader test is ``assert result.passed, result.hint``. In a Jupyter kernel the
result is also published as display data of type ``application/vnd.labkit.check+json``
(name, passed, status, hint, figures), which ``labkit grade`` reads. A summary shows a measured
figure that answers a prediction only once the learner has made that prediction.

A learner who is stuck asks for hints, one level at a time (1 a nudge, the last nearly the
answer): ``labkit.check.hint("ring_all_reduce", 1)``.

| nb | check | the learner's function | values | the ledger |
|---|---|---|---|---|
| 00 | ``sum_of_ranks`` | ``() -> float`` | N(N-1)/2 on every rank | a collective, data |
| 01 | ``ring_all_reduce`` | ``(tensor) -> None`` | the sum on every rank | ring, 2(N-1) steps |
| 01 | ``ring_reduce_scatter`` | ``(tensor) -> None`` | rank r: chunk r summed | ring, N-1 steps |
| 01 | ``ring_all_gather`` | ``(tensor) -> None`` | every chunk, everywhere | ring, N-1 steps |
| 01 | ``all_reduce_while_computing`` | ``(tensors, compute)`` | sums on return | async, open |
| 01 | ``all_reduce_via_rs_ag`` | ``(tensor) -> None`` | the sum on every rank | one RS, one AG |
| 02 | ``shard_indices`` | ``(size, rank, N) -> list`` | DistributedSampler's | (no ranks) |
| 02 | ``naive_ddp`` | ``NaiveDDP(module)`` class | one process, global batch | bcast, reduces |
| 03 | ``overlapped_ddp`` | ``OverlappedDDP(module)`` class | one process, global batch | async, in backward |
| 03 | ``bucketed_ddp`` | ``BucketedDDP(module, bucket_bytes)`` | one process, global batch | reverse buckets |
| 03 | ``bucket_sizes`` | ``(param_bytes, bucket_bytes) -> list`` | the bucket rule | (no ranks) |
| 03 | ``backward_and_sync_time`` | ``(buckets, backward_s, N, alpha, beta)`` | the overlap model | (no ranks) |
| 04 | ``accumulation_step`` | ``(model, optimizer, micro_batches)`` | one big batch | k backwards |
| 04 | ``no_sync_ddp`` | ``AccumulatingDDP`` class | one process, global batch | quiet in no_sync |
| 04 | ``token_accumulation`` | ``(ddp, micro_batches)`` | one process, all tokens | one count reduce |
| 04 | ``sync_bytes_per_step``, ``activation_memory_ratio``, ``model_state_bytes`` | formulas | the formula | (no ranks) |
| 05 | ``predicted_bytes`` | ``(num_params, optimizer, precision) -> dict`` | MemoryTracer, 6 optimizer x precision pairs | (no ranks) |
| 05 | ``mixed_precision_step`` | ``(params, master, optimizer)`` | the recipe, 3 steps | tracer: 2 + 2 + 12 at rest |
| 05 | ``pos_gb`` | ``(psi, n_d) -> GB`` | ``theory.zero_memory``; Table 1's printed cells | (no ranks) |
| 06 | ``zero1`` | ``ZeRO1(params, optimizer_class, **kw)`` | one process, global batch | one RS, one AG; state 1/N |
| 06 | ``zero1_optimizer_bytes``, ``zero1_wire_bytes`` | formulas | the formula | (no ranks) |
| 07 | ``zero2`` | ``ZeRO2(params, optimizer_class, bucket_bytes, **kw)`` | one process, global batch | RS in backward; grads 1/N |
| 07 | ``zero2_state_bytes`` | formula | the formula | (no ranks) |
| 08 | ``zero3`` | ``ZeRO3(module, optimizer_class, prefetch=False, **kw)`` | one process, global batch | per unit: AG fwd, AG + RS bwd; params 1/N + 1 unit |
| 08 | ``zero3_prefetch`` | the same, ``prefetch=True`` | one process, global batch | next unit's AG async, ahead; 2 units |
| 08 | ``zero3_bytes_per_step`` | formula | the formula | (no ranks) |
| 09 | ``step_comm_time`` | ``(strategy, num_params, N, elem_bytes, alpha, beta) -> s`` | the α-β ring model per strategy | (no ranks) |
| 09 | ``smallest_world_size`` | ``(num_params, stage, device_gb) -> int`` | the smallest N_d that fits (K = 12) | (no ranks) |
| 09 | ``comm_bound_world_size`` | ``(t1, num_params, elem_bytes, alpha, beta, strategy) -> int`` | first N with comm >= T1/N | (no ranks) |
| 09 | ``misconceptions`` | ``() -> {key: bool}`` | 13 statements; wrong keys named with their measurement | (no ranks) |
| 00-02 | predictions | ``predicted_sum(n)``, ... | the formula | (no ranks) |

The predictions (``predictions.py``: ``predicted_sum``, ``ring_sends_per_rank``,
``ring_bytes_per_rank``, ``all_reduce_time``, ``crossover_size``, ``algbw_from_busbw``,
``ddp_payload_bytes``, ``ddp_bytes_per_step``) call the
learner's formula on a grid of inputs, compare with ``labkit.theory`` and name the usual mistake
without giving the formula away.

The tensor functions work in place; chunks are ``torch.tensor_split(tensor, N)``. "A ring": only
send/recv (no collective), rank r sending only to (r + 1) % N and receiving only from (r - 1) % N,
every message one chunk (floor or ceil of S/N elements), one send and one receive per step. The
ring checks run 1, 7, 12, 64, 1000 float32 and 12 float64 elements on 2, 3, 4 ranks.
``ring_reduce_scatter`` then ``ring_all_gather`` is a ring all-reduce and passes that check.
``all_reduce_via_rs_ag`` is a demo in notebook 01 now; the two ring phases replaced it there.
``naive_ddp`` trains the learner's wrapper on 2 and 4 ranks on five small models that break
naive wrappers (``labkit.models``: BatchNorm buffers, a frozen parameter, tied weights, a branch
some steps do not use) and compares every parameter and buffer with one process trained on the
global batch; ``_training.py`` runs that comparison, for notebooks 03 and 04 too.
``zero1`` and ``zero2`` train the learner's sharded optimizer (built like torch's
``ZeroRedundancyOptimizer``) the same way, with ``_sharded.py``, and read each rank's optimizer
state and gradient memory from ``MemoryTracer`` as well as the ledger; ``predicted_bytes`` and
``mixed_precision_step`` (05) measure one process with the tracer.
Each check takes ``timeout=`` (seconds per launch, default 10). How a grader works is meant to
be read: ``nb00_setup.py``, ``nb01_collectives.py``, ``nb01_ring_phases.py``,
``nb01_async.py``, ``nb02_ddp.py``, ``nb06_zero1.py``, ``predictions.py``; the ring in the ledger is ``_ring.py``,
the cases and inputs ``_allreduce.py``, training on N ranks against one process
``_training.py``, the shared machinery ``_core.py``.

Quick sizes for grading (``_sizes.py``): where nbgrader runs the notebook (``NBGRADER_EXECUTION``
is "autograde" or "validate"; ``labkit grade`` sets "autograde") and the instructor has set
``LABKIT_AUTOGRADE_SIZES=quick``, the checks that launch ranks try 2 and 3 ranks instead of
2, 3, 4 (``sum_of_ranks``, the ring checks, ``all_reduce_via_rs_ag``) or 2 and 4 (``naive_ddp``,
``overlapped_ddp``, ``bucketed_ddp``, ``no_sync_ddp``, ``zero1``, ``zero2``, ``zero3``,
``zero3_prefetch``: the 4-rank run becomes a 3-rank run with the same models, dtypes,
optimizers and steps). The inputs and what is read from the ledger and the tracer do not
change, and an odd N and sizes N does not divide are still tried; the line ends with "(quick
sizes for grading: LABKIT_AUTOGRADE_SIZES=quick)". Either variable alone changes nothing, so
a learner's own run always has the full sizes. ``all_reduce_while_computing`` and
``token_accumulation`` already run on 2 and 3 ranks; the checks without ranks never change.
"""
from labkit.check._core import FAILED, MIMETYPE, NOT_IMPLEMENTED, PASSED, CheckResult
from labkit.check._hints import hint
from labkit.check.nb00_setup import sum_of_ranks
from labkit.check.nb01_async import all_reduce_while_computing
from labkit.check.nb01_collectives import all_reduce_via_rs_ag, ring_all_reduce
from labkit.check.nb01_ring_phases import ring_all_gather, ring_reduce_scatter
from labkit.check.nb02_ddp import naive_ddp, shard_indices
from labkit.check.nb03_buckets import (backward_and_sync_time, bucket_sizes, bucketed_ddp,
                                       overlapped_ddp)
from labkit.check.nb04_accumulation import (accumulation_step, activation_memory_ratio,
                                            model_state_bytes, no_sync_ddp, sync_bytes_per_step,
                                            token_accumulation)
from labkit.check.nb05_memory import mixed_precision_step, pos_gb, predicted_bytes
from labkit.check.nb06_zero1 import zero1, zero1_optimizer_bytes, zero1_wire_bytes
from labkit.check.nb07_zero2 import zero2, zero2_state_bytes
from labkit.check.nb08_zero3 import zero3, zero3_bytes_per_step, zero3_prefetch
from labkit.check.nb09_capstone import (comm_bound_world_size, misconceptions,
                                         smallest_world_size, step_comm_time)
from labkit.check.predictions import (algbw_from_busbw, all_reduce_time, crossover_size,
                                      ddp_bytes_per_step, ddp_payload_bytes, predicted_sum,
                                      ring_bytes_per_rank, ring_sends_per_rank)

__all__ = ["CheckResult", "MIMETYPE", "PASSED", "FAILED", "NOT_IMPLEMENTED", "hint",
           # 00
           "sum_of_ranks", "predicted_sum",
           # 01
           "ring_all_reduce", "ring_reduce_scatter", "ring_all_gather", "all_reduce_via_rs_ag",
           "all_reduce_while_computing", "ring_sends_per_rank", "ring_bytes_per_rank",
           "all_reduce_time", "crossover_size", "algbw_from_busbw",
           # 02
           "shard_indices", "naive_ddp", "ddp_payload_bytes", "ddp_bytes_per_step",
           # 03
           "overlapped_ddp", "bucketed_ddp", "bucket_sizes", "backward_and_sync_time",
           # 04
           "accumulation_step", "no_sync_ddp", "token_accumulation", "sync_bytes_per_step",
           "activation_memory_ratio", "model_state_bytes",
           # 05
           "predicted_bytes", "mixed_precision_step", "pos_gb",
           # 06
           "zero1", "zero1_optimizer_bytes", "zero1_wire_bytes",
           # 07
           "zero2", "zero2_state_bytes",
           # 08
           "zero3", "zero3_prefetch", "zero3_bytes_per_step",
           # 09
           "step_comm_time", "smallest_world_size", "comm_bound_world_size", "misconceptions"]
