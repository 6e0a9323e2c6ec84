"""The GPU suite: run with ``bash tests/gpu/run.sh`` on a machine with a CUDA GPU (README.md)."""
