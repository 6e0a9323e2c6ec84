#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image (Ubuntu). The
# autograder zip is unpacked in /autograder/source: the course (pyproject.toml, labkit/ and the
# released learner notebooks in notebooks/). See docs/instructors.md, "Grading on Gradescope".
set -euo pipefail
AUTOGRADER_ROOT="${AUTOGRADER_ROOT:-/autograder}"

apt-get update
apt-get install -y --no-install-recommends python3 python3-venv python3-pip
# A virtual environment: recent Ubuntu refuses pip installs into the system Python (PEP 668).
python3 -m venv "$AUTOGRADER_ROOT/venv"
# torch first, pinned, from the CPU index: else pip would pull PyPI's much larger CUDA build.
"$AUTOGRADER_ROOT/venv/bin/pip" install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
"$AUTOGRADER_ROOT/venv/bin/pip" install "$AUTOGRADER_ROOT/source"
