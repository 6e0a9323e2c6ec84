"""labkit: the plumbing of a hands-on course on distributed training.

Learners write the algorithms; labkit launches the ranks, and (in later modules) measures
memory and communication.
"""
import os

from labkit import _ranks
from labkit._ranks import shutdown
from labkit.errors import LaunchError, LaunchTimeout
from labkit.launch import launch

if os.environ.get("LABKIT_PRESTART", "1") != "0":
    _ranks.prestart()  # the first launch then finds torch already imported in the fork server

__all__ = ["launch", "shutdown", "LaunchError", "LaunchTimeout"]
__version__ = "0.1.0"
