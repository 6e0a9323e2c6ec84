"""``labkit grade``: score learner notebooks without nbgrader and without a database.

For each submitted notebook:

1. The grade cells and read-only cells (nbgrader ``grade: true`` or ``locked: true``, not solution
   cells) are put back from the released learner notebook of the same file name, matched by
   nbgrader ``grade_id``. A learner who edited a check cell, or pasted a passing output into it,
   gets the original cell back. Outputs are cleared.
2. The notebook runs top to bottom in a fresh kernel of *this* Python (like nbval's
   ``--nbval-current-env``), errors allowed, with a per-cell timeout. A cell that times out is
   interrupted; if the kernel does not answer again, it is killed and the remaining cells are
   not run. A kernel that dies (``os._exit``, a crash) ends the run the same way.
3. Each grade cell earns its points when it published a labkit check result
   (``application/vnd.labkit.check+json``), every such result says ``passed: true``, and the cell
   shows no error.

A wrong, unfinished, hanging or crashing notebook is still graded; only a grading failure (the
file is not a notebook, no released notebook to compare with, no kernel) is an error.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

MIMETYPE = "application/vnd.labkit.check+json"
DEFAULT_TIMEOUT = 120
RECOVERY_S = 15  # after a timeout, at most this long for the interrupted kernel to answer again
_PROBE = "labkit-grade-probe"


class GradingError(Exception):
    """The notebook could not be graded (as opposed to: it scored low)."""


@dataclass
class Exercise:
    name: str           # the grade cell's nbgrader grade_id
    max_points: float
    # passed, failed, not implemented, error, timeout, no result, not run, missing
    status: str
    hint: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def points(self) -> float:
        return self.max_points if self.passed else 0

    def as_json(self) -> dict:
        return {"name": self.name, "points": _number(self.points),
                "max_points": _number(self.max_points), "passed": self.passed,
                "status": self.status, "hint": self.hint}


@dataclass
class Grade:
    notebook: str
    exercises: list = field(default_factory=list)
    error: str | None = None     # set when grading itself failed
    seconds: float = 0.0
    executed: nbformat.NotebookNode | None = field(default=None, repr=False)

    @property
    def score(self) -> float:
        return sum(exercise.points for exercise in self.exercises)

    @property
    def max_score(self) -> float:
        return sum(exercise.max_points for exercise in self.exercises)

    def as_json(self) -> dict:
        return {"notebook": self.notebook, "score": _number(self.score),
                "max_score": _number(self.max_score),
                "exercises": [exercise.as_json() for exercise in self.exercises],
                "error": self.error}


def _number(value: float):
    return int(value) if float(value).is_integer() else value


def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _is_autograded(cell) -> bool:
    meta = _nbgrader(cell)
    return cell.cell_type == "code" and bool(meta.get("grade")) and not meta.get("solution")


def find_template(notebook: Path, template: Path | None = None) -> Path:
    """The released learner notebook to restore check cells from: ``template`` itself, or the
    file of the same name in ``template`` (a folder), by default the course's ``notebooks/``."""
    if template is None:
        from labkit.release import course_root
        template = course_root() / "notebooks"
    template = Path(template)
    candidate = template / notebook.name if template.is_dir() else template
    if not candidate.is_file():
        raise GradingError(f"no released notebook {candidate} to restore {notebook.name}'s check "
                           "cells from (use --template)")
    return candidate


def _read(path: Path) -> nbformat.NotebookNode:
    try:
        return nbformat.read(str(path), as_version=4)
    except Exception as error:  # missing file, bad JSON, not a notebook
        raise GradingError(f"cannot read {path}: {error}") from None


