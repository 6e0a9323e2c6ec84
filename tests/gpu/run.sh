#!/usr/bin/env bash
# The GPU suite in one go, on a machine with a CUDA GPU:  bash tests/gpu/run.sh [pytest args]
#
# Prints the GPUs, the versions and what `labkit doctor` says, checks labkit's dependencies
# (naming any that are missing and what needs them), then runs pytest on tests/gpu with the
# repository on PYTHONPATH (no install needed). Everything it prints also goes to
# ${OUT:-/tmp}/gpu-suite.log, and bench/run_all.py --quick's output to bench-quick.log beside it.
# Exit status: 0 when doctor and every test passed; non-zero otherwise (3: a dependency the suite
# cannot do without is missing; 4: no CUDA GPU is visible; 124: pytest ran past its time).
#
# Settings (environment): PYTHON (default python3), GPU_SUITE_TIMEOUT (s for pytest, default
# 270, so that all of it stays under 5 minutes), GPU_SUITE_STOP_AT_FIRST=0 (run every test
# instead of stopping at the first failure, pytest -x), GPU_SUITE_ALLOW_NO_GPU=1 (let a machine
# without a GPU run it: every test skips).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
LOG_DIR=${OUT:-/tmp}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu-suite.log"
SUITE_TIMEOUT=${GPU_SUITE_TIMEOUT:-270}
VENDOR=""

# psutil is a labkit dependency (bench/run_all.py, labkit.launch's torchrun start method). A
# Python without it can borrow the copy in this checkout's .venv when one was carried here: its
# compiled part is abi3 (any CPython 3 on Linux x86_64), and only psutil itself is put on the
# path (a symlink in a folder of its own), never the .venv's torch.
borrow_psutil() {
  "$PYTHON" -c "import psutil" 2>/dev/null && return 0
  local candidate
  for candidate in "$ROOT"/.venv/lib/python3*/site-packages/psutil; do
    [ -f "$candidate/__init__.py" ] || continue
    VENDOR=$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite-psutil.XXXXXX")
    ln -s "$candidate" "$VENDOR/psutil"
    if PYTHONPATH="$VENDOR" "$PYTHON" -c "import psutil" 2>/dev/null; then
      export PYTHONPATH="$VENDOR:$PYTHONPATH"
      echo "psutil: not installed in $PYTHON; using the copy in ${candidate#"$ROOT"/}"
      return 0
    fi
    rm -rf "$VENDOR"; VENDOR=""
  done
  return 1
}

main() {
  local start=$SECONDS status=0
  trap '[ -z "$VENDOR" ] || rm -rf "$VENDOR"' EXIT   # main runs in a subshell (| tee)
  echo "== GPU suite, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname), in $ROOT"
  echo "== nvidia-smi -L"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L || echo "(nvidia-smi -L failed)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  else
    echo "(no nvidia-smi on PATH)"
  fi

  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  export GPU_SUITE_LOG_DIR="$LOG_DIR"
  if [ -n "${LABKIT_DEVICE:-}" ]; then
    echo "LABKIT_DEVICE=$LABKIT_DEVICE was set: unset for this run (the suite chooses devices)"
    unset LABKIT_DEVICE
  fi
  borrow_psutil

  echo "== versions and dependencies"
  "$PYTHON" - <<'PY'
import importlib.util, platform, re, sys
print(f"python  {platform.python_version()} ({sys.executable})")
try:
    import torch
    import torch.distributed as dist
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"torch   {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if torch.cuda.is_available() else None}, "
          f"{gpus} GPU(s) visible, NCCL {'yes' if dist.is_nccl_available() else 'no'}, "
          f"gloo {'yes' if dist.is_gloo_available() else 'no'}")
    for i in range(gpus):
        print(f"        cuda:{i} {torch.cuda.get_device_name(i)}")
except Exception as error:   # reported below as a missing dependency
    print(f"torch   cannot be imported: {type(error).__name__}: {error}")

