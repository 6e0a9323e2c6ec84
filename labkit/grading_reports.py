"""What ``labkit grade`` writes for a class: grades.csv, grades.jsonl and the feedback notebooks.

- ``grades.jsonl``: one JSON object per submitted notebook (``Grade.as_json``), with its
  ``key``; the next run reads it back and grades again only the notebooks whose key changed.
- ``grades.csv``: one row per learner, one column per exercise ("01_collectives:ring_all_reduce-
  check", the points earned), then the total, the maximum (every exercise of every notebook the
  class handed in) and the problems an instructor should look at (a notebook that could not be
  graded, an incident, two copies of one notebook).
- ``feedback/<learner>/<notebook>.ipynb``: the notebook as it ran, check cells restored from the
  released notebook: the learner sees each check's line, hint and figures, never a hidden test
  (the released notebooks hold none).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nbformat

from labkit import grading


def read_previous(path: Path) -> dict:
    """{key: grade as JSON} from an earlier run's grades.jsonl; grading failures are not
    kept (they are tried again)."""
    previous = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return previous
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("key") and not record.get("error"):
            previous[record["key"]] = record
    return previous


def write_jsonl(grades, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(g.as_json(), ensure_ascii=False) + "\n" for g in grades),
                    encoding="utf-8")


def learner_of(grade) -> str:
    return grade.learner or Path(grade.notebook).parent.name or Path(grade.notebook).stem


def table_rows(grades, released: dict) -> tuple[list[str], list[list]]:
    """(header, rows) of the class table: a learner per row."""
    templates = sorted({Path(g.template) for g in grades if g.template}, key=lambda p: p.name)
    columns = []
    for template in templates:
        notebook = released.get(template)
        names = ([e.name for e in grading.not_graded(notebook, "")] if notebook is not None
                 else sorted({e.name for g in grades if g.template == str(template)
                              for e in g.exercises}))
        columns += [(template.stem, name) for name in names]
    maximum = sum(_max_points(released.get(t), grades, t) for t in templates)
    header = ["learner", *(f"{stem}:{name}" for stem, name in columns), "total", "max",
              "problems"]
    by_learner: dict = {}
    for grade in grades:
        by_learner.setdefault(learner_of(grade), []).append(grade)
    rows = []
    for learner, theirs in sorted(by_learner.items()):
        chosen, problems = _one_per_notebook(theirs)
        points = {(Path(g.template).stem, e.name): e.points
                  for g in chosen.values() for e in g.exercises}
        cells = ["" if key not in points else grading._number(points[key]) for key in columns]
        total = sum(points.values())
        rows.append([learner, *cells, grading._number(total), grading._number(maximum), "; ".join(problems)])
    return header, rows


def _max_points(notebook, grades, template) -> float:
    if notebook is not None:
        return sum(e.max_points for e in grading.not_graded(notebook, ""))
    return max((g.max_score for g in grades if g.template == str(template)), default=0)


def _one_per_notebook(grades) -> tuple[dict, list[str]]:
    """A learner's best grade per released notebook, and what to look at."""
    chosen, problems, copies = {}, [], {}
    for grade in grades:
        name = Path(grade.notebook).name
        if grade.error:
            problems.append(f"{name}: {grade.error}")
            continue
        problems += [f"{name}: {incident}" for incident in grade.incidents]
        stopped = [e for e in grade.exercises if e.status in ("timeout", "not run")]
        if stopped:
            problems.append(f"{name}: {stopped[0].hint}")
        copies.setdefault(grade.template, []).append(grade)
    for template, graded in copies.items():
        best = max(graded, key=lambda g: g.score)
        chosen[template] = best
        if len(graded) > 1:
            problems.append(f"{len(graded)} notebooks for {Path(template).stem} ("
                            f"{', '.join(Path(g.notebook).name for g in graded)}): the best "
                            "counted")
    return chosen, problems


def write_csv(grades, released: dict, path: Path) -> None:
    header, rows = table_rows(grades, released)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)


def write_feedback(grades, folder: Path) -> list[Path]:
    """The executed notebooks, one folder per learner; returns the files written."""
    written = []
    for grade in grades:
        if grade.executed is None:
            continue
        target = folder / learner_of(grade) / Path(grade.notebook).name
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(grade.executed, str(target))
        written.append(target)
    return written


def summary(grades, released: dict) -> str:
    """The class at a glance, for the terminal: learner, total/max, problems."""
    header, rows = table_rows(grades, released)
    shown = [("learner", "total", "problems")] + [(r[0], f"{r[-3]}/{r[-2]}", r[-1])
                                                  for r in rows]
    width = [max(len(str(row[i])) for row in shown) for i in range(2)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}".rstrip() for a, b, c in shown)
