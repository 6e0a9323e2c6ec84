"""``labkit release``: the learner notebooks, generated from the instructor sources.

The sources (``notebooks/source/*.ipynb``) are in nbgrader's format. The learner version is made
with nbgrader's own preprocessors, used as a library (no course directory, no database), in the
order ``nbgrader generate_assignment`` uses: solutions become a stub, hidden tests and mark
schemes are removed, outputs are cleared, grade and read-only cells are locked and get nbgrader's
checksums. The result is written as stable JSON (sorted keys, no timestamps, no outputs), so the
same source always gives the same bytes, and is checked independently for leaked solution or
hidden-test text before it is written.

nbgrader is an instructor tool in the optional ``grading`` extra; everything else in labkit,
``labkit grade`` included, works without it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat

CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"
TEXT_STUB = "YOUR ANSWER HERE"
MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS",
           "BEGIN MARK SCHEME", "END MARK SCHEME")
_REGIONS = [("BEGIN SOLUTION", "END SOLUTION"), ("BEGIN HIDDEN TESTS", "END HIDDEN TESTS"),
            ("BEGIN MARK SCHEME", "END MARK SCHEME")]
INSTALL_HINT = ("labkit release needs nbgrader, an instructor tool: "
                "pip install -e '.[grading]' (Python >= 3.11)")


class ReleaseError(Exception):
    """A source cannot be released; the message names the notebook."""


def course_root() -> Path:
    """The course checkout this labkit belongs to (an editable install), else the working folder."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "notebooks").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout
    return Path.cwd()


def read_notebook(path: Path) -> nbformat.NotebookNode:
    """Read without letting nbformat invent random cell ids (those would make output unstable)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("nbformat") != 4:
        raise ReleaseError(f"{path}: nbformat {data.get('nbformat')} notebooks are not supported; "
                           "save it as nbformat 4")
    if data.get("nbformat_minor", 0) >= 5:
        taken = {cell.get("id") for cell in data["cells"]}
        for index, cell in enumerate(data["cells"]):
            if not cell.get("id"):
                grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", "")
                cell["id"] = _unique(re.sub(r"[^A-Za-z0-9_-]", "-", grade_id)[:64]
                                     or f"cell-{index}", taken)
    return nbformat.reads(json.dumps(data), as_version=4)


def _unique(candidate: str, taken: set) -> str:
    name, n = candidate, 1
    while name in taken:
        n += 1
        name = f"{candidate[:60]}-{n}"
    taken.add(name)
    return name


def dumps(nb: nbformat.NotebookNode) -> str:
    """nbformat's own stable JSON (sorted keys, one-space indent) with a final newline."""
    return nbformat.writes(nb, version=4) + "\n"


def _preprocessors() -> list:
    try:
        from nbgrader.preprocessors import (CheckCellMetadata, ClearHiddenTests, ClearMarkScheme,
                                            ClearOutput, ClearSolutions, ComputeChecksums,
                                            LockCells)
    except ImportError as error:
        raise ReleaseError(f"{INSTALL_HINT} ({error})") from None
    clear_solutions = ClearSolutions(code_stub={"python": CODE_STUB}, text_stub=TEXT_STUB)
    # generate_assignment's list, less IncludeHeaderFooter, InstantiateTests and SaveCells (db)
    return [LockCells(), clear_solutions, ClearOutput(), CheckCellMetadata(), ComputeChecksums(),
            ClearHiddenTests(), ClearMarkScheme(), ComputeChecksums(), CheckCellMetadata()]


def learner_version(source: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """The learner notebook for a source notebook; raises ReleaseError naming ``name``."""
    nb, resources = nbformat.from_dict(json.loads(json.dumps(source))), {}
    try:
        for preprocessor in _preprocessors():
            nb, resources = preprocessor.preprocess(nb, resources)
    except ReleaseError:
        raise
    except Exception as error:  # nbgrader's RuntimeError / ValidationError on malformed cells
        raise ReleaseError(f"{name}: nbgrader could not release it: {error}") from None
    nb.metadata.pop("celltoolbar", None)
    nb.metadata.pop("widgets", None)  # saved widget state
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # JupyterLab's recorded run times
    leaks = find_leaks(source, nb)
    if leaks:
        raise ReleaseError(f"{name}: the learner version would leak:\n  " + "\n  ".join(leaks))
    return nb


def _secret_lines(source: nbformat.NotebookNode) -> set:
    """The stripped lines inside solution / hidden-test / mark-scheme regions (and of whole
    solution cells without markers) that appear nowhere else in the source."""
    secret, public = set(), set()
    for cell in source.cells:
        lines = cell.source.splitlines()
        marked = any(begin in line for line in lines for begin, _ in _REGIONS)
        if cell.get("metadata", {}).get("nbgrader", {}).get("solution") and not marked:
            secret.update(line.strip() for line in lines)
            continue
        end = None
        for line in lines:
            if end is None:
                end = next((e for b, e in _REGIONS if b in line), None)
                (secret if end else public).add(line.strip())
            elif end in line:
                secret.add(line.strip())
                end = None
            else:
                secret.add(line.strip())
    public.update(CODE_STUB.splitlines() + TEXT_STUB.splitlines())
    return secret - public - {""}


def find_leaks(source: nbformat.NotebookNode, learner: nbformat.NotebookNode) -> list[str]:
    """What the learner notebook shows that it must not: markers, solution or hidden-test lines
    (found by a parser independent of nbgrader's), outputs, execution counts."""
    secret = _secret_lines(source)
    problems = []
    for index, cell in enumerate(learner.cells):
        where = f"cell {index}"
        for marker in MARKERS:
            if marker in cell.source:
                problems.append(f"{where}: contains {marker!r}")
        for line in cell.source.splitlines():
            if line.strip() in secret:
                problems.append(f"{where}: solution or hidden-test line {line.strip()!r}")
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count")):
            problems.append(f"{where}: has outputs or an execution count")
    return problems


def release(source_dir: Path, out_dir: Path, check: bool = False) -> list[str]:
    """Write (or with ``check``, compare) the learner notebook of every source notebook.

    Returns the problems found; an empty list means success.
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    sources = sorted(source_dir.glob("*.ipynb"))
    if not sources:
        return [f"no notebooks in {source_dir}"]
    _preprocessors()  # fail early, with the install hint, when nbgrader is missing
    problems = []
    for path in sources:
        target = out_dir / path.name
        try:
            text = dumps(learner_version(read_notebook(path), name=str(path)))
        except ReleaseError as error:
            problems.append(str(error))
            continue
        if check:
            if not target.exists():
                problems.append(f"{target} is missing: run `labkit release` and commit it")
            elif target.read_text(encoding="utf-8") != text:
                problems.append(f"{target} differs from what {path} generates: "
                                "run `labkit release` and commit the result")
        elif not target.exists() or target.read_text(encoding="utf-8") != text:
            out_dir.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target}")
        else:
            print(f"unchanged {target}")
    names = {path.name for path in sources}
    for orphan in sorted(p for p in out_dir.glob("*.ipynb") if p.name not in names):
        message = f"{orphan} has no source in {source_dir}: remove it or add its source"
        if check:
            problems.append(message)
        else:
            print(f"warning: {message}")
    return problems
