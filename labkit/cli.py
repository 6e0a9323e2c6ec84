"""The ``labkit`` command."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="labkit", description="Tools for the distributed "
                                     "training course.")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="check this machine and run a real 2-rank "
                                 "all-reduce")
    doctor.add_argument("--nprocs", type=int, default=2, help="ranks to launch (default 2)")
    doctor.add_argument("--timeout", type=float, default=120, help="seconds (default 120)")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from labkit import doctor as doctor_module
        return 0 if doctor_module.run(args.nprocs, args.timeout) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
