"""The ``labkit`` command: ``doctor``, ``release`` and ``grade``."""
import argparse
import json
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

    grade = commands.add_parser("grade", help="run and score learner notebooks (no nbgrader, no "
                                "database)")
    grade.add_argument("paths", nargs="+", type=Path, metavar="PATH.ipynb")
    grade.add_argument("--json", action="store_true",
                       help="print one JSON object per notebook, one per line")
    grade.add_argument("--timeout-per-cell", type=float, default=120, metavar="S",
                       help="seconds a cell may run before it is interrupted (default 120)")
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


def _grade(args) -> int:
    from labkit.grading import Progress, grade_notebook, table
    grades, progress = [], Progress(sys.stderr, notebooks=len(args.paths))
    for path in args.paths:
        grade = grade_notebook(path, args.template, args.timeout_per_cell, progress)
        grades.append(grade)
        if args.json:
            print(json.dumps(grade.as_json()), flush=True)
    if not args.json:
        print(table(grades))
    return 1 if any(grade.error for grade in grades) else 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        from labkit import doctor as doctor_module
        return 0 if doctor_module.run(args.nprocs, args.timeout) else 1
    return _release(args) if args.command == "release" else _grade(args)


if __name__ == "__main__":
    sys.exit(main())
