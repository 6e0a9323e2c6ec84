"""``labkit.gradescope``: the ``results.json`` Gradescope shows a learner, and the example
autograder in ``docs/examples/gradescope/``.

Every file is checked against a JSON Schema written from Gradescope's "Autograder Specifications"
page, https://gradescope-autograders.readthedocs.io/en/latest/specs/ ("Output format", "Controlling
Test Case Visibility", "Test case status", "Output String Formatting").
"""
import html
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from labkit import gradescope, grading
from labkit.grading import Exercise, Grade

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOY = FIXTURES / "source" / "toy.ipynb"
EXAMPLE = ROOT / "docs" / "examples" / "gradescope"

# From https://gradescope-autograders.readthedocs.io/en/latest/specs/: every field the page lists,
# with the values it allows; a field it does not list is refused (a typo Gradescope would ignore).
VISIBILITY = {"enum": ["hidden", "after_due_date", "after_published", "visible"]}
TEXT_FORMAT = {"enum": ["text", "simple_format", "html", "md", "ansi"]}
TEST = {
    "type": "object",
    "properties": {
        "score": {"type": "number"}, "max_score": {"type": "number"},
        "status": {"enum": ["passed", "failed"]},
        "name": {"type": "string"}, "name_format": TEXT_FORMAT,
        "number": {"type": "string"},
        "output": {"type": "string"}, "output_format": TEXT_FORMAT,
        "tags": {"type": "array", "items": {"type": "string"}},
        "visibility": VISIBILITY,
        "extra_data": {"type": "object"},
    },
    "additionalProperties": False,
}
RESULTS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "score": {"type": "number"},
        "execution_time": {"type": "integer", "minimum": 0},  # seconds
        "output": {"type": "string"}, "output_format": TEXT_FORMAT,
        "test_output_format": TEXT_FORMAT, "test_name_format": TEXT_FORMAT,
        "visibility": VISIBILITY, "stdout_visibility": VISIBILITY,
        "extra_data": {"type": "object"},
        "tests": {"type": "array", "items": TEST},
        "leaderboard": {"type": "array", "items": {
            "type": "object", "required": ["name", "value"],
            "properties": {"name": {"type": "string"}, "value": {"type": ["number", "string"]},
                           "order": {"enum": ["asc", "desc"]}}}},
    },
    "additionalProperties": False,
    # "score": "optional, but required if not on each test case"
    "anyOf": [{"required": ["score"]},
              {"required": ["tests"],
               "properties": {"tests": {"items": {"required": ["score"]}}}}],
}


def validate(document: dict) -> None:
    jsonschema.Draft202012Validator(RESULTS_SCHEMA).validate(document)


def written(grades, tmp_path, **options) -> tuple[dict, str]:
    """What ``write`` puts in the file: parsed, and as text."""
    path = tmp_path / "results" / "results.json"
    gradescope.write(grades, path, **options)
    text = path.read_text(encoding="utf-8")
    return json.loads(text), text


def named_tests(results: dict) -> dict:
    return {test["name"]: test for test in results["tests"]}


def summary(results: dict) -> str:
    return html.unescape(results["output"])


def collectives(**changes) -> Grade:
    """A graded 01_collectives: one exercise passed (3 points), one failed (2)."""
    grade = Grade(
        "/autograder/submission/01_collectives.ipynb",
        [Exercise("ring_all_reduce-check", 3, "passed", "",
                  {"bytes_sent": 1536, "seconds": 0.25}),
         Exercise("all_reduce_via_rs_ag-check", 2, "failed",
                  "rank 1 sent 4 chunks; a ring sends N-1 = 1", {"chunks_sent": 4})],
        template="/autograder/source/notebooks/01_collectives.ipynb", seconds=31.4)
    for name, value in changes.items():
        setattr(grade, name, value)
    return grade


# --- the schema ----------------------------------------------------------------------------------