def restore_check_cells(submission, template) -> None:
    """Put the template's grade and read-only cells back, by grade_id, and clear all outputs.
    (A check cell the learner deleted stays deleted: ``score`` marks it missing.)"""
    master = {_nbgrader(c)["grade_id"]: c for c in template.cells
              if (_nbgrader(c).get("grade") or _nbgrader(c).get("locked"))
              and not _nbgrader(c).get("solution") and "grade_id" in _nbgrader(c)}
    for index, cell in enumerate(submission.cells):
        grade_id = _nbgrader(cell).get("grade_id")
        if grade_id in master:
            restored = copy.deepcopy(master[grade_id])
            if "id" in cell:
                restored["id"] = cell["id"]
            submission.cells[index] = restored
    for cell in submission.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None


def _error_output(ename: str, evalue: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[])


def _client(nb, cwd: Path, timeout: float, sockets: str, replies: dict):
    """An nbclient NotebookClient whose kernel is this Python, on Unix sockets in ``sockets``."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    class CurrentEnvSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                                    "{connection_file}"],
                              display_name="labkit grade", language="python")

    class Client(NotebookClient):
        def create_kernel_manager(self):
            # IPC transport in a private folder: no TCP port, nothing to eavesdrop on.
            self.km = AsyncKernelManager(kernel_name="python3", transport="ipc",
                                         ip=str(Path(sockets) / "kernel"),
                                         kernel_spec_manager=CurrentEnvSpecs())
            return self.km

    def keep_reply(cell, cell_index, execute_reply):
        replies[cell_index] = execute_reply

    # On a timeout nbclient interrupts the kernel and answers with this error at once.
    return Client(nb, timeout=timeout, allow_errors=True, interrupt_on_timeout=True,
                  error_on_timeout={"ename": "Timeout", "evalue": "", "traceback": []},
                  resources={"metadata": {"path": str(cwd)}}, on_cell_executed=keep_reply)


def execute(nb, cwd: Path, timeout: float = DEFAULT_TIMEOUT) -> dict[int, str]:
    """Run every code cell of ``nb`` in place; returns {cell index: why it was not run}."""
    from nbclient.exceptions import DeadKernelError

    if importlib.util.find_spec("ipykernel") is None:
        raise GradingError(f"labkit grade needs ipykernel in {sys.executable}'s environment")
    not_run, stopped, started, replies = {}, None, False, {}
    with tempfile.TemporaryDirectory(prefix="labkit-grade-") as sockets:
        client = _client(nb, cwd, timeout, sockets, replies)
        try:
            with client.setup_kernel():
                started = True
                for index, cell in enumerate(nb.cells):
                    if stopped:
                        not_run[index] = stopped
                        continue
                    try:
                        client.execute_cell(cell, index)
                    except DeadKernelError:
                        cell.outputs.append(_error_output(
                            "DeadKernelError", "the kernel died while running this cell "
                            "(os._exit, a crash or out of memory)"))
                        stopped = f"not run: the kernel died in cell {index}"
                        continue
                    if replies.pop(index, {}).get("content", {}).get("ename") == "Timeout":
                        cell.outputs.insert(0, _error_output(
                            "Timeout", f"the cell did not finish within {timeout:g} s"))
                        if not _answers_again(client):
                            client.shutdown_kernel = "immediate"  # kill it on the way out
                            stopped = (f"not run: cell {index} did not finish within "
                                       f"{timeout:g} s and the kernel ignored the interrupt")
        except Exception as error:
            if not started:  # no kernel: grading failed, not the learner
                raise GradingError(f"could not start a kernel: {error}") from None
            raise
    return not_run


def _answers_again(client) -> bool:
    """After an interrupt: does the kernel run a probe cell soon (5 s up to RECOVERY_S)?"""
    from nbclient.exceptions import DeadKernelError
    probe = nbformat.v4.new_code_cell(f"print({_PROBE!r})")
    client.nb.cells.append(probe)  # nbclient stores the executed cell at its index
    saved, client.timeout = client.timeout, min(RECOVERY_S, max(client.timeout, 5))
    try:
        client.execute_cell(probe, len(client.nb.cells) - 1, store_history=False)
    except DeadKernelError:
        return False
    finally:
        client.timeout = saved
        client.nb.cells.pop()
    return any(_PROBE in output.get("text", "") for output in probe.outputs)


def check_results(cell) -> list[dict]:
    """The labkit check results a cell published."""
    results = []
    for output in cell.get("outputs", []):
        value = output.get("data", {}).get(MIMETYPE)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                value = None
        if isinstance(value, dict):
            results.append(value)
    return results


def _cell_status(cell) -> tuple[str, str]:
    errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    if errors:
        status = "timeout" if errors[0].get("ename") == "Timeout" else "error"
        return status, f"{errors[0].get('ename')}: {errors[0].get('evalue')}"[:300]
    results = check_results(cell)
    if not results:
        return "no result", "the cell published no labkit check result"
    failing = [r for r in results if r.get("passed") is not True]
    if not failing:
        return "passed", ""
    status = failing[0].get("status")
    status = status if status in ("failed", "not implemented") else "failed"
    return status, str(failing[0].get("hint") or ("not implemented yet" if status ==
                                                  "not implemented" else ""))


def score(executed, template, not_run: dict[int, str]) -> list[Exercise]:
    """One Exercise per autograded cell of the template, in the template's order."""
    exercises = []
    for master in template.cells:
        if not _is_autograded(master):
            continue
        grade_id, points = _nbgrader(master)["grade_id"], float(_nbgrader(master).get("points", 0))
        indices = [i for i, cell in enumerate(executed.cells)
                   if _nbgrader(cell).get("grade_id") == grade_id]
        if not indices:
            exercises.append(Exercise(grade_id, points, "missing", "the check cell was deleted; "
                                      "copy it back from the released notebook"))
            continue
        statuses = [("not run", not_run[i]) if i in not_run else _cell_status(executed.cells[i])
                    for i in indices]
        status, hint = next((s for s in statuses if s[0] != "passed"), ("passed", ""))
        exercises.append(Exercise(grade_id, points, status, hint))
    return exercises


