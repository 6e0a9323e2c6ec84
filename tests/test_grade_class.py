"""``labkit grade`` for a class: 20 synthetic submissions, hostile ones among them.

The class is built from the toy fixture (two exercises, 2 + 1 points) in a temporary folder:
correct, empty, wrong and hostile notebooks, one learner each. It is graded end to end by the
real command, two at a time, and the CSV must equal ``tests/fixtures/class_expected.csv``.
The hostile notebooks would all score full marks if their tricks went unnoticed; each trick is
checked to have changed nothing for the notebooks graded after it, and to be reported.

The class of 20 runs in the parallel phase of ``make test`` (marked notebook): two hostile
notebooks write harmless lines into this checkout's ``labkit`` and site-packages, which the
grader removes again; a test running beside it meanwhile imports nothing different.
"""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import nbformat
import psutil
import pytest

import labkit.check
from labkit import grading_guard

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SOLUTION, RELEASED = FIXTURES / "source" / "toy.ipynb", FIXTURES / "toy.ipynb"
EXPECTED = FIXTURES / "class_expected.csv"
SECRET = "zz-grader-token-6d1f"
DAEMON_MARK = "labkit-test-daemon-3141"
CHECK_FILE = Path(labkit.check.__file__).resolve()
PTH = Path(sysconfig.get_paths()["purelib"]) / "zz_labkit_hostile.pth"
FAKE = '{"notebook": "x.ipynb", "score": 999, "max_score": 3}'


def notebook(base: Path, before_checks: str = "", **answers) -> nbformat.NotebookNode:
    """``base`` with answer cells replaced (by grade_id) and a cell of code run before the
    first check."""
    nb = nbformat.read(base, as_version=4)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell.source = answers[grade_id]
    if before_checks:
        first_check = next(i for i, c in enumerate(nb.cells)
                           if c.metadata.get("nbgrader", {}).get("grade_id") == "check-double")
        nb.cells.insert(first_check, nbformat.v4.new_code_cell(before_checks))
    return nb


def slow(nb, cells: int, seconds: float) -> nbformat.NotebookNode:
    """``nb`` with ``cells`` cells first that each sleep ``seconds``."""
    nb.cells[1:1] = [nbformat.v4.new_code_cell(f"import time\ntime.sleep({seconds})")
                     for _ in range(cells)]
    return nb


def hostile(code: str) -> nbformat.NotebookNode:
    """The full solution plus ``code``: full marks unless the trick is caught."""
    return notebook(SOLUTION, code)


def build_class(root: Path, released: Path) -> Path:
    """20 learners, one notebook each; names of files are the learners' own choices."""
    folder = root / "submissions"
    wrong_double = "def double(x):\n    return 0"
    learners = {
        "ada": ("toy.ipynb", notebook(SOLUTION)),
        "ben": ("Toy (1).ipynb", notebook(SOLUTION)),
        "cy": ("lab-cy.ipynb", notebook(SOLUTION, "x = 1  # an extra cell of their own")),
        "dee": ("toy.ipynb", notebook(RELEASED, double="def double(x):\n    return x + x")),
        "eli": ("toy.ipynb", notebook(RELEASED)),
        "gus": ("toy.ipynb", notebook(RELEASED, "# started, nothing done")),
        "hal": ("toy.ipynb", notebook(SOLUTION, double=wrong_double)),
        "ivy": ("toy.ipynb", notebook(SOLUTION, triple="def triple(x):\n    return x * 2")),
        "jon": ("toy.ipynb", notebook(SOLUTION, double="def double(x):\n    raise ValueError('no')")),
        "kim": ("toy.ipynb", notebook(SOLUTION, double=wrong_double, **{
            "check-double": "result = None\nprint('double: passed.')"})),
        # hostile: (a) overwrite the released notebook
        "h-template": ("toy.ipynb", hostile(
            f"open({str(released / 'toy.ipynb')!r}, 'w').write('{{}}')")),
        # (b) change labkit.check on disk
        "h-labkit": ("toy.ipynb", hostile(
            f"open({str(CHECK_FILE)!r}, 'a').write('\\nEVERYTHING_PASSES = True\\n')")),
        # (b') make every later Python run code at startup
        "h-pth": ("toy.ipynb", hostile(f"open({str(PTH)!r}, 'w').write('import os\\n')")),
        # (c) look for the grader's secrets: its own environment, every process's
        "h-secret": ("toy.ipynb", hostile(
            "import os, glob\nfound = [k + '=' + v for k, v in os.environ.items()]\n"
            "for path in glob.glob('/proc/[0-9]*/environ'):\n"
            "    try:\n        found.append(open(path, 'rb').read().decode(errors='replace'))\n"
            "    except OSError:\n        pass\n"
            f"print([f for f in found if {SECRET[:8]!r} in f])")),
        # (d) fake result lines: its own stdout, and every pipe of its parents it can open
        "h-stdout": ("toy.ipynb", hostile(
            f"import os\nfake = {FAKE!r} + '\\n'\nos.write(1, fake.encode())\n"
            "for pid in (os.getppid(), *[int(p) for p in os.listdir('/proc') if p.isdigit()]):\n"
            "    for fd in (1, 2):\n"
            "        try:\n"
            "            with open(f'/proc/{pid}/fd/{fd}', 'w') as out:\n"
            "                out.write(fake)\n"
            "        except OSError:\n            pass\n")),
        # (e) a daemon that outlives the kernel
        "h-fork": ("toy.ipynb", hostile(
            "import os, subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', "
            f"{DAEMON_MARK!r}], start_new_session=True)\n")),
        # (f) far past the time limit: a loop that ignores the interrupt, slow cells
        "h-forever": ("toy.ipynb", notebook(SOLUTION, double=(
            "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n"
            "    pass"))),
        "h-slow": ("toy.ipynb", slow(notebook(SOLUTION), cells=4, seconds=4)),
        # rewrites another learner's submission on disk: read before anything ran
        "h-others": ("toy.ipynb", hostile(
            f"open({str(folder / 'zz-zed' / 'mine.ipynb')!r}, 'w').write('{{}}')")),
        "zz-zed": ("mine.ipynb", notebook(SOLUTION)),
    }
    for learner, (name, nb) in learners.items():
        (folder / learner).mkdir(parents=True)
        nbformat.write(nb, folder / learner / name)
    return folder


