"""The kernel of a graded submission: ``python -m labkit._sandboxed_kernel -f CONNECTION``.

ipykernel, started not dumpable (Linux): another submission's kernel, graded at the same time as
the same user, cannot open this one's pipes or read its memory through /proc.
"""
import sys

if __name__ == "__main__":
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    from ipykernel import kernelapp
    kernelapp.launch_new_instance()
