"""The authoring, release and grading pipeline.

- ``labkit release`` makes the learner notebooks from the nbgrader sources, leaks nothing, and
  the committed learner notebooks are what the sources generate;
- ``labkit grade`` (no nbgrader, no database) gives the solutions full marks and the learner
  notebooks zero, restores check cells a learner edited, and survives notebooks that hang or
  kill their kernel;
- real ``nbgrader generate_assignment`` / ``autograde`` agree.

The small fixture ``tests/fixtures/source/toy.ipynb`` (two exercises, checked by a fake grader that
follows the labkit check protocol) is released to ``tests/fixtures/toy.ipynb``; the course's own
notebooks are covered by the tests parametrized over ``notebooks/source/*.ipynb``.
"""
import copy
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from labkit import grading, release

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = sorted((NOTEBOOKS / "source").glob("*.ipynb"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOY = FIXTURES / "source" / "toy.ipynb"
MIMETYPE = grading.MIMETYPE
FAKE_PASS = ('display({%r: {"name": "double", "passed": True, "status": "passed", "hint": "", '
             '"figures": {}}}, raw=True)' % MIMETYPE)

try:
    import nbgrader.preprocessors  # noqa: F401
    NBGRADER = None
except ImportError as error:
    NBGRADER = f"nbgrader is not importable ({error}); install the 'test' extra on Python >= 3.11"
needs_nbgrader = pytest.mark.skipif(NBGRADER is not None, reason=str(NBGRADER))


def names(paths):
    return [path.name for path in paths]


def toy_submission(folder: Path, **sources) -> Path:
    """The toy solution with some cells (by grade_id) replaced, saved as folder/toy.ipynb."""
    nb = nbformat.read(TOY, as_version=4)
    for cell in list(nb.cells):
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in sources and sources[grade_id] is None:
            nb.cells.remove(cell)
        elif grade_id in sources:
            cell.source = sources[grade_id]
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / "toy.ipynb")
    return folder / "toy.ipynb"


def foreign_notebook(path: Path) -> Path:
    """A notebook with nbgrader check cells of no assignment of this course."""
    nb = nbformat.read(TOY, as_version=4)
    for cell in nb.cells:
        if "nbgrader" in cell.metadata:
            cell.metadata.nbgrader.grade_id = "elsewhere-" + cell.metadata.nbgrader.grade_id
    nbformat.write(nb, path)
    return path


def statuses(grade):
    assert grade.error is None, grade.error
    return {exercise.name: exercise.status for exercise in grade.exercises}


def labkit_cli(*args, timeout=300):
    env = dict(os.environ, LABKIT_PRESTART="0")
    return subprocess.run([sys.executable, "-m", "labkit", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def error_outputs(nb):
    return [(index, output.get("ename"), output.get("evalue"))
            for index, cell in enumerate(nb.cells) if cell.cell_type == "code"
            and "raises-exception" not in cell.metadata.get("tags", [])
            for output in cell.get("outputs", []) if output.get("output_type") == "error"]


# --- release -------------------------------------------------------------------------------------

@needs_nbgrader
def test_release_of_the_fixture_is_committed_and_byte_stable(tmp_path):
    assert release.release(TOY.parent, FIXTURES, check=True) == []
    release.release(TOY.parent, tmp_path / "a")
    release.release(TOY.parent, tmp_path / "b")
    first = (tmp_path / "a" / "toy.ipynb").read_bytes()
    assert first == (tmp_path / "b" / "toy.ipynb").read_bytes()
    assert first == (FIXTURES / "toy.ipynb").read_bytes()
    learner = nbformat.reads(first.decode(), as_version=4)
    assert "raise NotImplementedError()" in learner.cells[3].source
    assert "secret_factor" not in first.decode() and "HIDDEN" not in first.decode()


@needs_nbgrader
def test_release_check_names_the_stale_missing_and_orphan_notebooks(tmp_path):
    (tmp_path / "source").mkdir()
    shutil.copy(TOY, tmp_path / "source" / "toy.ipynb")
    shutil.copy(TOY, tmp_path / "source" / "other.ipynb")
    shutil.copy(FIXTURES / "toy.ipynb", tmp_path / "toy.ipynb")
    shutil.copy(FIXTURES / "toy.ipynb", tmp_path / "orphan.ipynb")
    source = nbformat.read(tmp_path / "source" / "toy.ipynb", as_version=4)
    source.cells[2].source += " Twice."
    nbformat.write(source, tmp_path / "source" / "toy.ipynb")
    run = labkit_cli("release", tmp_path / "source", "--check")
    assert run.returncode == 1, run.stdout + run.stderr
    for name in ("toy.ipynb differs", "other.ipynb is missing", "orphan.ipynb has no source"):
        assert name in run.stderr
    (tmp_path / "orphan.ipynb").unlink()
    assert release.release(tmp_path / "source", tmp_path) == []
    run = labkit_cli("release", tmp_path / "source", "--out", tmp_path, "--check")
    assert run.returncode == 0 and "up to date" in run.stdout, run.stderr


@needs_nbgrader
def test_release_refuses_a_solution_region_outside_a_solution_cell(tmp_path):
    nb = nbformat.read(TOY, as_version=4)
    nb.cells[1].source += "\n### BEGIN SOLUTION\nanswer = 42\n### END SOLUTION"
    (tmp_path / "source").mkdir()
    nbformat.write(nb, tmp_path / "source" / "bad.ipynb")
    problems = release.release(tmp_path / "source", tmp_path)
    assert len(problems) == 1 and "bad.ipynb" in problems[0] and "Solution region" in problems[0]
    assert not (tmp_path / "bad.ipynb").exists()


def test_find_leaks_catches_solution_and_hidden_lines_independently_of_nbgrader():
    source = nbformat.read(TOY, as_version=4)
    learner = nbformat.read(FIXTURES / "toy.ipynb", as_version=4)
    assert release.find_leaks(source, learner) == []
    leaky = copy.deepcopy(learner)
    leaky.cells[6].source = "def triple(x):\n    secret_factor = 3\n    raise NotImplementedError()"
    leaky.cells[7].source += "\nassert result.passed, result.hint"
    leaky.cells[4].outputs = [nbformat.v4.new_output("stream", text="double: passed.")]
    problems = "\n".join(release.find_leaks(source, leaky))
    assert "secret_factor = 3" in problems and "assert result.passed" in problems
    assert "cell 4: has outputs" in problems


def test_release_without_nbgrader_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nbgrader.preprocessors", None)
    with pytest.raises(release.ReleaseError, match=r"pip install -e '\.\[grading\]'"):
        release.release(TOY.parent, tmp_path)


# --- grading the fixture -------------------------------------------------------------------------

def test_grade_json_one_object_per_line_full_marks_and_zero(tmp_path):
    run = labkit_cli("grade", "--json", "--template", FIXTURES, TOY, FIXTURES / "toy.ipynb")
    assert run.returncode == 0, run.stderr
    solution, learner = [json.loads(line) for line in run.stdout.splitlines()]
    assert (solution["score"], solution["max_score"], learner["score"]) == (3, 3, 0)
    assert solution["error"] is None and solution["notebook"] == str(TOY)
    assert learner["exercises"] == [
        {"name": "check-double", "points": 0, "max_points": 2, "passed": False,
         "status": "not implemented", "hint": "double is not implemented yet", "figures": {}},
        {"name": "check-triple", "points": 0, "max_points": 1, "passed": False,
         "status": "not implemented", "hint": "triple is not implemented yet", "figures": {}}]


def test_grade_table_and_exit_status_when_grading_fails(tmp_path):
    run = labkit_cli("grade", "--template", FIXTURES, TOY)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[0].split() == ["exercise", "points", "passed", "hint"]
    assert run.stdout.splitlines()[-1].split() == ["total", "3/3"]
    (tmp_path / "junk.ipynb").write_text("not json")
    foreign_notebook(tmp_path / "other.ipynb")
    run = labkit_cli("grade", "--json", "--template", FIXTURES, tmp_path / "junk.ipynb",
                     tmp_path / "other.ipynb")
    assert run.returncode == 1
    junk, other = [json.loads(line) for line in run.stdout.splitlines()]
    assert "cannot read" in junk["error"] and "no released notebook" in other["error"]
    assert "could not grade" in run.stderr and "other.ipynb" in run.stderr


def test_a_renamed_submission_is_graded_against_its_released_notebook(tmp_path):
    # named like another released notebook, and not like its own: the content decides
    released = tmp_path / "released"
    released.mkdir()
    shutil.copy(FIXTURES / "toy.ipynb", released / "toy.ipynb")
    shutil.copy(NOTEBOOKS / "00_setup.ipynb", released / "00_setup.ipynb")
    renamed = tmp_path / "alice" / "00_setup.ipynb"
    renamed.parent.mkdir()
    shutil.copy(TOY, renamed)
    run = labkit_cli("grade", "--json", "--template", released, renamed)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["score"], result["max_score"], result["error"]) == (3, 3, None)
    assert result["template"] == str(released / "toy.ipynb")
    # not a terminal: one line when the notebook starts and one when it ends, nothing per cell
    code_cells = sum(c.cell_type == "code" for c in nbformat.read(TOY, as_version=4).cells)
    lines = [line for line in run.stderr.splitlines() if "grad" in line]
    assert lines == [f"grading {renamed} against toy.ipynb: {code_cells} code cells",
                     lines[1]], run.stderr
    assert lines[1].startswith(f"graded {renamed}: 3/3 against toy.ipynb in "), run.stderr


@pytest.mark.parametrize("name", names(SOURCES))
def test_each_course_notebook_is_found_by_its_check_cells(name):
    solution = nbformat.read(NOTEBOOKS / "source" / name, as_version=4)
    assert grading.find_template(solution, f"{Path(name).stem}-alice.ipynb") == NOTEBOOKS / name
    assert grading.find_template(solution, "01_anything.ipynb") == NOTEBOOKS / name


def test_a_notebook_from_no_assignment_gets_an_error_that_says_what_to_do(tmp_path):
    grade = grading.grade_notebook(foreign_notebook(tmp_path / "toy.ipynb"), FIXTURES)
    assert grade.error.startswith(f"no released notebook in {FIXTURES} matches toy.ipynb")
    assert "--template" in grade.error and grade.exercises == []
    bare = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nbformat.write(bare, tmp_path / "bare.ipynb")
    grade = grading.grade_notebook(tmp_path / "bare.ipynb", FIXTURES)
    assert "no released notebook matches bare.ipynb: it has no check cells" in grade.error
    assert "copy of the released notebook" in grade.error


def test_two_released_notebooks_with_the_same_check_cells_are_told_apart_by_name(tmp_path):
    for name in ("toy.ipynb", "toy_v2.ipynb"):
        shutil.copy(FIXTURES / "toy.ipynb", tmp_path / name)
    submission = nbformat.read(TOY, as_version=4)
    assert grading.find_template(submission, "toy_v2.ipynb", tmp_path) == tmp_path / "toy_v2.ipynb"
    with pytest.raises(grading.GradingError, match="matches toy.ipynb and toy_v2.ipynb equally "
                       "well .* name the right one with --template"):
        grading.find_template(submission, "mine.ipynb", tmp_path)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_progress_line_counts_the_cells(tmp_path, monkeypatch):
    path = toy_submission(tmp_path)
    screen = Terminal()
    monkeypatch.setenv("COLUMNS", "300")
    grade = grading.grade_notebook(path, FIXTURES, progress=grading.Progress(screen))
    assert grade.score == 3, grade.error
    code_cells = sum(c.cell_type == "code" for c in nbformat.read(path, as_version=4).cells)
    drawn = screen.getvalue().split("\r")
    assert [d.rstrip() for d in drawn[1:-1]] == [f"grading {path}: cell {n}/{code_cells}"
                                                 for n in range(1, code_cells + 1)]
    assert drawn[-1].startswith(f"graded {path}: 3/3 against toy.ipynb in ")
    assert drawn[-1].endswith(" s\n") and screen.getvalue().count("\n") == 1
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal: one row, the count kept
    progress = grading.Progress(Terminal())
    progress.start(path, FIXTURES / "toy.ipynb", code_cells)(2)
    assert progress.stream.getvalue() == "\r…" + f"{path}: cell 2/{code_cells}"[-38:]


def test_the_kernel_runs_on_ipc_without_the_unencrypted_tcp_warning(tmp_path, monkeypatch):
    assert grading.kernel_transport() == ("tcp" if os.name == "nt" else "ipc")
    run = labkit_cli("grade", "--template", FIXTURES, toy_submission(tmp_path))
    assert run.returncode == 0 and run.stdout.splitlines()[-1].split() == ["total", "3/3"]
    assert "without encryption" not in run.stdout + run.stderr, run.stderr
    monkeypatch.setattr(grading.os, "name", "nt")   # Windows has no IPC: TCP there
    assert grading.kernel_transport() == "tcp"


def test_grade_restores_edited_and_pasted_check_cells(tmp_path):
    path = toy_submission(tmp_path, **{
        "double": "def double(x):\n    raise NotImplementedError()", "check-triple": None,
        "check-double": "from types import SimpleNamespace\nresult = SimpleNamespace(passed=True)\n"
                        + FAKE_PASS})
    nb = nbformat.read(path, as_version=4)
    pasted = {MIMETYPE: {"name": "double", "passed": True, "status": "passed"}}
    nb.cells[4].outputs = [nbformat.v4.new_output("display_data", data=pasted)]
    nbformat.write(nb, path)
    assert statuses(grading.grade_notebook(path, FIXTURES)) == {
        "check-double": "not implemented", "check-triple": "missing"}


def test_a_fake_result_published_by_learner_code_does_not_pass(tmp_path):
    path = toy_submission(tmp_path, double=f"def double(x):\n    {FAKE_PASS}\n    return 0")
    grade = grading.grade_notebook(path, FIXTURES)
    assert statuses(grade) == {"check-double": "failed", "check-triple": "passed"}
    assert grade.score == 1 and "returned 0, expected 42" in grade.exercises[0].hint


def test_a_hanging_cell_is_interrupted_and_grading_goes_on(tmp_path, no_leftovers):
    path = toy_submission(tmp_path, double="import time\ndef double(x):\n    while True:\n"
                                           "        time.sleep(1)")
    grade = grading.grade_notebook(path, FIXTURES, timeout_per_cell=3)
    assert statuses(grade) == {"check-double": "timeout", "check-triple": "passed"}
    assert "did not finish within 3 s" in grade.exercises[0].hint


def test_a_kernel_that_ignores_the_interrupt_is_killed(tmp_path, no_leftovers):
    path = toy_submission(tmp_path, double="import signal, time\n"
                          "signal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n"
                          "    time.sleep(1)")
    grade = grading.grade_notebook(path, FIXTURES, timeout_per_cell=3)
    assert statuses(grade) == {"check-double": "not run", "check-triple": "not run"}
    assert "ignored the interrupt" in grade.exercises[0].hint and grade.score == 0


def test_a_kernel_that_exits_is_graded_and_the_command_returns(tmp_path, no_leftovers):
    path = toy_submission(tmp_path, double="import os\nos._exit(3)")
    grade = grading.grade_notebook(path, FIXTURES)
    assert statuses(grade) == {"check-double": "not run", "check-triple": "not run"}
    assert "kernel died in cell 3" in grade.exercises[0].hint
    run = labkit_cli("grade", "--json", "--template", FIXTURES, path, timeout=120)
    assert run.returncode == 0 and json.loads(run.stdout)["score"] == 0, run.stderr


# --- the course's notebooks ----------------------------------------------------------------------

def test_committed_notebooks_carry_no_outputs():
    paths = [p for p in [*NOTEBOOKS.rglob("*.ipynb"), *FIXTURES.rglob("*.ipynb")]
             if ".ipynb_checkpoints" not in p.parts]
    dirty = [f"{path.relative_to(ROOT)} cell {index}"
             for path in paths for index, cell in enumerate(nbformat.read(path, 4).cells)
             if cell.get("outputs") or cell.get("execution_count") is not None
             or "execution" in cell.metadata]
    assert not dirty, f"clear the outputs (and run times) of: {dirty}"


def test_every_source_has_its_learner_notebook():
    learner = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert names(learner) == names(SOURCES), "run `labkit release` and commit notebooks/"


@pytest.mark.parametrize("name", names(SOURCES))
def test_learner_notebook_leaks_no_solution_or_hidden_test(name):
    source = release.read_notebook(NOTEBOOKS / "source" / name)
    learner = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert release.find_leaks(source, learner) == []


@needs_nbgrader
def test_release_check_passes_for_the_committed_notebooks():
    if not SOURCES:
        pytest.skip("no notebooks in notebooks/source yet")
    run = labkit_cli("release", "--check")
    assert run.returncode == 0, run.stderr


@pytest.mark.notebook
@pytest.mark.parametrize("name", names(SOURCES))
def test_learner_notebook_runs_to_the_end_and_scores_zero(name, record_property):
    grade = grading.grade_notebook(NOTEBOOKS / name)
    record_property("notebook_run_s", round(grade.seconds, 1))
    assert grade.error is None, grade.error
    assert error_outputs(grade.executed) == []
    assert grade.score == 0
    assert {e.name: e.status for e in grade.exercises} == {
        e.name: "not implemented" for e in grade.exercises}
    results = [r for cell in grade.executed.cells for r in grading.check_results(cell)]
    assert {r["status"] for r in results} <= {"not implemented"}


@pytest.mark.notebook
@pytest.mark.parametrize("name", names(SOURCES))
def test_solution_notebook_runs_without_error_and_gets_full_marks(name, record_property):
    grade = grading.grade_notebook(NOTEBOOKS / "source" / name, NOTEBOOKS)
    record_property("notebook_run_s", round(grade.seconds, 1))
    assert grade.error is None, grade.error
    assert error_outputs(grade.executed) == []
    assert grade.score == grade.max_score, grading.table([grade])
    # written answers are counted for the instructor, never scored by labkit grade
    written = [c for c in nbformat.read(NOTEBOOKS / name, 4).cells
               if c.metadata.get("nbgrader", {}).get("solution")
               and c.metadata.get("nbgrader", {}).get("grade")]
    assert all(c.cell_type == "markdown" for c in written)
    assert grade.manual_points == sum(c.metadata["nbgrader"]["points"] for c in written)
    assert ("written answers" in grading.table([grade])) == bool(written)


# --- real nbgrader -------------------------------------------------------------------------------

# The course notebooks real nbgrader autogrades: a function exercise with a collective (00) and
# a class trained on ranks, with predictions and written answers (02).
AUTOGRADED = ("00_setup.ipynb", "02_naive_ddp.ipynb")


@pytest.mark.notebook
@needs_nbgrader
@pytest.mark.timeout(900)
def test_real_nbgrader_gives_solutions_full_marks_and_blank_notebooks_zero(tmp_path):
    from nbgrader.api import Gradebook
    course, sources = tmp_path / "course", [TOY, *SOURCES]
    (course / "source" / "lab").mkdir(parents=True)
    for path in sources:
        shutil.copy(path, course / "source" / "lab" / path.name)
    (course / "nbgrader_config.py").write_text(
        f'c = get_config()\nc.CourseDirectory.course_id = "labkit-test"\n'
        f'c.CourseDirectory.root = {str(course)!r}\nc.Execute.timeout = 120\n')
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def nbgrader_cli(*args):
        run = subprocess.run([Path(sys.executable).parent / "nbgrader", *args], cwd=course,
                             env=env, capture_output=True, text=True, timeout=800)
        assert run.returncode == 0, run.stdout + run.stderr

    nbgrader_cli("generate_assignment", "lab")
    for path in sources:  # labkit release makes what nbgrader releases, cell for cell
        ours = release.learner_version(release.read_notebook(path))
        theirs = nbformat.read(course / "release" / "lab" / path.name, as_version=4)
        assert [(c.cell_type, c.source, c.metadata) for c in ours.cells] == \
            [(c.cell_type, c.source, c.metadata) for c in theirs.cells]
    # autograde runs every notebook twice more; labkit grade already runs each of them, so a
    # sample of the course's kinds of exercise is enough here (see docs/architecture.md)
    graded = [path for path in sources if path == TOY or path.name in AUTOGRADED]
    for student, folder in (("solver", course / "source"), ("blank", course / "release")):
        (course / "submitted" / student / "lab").mkdir(parents=True)
        for path in graded:
            shutil.copy(folder / "lab" / path.name, course / "submitted" / student / "lab")
    nbgrader_cli("autograde", "lab", "--create", "--force")
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        for path in graded:
            for student in ("solver", "blank"):
                submission = gradebook.find_submission_notebook(path.stem, "lab", student)
                auto = [(g.name, g.auto_score, g.max_score) for g in submission.grades
                        if g.auto_score is not None]
                expected = [(n, m if student == "solver" else 0, m) for n, _, m in auto]
                assert auto == expected, (path.name, student)
                assert path != TOY or len(auto) == 2
