"""labkit: the plumbing of a hands-on course on distributed training.

Learners write the algorithms; labkit launches the ranks (``launch``), says where each rank's
tensors live (``device()``: the CPU, its own GPU, or a GPU it shares), measures memory by
category (``MemoryTracer``) and communication (``CommCounter``), and holds the formulas
(``labkit.theory``), simulated large runs (``labkit.simulate``), figures (``labkit.plots``) and
widgets (``labkit.widgets``).

Importing labkit does not import torch: the fork server then imports torch on another core while
the notebook does (see docs/architecture.md). The tools that need torch load on first use.
"""
import importlib

from labkit.launcher import LaunchError, LaunchTimeout, launch, shutdown, usable_cores, warm_up
from labkit.launcher._server import prestart_if_wanted

prestart_if_wanted()  # in a notebook: the fork server imports torch while the notebook does

_LAZY = {"MemoryTracer": "labkit.memory", "CommCounter": "labkit.comm",
         "device": "labkit.placement"}
_SUBMODULES = ("theory", "simulate", "plots", "widgets", "memory", "comm", "compat",
               "doctor", "check", "models", "stages", "placement", "trace",
               "memory_snapshot")


def load_ipython_extension(ipython):
    """``%load_ext labkit``: the ``%ranks`` and ``%%ranks`` magics (docs/ranks.md)."""
    from labkit.magics import load_ipython_extension as load
    load(ipython)


def unload_ipython_extension(ipython):
    from labkit.magics import unload_ipython_extension as unload
    unload(ipython)


def __getattr__(name):
    """Load torch-heavy tools and submodules the first time they are used."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"labkit.{name}")
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


__all__ = ["launch", "shutdown", "warm_up", "usable_cores", "LaunchError", "LaunchTimeout",
           "device", "MemoryTracer",
           "CommCounter", "theory", "simulate", "plots", "widgets", "check", "compat", "models",
           "stages"]
__version__ = "0.1.0"