def grade_notebook(path, template=None, timeout_per_cell: float = DEFAULT_TIMEOUT) -> Grade:
    """Grade one submitted notebook. Grading failures are returned in ``Grade.error``."""
    path, started = Path(path), time.monotonic()
    grade = Grade(notebook=str(path))
    try:
        submission = _read(path)
        template_nb = _read(find_template(path, template))
        restore_check_cells(submission, template_nb)
        not_run = execute(submission, path.resolve().parent, timeout_per_cell)
        grade.exercises, grade.executed = score(submission, template_nb, not_run), submission
    except GradingError as error:
        grade.error = str(error)
    except Exception as error:  # a bug or an environment problem: still report, never hang
        grade.error = f"grading failed: {type(error).__name__}: {error}"
    grade.seconds = time.monotonic() - started
    return grade


def _fmt(value: float) -> str:
    return str(_number(value))


def table(grades: list[Grade]) -> str:
    """One notebook: a row per exercise and the total. Several: a row per notebook."""
    if len(grades) == 1 and not grades[0].error:
        grade = grades[0]
        rows = [("exercise", "points", "passed", "hint")]
        rows += [(e.name, f"{_fmt(e.points)}/{_fmt(e.max_points)}", "yes" if e.passed else "no",
                  " ".join((e.hint or ("" if e.passed else e.status)).split()))
                 for e in grade.exercises]
        rows.append(("total", f"{_fmt(grade.score)}/{_fmt(grade.max_score)}", "", ""))
    else:
        rows = [("notebook", "score", "not passed")]
        for g in grades:
            failed = ", ".join(e.name for e in g.exercises if not e.passed)
            rows.append((g.notebook, "-" if g.error else f"{_fmt(g.score)}/{_fmt(g.max_score)}",
                         f"grading failed: {g.error}" if g.error else failed))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([str(v).ljust(w) for v, w in zip(row, widths)] + [str(row[-1])])
                     .rstrip() for row in rows)