# labkit's dependencies, from pyproject.toml, and what in this suite needs each
text = open("pyproject.toml").read()
block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
names = [re.match(r"[A-Za-z0-9_.-]+", line.strip().strip('",')).group(0)
         for line in block.splitlines() if line.strip().startswith('"')]
needed_by = {
    "torch": "everything (required)",
    "cloudpickle": "labkit.launch: every launch (required)",
    "psutil": "bench/run_all.py, launch(start_method='torchrun'); without it the bench "
              "test skips",
    "tqdm": "the benches' progress bars (bench/_report.py); without it the bench test skips",
    "numpy": "the fork server imports it when present; labkit.plots",
    "matplotlib": "labkit.plots and widgets: not used by this suite",
    "nbformat": "labkit grade / release: not used by this suite",
    "nbclient": "labkit grade: not used by this suite",
    "ipykernel": "labkit grade: not used by this suite",
}
required = {"torch", "cloudpickle", "pytest"}
missing = []
for name in names + ["pytest", "pytest-timeout"]:
    module = {"pytest-timeout": "pytest_timeout"}.get(name, name.lower().replace("-", "_"))
    found = importlib.util.find_spec(module) is not None
    what = needed_by.get(name, {"pytest": "runs the suite (required)",
                                "pytest-timeout": "optional: per-test time limits; without it "
                                                  "the launches' own timeouts bound each test"}
                         .get(name, "labkit"))
    print(f"  {'ok     ' if found else 'MISSING'} {name:<15} {what}")
    if not found:
        missing.append(name)
lost = [name for name in missing if name in required]
if missing:
    print(f"missing: {', '.join(missing)}"
          + (f"; the suite cannot run without {', '.join(lost)}" if lost else
             "; the suite runs, and what needs them skips with the reason or is not used"))
sys.exit(3 if lost else 0)
PY
  status=$?
  if [ $status -ne 0 ]; then
    echo "== cannot run the suite: install what is MISSING above into $PYTHON"
    return $status
  fi
  echo "== labkit doctor"
  local doctor=0
  if command -v timeout >/dev/null 2>&1; then
    timeout -k 5 60 "$PYTHON" -m labkit doctor --timeout 45 || doctor=$?
  else
    "$PYTHON" -m labkit doctor --timeout 45 || doctor=$?
  fi
  [ $doctor -eq 0 ] || echo "== labkit doctor failed (exit $doctor); running the tests anyway"
  if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "== no CUDA GPU is visible to torch: every test would skip"
    [ "${GPU_SUITE_ALLOW_NO_GPU:-0}" = 1 ] || return 4
  fi

  echo "== pytest tests/gpu ($SUITE_TIMEOUT s at most)"
  local stop=(-x)
  [ "${GPU_SUITE_STOP_AT_FIRST:-1}" = 0 ] && stop=()
  # -o addopts= and --confcutdir: only this folder's settings (tests/conftest.py needs psutil)
  local pytest=("$PYTHON" -m pytest tests/gpu -v -rfEs ${stop[@]+"${stop[@]}"} --tb=short
                -p no:cacheprovider -o addopts= --confcutdir=tests/gpu --durations=0 "$@")
  local tests=0
  if command -v timeout >/dev/null 2>&1; then
    timeout -s INT -k 20 "$SUITE_TIMEOUT" "${pytest[@]}" || tests=$?
  else
    "${pytest[@]}" || tests=$?
  fi
  [ $tests -eq 124 ] && echo "== pytest ran past $SUITE_TIMEOUT s and was stopped"

  echo "== done in $((SECONDS - start)) s: doctor exit $doctor, pytest exit $tests; log $LOG"
  if [ $tests -ne 0 ]; then return $tests; fi
  if [ $doctor -ne 0 ]; then return 1; fi
  echo "== GPU suite passed"
  return 0
}

main "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