@pytest.mark.parametrize("broken", [
    {"tests": [{"name": "no score anywhere", "status": "passed"}]},
    {"score": "3"},
    {"score": 3, "visibility": "public"},
    {"score": 3, "tests": [{"score": 1, "status": "ok"}]},
    {"score": 3, "tests": [{"score": 1, "max_scroe": 2}]},
    {"score": 3, "output_format": "rst"},
])
def test_the_schema_refuses_a_file_gradescope_would_not_read_as_meant(broken):
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_the_schema_accepts_the_example_on_gradescopes_page():
    validate({"score": 44.0, "execution_time": 136, "output": "Text relevant to the entire "
              "submission", "output_format": "simple_format", "test_output_format": "text",
              "test_name_format": "text", "visibility": "after_due_date",
              "stdout_visibility": "visible", "extra_data": {},
              "tests": [{"score": 2.0, "max_score": 2.0, "status": "passed",
                         "name": "Your name here", "name_format": "text", "number": "1.1",
                         "output": "Giant multiline string", "output_format": "text",
                         "tags": ["tag1", "tag2"], "visibility": "visible", "extra_data": {}}],
              "leaderboard": [{"name": "Accuracy", "value": .926},
                              {"name": "Time", "value": 15.1, "order": "asc"},
                              {"name": "Stars", "value": "*****"}]})


# --- results for constructed grades ---------------------------------------------------------------

def test_one_test_per_exercise_with_points_status_hint_and_figures(tmp_path):
    second = Grade("/autograder/submission/02_naive_ddp-alice.ipynb",
                   [Exercise("broadcast-check", 1, "not implemented", "not implemented yet"),
                    Exercise("sync-check", 2, "timeout", "Timeout: the cell did not finish "
                             "within 120 s"),
                    Exercise("train-check", 2, "not run", "not run: the kernel died in cell 9")],
                   template="/autograder/source/notebooks/02_naive_ddp.ipynb", seconds=20.2)
    results, _ = written([collectives(), second], tmp_path)
    validate(results)
    assert [(t["name"], t["score"], t["max_score"], t["status"]) for t in results["tests"]] == [
        ("01_collectives: ring_all_reduce-check", 3, 3, "passed"),
        ("01_collectives: all_reduce_via_rs_ag-check", 0, 2, "failed"),
        ("02_naive_ddp: broadcast-check", 0, 1, "failed"),
        ("02_naive_ddp: sync-check", 0, 2, "failed"),
        ("02_naive_ddp: train-check", 0, 2, "failed")]
    assert (results["score"], results["execution_time"]) == (3, 52)
    assert {t["visibility"] for t in results["tests"]} == {"visible"}
    outputs = [t["output"] for t in results["tests"]]
    assert outputs[0] == "Passed.\nMeasured:\n  bytes_sent: 1536\n  seconds: 0.25"
    assert outputs[1] == ("Failed.\nrank 1 sent 4 chunks; a ring sends N-1 = 1\n"
                          "Measured:\n  chunks_sent: 4")
    assert outputs[2] == "Not implemented yet."  # the hint says it again: once is enough
    assert outputs[3].startswith("The check cell did not finish in time.\nTimeout: ")
    assert outputs[4] == ("Not run: the notebook stopped before this cell.\n"
                          "not run: the kernel died in cell 9")
    assert "01_collectives.ipynb, graded as 01_collectives: 3/5 points" in summary(results)
    assert "02_naive_ddp-alice.ipynb, graded as 02_naive_ddp: 0/5 points" in summary(results)


def test_a_notebook_that_could_not_be_graded_is_a_visible_failed_test(tmp_path):
    broken = Grade("/autograder/submission/notes.ipynb",
                   error="no released notebook in /autograder/source/notebooks matches "
                         "notes.ipynb: none has any of its check cells")
    results, _ = written([broken, collectives()], tmp_path, visibility="after_due_date")
    validate(results)
    failure = named_tests(results)["notes.ipynb: could not be graded"]
    assert (failure["score"], failure["max_score"], failure["status"]) == (0, 0, "failed")
    assert failure["visibility"] == "visible"  # the learner must know before the due date
    assert "none has any of its check cells" in failure["output"]
    assert gradescope.WHAT_TO_DO in failure["output"]
    assert "Could not grade notes.ipynb" in summary(results)
    assert results["score"] == 3 and results["tests"][0] is failure  # in upload order
    assert {t["visibility"] for t in results["tests"][1:]} == {"after_due_date"}


def test_hidden_tests_keep_the_score_out_of_the_summary_too(tmp_path):
    results, _ = written([collectives()], tmp_path, visibility="hidden")
    validate(results)
    assert results["visibility"] == "hidden"
    assert {t["visibility"] for t in results["tests"]} == {"hidden"}
    assert "3/5" not in summary(results)
    with pytest.raises(ValueError, match="after_published"):
        gradescope.results([collectives()], visibility="public")


