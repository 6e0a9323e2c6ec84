"""``labkit grade``: score learner notebooks without nbgrader and without a database.

For each submitted notebook:

1. The grade cells and read-only cells (nbgrader ``grade: true`` or ``locked: true``, not solution
   cells) are put back from the released learner notebook it came from, matched by nbgrader
   ``grade_id``. A learner who edited a check cell, or pasted a passing output into it, gets the
   original cell back. Outputs are cleared. The released notebook is found by content, not by
   file name: in the template folder (default ``notebooks/``), the one whose check cells'
   grade_ids best match the submission's, so ``00_setup-alice.ipynb`` is graded as ``00_setup``;
   the file name only breaks a tie. No match, or a tie, is a grading error that says to name the
   released notebook with ``--template``.
2. The notebook runs top to bottom in a fresh kernel of *this* Python (like nbval's
   ``--nbval-current-env``), errors allowed, with a per-cell timeout. The kernel listens on Unix
   sockets (IPC) in a private temporary folder, not on TCP (Windows, which has no IPC: TCP). A
   cell that times out is interrupted; if the kernel does not answer again, it is killed and the
   remaining cells are not run. A kernel that dies (``os._exit``, a crash) ends the run the same
   way. ``Progress`` shows where the run is on stderr (a line per code cell on a terminal).
3. Each grade cell earns its points when it published a labkit check result
   (``application/vnd.labkit.check+json``), every such result says ``passed: true``, and the cell
   shows no error.

A wrong, unfinished, hanging or crashing notebook is still graded; only a grading failure (the
file is not a notebook, no released notebook matches it, no kernel) is an error.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import shutil
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
    figures: dict = field(default_factory=dict)  # what the check measured, for feedback

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def points(self) -> float:
        return self.max_points if self.passed else 0

    def as_json(self) -> dict:
        return {"name": self.name, "points": _number(self.points),
                "max_points": _number(self.max_points), "passed": self.passed,
                "status": self.status, "hint": self.hint, "figures": self.figures}


@dataclass
class Grade:
    notebook: str
    exercises: list = field(default_factory=list)
    error: str | None = None     # set when grading itself failed
    template: str | None = None  # the released notebook its check cells were restored from
    manual_points: float = 0.0   # written answers (nbgrader manual cells): graded by hand
    seconds: float = 0.0
    learner: str | None = None   # the submission folder's name, when a class is graded
    key: str | None = None       # what was graded (content hashes): a re-run skips it if equal
    incidents: list = field(default_factory=list)  # what the notebook tried that it must not
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
                "error": self.error, "template": self.template,
                "manual_points": _number(self.manual_points), "learner": self.learner,
                "incidents": list(self.incidents), "key": self.key,
                "seconds": round(self.seconds, 1)}

    @classmethod
    def from_json(cls, data: dict) -> "Grade":
        """The inverse of ``as_json`` (a line of an earlier run's grades.jsonl)."""
        exercises = [Exercise(e["name"], float(e["max_points"]), e["status"], e.get("hint", ""),
                              e.get("figures") or {}) for e in data.get("exercises", [])]
        return cls(data["notebook"], exercises, data.get("error"), data.get("template"),
                   float(data.get("manual_points") or 0), float(data.get("seconds") or 0),
                   data.get("learner"), data.get("key"), list(data.get("incidents") or []))


def _number(value: float):
    return int(value) if float(value).is_integer() else value


def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _is_autograded(cell) -> bool:
    meta = _nbgrader(cell)
    return cell.cell_type == "code" and bool(meta.get("grade")) and not meta.get("solution")


def _is_manual(cell) -> bool:
    """A written answer: nbgrader grades it by hand (solution and grade cell)."""
    meta = _nbgrader(cell)
    return bool(meta.get("grade")) and bool(meta.get("solution"))


def _restored(cell) -> bool:
    """A cell ``labkit grade`` puts back from the released notebook: grade or read-only."""
    meta = _nbgrader(cell)
    return bool(meta.get("grade") or meta.get("locked")) and not meta.get("solution") \
        and "grade_id" in meta


def _check_ids(nb) -> set:
    """The grade_ids of the restored cells: together they say which assignment a notebook is."""
    return {_nbgrader(cell)["grade_id"] for cell in nb.cells if _restored(cell)}


def load_released(template: Path | None = None) -> dict:
    """{path: notebook} of the released notebooks ``template`` names (a notebook or a folder of
    them; by default the course's ``notebooks/``), read once: a class is graded against what
    they were when grading started, whatever a submission later does to the files."""
    if template is None:
        from labkit.release import course_root
        template = course_root() / "notebooks"
    template = Path(template)
    if template.is_file():
        return {template: _read(template)}
    if not template.is_dir():
        raise GradingError(f"no released notebook at {template}: --template takes a released "
                           "learner notebook or a folder of them")
    return {path: _read(path) for path in sorted(template.glob("*.ipynb"))}


def find_template(submission, name: str, template: Path | None = None,
                  released: dict | None = None) -> Path:
    """The released learner notebook to restore ``submission``'s check cells from.

    ``template`` itself when it is a file; else, of the notebooks in the folder ``template`` (by
    default the course's ``notebooks/``), the one whose check cells' grade_ids best match the
    submission's (the largest share of the ids either has in common), so a renamed copy still
    finds its assignment. The file name ``name`` only breaks a tie. ``released``: the notebooks
    ``load_released(template)`` read, when already read.
    """
    if released is None:
        released = load_released(template)
    if template is not None and Path(template).is_file():
        return Path(template)
    if template is None:
        from labkit.release import course_root
        template = course_root() / "notebooks"
    ids = _check_ids(submission)
    if not ids:
        raise GradingError(f"no released notebook matches {name}: it has no check cells (no "
                           "nbgrader grade_id in its cell metadata). Paste the learner's answers "
                           "into a copy of the released notebook and grade that, or name the "
                           "released notebook with --template PATH.ipynb")
    matches = []
    for path, notebook in sorted(released.items()):
        theirs = _check_ids(notebook)
        if ids & theirs:
            matches.append((len(ids & theirs) / len(ids | theirs), path))
    if not matches:
        shown = ", ".join(sorted(ids)[:3]) + (", ..." if len(ids) > 3 else "")
        raise GradingError(f"no released notebook in {template} matches {name}: none has any of "
                           f"its check cells ({shown}). Is it from this course? Name its "
                           "released notebook with --template PATH.ipynb")
    best = max(share for share, _ in matches)
    tied = [path for share, path in matches if share == best]
    tied = [path for path in tied if path.name == name] or tied
    if len(tied) > 1:
        raise GradingError(f"{name} matches {' and '.join(p.name for p in tied)} equally well "
                           "(the same check cells); name the right one with --template "
                           "PATH.ipynb")
    return tied[0]


def _read(path: Path) -> nbformat.NotebookNode:
    try:
        return nbformat.read(str(path), as_version=4)
    except Exception as error:  # missing file, bad JSON, not a notebook
        raise GradingError(f"cannot read {path}: {error}") from None


def restore_check_cells(submission, template) -> None:
    """Put the template's grade and read-only cells back, by grade_id, and clear all outputs.
    (A check cell the learner deleted stays deleted: ``score`` marks it missing.)"""
    master = {_nbgrader(c)["grade_id"]: c for c in template.cells if _restored(c)}
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


def kernel_transport() -> str:
    """"ipc" (Unix sockets) where zmq has them, so the kernel opens no TCP port and ipykernel does
    not warn that it runs over TCP without encryption; "tcp" on Windows, which has no IPC."""
    import zmq
    return "ipc" if os.name != "nt" and zmq.has("ipc") else "tcp"


def _client(nb, cwd: Path, timeout: float, private: str, replies: dict,
            kernel_module: str = "ipykernel_launcher", kernel_user: int | None = None):
    """An nbclient NotebookClient whose kernel is this Python (``python -m kernel_module``);
    its connection file (and its sockets, on IPC) are in the private folder ``private``. With
    ``kernel_user`` (the uid the kernel runs as), that user owns the connection file."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    class CurrentEnvSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(argv=[sys.executable, "-m", kernel_module, "-f",
                                    "{connection_file}"],
                              display_name="labkit grade", language="python")

    class Manager(AsyncKernelManager):
        def write_connection_file(self, **kwargs):
            super().write_connection_file(**kwargs)
            if kernel_user is not None:  # written 0600 by us: the kernel's user must read it
                os.chown(self.connection_file, kernel_user, kernel_user)

    class Client(NotebookClient):
        def create_kernel_manager(self):
            # On IPC the sockets are files next to the connection file (kernel-ipc-<port>).
            self.km = Manager(kernel_name="python3", transport=kernel_transport(),
                              connection_file=str(Path(private) / "kernel.json"),
                              kernel_spec_manager=CurrentEnvSpecs())
            return self.km

    def keep_reply(cell, cell_index, execute_reply):
        replies[cell_index] = execute_reply

    # On a timeout nbclient interrupts the kernel and answers with this error at once.
    return Client(nb, timeout=timeout, allow_errors=True, interrupt_on_timeout=True,
                  error_on_timeout={"ename": "Timeout", "evalue": "", "traceback": []},
                  resources={"metadata": {"path": str(cwd)}}, on_cell_executed=keep_reply)


def execute(nb, cwd: Path, timeout: float = DEFAULT_TIMEOUT, on_cell=None, *,
            time_limit: float | None = None, private: Path | None = None,
            kernel_kwargs: dict | None = None) -> dict[int, str]:
    """Run every code cell of ``nb`` in place; returns {cell index: why it was not run}.
    ``on_cell(number)`` is called before the code cell ``number`` (from 1) runs. After
    ``time_limit`` seconds for the whole notebook, the cells left are not run. ``private``
    holds the kernel's connection file (a fresh temporary folder by default);
    ``kernel_kwargs`` go to the kernel's Popen (its environment, streams, user), but
    ``kernel_module``, the module the kernel runs (default ``ipykernel_launcher``)."""
    if importlib.util.find_spec("ipykernel") is None:
        raise GradingError(f"labkit grade needs ipykernel in {sys.executable}'s environment")
    if private is None:
        with tempfile.TemporaryDirectory(prefix="labkit-grade-") as folder:
            return execute(nb, cwd, timeout, on_cell, time_limit=time_limit,
                           private=Path(folder), kernel_kwargs=kernel_kwargs)
    from nbclient.exceptions import DeadKernelError

    not_run, stopped, started, replies, number = {}, None, False, {}, 0
    end = time.monotonic() + time_limit if time_limit else None
    kernel_kwargs = dict(kernel_kwargs or {})
    client = _client(nb, cwd, timeout, str(private), replies,
                     kernel_kwargs.pop("kernel_module", "ipykernel_launcher"),
                     kernel_kwargs.get("user"))
    try:
        with client.setup_kernel(**kernel_kwargs):
            started = True
            for index, cell in enumerate(nb.cells):
                left = end - time.monotonic() if end is not None else timeout
                if not stopped and cell.cell_type == "code" and left <= 0:
                    stopped = (f"not run: the notebook ran past its time limit of "
                               f"{time_limit:g} s")
                if stopped:
                    not_run[index] = stopped
                    continue
                if cell.cell_type == "code" and on_cell is not None:
                    number += 1
                    on_cell(number)
                client.timeout = max(1, min(timeout, math.ceil(left)))
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
                        "Timeout", f"the cell did not finish within {client.timeout:g} s"
                        + ("" if client.timeout == timeout else
                           " (the notebook's time limit)")))
                    if not _answers_again(client):
                        client.shutdown_kernel = "immediate"  # kill it on the way out
                        stopped = (f"not run: cell {index} did not finish within "
                                   f"{client.timeout:g} s and the kernel ignored the "
                                   "interrupt")
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


def _cell_status(cell) -> tuple[str, str, dict]:
    """(status, hint, figures) of one executed check cell."""
    errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    if errors:
        status = "timeout" if errors[0].get("ename") == "Timeout" else "error"
        return status, f"{errors[0].get('ename')}: {errors[0].get('evalue')}"[:300], {}
    results = check_results(cell)
    if not results:
        return "no result", "the cell published no labkit check result", {}
    failing = [r for r in results if r.get("passed") is not True]
    if not failing:
        return "passed", "", _figures(results[0])
    status = failing[0].get("status")
    status = status if status in ("failed", "not implemented") else "failed"
    return status, str(failing[0].get("hint") or ("not implemented yet" if status ==
                                                  "not implemented" else "")), \
        _figures(failing[0])


def _figures(result: dict) -> dict:
    """The measured figures of a check result, when they are JSON (a learner could publish
    anything)."""
    figures = result.get("figures")
    try:
        return json.loads(json.dumps(figures)) if isinstance(figures, dict) else {}
    except (TypeError, ValueError):
        return {}


def not_graded(template, why: str) -> list[Exercise]:
    """Every exercise of ``template`` at zero, status "not run", with ``why`` as the hint (a
    notebook stopped from outside)."""
    return score(template, template, {i: why for i in range(len(template.cells))})


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
        statuses = [("not run", not_run[i], {}) if i in not_run
                    else _cell_status(executed.cells[i]) for i in indices]
        status, hint, figures = next((s for s in statuses if s[0] != "passed"), statuses[0])
        exercises.append(Exercise(grade_id, points, status, hint, figures))
    return exercises


def grade_notebook(path, template=None, timeout_per_cell: float = DEFAULT_TIMEOUT,
                   progress: Progress | None = None, *, released: dict | None = None,
                   time_limit: float | None = None, private: Path | None = None,
                   kernel_kwargs: dict | None = None) -> Grade:
    """Grade one submitted notebook. Grading failures are returned in ``Grade.error``.
    ``progress``, when given, is told where the run is (the notebook takes a while).
    ``released`` are the released notebooks already read (``load_released``); ``time_limit``,
    ``private`` and ``kernel_kwargs`` are passed to ``execute`` (a class's sandbox uses them)."""
    path, started = Path(path), time.monotonic()
    grade = Grade(notebook=str(path))
    try:
        submission = _read(path)
        released = released if released is not None else load_released(template)
        found = find_template(submission, path.name, template, released)
        grade.template, template_nb = str(found), released[found]
        restore_check_cells(submission, template_nb)
        on_cell = None
        if progress is not None:
            on_cell = progress.start(path, found, sum(c.cell_type == "code"
                                                      for c in submission.cells))
        not_run = execute(submission, path.resolve().parent, timeout_per_cell, on_cell,
                          time_limit=time_limit, private=private, kernel_kwargs=kernel_kwargs)
        grade.exercises, grade.executed = score(submission, template_nb, not_run), submission
        grade.manual_points = sum(float(_nbgrader(c).get("points", 0))
                                  for c in template_nb.cells if _is_manual(c))
    except GradingError as error:
        grade.error = str(error)
    except Exception as error:  # a bug or an environment problem: still report, never hang
        grade.error = f"grading failed: {type(error).__name__}: {error}"
    grade.seconds = time.monotonic() - started
    if progress is not None:
        progress.end(grade)
    return grade


class Progress:
    """Where ``labkit grade`` is, on ``stream`` (stderr), since a notebook runs for a while.

    On a terminal, one line redrawn before each code cell ("grading alice.ipynb: cell 7/30");
    elsewhere (a log, CI) no per-cell noise: one line when a notebook starts, naming the released
    notebook it is graded against, and, in both cases, one when it ends with its score.
    """

    def __init__(self, stream=None, notebooks: int = 1):
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.notebooks, self.done, self._drawn = notebooks, 0, 0

    def _show(self, text: str, final: bool = True) -> None:
        """Write a line; on a terminal a non-final one stays open, to be drawn over."""
        if self.live:
            width = shutil.get_terminal_size().columns - 1  # one row, or "\r" cannot reach it
            if not final and len(text) > width:
                text = "…" + text[1 - width:]
            padded = "\r" + text.ljust(self._drawn)  # cover the longer line drawn before
            self._drawn = 0 if final else len(text)
            text = padded
        self.stream.write(text if self.live and not final else text + "\n")
        self.stream.flush()

    def start(self, path, template, cells: int):
        """A notebook starts: returns the callback ``execute`` calls before each code cell."""
        count = f" ({self.done + 1}/{self.notebooks})" if self.notebooks > 1 else ""
        head = f"grading {path}{count}"
        if not self.live:
            self._show(f"{head} against {Path(template).name}: {cells} code cells")

        def on_cell(number: int) -> None:
            if self.live:
                self._show(f"{head}: cell {number}/{cells}", final=False)
        return on_cell

    def end(self, grade: Grade) -> None:
        self.done += 1
        self._show(outcome(grade))


def outcome(grade: Grade) -> str:
    """The line that says how a notebook's grading ended (progress on stderr)."""
    if grade.error:
        return f"could not grade {grade.notebook}: {grade.error}"
    return (f"graded {grade.notebook}: {_fmt(grade.score)}/{_fmt(grade.max_score)} "
            f"against {Path(grade.template).name} in {grade.seconds:.0f} s")


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
        if grade.manual_points:
            rows.append(("written answers", f"-/{_fmt(grade.manual_points)}", "",
                         "not scored here: graded by hand (nbgrader's formgrader)"))
    else:
        rows = [("notebook", "score", "not passed")]
        for g in grades:
            failed = ", ".join(e.name for e in g.exercises if not e.passed)
            rows.append((g.notebook, "-" if g.error else f"{_fmt(g.score)}/{_fmt(g.max_score)}",
                         f"grading failed: {g.error}" if g.error else failed))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([str(v).ljust(w) for v, w in zip(row, widths)] + [str(row[-1])])
                     .rstrip() for row in rows)
