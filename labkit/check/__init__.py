"""The graders behind the notebooks' exercises.

A notebook's check cell passes the learner's function to its check::

    result = labkit.check.ring_all_reduce(ring_all_reduce)

The check runs the function on N ranks against an independent reference computed in the same
run (torch's own collective, or a formula), prints one line and returns a ``CheckResult``::

    ✓ ring_all_reduce: matches dist.all_reduce on 2, 3, 4 ranks ... (the measured figures)
    ✗ ring_all_reduce: <a hint that names the likely bug>
    … ring_all_reduce: not implemented yet

It never raises for a wrong or unfinished exercise, so "Run all" reaches the end of the
notebook; a deadlock or crash on the ranks is stopped after a few seconds and becomes a hint.
The hidden nbgrader test is ``assert result.passed, result.hint``. In a Jupyter kernel the
result is also published as display data of type ``application/vnd.labkit.check+json``
(name, passed, status, hint, figures), which ``labkit grade`` reads.

| notebook | check | the learner's function |
|---|---|---|
| 00 | ``sum_of_ranks`` | ``sum_of_ranks() -> float`` |
| 01 | ``ring_all_reduce`` | ``ring_all_reduce(tensor) -> None`` (in place, send/recv only) |
| 01 | ``all_reduce_via_rs_ag`` | ``all_reduce_via_rs_ag(tensor) -> None`` (in place) |

Each check takes ``timeout=`` (seconds per launch, default 10). How a grader works is meant to
be read: ``nb00_setup.py``, ``nb01_collectives.py``; the shared machinery is ``_core.py``.
"""
from labkit.check._core import (FAILED, MIMETYPE, NOT_IMPLEMENTED, PASSED, CheckResult)
from labkit.check.nb00_setup import sum_of_ranks
from labkit.check.nb01_collectives import all_reduce_via_rs_ag, ring_all_reduce

__all__ = ["CheckResult", "MIMETYPE", "PASSED", "FAILED", "NOT_IMPLEMENTED", "sum_of_ranks",
           "ring_all_reduce", "all_reduce_via_rs_ag"]
