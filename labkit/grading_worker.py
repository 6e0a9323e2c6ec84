"""One submission, graded in a process of its own: ``python -m labkit.grading_worker``.

The grading run (``grading_class``) starts one worker per submission and hands it the job as
JSON on stdin: the submitted notebook's text and the released notebook's, both read by the
grading run before any submission ran. The worker puts the notebook into a fresh sandbox
(``grading_sandbox``), runs it in a kernel there, scores it, kills whatever the kernel left
running, and answers with one JSON object on its stdout: a pipe only the grading run holds (the
kernel writes to a log in the sandbox instead), after the job's token, so that bytes a kernel
might have pushed into that pipe are recognised as not the worker's. While the kernel runs, it tells the grading run
on stderr which code cell is running ("cell 7"), for the progress line.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat

from labkit import grading, grading_sandbox

RESULT_KEYS = ("notebook", "score", "max_score")  # what a line pretending to be a grade has


def run(job: dict) -> dict:
    """Grade ``job`` in a sandbox; the answer for the grading run."""
    sandbox = grading_sandbox.Sandbox(job.get("uid"))
    try:
        name = Path(job["name"]).name
        path = sandbox.work / name
        path.write_text(job["submission"], encoding="utf-8")
        if sandbox.uid is not None:
            os.chown(path, sandbox.uid, sandbox.uid)
        template = Path(job["template"])
        released = {template: nbformat.reads(job["template_notebook"], as_version=4)}

        def on_cell(number: int) -> None:
            print(f"cell {number}", file=sys.stderr, flush=True)

        progress = _CellReporter(on_cell)
        with open(sandbox.log, "wb") as log:
            grade = grading.grade_notebook(
                path, template, job["timeout_per_cell"], progress, released=released,
                time_limit=job.get("time_limit"), private=sandbox.root,
                kernel_kwargs=sandbox.kernel_kwargs(log))
        grade.incidents.extend(_incidents(sandbox))
        grade.notebook = job["notebook"]
        executed = nbformat.writes(grade.executed) if grade.executed is not None else None
        return {"grade": grade.as_json(), "seconds": grade.seconds, "executed": executed}
    finally:
        sandbox.cleanup()


class _CellReporter:
    """The part of ``grading.Progress`` a worker needs: a callback per code cell."""

    def __init__(self, on_cell):
        self.on_cell = on_cell

    def start(self, path, template, cells):
        return self.on_cell

    def end(self, grade):
        pass


def _incidents(sandbox) -> list[str]:
    """What the submission did that it must not, seen after its kernel ended."""
    found = []
    left = grading_sandbox.reap_leftovers(sandbox.uid)
    if left:
        found.append(f"left {len(left)} process{'es' if len(left) > 1 else ''} running after "
                     f"its kernel ended ({', '.join(sorted(set(left)))}): killed")
    fakes = [line for line in _log_lines(sandbox.log) if _looks_like_a_grade(line)]
    if fakes:
        found.append(f"printed {len(fakes)} line{'s that look' if len(fakes) > 1 else ' that looks'}"
                     " like a grade to its kernel's own stdout (never the grader's output): "
                     "ignored")
    return found


def _log_lines(log: Path) -> list[str]:
    try:
        return log.read_text(encoding="utf-8", errors="replace").splitlines()[-10_000:]
    except OSError:
        return []


def _looks_like_a_grade(line: str) -> bool:
    try:
        value = json.loads(line)
    except ValueError:
        return False
    return isinstance(value, dict) and any(key in value for key in RESULT_KEYS)


def main() -> int:
    grading_sandbox.harden_this_process()
    job = json.loads(sys.stdin.read())
    try:
        answer = run(job)
    except Exception as error:  # a bug or the machine: the grading run reports it, goes on
        answer = {"error": f"grading failed: {type(error).__name__}: {error}"}
    sys.stdout.write(job.get("token", "") + json.dumps(answer))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