def labkit_grade(*args, timeout=600, env=None):
    env = {**os.environ, "LABKIT_PRESTART": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "labkit", "grade", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def daemons():
    return [p for p in psutil.process_iter(["cmdline"])
            if DAEMON_MARK in " ".join(p.info.get("cmdline") or [])]


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_a_class_of_20_with_hostile_notebooks_gets_the_expected_grades(tmp_path):
    released = tmp_path / "released"
    released.mkdir()
    shutil.copy(RELEASED, released / "toy.ipynb")
    template_bytes, check_bytes = RELEASED.read_bytes(), CHECK_FILE.read_bytes()
    folder = build_class(tmp_path, released)
    assert len(list(folder.iterdir())) == 20
    try:
        run = labkit_grade(folder, "-j", "2", "--out", tmp_path / "grades", "--template",
                           released, "--timeout-per-cell", "5", "--time-limit", "10", "--json",
                           env={"GRADER_API_TOKEN": SECRET})
    finally:
        PTH.unlink(missing_ok=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # nothing of the tricks is left: files put back, daemon killed, secret nowhere
    assert CHECK_FILE.read_bytes() == check_bytes
    assert (released / "toy.ipynb").read_bytes() == template_bytes
    assert not PTH.exists() and daemons() == []
    written = [run.stdout, run.stderr] + [p.read_text(errors="replace")
                                         for p in (tmp_path / "grades").rglob("*") if p.is_file()]
    assert not any(SECRET in text for text in written)
    # stdout is the grader's alone: one JSON line per notebook, none of them the fake
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(lines) == 20 and all(line["score"] != 999 for line in lines)
    # the expected grades, and each trick reported
    rows = list(csv.DictReader(io.StringIO((tmp_path / "grades" / "grades.csv").read_text())))
    expected = list(csv.DictReader(EXPECTED.open()))
    assert [r["learner"] for r in rows] == [r["learner"] for r in expected]
    for row, want in zip(rows, expected):
        problems, wanted = row.pop("problems"), want.pop("problems")
        assert row == want, (row, want)
        assert all(part in problems for part in wanted.split(" | ") if part), (problems, wanted)
    feedback = tmp_path / "grades" / "feedback" / "hal" / "toy.ipynb"
    text = feedback.read_text()  # the hint, never a hidden test (released notebooks hold none)
    assert "returned 0, expected 42" in text
    assert "HIDDEN" not in text and "assert result.passed" not in text


@pytest.mark.timeout(300)
def test_a_rerun_grades_only_what_changed(tmp_path):
    folder = tmp_path / "submissions"
    for learner, nb in (("ada", notebook(SOLUTION)), ("eli", notebook(RELEASED))):
        (folder / learner).mkdir(parents=True)
        nbformat.write(nb, folder / learner / "toy.ipynb")
    out = tmp_path / "grades"
    first = labkit_grade(folder, "--out", out, "--template", RELEASED.parent)
    assert first.returncode == 0, first.stderr
    assert sum(line.startswith("graded ") for line in first.stderr.splitlines()) == 2
    again = labkit_grade(folder, "--out", out, "--template", RELEASED.parent)
    assert "2 notebooks unchanged since the last run" in again.stderr, again.stderr
    assert "\ngraded " not in "\n" + again.stderr
    nbformat.write(notebook(SOLUTION), folder / "eli" / "toy.ipynb")  # eli finished the lab
    third = labkit_grade(folder, "--out", out, "--template", RELEASED.parent)
    assert "1 notebook unchanged" in third.stderr
    assert [line for line in third.stderr.splitlines() if line.startswith("graded ")] == \
        [line for line in third.stderr.splitlines() if line.startswith("graded ") and "eli" in line]
    assert (out / "grades.csv").read_text().splitlines()[1:] == ["ada,2,1,3,3,", "eli,2,1,3,3,"]


def test_the_guard_puts_labkit_and_templates_back_and_names_what_it_cannot(tmp_path):
    released, package = tmp_path / "released", tmp_path / "site-packages"
    released.mkdir()
    package.mkdir()
    (released / "a.ipynb").write_text("original")
    (package / "torchish.py").write_text("x = 1")
    guard = grading_guard.TreeGuard([package], [released])
    assert guard.changes() == []
    (released / "a.ipynb").write_text("tampered")
    (released / "new.ipynb").write_text("planted")
    (package / "torchish.py").write_text("x = 2")
    (package / "evil.pth").write_text("import os")
    changes = guard.changes()
    assert {(Path(c.path).name, c.what) for c in changes} == {
        ("a.ipynb", "changed"), ("new.ipynb", "added"), ("torchish.py", "changed"),
        ("evil.pth", "added")}
    left = guard.restore(changes)  # added files go, kept bytes come back; torch's cannot
    assert [Path(c.path).name for c in left] == ["torchish.py"]
    assert (released / "a.ipynb").read_text() == "original"
    assert not (released / "new.ipynb").exists() and not (package / "evil.pth").exists()
    assert [Path(c.path).name for c in guard.changes()] == ["torchish.py"]
    # a .pyc some Python wrote for its first import: removed, never blamed on a notebook
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "torchish.cpython-311.pyc").write_bytes(b"\0")
    fresh = [c for c in guard.changes() if c.new_bytecode]
    assert [Path(c.path).name for c in fresh] == ["__pycache__", "torchish.cpython-311.pyc"]
    assert guard.restore(fresh) == [] and [Path(c.path).name for c in guard.changes()] == [
        "torchish.py"]
    # a cached .pyc rewritten where labkit keeps no bytes: removed (Python rebuilds it), not left
    (released / "__pycache__").mkdir()
    cached = released / "__pycache__" / "a.cpython-311.pyc"
    cached.write_bytes(b"\0")
    guard = grading_guard.TreeGuard([package], [released])
    cached.write_bytes(b"\1\1")
    changed = [c for c in guard.changes() if c.path == str(cached)]
    assert [c.what for c in changed] == ["changed"] and guard.restore(changed) == []
    assert not cached.exists()


@pytest.mark.skipif(not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("unshare")
                         and shutil.which("ip")),
                    reason="the no-network recipe needs root, unshare and ip (iproute2)")
