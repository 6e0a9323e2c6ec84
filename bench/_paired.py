"""What the paired benchmarks (zero1_vs_torch.py, zero3_vs_fsdp2.py) share: their command line
and one launch per world size, each rank running every implementation in rotation."""
import argparse

import _report   # bench/_report.py: --quick, --json, progress bars, the results table


def arguments(doc: str, repeats: int, quick_warmup: int = 2) -> argparse.Namespace:
    """--repeats (timed blocks per implementation), --steps, --warmup, --quick (a smoke run:
    3 repeats of 1 step after ``quick_warmup`` warm-up steps), --json PATH."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="timed blocks per implementation")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=2)
    _report.add_arguments(parser, f"3 repeats of 1 step after {quick_warmup} warm-up step(s): "
                                  "a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.warmup = 3, 1, quick_warmup
    return args


def each_world(rank_main, args, names, report, results, worlds=(2, 4)) -> bool:
    """``rank_main(steps, repeats, warmup, show)`` on each world size (gloo, 1 thread per rank;
    ``show``: rank 0 shows a progress bar), then ``report(world, ranks' results, steps,
    results)``, which prints and adds its entries to ``results`` (a `_report.Results`); True
    when every report met its target."""
    import labkit
    ok = True
    for world in worlds:
        work = len(names) * (args.warmup + 1 + args.steps * args.repeats)
        outcome = labkit.launch(rank_main, nprocs=world, threads=1, quiet=True,
                                timeout=120 + 3 * world * work,
                                args=(args.steps, args.repeats, args.warmup,
                                      _report.show_progress()))
        ok = report(world, outcome, args.steps, results) and ok
    labkit.shutdown()
    return ok
