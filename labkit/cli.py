"""The ``labkit`` command: ``doctor``, ``release`` and ``grade``."""
import argparse
import json
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labkit", description="Tools for the distributed "
                                     "training course.")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="check this machine and run a real 2-rank "
                                 "all-reduce")
    doctor.add_argument("--nprocs", type=int, default=2, help="ranks to launch (default 2)")
    doctor.add_argument("--timeout", type=float, default=120, help="seconds (default 120)")

    release = commands.add_parser("release", help="generate the learner notebooks from the "
                                  "nbgrader sources (needs the 'grading' extra)")
    release.add_argument("source", nargs="?", type=Path,
                         help="folder of source notebooks (default: the course's notebooks/source)")
    release.add_argument("--out", type=Path,
                         help="folder for the learner notebooks (default: the source "
                         "folder's parent)")
    release.add_argument("--check", action="store_true",
                         help="write nothing; fail if the learner notebooks differ from what the "
                         "sources generate")

    grade = commands.add_parser("grade", help="run and score learner notebooks, one or a whole "
                                "class, each in a sandbox (no nbgrader, no database)")
    grade.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                       help="submitted notebooks, or folders of them: one folder per learner "
                       "(any file names), or one learner's folder")
    grade.add_argument("-j", "--jobs", type=int, default=1, metavar="N",
                       help="notebooks graded at the same time, each in its own kernel "
                       "(default 1; about one per 2 cores: every notebook runs its own ranks)")
    grade.add_argument("--out", type=Path, metavar="PATH",
                       help="where to write: a folder for grades.csv, grades.jsonl and "
                       "feedback/ (default ./grades when a folder is graded), or the "
                       "results.json file for --format gradescope (default results.json)")
    grade.add_argument("--format", choices=("class", "gradescope"), default="class",
                       help="class: grades.csv, grades.jsonl and feedback notebooks; "
                       "gradescope: one learner's results.json for Gradescope")
    grade.add_argument("--json", action="store_true",
                       help="print one JSON object per notebook, one per line")
    grade.add_argument("--timeout-per-cell", type=float, default=120, metavar="S",
                       help="seconds a cell may run before it is interrupted (default 120)")
    grade.add_argument("--time-limit", type=float, default=1200, metavar="S",
                       help="seconds a whole notebook may run; the cells left are not run "
                       "(default 1200)")
    grade.add_argument("--template", type=Path, metavar="PATH",
                       help="released notebook to restore the check cells from, or a folder "
                       "of them: the one whose check cells match is used (default: the "
                       "course's notebooks/ folder)")
    return parser


def _release(args) -> int:
    from labkit.release import ReleaseError, course_root, release
    source = args.source or course_root() / "notebooks" / "source"
    out = args.out or source.resolve().parent
    try:
        problems = release(source, out, check=args.check)
    except ReleaseError as error:
        problems = [str(error)]
    for problem in problems:
        print(f"labkit release: {problem}", file=sys.stderr)
    if args.check and not problems:
        print(f"labkit release --check: the learner notebooks in {out} are up to date")
    return 1 if problems else 0


def _without_secrets(argv) -> None:
    """Start ``labkit grade`` again with only the environment a kernel may see (POSIX): then
    no process of the grading run holds the caller's tokens for a submission to find."""
    from labkit import grading_class
    if os.name != "posix" or os.environ.get("LABKIT_GRADE_CLEAN_ENV") == "1":
        return
    env = {**grading_class.worker_environment(), "LABKIT_GRADE_CLEAN_ENV": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "labkit", *argv], env)


def _grade(args) -> int:
    from labkit import grading, grading_class, grading_progress, grading_reports
    if args.jobs < 1:
        print("labkit grade: -j takes a number of notebooks at a time, 1 or more",
              file=sys.stderr)
        return 2
    out = args.out
    if out is None and args.format == "gradescope":
        out = Path("results.json")
    elif out is None and any(path.is_dir() for path in args.paths):
        out = Path("grades")
    previous = {}
    if out is not None and args.format == "class":
        previous = grading_reports.read_previous(out / "grades.jsonl")
    try:
        grader = grading_class.ClassGrader(
            args.template, args.jobs, args.timeout_per_cell, args.time_limit,
            grading_progress.ClassProgress(sys.stderr), previous)
    except grading.GradingError as error:
        print(f"labkit grade: {error}", file=sys.stderr)
        return 2
    grades = grader.grade(grading_class.discover(args.paths))
    if args.json:
        for grade in grades:
            print(json.dumps(grade.as_json(), ensure_ascii=False), flush=True)
    if args.format == "gradescope":
        from labkit import gradescope
        gradescope.write(grades, out)
        print(f"wrote {out}", file=sys.stderr)
    elif out is not None:
        grading_reports.write_jsonl(grades, out / "grades.jsonl")
        grading_reports.write_csv(grades, grader.released, out / "grades.csv")
        grading_reports.write_feedback(grades, out / "feedback")
        if not args.json:
            print(grading_reports.summary(grades, grader.released))
        print(f"wrote {out / 'grades.csv'}, {out / 'grades.jsonl'} and the feedback "
              f"notebooks in {out / 'feedback'}", file=sys.stderr)
    elif not args.json:
        print(grading.table(grades))
    if grader.stopped:
        print(f"labkit grade: stopped: {grader.stopped}", file=sys.stderr)
        return 3
    return 1 if any(grade.error and not grade.incidents for grade in grades) else 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "grade" and argv is None:  # a command, not a call from Python
        _without_secrets(sys.argv[1:])
    if args.command == "doctor":
        from labkit import doctor as doctor_module
        return 0 if doctor_module.run(args.nprocs, args.timeout) else 1
    return _release(args) if args.command == "release" else _grade(args)


if __name__ == "__main__":
    sys.exit(main())