def test_the_no_network_recipe_of_the_instructor_guide_grades(tmp_path):
    # docs/instructors.md: unshare --net sh -c 'ip link set lo up && labkit grade ...'
    (tmp_path / "ada").mkdir()
    nbformat.write(notebook(SOLUTION, "import socket\ntry:\n    socket.create_connection("
                                      "('pypi.org', 443), timeout=3)\n    print('NETWORK')\n"
                                      "except OSError:\n    print('no network')"),
                   tmp_path / "ada" / "toy.ipynb")
    command = (f"ip link set lo up && {sys.executable} -m labkit grade {tmp_path} --template "
               f"{RELEASED.parent} --out {tmp_path / 'grades'}")
    run = subprocess.run(["unshare", "--net", "sh", "-c", command], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "LABKIT_PRESTART": "0"})
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "grades" / "grades.csv").read_text().splitlines()[1] == "ada,2,1,3,3,"
    fed_back = nbformat.read(tmp_path / "grades" / "feedback" / "ada" / "toy.ipynb", 4)
    printed = "".join(o.get("text", "") for c in fed_back.cells for o in c.get("outputs", []))
    assert "no network" in printed and "NETWORK" not in printed, printed


def readable_python(folder: Path):
    """A Python that other users can run, with this environment's packages: Debian's
    python3.11 in a venv whose .pth adds this venv's site-packages (same ABI); None without it.
    (This machine's own Python lives under /root, which other users cannot enter.)"""
    system = Path("/usr/bin/python3.11")
    if sys.version_info[:2] != (3, 11) or not system.exists():
        return None
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(folder)], check=True,
                   timeout=120)
    purelib = sysconfig.get_paths()["purelib"]
    site_dir = next((folder / "lib").glob("python3.11/site-packages"))
    (site_dir / "course.pth").write_text(f"import site; site.addsitedir({purelib!r})\n")
    return folder / "bin" / "python"


