"""Run every benchmark, one after the other, and print one summary table.

Each bench runs in a subprocess of its own (`--json` into a temporary folder, `--quick` passed on
when given); its own output and progress bars go to this terminal as it runs. Then one table:
bench, quantity, case, ours, reference, the ratio ours / reference, the target and whether it was
met; each value is the median with its spread (min-max over the repeats), from the benches' JSON.
Below it, each bench's wall time and CPU time (the bench and every process under it: ranks,
servers, torchrun; sampled every 0.1 s, so a little low), and the correctness checks.

`--write-readme` replaces what lies between `<!-- results:start -->` and `<!-- results:end -->` in
bench/README.md with the table in Markdown, headed by the machine (CPU, cores, load at the start,
versions), the date and the command. A `--quick` run never writes it: its numbers come from too
few repeats to be measurements.

Run: make bench   (.venv/bin/python bench/run_all.py --write-readme)
     make bench BENCH_ARGS=--quick   (a smoke run: every bench runs and computes its ratios)
     .venv/bin/python bench/run_all.py [--quick] [--only NAME,...] [--json PATH] [--write-readme]
Exit status: 1 if a bench failed (crashed or wrote no results); a missed target is reported, not
an error.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import _report   # bench/_report.py: the machine, the formatting of medians and spreads

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"
BENCHES = ("launch_speed", "memory_overhead", "ddp_vs_torch", "zero1_vs_torch", "zero3_vs_fsdp2",
           "scaling")
TIMEOUT_S = {True: 600, False: 3600}   # per bench: --quick, full


def run_bench(name: str, json_path: str, quick: bool) -> dict:
    """Run one bench; {"rc", "wall_s", "cpu_s", "results" (its JSON) or "error"}."""
    import psutil
    command = [sys.executable, os.path.join(HERE, f"{name}.py"), "--json", json_path]
    command += ["--quick"] if quick else []
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=os.path.dirname(HERE))
    cpu = {}   # (pid, create_time) -> user + system seconds, as last seen

    def sample():
        try:
            root = psutil.Process(process.pid)
            tree = [root] + root.children(recursive=True)
        except psutil.Error:
            return
        for p in tree:
            try:
                with p.oneshot():
                    times = p.cpu_times()
                    cpu[(p.pid, p.create_time())] = times.user + times.system
            except psutil.Error:
                pass

    deadline = start + TIMEOUT_S[quick]
    while process.poll() is None:
        sample()
        if time.perf_counter() > deadline:
            process.kill()
            process.wait()
            return {"rc": None, "wall_s": time.perf_counter() - start, "cpu_s": sum(cpu.values()),
                    "error": f"timed out after {TIMEOUT_S[quick]} s"}
        time.sleep(0.1)
    out = {"rc": process.returncode, "wall_s": time.perf_counter() - start,
           "cpu_s": sum(cpu.values())}
    if process.returncode != 0:
        out["error"] = f"exit status {process.returncode}"
    elif not os.path.exists(json_path):
        out["error"] = "no JSON written"
    else:
        with open(json_path) as f:
            out["results"] = json.load(f)
    return out


def summary_rows(report: dict) -> list:
    """(bench, quantity, case, ours, reference, ratio, target, met) per entry, as text."""
    rows = []
    for name, run in report["benches"].items():
        if "results" not in run:
            rows.append((name, f"FAILED: {run.get('error')}", "", "", "", "", "", ""))
            continue
        for e in run["results"]["entries"]:
            unit = _report.unit_suffix(e["unit"])
            rows.append((name, e["quantity"], e["case"],
                         f"{e['ours_label']} {_report.fmt_stats(e['ours'], e['unit'])}{unit}",
                         f"{e['reference_label']} {_report.fmt_stats(e['reference'], e['unit'])}"
                         f"{unit}",
                         _report.fmt_stats(e["ratio"]) + "x", e["target"] or "",
                         "" if e["met"] is None else ("yes" if e["met"] else "NO")))
    return rows


HEADER = ("bench", "quantity", "case", "ours", "reference", "ratio", "target", "met")


def print_summary(report: dict) -> None:
    print(f"\n== summary{' (--quick: a smoke run, not a measurement)' if report['quick'] else ''}"
          f" == median [{_report.SPREAD}]; ratio = ours / reference (the median of the "
          f"per-repeat ratios where the two ran in pairs)")
    _report.print_rows([HEADER] + summary_rows(report))
    print()
    for name, run in report["benches"].items():
        checks = run.get("results", {}).get("checks", [])
        failed = [c["name"] for c in checks if not c["ok"]]
        print(f"{name:<16} wall {run['wall_s']:6.1f} s  CPU {run['cpu_s']:6.1f} s  "
              + (f"FAILED: {run['error']}" if "error" in run else
                 "no correctness checks" if not checks else
                 f"checks: {len(checks) - len(failed)}/{len(checks)} ok"
                 + (f"; FAILED: {'; '.join(failed)}" if failed else "")))
    total_wall = sum(r["wall_s"] for r in report["benches"].values())
    total_cpu = sum(r["cpu_s"] for r in report["benches"].values())
    print(f"{'total':<16} wall {total_wall:6.1f} s  CPU {total_cpu:6.1f} s")


def markdown(report: dict) -> str:
    """The results section: the machine, date and command, then one Markdown table."""
    m = report["machine"]
    load = ", ".join(map(str, m.get("load_average") or [])) or "unknown"
    lines = [
        f"Measured {report['date']} with `{report['command']}` on {m['cpu']}, {m['cores']} cores "
        f"({m['usable_cores']} usable), load average {load} at the start; {m['platform']}, "
        f"Python {m['python']}, torch {m['torch']}.",
    ]
    if report["quick"]:
        lines.append("")
        lines.append("**A `--quick` run: too few repeats to be a measurement.**")
    lines += ["", f"Median [{_report.SPREAD}]; ratio = ours / reference (the median of the "
              "per-repeat ratios where the two ran in pairs, in the same run).", ""]
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("|" + "---|" * len(HEADER))
    for row in summary_rows(report):
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    failed = [f"{name}: {c['name']}" for name, run in report["benches"].items()
              for c in run.get("results", {}).get("checks", []) if not c["ok"]]
    lines += ["", "Checks: " + ("FAILED: " + "; ".join(failed) if failed else
                                "every bench's correctness checks passed (equal parameters).")]
    return "\n".join(lines)


def write_readme(path: str, report: dict) -> str:
    """Replace the text between the results markers in ``path`` with `markdown(report)`;
    return the new section."""
    with open(path) as f:
        text = f.read()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{path} needs one {START} followed by one {END}")
    section = markdown(report)
    head, rest = text.split(START)
    _, tail = rest.split(END)
    with open(path, "w") as f:
        f.write(f"{head}{START}\n{section}\n{END}{tail}")
    return section


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="pass --quick to every bench: a smoke run")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHES)}")
    parser.add_argument("--json", metavar="PATH", help="write every bench's results here")
    parser.add_argument("--write-readme", action="store_true",
                        help="replace bench/README.md's results section (not with --quick)")
    parser.add_argument("--readme", default=README, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = BENCHES
    if args.only:
        names = tuple(n.strip() for n in args.only.split(","))
        unknown = [n for n in names if n not in BENCHES]
        if unknown:
            parser.error(f"unknown bench(es) {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:]),
              "quick": args.quick, "machine": _report.machine(), "benches": {}}
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        for i, name in enumerate(names, 1):
            print(f"\n== [{i}/{len(names)}] {name}{' --quick' if args.quick else ''} ==",
                  flush=True)
            report["benches"][name] = run_bench(name, os.path.join(folder, f"{name}.json"),
                                                args.quick)
    print_summary(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.write_readme:
        if args.quick:
            print(f"\nnot writing {os.path.relpath(args.readme)}: a --quick run is not a "
                  "measurement")
        else:
            write_readme(args.readme, report)
            print(f"\nresults written to {os.path.relpath(args.readme)}")
    return 1 if any("error" in run for run in report["benches"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
