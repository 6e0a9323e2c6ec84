"""Feedback that never shows the hidden tests: a preprocessor for ``nbgrader generate_feedback``.

nbgrader's feedback is the autograded notebook rendered as HTML, and autograding put the hidden
tests back into the check cells (``### BEGIN HIDDEN TESTS`` ... ``### END HIDDEN TESTS``). The
learner would read them there, and again in the traceback of a failed check cell, which quotes
the hidden line (``----> 3 assert result.passed, result.hint``). ``HideHiddenTests``, in every
grade cell:

* removes the hidden-test regions from the source, with nbgrader's own ``ClearHiddenTests``
  (whose delimiters the course may have configured for ``generate_assignment``: a subclass
  reads the same settings);
* turns each error output's traceback into one line, ``AssertionError: <the check's hint>``:
  the hint is what the learner needs, the hidden line is not.

Every other output stays: the check's line with its hint and figures, plots, the learner's
prints. Solution cells keep their tracebacks: they show only the learner's own code.

nbgrader's ``GenerateFeedback`` runs only the preprocessors in its list (``GetGrades``, which
reads the scores from the gradebook, then ``CSSHTMLHeaderPreprocessor``), in that order, and then
the HTML exporter; this one goes last. In ``nbgrader_config.py``::

    from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
    from nbgrader.preprocessors import GetGrades
    from labkit.nbgrader_feedback import HideHiddenTests

    c.GenerateFeedback.preprocessors = [GetGrades, CSSHTMLHeaderPreprocessor, HideHiddenTests]
"""
from nbgrader import utils
from nbgrader.preprocessors import ClearHiddenTests


def one_line(output) -> str:
    """An error output as the single line "ename: evalue" (just "ename" when evalue is empty)."""
    evalue = output.get("evalue", "")
    return f"{output.get('ename', 'Error')}: {evalue}" if evalue else output.get("ename", "Error")


class HideHiddenTests(ClearHiddenTests):
    """In grade cells: no hidden-test regions in the source, one line per error output."""

    def preprocess_cell(self, cell, resources, cell_index):
        if not utils.is_grade(cell):
            return cell, resources
        self._remove_hidden_test_region(cell)
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                output["traceback"] = [one_line(output)]
        return cell, resources