def test_incidents_and_written_answers_are_in_the_summary(tmp_path):
    grade = collectives(manual_points=2.5, incidents=[
        "left 2 processes running after the kernel ended: killed"])
    results, _ = written([grade], tmp_path)
    validate(results)
    assert ("While grading 01_collectives.ipynb: left 2 processes running after the kernel "
            "ended: killed") in summary(results)
    assert "Written answers worth 2.5 points are graded by hand" in summary(results)
    assert results["score"] == 3  # the written answers are not in it
    no_extras, _ = written([collectives()], tmp_path)
    assert "Written answers" not in summary(no_extras) and "While" not in summary(no_extras)


def test_two_copies_of_one_assignment_count_once_the_better_one(tmp_path):
    blank = collectives(notebook="/autograder/submission/01_collectives (1).ipynb")
    blank.exercises = [Exercise(e.name, e.max_points, "not implemented", "not implemented yet")
                       for e in blank.exercises]
    results, _ = written([blank, collectives()], tmp_path)
    validate(results)
    assert results["score"] == 3
    assert [t["score"] for t in results["tests"]] == [3, 0]  # the better copy's tests only
    assert ("01_collectives (1).ipynb is another copy of 01_collectives: only the best copy "
            "counts (01_collectives.ipynb)") in summary(results)


def test_non_ascii_hints_figures_and_names_are_kept_as_utf8_text(tmp_path):
    grade = collectives(notebook="/autograder/submission/01_collectives-Zoë.ipynb")
    grade.exercises[1].hint = "le rang 1 a envoyé 4 morceaux — attendu : 1 (<b>N−1</b>)"
    grade.exercises[1].figures = {"débit": "1,5 Go/s", "ratio": "½", "ranks": [0, 1]}
    results, text = written([grade], tmp_path)
    validate(results)
    output = results["tests"][1]["output"]
    assert "le rang 1 a envoyé 4 morceaux — attendu : 1 (<b>N−1</b>)" in output
    assert "  débit: 1,5 Go/s\n  ratio: ½\n  ranks: [0, 1]" in output
    assert "envoyé" in text and "\\u" not in text  # readable, not escaped
    assert (results["test_output_format"], results["test_name_format"]) == ("text", "text")
    assert "01_collectives-Zoë.ipynb" in summary(results)


def test_a_file_name_in_the_summary_is_escaped_not_rendered(tmp_path):
    grade = collectives(notebook="/autograder/submission/<img src=x onerror=alert(1)>.ipynb")
    results, _ = written([grade], tmp_path)
    assert results["output_format"] == "simple_format"  # keeps the line breaks...
    assert "<img" not in results["output"]  # ...and shows the name as typed
    assert "&lt;img src=x onerror=alert(1)&gt;.ipynb" in results["output"]


def test_a_huge_hint_is_clipped(tmp_path):
    grade = collectives()
    grade.exercises[1].hint = "x" * 100_000
    results, _ = written([grade], tmp_path)
    assert len(results["tests"][1]["output"]) == gradescope.MAX_OUTPUT
    assert results["tests"][1]["output"].endswith("…")


def test_an_empty_submission_gives_a_valid_file_that_says_so(tmp_path):
    results, _ = written([], tmp_path)
    validate(results)
    assert results["score"] == 0
    assert [(t["name"], t["status"], t["visibility"]) for t in results["tests"]] == [
        ("submission: could not be graded", "failed", "visible")]
    assert "no notebook that labkit could grade" in summary(results)
    assert "no notebook that labkit could grade" in results["tests"][0]["output"]


# --- end to end: the toy fixture, graded ---------------------------------------------------------

def test_the_graded_toy_fixture_scores_and_shows_no_cell_source(tmp_path):
    submission = tmp_path / "submission"
    submission.mkdir()
    shutil.copy(TOY, submission / "toy.ipynb")
    shutil.copy(FIXTURES / "toy.ipynb", submission / "toy-blank.ipynb")
    grades = [grading.grade_notebook(submission / name, FIXTURES)
              for name in ("toy-blank.ipynb", "toy.ipynb")]
    results, text = written(grades, tmp_path)
    validate(results)
    assert results["score"] == 3  # the blank copy of the same assignment does not count
    assert [(t["name"], t["score"], t["max_score"], t["status"]) for t in results["tests"]] == [
        ("toy: check-double", 2, 2, "passed"), ("toy: check-triple", 1, 1, "passed")]
    assert "toy-blank.ipynb is another copy of toy" in summary(results)
    for source in ("### BEGIN", "assert result.passed", "secret_factor", "fake_check",
                   "return 2 * x", "HIDDEN"):
        assert source not in text


