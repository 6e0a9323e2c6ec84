"""Gradescope's ``results.json`` for one learner's submission: ``labkit grade --format gradescope``.

On Gradescope, ``run_autograder`` (``docs/examples/gradescope/``) grades the notebooks one learner
uploaded with ``labkit.grading``; this module turns those grades into the file Gradescope shows
the learner, in the format of its "Autograder Specifications" page:
https://gradescope-autograders.readthedocs.io/en/latest/specs/

- One Gradescope test per exercise, named "01_collectives: ring_all_reduce-check", in notebook
  then template order, with its points, passed/failed, and as output what the check said: its
  hint and its measured figures. Never a cell's source: the learner sees what the check found,
  not how it checks.
- The top-level output: what could not be graded and what to do about it, what a notebook tried
  that it must not (processes left running...), and the written answers graded by hand.
- An assignment counts once: a learner who uploads two copies of one notebook gets the better.

Learners' code writes the hints (and names the files), so every text is shown as text, never as
HTML or Markdown.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from labkit.grading import Exercise, Grade

VISIBILITIES = ("hidden", "after_due_date", "after_published", "visible")
MAX_OUTPUT = 2000  # characters of one test's output: a learner's code can publish any hint

WHAT_TO_DO = ("Upload the .ipynb file of the released notebook you worked in, with its check "
              "cells as they were. If it still cannot be graded, tell your instructor.")
NOTHING_TO_GRADE = "Your submission has no notebook that labkit could grade. " + WHAT_TO_DO

# The first line of an exercise's output, by Exercise.status.
SAYS = {"passed": "Passed.", "failed": "Failed.", "not implemented": "Not implemented yet.",
        "error": "The check cell raised an error.",
        "timeout": "The check cell did not finish in time.",
        "no result": "The check cell published no result.",
        "not run": "Not run: the notebook stopped before this cell.",
        "missing": "The check cell was deleted."}


def results(grades: list[Grade], visibility: str = "visible") -> dict:
    """The ``results.json`` for one submission. ``visibility`` is when learners see the tests
    (Gradescope's choices: ``VISIBILITIES``)."""
    if visibility not in VISIBILITIES:
        raise ValueError(f"visibility must be one of {', '.join(VISIBILITIES)}, not {visibility!r}")
    counted = _best_per_assignment(grades)
    tests = []
    for grade in grades:
        if grade.error:
            tests.append(_not_graded(Path(grade.notebook).name, f"{grade.error}\n\n{WHAT_TO_DO}"))
        elif any(grade is best for best in counted):
            tests += [_test(grade, exercise, visibility) for exercise in grade.exercises]
    if not grades:
        tests.append(_not_graded("submission", NOTHING_TO_GRADE))
    return {"score": sum(grade.score for grade in counted),
            "execution_time": round(sum(grade.seconds for grade in grades)),
            # simple_format keeps the summary's line breaks; escaped, a file name stays text
            "output": html.escape(_summary(grades, counted, visibility)),
            "output_format": "simple_format",
            "test_output_format": "text", "test_name_format": "text",
            "visibility": visibility,
            "stdout_visibility": "hidden",  # the grader's log: file paths and progress lines
            "tests": tests}


def write(grades: list[Grade], path, visibility: str = "visible") -> None:
    """Write ``results(grades, visibility)`` to ``path`` (UTF-8, readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results(grades, visibility), indent=2, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")


def _best_per_assignment(grades: list[Grade]) -> list[Grade]:
    """The graded notebooks that count: of several graded against the same released notebook
    (two copies of one assignment), the best-scoring one, the first of equals."""
    best = {}
    for grade in grades:
        if grade.error is None and (grade.template not in best
                                    or grade.score > best[grade.template].score):
            best[grade.template] = grade
    return [grade for grade in grades if grade.error is None and best[grade.template] is grade]


def _assignment(grade: Grade) -> str:
    """ "01_collectives": the released notebook it was graded against, whatever its file name."""
    return Path(grade.template or grade.notebook).stem


def _test(grade: Grade, exercise: Exercise, visibility: str) -> dict:
    return {"name": f"{_assignment(grade)}: {exercise.name}",
            "score": exercise.points, "max_score": exercise.max_points,
            "status": "passed" if exercise.passed else "failed",
            "output": _clip(_feedback(exercise)), "visibility": visibility}


def _not_graded(name: str, why: str) -> dict:
    # A failed test of its own, not only a line in the top-level output: Gradescope lists it with
    # the tests, marked failed, where a learner looks. Always visible: a learner who uploaded the
    # wrong file must learn it before the due date even when the tests are hidden until then
    # (the spec's own example of an always-visible test is a "did it compile" check).
    return {"name": f"{name}: could not be graded", "score": 0, "max_score": 0,
            "status": "failed", "output": _clip(why), "visibility": "visible"}


def _feedback(exercise: Exercise) -> str:
    """What the check said: the status, the hint, the measured figures."""
    lines = [SAYS.get(exercise.status, exercise.status)]
    hint = exercise.hint.strip()
    if hint and hint.rstrip(".").lower() not in lines[0].lower():  # unless line 1 says it
        lines.append(hint)
    if exercise.figures:
        lines.append("Measured:")
        lines += [f"  {name}: {_text(value)}" for name, value in exercise.figures.items()]
    return "\n".join(lines)


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_OUTPUT else text[:MAX_OUTPUT - 1] + "…"


def _points(value: float) -> str:
    return f"{value:g}"


def _summary(grades: list[Grade], counted: list[Grade], visibility: str) -> str:
    """The top-level output, one line per fact."""
    if not grades:
        return NOTHING_TO_GRADE
    lines = []
    if visibility == "visible":  # hidden tests hide the total, so the summary must not tell it
        lines += [f"{Path(g.notebook).name}, graded as {_assignment(g)}: "
                  f"{_points(g.score)}/{_points(g.max_score)} points" for g in counted]
    for grade in grades:
        if grade.error is None and not any(grade is best for best in counted):
            best = next(g for g in counted if g.template == grade.template)
            lines.append(f"{Path(grade.notebook).name} is another copy of {_assignment(grade)}: "
                         f"only the best copy counts ({Path(best.notebook).name}).")
        if grade.error:
            lines.append(f"Could not grade {Path(grade.notebook).name} (see its test below). "
                         + WHAT_TO_DO)
        lines += [f"While grading {Path(grade.notebook).name}: {incident}"
                  for incident in grade.incidents]
    manual = sum(grade.manual_points for grade in counted)
    if manual:
        lines.append(f"Written answers worth {_points(manual)} points are graded by hand: "
                     "they are not in this score yet.")
    return "\n".join(lines)
