"""``labkit grade`` for a class: every submission in a worker of its own, N at a time, safely.

1. ``discover`` reads every submission (one folder per learner, any file names) and the released
   notebooks are read once (``grading.load_released``), before any submission runs: a notebook
   that later rewrites files on disk changes neither what is graded nor what it is graded against.
2. Each submission is matched to its released notebook by its check cells and graded by a worker
   process (``grading_worker``) in a sandbox (``grading_sandbox``), ``jobs`` at a time, each with
   a per-cell timeout and a time limit for the whole notebook; a worker that outlives that limit
   by ``GRACE_S`` is killed with everything it started. One submission failing never stops the
   others.
3. After each submission the integrity guard (``grading_guard``) compares the installed packages,
   labkit and the released notebooks with what they were. A change is put back and reported,
   and the submission that made it gets no grade. When several ran at the time, all of them are
   graded again at the end, one at a time, so that the change is pinned on the right one and no
   grade rests on a changed environment. A change that cannot be put back stops the run.
4. A submission graded before (the same learner and file name, bytes, released notebook,
   labkit and settings: ``key``) is not graded again: its earlier grade is reused, and its
   feedback notebook from that run stays.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import psutil

from labkit import grading, grading_guard, grading_sandbox

GRACE_S = 60  # beyond a notebook's time limit before its worker is killed from outside
DEFAULT_TIME_LIMIT = 1200  # seconds for a whole notebook


@dataclass
class Submission:
    path: Path
    learner: str | None
    text: str | None = None   # read once, before any submission ran
    error: str | None = None  # why it cannot be graded, found before running anything
    template: Path | None = None
    key: str | None = None


@dataclass
class _Job:
    submission: Submission
    started: float = 0.0
    ended: float | None = None
    grade: grading.Grade | None = None
    discarded: bool = False  # ran beside a submission that changed the environment


def discover(paths) -> list[Submission]:
    """The notebooks under ``paths``: a file is one submission; a folder holds one folder per
    learner (the learner is that folder's name) or, with notebooks directly inside, is one
    learner's submission (as Gradescope hands it over)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            for notebook in sorted(path.rglob("*.ipynb")):
                relative = notebook.relative_to(path)
                if ".ipynb_checkpoints" in relative.parts:
                    continue
                learner = relative.parts[0] if len(relative.parts) > 1 else path.resolve().name
                found.append(Submission(notebook, learner))
        else:
            found.append(Submission(path, None))
    for submission in found:
        try:
            submission.text = submission.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            submission.error = f"cannot read {submission.path}: {error}"
    return found


def _sha256(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    return digest.hexdigest()


class ClassGrader:
    """Grades submissions against the released notebooks in ``template``."""

    def __init__(self, template=None, jobs: int = 1,
                 timeout_per_cell: float = grading.DEFAULT_TIMEOUT,
                 time_limit: float = DEFAULT_TIME_LIMIT, progress=None, previous=None):
        self.released = grading.load_released(template)
        self.template = Path(template) if template is not None else None
        folder = self.template if self.template is not None else next(
            iter(self.released), Path(".")).parent
        self.guard = grading_guard.default_guard(folder)
        self.jobs, self.timeout_per_cell, self.time_limit = max(1, jobs), timeout_per_cell, \
            time_limit
        self.progress, self.previous = progress, previous or {}
        self.settings = json.dumps([timeout_per_cell, time_limit, self.guard.restorable_digest()])
        self.stopped: str | None = None  # why grading stopped: a change it cannot undo
        self._lock = threading.Lock()
        self._last_clean = time.monotonic()
        self._suspects: list[_Job] = []
        self._jobs: list[_Job] = []

    # -- before running anything --------------------------------------------------------------

    def prepare(self, submission: Submission) -> None:
        """Find the released notebook and the content key (no kernel yet)."""
        if submission.error:
            return
        try:
            notebook = nbformat.reads(submission.text, as_version=4)
            submission.template = grading.find_template(notebook, submission.path.name,
                                                        self.template, self.released)
        except grading.GradingError as error:
            submission.error = str(error)
            return
        except Exception as error:  # not a notebook
            submission.error = f"cannot read {submission.path}: {error}"
            return
        template_text = nbformat.writes(self.released[submission.template])
        submission.key = _sha256(str(submission.learner), submission.path.name, submission.text,
                                 template_text, self.settings)

    # -- the run ------------------------------------------------------------------------------

    def grade(self, submissions: list[Submission]) -> list[grading.Grade]:
        grading_sandbox.harden_this_process(subreaper=False)
        for submission in submissions:
            self.prepare(submission)
        queue = [_Job(s) for s in submissions]
        todo, failed, reused = [], [], 0
        for job in queue:
            earlier = self.previous.get(job.submission.key) if job.submission.key else None
            if job.submission.error:
                job.grade = self._error_grade(job.submission, job.submission.error)
                failed.append(job.grade)
            elif earlier is not None:
                job.grade = grading.Grade.from_json(earlier)
                job.grade.notebook, job.grade.learner = str(job.submission.path), \
                    job.submission.learner
                reused += 1
            else:
                todo.append(job)
        if self.progress is not None:
            self.progress.begin(len(todo), reused)
            for grade in failed:
                self.progress.end(grade, counted=False)
        pending = list(todo)
        threads = [threading.Thread(target=self._slot, args=(slot, pending), daemon=True)
                   for slot in range(min(self.jobs, len(todo)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for job in list(self._suspects):  # graded again alone, so each change is pinned
            if self.stopped is None:
                job.discarded = False
                self._run(job, slot=0, alone=True)
        for job in queue:
            if job.grade is None or job.discarded:
                job.grade = self._error_grade(job.submission, f"not graded: {self.stopped}")
        if self.progress is not None:
            self.progress.finish()
        return [job.grade for job in queue]

    def _slot(self, slot: int, pending: list) -> None:
        while True:
            with self._lock:
                if not pending or self.stopped:
                    return
                job = pending.pop(0)
            self._run(job, slot)

    def _run(self, job: _Job, slot: int, alone: bool = False) -> None:
        submission = job.submission
        template_nb = self.released[submission.template]
        with self._lock:
            job.started, job.ended = time.monotonic(), None
            self._jobs.append(job)
        on_cell = None
        if self.progress is not None:
            on_cell = self.progress.start(submission, sum(
                c.cell_type == "code" for c in nbformat.reads(submission.text, 4).cells))
        grade = self._work(job, slot, template_nb, on_cell)
        with self._lock:
            job.ended = time.monotonic()
            self._after(job, grade, alone)
        if self.progress is not None and not job.discarded:
            self.progress.end(job.grade)

    def _work(self, job: _Job, slot: int, template_nb, on_cell) -> grading.Grade:
        """Grade in a worker process; whatever happens, a Grade comes back."""
        submission = job.submission
        uid = grading_sandbox.kernel_user(slot)
        request = {"notebook": str(submission.path), "name": submission.path.name,
                   "submission": submission.text, "template": str(submission.template),
                   "template_notebook": nbformat.writes(template_nb),
                   "timeout_per_cell": self.timeout_per_cell, "time_limit": self.time_limit,
                   "uid": uid, "token": secrets.token_hex(16)}
        answer, problem = _ask_worker(request, self.time_limit + GRACE_S, on_cell, uid)
        if answer is not None and "grade" in answer:
            grade = grading.Grade.from_json(answer["grade"])
            if answer.get("executed"):
                grade.executed = nbformat.reads(answer["executed"], as_version=4)
        elif problem is not None:  # killed from outside: over its time limit
            grade = grading.Grade(str(submission.path), template=str(submission.template),
                                  exercises=grading.not_graded(template_nb, problem))
            grade.incidents.append(problem)
        else:
            grade = self._error_grade(submission, (answer or {}).get("error") or
                                      "grading failed: the worker gave no answer")
        grade.notebook, grade.learner, grade.key = str(submission.path), submission.learner, \
            submission.key
        grade.seconds = time.monotonic() - job.started
        return grade

    def _after(self, job: _Job, grade: grading.Grade, alone: bool) -> None:
        """Holding the lock: keep the grade unless the environment changed meanwhile."""
        job.grade = grade
        changes = self.guard.changes()
        self.guard.restore([c for c in changes if c.new_bytecode])
        changes = [c for c in changes if not c.new_bytecode]
        if not changes:
            self._last_clean = job.ended
            return
        left = self.guard.restore(changes)
        shown = "; ".join(map(str, changes[:5])) + (" ..." if len(changes) > 5 else "")
        suspects = [j for j in self._jobs if j.started < job.ended
                    and (j.ended is None or j.ended > self._last_clean)]
        if alone or suspects == [job]:
            grade.error = ("not graded: the notebook changed the grading environment ("
                           f"{shown}){'' if left else '; the files were put back'}")
            grade.exercises = []
            grade.incidents.append(f"changed the grading environment: {shown}")
        else:  # someone among those running at the time: grade them again, one by one
            for suspect in suspects:
                suspect.discarded = True
                if suspect not in self._suspects:
                    self._suspects.append(suspect)
        if left:
            self.stopped = (f"the grading environment was changed ({'; '.join(map(str, left))})"
                            " in a way labkit cannot put back: reinstall it, and grade as root "
                            "or in a container (docs/instructors.md, 'Grading untrusted "
                            "notebooks')")
        self._last_clean = time.monotonic()

    def _error_grade(self, submission: Submission, error: str) -> grading.Grade:
        return grading.Grade(str(submission.path), error=error, learner=submission.learner,
                             key=submission.key,
                             template=str(submission.template) if submission.template else None)


def worker_environment() -> dict[str, str]:
    """The worker's environment: what a kernel may have, and nothing more (no tokens)."""
    kept = {name: value for name, value in os.environ.items()
            if name in grading_sandbox.KEPT_VARIABLES
            or name.startswith(grading_sandbox.KEPT_PREFIXES)}
    return {**kept, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"}


def _ask_worker(request: dict, limit: float, on_cell, uid):
    """(answer, None) from a worker, or (None, why) when it had to be killed."""
    worker = subprocess.Popen([sys.executable, "-m", "labkit.grading_worker"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=worker_environment(),
                              start_new_session=True)
    out, err = [], []

    def read_stdout():
        out.append(worker.stdout.read())

    def read_stderr():
        for line in iter(worker.stderr.readline, b""):
            text = line.decode("utf-8", "replace")
            if text.startswith("cell ") and text[5:].strip().isdigit() and on_cell:
                on_cell(int(text[5:]))
            else:
                err.append(text)

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
    for reader in readers:
        reader.start()
    try:
        worker.stdin.write(json.dumps(request).encode())
        worker.stdin.close()
    except OSError:
        pass
    try:
        worker.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_tree(worker, uid)
        for reader in readers:
            reader.join(timeout=5)
        return None, (f"stopped after {limit:g} s: the notebook ran far past its time limit "
                      "and its grader was killed")
    for reader in readers:
        reader.join(timeout=30)
    answer = out[0].decode("utf-8", "replace") if out else ""
    if answer.startswith(request["token"]):
        try:
            return json.loads(answer[len(request["token"]):]), None
        except ValueError:
            pass
    if answer:
        return {"error": "not graded: the answer of its grading process was tampered with "
                         "(bytes written into the grader's pipe)"}, None
    tail = "".join(err).strip().splitlines()[-1:] or [f"exit status {worker.returncode}"]
    return {"error": f"grading failed: the grading process ended without an answer "
                     f"({tail[0][:300]})"}, None


def _kill_tree(worker: subprocess.Popen, uid) -> None:
    try:
        tree = psutil.Process(worker.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    for process in [*tree]:
        try:
            process.kill()
        except psutil.Error:
            pass
    worker.kill()
    worker.wait(timeout=30)
    psutil.wait_procs(tree, timeout=5)
    if uid is not None:
        grading_sandbox.kill_processes_of(uid)
