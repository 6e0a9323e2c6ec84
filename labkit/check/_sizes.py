"""How many ranks a check runs on: the full sizes everywhere, quick ones only when an instructor
asks for them while nbgrader grades.

nbgrader sets ``NBGRADER_EXECUTION`` to "autograde" or "validate" in the kernels it runs
(nbgrader's FAQ, "Can I modify the notebook behavior during autograding or validation?"), and
``labkit grade`` sets "autograde" in its own. An instructor who grades many submissions sets
``LABKIT_AUTOGRADE_SIZES=quick`` where the grading runs; the checks that launch ranks then run
on 2 and 3 ranks instead of 2, 3, 4 (or 2 and 4). Quick sizes still try an even and an odd N,
tensors that N does not divide, every model and every step, and read the same ledger and
memory; they save the 4-rank launches, the slowest on a few cores. A check that used them says
so at the end of its line (``NOTE``).

Both variables are needed: a learner who sets ``LABKIT_AUTOGRADE_SIZES`` by hand outside
nbgrader still gets the full sizes, so a learner's own run is never lowered.
"""
import os
import warnings

MODES = ("autograde", "validate")      # the values of NBGRADER_EXECUTION that may lower sizes
SETTING = "LABKIT_AUTOGRADE_SIZES"
NOTE = f" (quick sizes for grading: {SETTING}=quick)"


def quick() -> bool:
    """True when nbgrader (or ``labkit grade``) runs this kernel and the instructor set
    ``LABKIT_AUTOGRADE_SIZES=quick``; read at every call, so a setting changed later counts."""
    if os.environ.get("NBGRADER_EXECUTION") not in MODES:
        return False
    setting = os.environ.get(SETTING, "full").strip().lower()
    if setting not in ("full", "quick", ""):
        warnings.warn(f"{SETTING}={os.environ[SETTING]!r} is neither 'quick' nor 'full': the "
                      "checks run their full sizes. Set it to 'quick' to lower them while "
                      "grading, or unset it.", stacklevel=2)
    return setting == "quick"


def pick(full, quick_sizes):
    """``quick_sizes`` when ``quick()``, else ``full``: a check's world sizes (or cases)."""
    return quick_sizes if quick() else full


def listed(numbers) -> str:
    """"2, 3 and 4", "2 and 3": world sizes as a summary names them."""
    words = [str(n) for n in numbers]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