# --- the example autograder ----------------------------------------------------------------------

def autograder_root(tmp_path) -> Path:
    """A stand-in for Gradescope's /autograder: the learner's upload and the course's notebooks."""
    root = tmp_path / "autograder"
    (root / "submission").mkdir(parents=True)
    (root / "source" / "notebooks").mkdir(parents=True)
    shutil.copy(TOY, root / "submission" / "toy.ipynb")
    shutil.copy(FIXTURES / "toy.ipynb", root / "source" / "notebooks" / "toy.ipynb")
    return root


def run_autograder(root: Path, path: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, AUTOGRADER_ROOT=str(root), PATH=path, LABKIT_PRESTART="0")
    return subprocess.run([str(EXAMPLE / "run_autograder")], capture_output=True, text=True,
                          env=env, timeout=300, cwd=root)


@pytest.mark.parametrize("labkit_writes_results", [False, True])
def test_run_autograder_calls_labkit_grade_and_always_leaves_a_results_file(
        tmp_path, labkit_writes_results):
    """A stand-in ``labkit`` records its arguments; the real one is in the next test."""
    root = autograder_root(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ours = '{"score": 1, "tests": []}'
    (bin_dir / "labkit").write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$@" > "{tmp_path / "args"}"\n'
        + (f"echo '{ours}' > \"$AUTOGRADER_ROOT/results/results.json\"\n"
           if labkit_writes_results else "")
        + "echo 'could not grade' >&2\nexit 1\n")
    (bin_dir / "labkit").chmod(0o755)
    run = run_autograder(root, f"{bin_dir}:{os.environ['PATH']}")
    assert run.returncode == 0, run.stdout
    assert "could not grade" in run.stdout  # the log keeps labkit's messages
    assert (tmp_path / "args").read_text().splitlines() == [
        "grade", f"{root}/submission", "--format", "gradescope",
        "--out", f"{root}/results/results.json", "--template", f"{root}/source/notebooks"]
    results = json.loads((root / "results" / "results.json").read_text())
    validate(results)
    if labkit_writes_results:
        assert results == json.loads(ours)  # labkit's file, untouched
    else:
        assert results["score"] == 0 and "tell your instructor" in results["output"]


def test_the_example_scripts_are_executable_and_pin_the_tested_torch():
    for name in ("setup.sh", "run_autograder"):
        assert os.access(EXAMPLE / name, os.X_OK), f"{name} must be executable (chmod +x)"
        check = subprocess.run(["bash", "-n", str(EXAMPLE / name)], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stderr
    setup = (EXAMPLE / "setup.sh").read_text()
    pin = re.search(r"pip\" install torch==(\S+) --index-url https://download.pytorch.org/whl/cpu",
                    setup)
    assert pin, "setup.sh must install a pinned CPU torch"
    assert pin.group(1) == importlib.metadata.version("torch").split("+")[0]
    assert setup.index("torch==") < setup.index('install "$AUTOGRADER_ROOT/source"')


def _grade_has_format_flag() -> bool:
    run = subprocess.run([sys.executable, "-m", "labkit", "grade", "-h"], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, LABKIT_PRESTART="0"))
    return "--format" in run.stdout


@pytest.mark.skipif(not _grade_has_format_flag(),
                    reason="labkit grade has no --format gradescope yet")
def test_run_autograder_example(tmp_path):
    root = autograder_root(tmp_path)
    path = f"{ROOT / '.venv' / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    run = run_autograder(root, path)
    assert run.returncode == 0, run.stdout
    results = json.loads((root / "results" / "results.json").read_text(encoding="utf-8"))
    validate(results)
    assert results["score"] == 3, run.stdout
    assert [(t["name"], t["status"]) for t in results["tests"]] == [
        ("toy: check-double", "passed"), ("toy: check-triple", "passed")]
    assert "secret_factor" not in json.dumps(results)
