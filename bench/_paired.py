"""What the paired benchmarks (zero1_vs_torch.py, zero3_vs_fsdp2.py) share: their command line
and one launch per world size, each rank running every implementation in rotation."""
import argparse


def arguments(doc: str, repeats: int) -> argparse.Namespace:
    """--repeats (timed blocks per implementation), --steps, --warmup, --quick (a smoke run)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="timed blocks per implementation")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 repeats of 1 step: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps = 3, 1
    return args


def each_world(rank_main, args, names, report, worlds=(2, 4)) -> bool:
    """``rank_main(steps, repeats, warmup)`` on each world size (gloo, 1 thread per rank), then
    ``report(world, results, steps)``; True when every report met its target."""
    import labkit
    ok = True
    for world in worlds:
        work = len(names) * (args.warmup + 1 + args.steps * args.repeats)
        results = labkit.launch(rank_main, nprocs=world, threads=1, quiet=True,
                                timeout=120 + 3 * world * work,
                                args=(args.steps, args.repeats, args.warmup))
        ok = report(world, results, args.steps) and ok
    labkit.shutdown()
    return ok