@pytest.mark.skipif(not (hasattr(os, "geteuid") and os.geteuid() == 0),
                    reason="a kernel user of its own needs a grader running as root")
def test_as_root_each_kernel_runs_as_a_user_of_its_own(tmp_path_factory, tmp_path):
    venv = Path(tempfile.mkdtemp(prefix="labkit-readable-", dir="/tmp"))
    os.chmod(venv, 0o755)
    try:
        python = readable_python(venv)
        if python is None:
            pytest.skip("no Debian python3.11 beside this Python 3.11")
        probe = subprocess.run([str(python), "-c", "from labkit import grading_sandbox as s; "
                                "print(s.unprivileged_python_problem())"],
                               capture_output=True, text=True, timeout=120)
        if probe.stdout.strip() != "None":
            pytest.skip(f"other users cannot run labkit here: {probe.stdout.strip()} "
                        f"{probe.stderr[-300:]}")
        released = tmp_path / "released"
        released.mkdir()
        shutil.copy(RELEASED, released / "toy.ipynb")
        os.chmod(tmp_path, 0o755)
        (tmp_path / "ada").mkdir()
        check_bytes = CHECK_FILE.read_bytes()
        nbformat.write(hostile(
            "import os\nprint('uid', os.getuid())\n"
            f"for path in ({str(CHECK_FILE)!r}, {str(released / 'toy.ipynb')!r}):\n"
            "    try:\n        open(path, 'a').write('#')\n        print('WROTE', path)\n"
            "    except OSError as error:\n        print('refused', type(error).__name__)\n"
            "for pid in os.listdir('/proc'):\n"
            "    try:\n        open(f'/proc/{pid}/environ', 'rb').read()\n"
            f"        print('READ', pid) if {SECRET!r}.encode() in "
            "open(f'/proc/{pid}/environ', 'rb').read() else None\n"
            "    except OSError:\n        pass\n"), tmp_path / "ada" / "toy.ipynb")
        run = subprocess.run([str(python), "-m", "labkit", "grade", str(tmp_path / "ada"),
                              "--template", str(released), "--out", str(tmp_path / "grades")],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "LABKIT_PRESTART": "0",
                                  "GRADER_API_TOKEN": SECRET})
        assert run.returncode == 0, run.stderr
        assert (tmp_path / "grades" / "grades.csv").read_text().splitlines()[1] == "ada,2,1,3,3,"
        fed_back = nbformat.read(tmp_path / "grades" / "feedback" / "ada" / "toy.ipynb", 4)
        printed = "".join(o.get("text", "") for c in fed_back.cells for o in c.get("outputs", []))
        assert "uid 2000000000" in printed and printed.count("refused PermissionError") == 2
        assert "WROTE" not in printed and "READ" not in printed, printed
        assert CHECK_FILE.read_bytes() == check_bytes
    finally:
        shutil.rmtree(venv, ignore_errors=True)


@pytest.mark.timeout(600)  # not beside the class of 20: its hostile notebooks change labkit
def test_a_course_notebook_in_the_sandbox_gets_full_marks_and_no_incident(tmp_path):
    # the sandbox (scrubbed environment, private folders, no capabilities, not dumpable) does
    # not get in the way of a real notebook: ranks, the fork server that outlives a moment its
    # kernel, checks; the other notebooks' solutions are graded in-process by
    # tests/test_release_grade.py
    source = Path(__file__).resolve().parents[1] / "notebooks" / "source" / "00_setup.ipynb"
    (tmp_path / "ada").mkdir()
    shutil.copy(source, tmp_path / "ada" / "setup (final).ipynb")
    run = labkit_grade(tmp_path / "ada", "--json", "--out", tmp_path / "grades")
    assert run.returncode == 0, run.stderr
    grade = json.loads(run.stdout)
    assert grade["error"] is None and grade["incidents"] == [], grade
    assert grade["score"] == grade["max_score"] > 0, grade["exercises"]
