"""nbgrader's feedback shows the check's hint, never the hidden tests (``labkit.nbgrader_feedback``).

The real pipeline on the toy fixture (``tests/fixtures/source/toy.ipynb``): ``nbgrader
generate_assignment``, a submission whose ``double`` returns 0, ``autograde``, then
``generate_feedback`` without and with ``HideHiddenTests`` in ``nbgrader_config.py``. Without it
the feedback quotes the hidden line (so the test can fail); with it, only the hint is left.
"""
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOY = FIXTURES / "source" / "toy.ipynb"
HIDDEN_LINE = "assert result.passed, result.hint"
HINT = "double(21) returned 0, expected 42"

try:
    import nbgrader.preprocessors  # noqa: F401
    NBGRADER = None
except ImportError as error:
    NBGRADER = f"nbgrader is not importable ({error}); install the 'test' extra on Python >= 3.11"
needs_nbgrader = pytest.mark.skipif(NBGRADER is not None, reason=str(NBGRADER))

CONFIG = """c = get_config()
c.CourseDirectory.course_id = "labkit-test"
c.CourseDirectory.root = {root!r}
c.Execute.timeout = 120
"""
FEEDBACK_CONFIG = """
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import GetGrades
from labkit.nbgrader_feedback import HideHiddenTests

c.GenerateFeedback.preprocessors = [GetGrades, CSSHTMLHeaderPreprocessor, HideHiddenTests]
"""


def code_cell(source, outputs, grade_id, grade=True, solution=False):
    cell = nbformat.v4.new_code_cell(source, outputs=outputs)
    cell.metadata.nbgrader = {"grade": grade, "solution": solution, "locked": not solution,
                              "grade_id": grade_id, "points": 1 if grade else 0,
                              "schema_version": 3}
    return cell


@needs_nbgrader
def test_the_preprocessor_strips_hidden_tests_and_tracebacks_in_grade_cells_only():
    from labkit.nbgrader_feedback import HideHiddenTests
    traceback = ["\x1b[0;31m-----------------------\x1b[0m",
                 f"\x1b[0;32m----> 3\x1b[0m {HIDDEN_LINE}",
                 f"\x1b[0;31mAssertionError\x1b[0m: {HINT}"]
    check = code_cell(
        f"result = labkit.check.double(double)\n### BEGIN HIDDEN TESTS\n{HIDDEN_LINE}\n"
        "### END HIDDEN TESTS", [
            nbformat.v4.new_output("stream", name="stdout", text=f"✗ double: {HINT}\n"),
            nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="}),
            nbformat.v4.new_output("error", ename="AssertionError", evalue=HINT,
                                   traceback=traceback)], "check-double")
    learner_traceback = ["----> 2 return x[3]", "IndexError: list index out of range"]
    solution = code_cell("def double(x):\n    return x[3]", [
        nbformat.v4.new_output("error", ename="IndexError", evalue="list index out of range",
                               traceback=learner_traceback)], "double", grade=False,
        solution=True)
    nb = nbformat.v4.new_notebook(cells=[solution, check])

    nb, _ = HideHiddenTests().preprocess(nb, {})

    assert nb.cells[1].source == "result = labkit.check.double(double)"
    stream, picture, error = nb.cells[1].outputs
    assert stream.text == f"✗ double: {HINT}\n" and picture.data == {"image/png": "iVBORw0KGgo="}
    assert error.traceback == [f"AssertionError: {HINT}"]
    assert nb.cells[0].outputs[0].traceback == learner_traceback   # the learner's own code


def nbgrader_cli(course: Path, *args):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run([Path(sys.executable).parent / "nbgrader", *args], cwd=course, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr


def submit_wrong_double(course: Path) -> None:
    """alice's submission: the released toy with double returning 0 and triple right."""
    nb = nbformat.read(course / "release" / "lab" / "toy.ipynb", as_version=4)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id == "double":
            cell.source = "def double(x):\n    return 0"
        elif grade_id == "triple":
            cell.source = "def triple(x):\n    return 3 * x"
    folder = course / "submitted" / "alice" / "lab"
    folder.mkdir(parents=True)
    nbformat.write(nb, folder / "toy.ipynb")


def text_of(page: str) -> str:
    """What a reader of the HTML sees: tags removed (syntax highlighting splits code into
    spans), entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


@pytest.mark.notebook
@needs_nbgrader
@pytest.mark.timeout(600)
def test_real_feedback_shows_the_hint_and_not_the_hidden_tests(tmp_path):
    course = tmp_path / "course"
    (course / "source" / "lab").mkdir(parents=True)
    (course / "source" / "lab" / "toy.ipynb").write_bytes(TOY.read_bytes())
    config = course / "nbgrader_config.py"
    config.write_text(CONFIG.format(root=str(course)))
    nbgrader_cli(course, "generate_assignment", "lab")
    submit_wrong_double(course)
    nbgrader_cli(course, "autograde", "lab", "--create", "--force")
    feedback = course / "feedback" / "alice" / "lab" / "toy.html"

    nbgrader_cli(course, "generate_feedback", "lab", "--force")
    plain = text_of(feedback.read_text())
    assert HIDDEN_LINE in plain and "HIDDEN TESTS" in plain   # what nbgrader shows by itself

    config.write_text(CONFIG.format(root=str(course)) + FEEDBACK_CONFIG)
    nbgrader_cli(course, "generate_feedback", "lab", "--force")
    page = text_of(feedback.read_text())
    assert f"AssertionError: {HINT}" in page
    assert "HIDDEN TESTS" not in page and HIDDEN_LINE not in page
    assert "triple: passed." in page   # the other check's output is still there
