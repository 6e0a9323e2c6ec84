"""Deck 01's values: the five collectives and a ring all-reduce run on real gloo ranks, the ring's
bytes from the ledger beside the formula, and alpha and beta fitted on this machine."""
import statistics

import labkit
from labkit import plots, theory

RING_BYTES = 2**20                          # S for the ledger: a float32 tensor of S/4 elements
SIZES = [4**k for k in range(5, 12)]        # bytes: 1 KiB ... 4 MiB, for the alpha-beta fit
REPEATS = 9


def _ring(tensor, phases, snapshot=None):
    """A ring on send/recv, in place: rank r ends the reduce-scatter holding the sum of chunk r
    (as torch's reduce_scatter_tensor), then the all-gather sends the complete chunks around.
    ``snapshot(phase, chunk_received)`` is called after every step."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % world, (rank - 1) % world
    chunks = torch.tensor_split(tensor, world)
    if "reduce_scatter" in phases:
        for step in range(world - 1):
            send, into = (rank - step - 1) % world, (rank - step - 2) % world
            incoming = torch.empty_like(chunks[into])
            request = dist.isend(chunks[send], dst=right)
            dist.recv(incoming, src=left)
            request.wait()
            chunks[into].add_(incoming)
            if snapshot:
                snapshot("reduce-scatter", into)
    if "all_gather" in phases:
        for step in range(world - 1):
            send, into = (rank - step) % world, (rank - step - 1) % world
            request = dist.isend(chunks[send], dst=right)
            dist.recv(chunks[into], src=left)
            request.wait()
            if snapshot:
                snapshot("all-gather", into)


def ring_ledger(numel):
    """Sends and bytes one rank's ring all-reduce makes, from the ledger, and the result's
    largest difference from torch's all_reduce on the same data."""
    import torch
    import torch.distributed as dist

    torch.manual_seed(dist.get_rank())
    x = torch.randn(numel)
    expected = x.clone()
    dist.all_reduce(expected)
    with labkit.CommCounter() as comm:
        _ring(x, ("reduce_scatter", "all_gather"))
    sends = [c for c in comm.calls if c.op == "send"]
    return {"sends": len(sends), "bytes": sum(c.payload_bytes for c in sends),
            "peers": sorted({c.peer for c in sends}),
            "worst": (x - expected).abs().max().item()}


def on_four_ranks():
    """Notebook 01's five collectives (rank r holds (j+1)·10^r in element j), the ring step by
    step on the same data, and the ring's ledger: one launch."""
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    from labkit.compat import all_gather_into_tensor, reduce_scatter_tensor

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = torch.tensor([(j + 1) * 10.0 ** rank for j in range(world)])
    seen = {}
    x = mine.clone(); dist.broadcast(x, src=0); seen["broadcast"] = (mine, x)   # noqa: E702
    x = mine.clone(); dist.reduce(x, dst=0); seen["reduce"] = (mine, x)         # noqa: E702
    x = mine.clone(); dist.all_reduce(x); seen["all_reduce"] = (mine, x)        # noqa: E702
    shard = torch.empty(1)
    reduce_scatter_tensor(shard, mine); seen["reduce_scatter"] = (mine, shard)  # noqa: E702
    full = torch.empty(world)
    all_gather_into_tensor(full, shard); seen["all_gather"] = (shard, full)     # noqa: E702

    x = mine.clone()
    states, received = [x.tolist()], [None]
    _ring(x, ("reduce_scatter", "all_gather"),
          lambda phase, chunk: (states.append(x.tolist()), received.append(chunk)))
    return {"seen": {op: (a.tolist(), b.tolist()) for op, (a, b) in seen.items()},
            "ring": states, "received": received,
            "ledger": ring_ledger(RING_BYTES // 4),
            "same_object": dist.all_reduce is distributed_c10d.all_reduce}


def on_two_ranks(sizes, repeats):
    """gloo's all_reduce timed by the ledger at each size, the sizes taking turns (so that a
    burst of load from other programs hits every size alike), each call after a barrier; and
    the ring's ledger on 2 ranks."""
    import torch
    import torch.distributed as dist

    comm = labkit.CommCounter()
    buffers = {size: torch.zeros(size // 4) for size in sizes}
    for x in buffers.values():
        dist.all_reduce(x)                      # warm-up
    for _ in range(repeats):
        for x in buffers.values():
            dist.barrier()
            with comm:
                dist.all_reduce(x)
    runs = {}
    for call in comm.calls:
        runs.setdefault(call.payload_bytes, []).append(call.seconds)
    return {"runs": runs, "ledger": ring_ledger(RING_BYTES // 4)}


def gloo_allreduce_chooses_no_algorithm():
    """Notebook 01's "going further": torch 2.13's gloo backend calls gloo::allreduce; does it
    call setAlgorithm first? Read from the header installed with torch."""
    from pathlib import Path

    import torch

    header = (Path(torch.__file__).parent
              / "include/torch/csrc/distributed/c10d/ProcessGroupGlooDetail.hpp")
    text = header.read_text() if header.exists() else ""
    start = text.find("class AsyncAllreduceWork")
    end = text.find("gloo::allreduce(opts);", start)
    if start < 0 or end < 0:
        return None
    return "setAlgorithm" not in text[start:end]


def _figure(before, after, title):
    """collective_picture on a figure sized for a slide (4 ranks x 4 elements)."""
    import matplotlib.pyplot as plt

    widths = [max(len(r) for r in before), max(len(r) for r in after)]
    _, axes = plt.subplots(1, 2, figsize=(6.4, 2.75), layout="constrained",
                           gridspec_kw={"width_ratios": widths})
    plots.collective_picture(before, after, title=title, axes=axes)
    return axes[0].figure


def _ring_figure(states, received, world):
    """Every rank's buffer before the ring and after each of its 2(N-1) steps."""
    titles = ["start"] + [f"reduce-scatter {s + 1}" for s in range(world - 1)] \
        + [f"all-gather {s + 1}" for s in range(world - 1)]
    # one element per chunk here: the cell a rank wrote at a step is the chunk it received
    highlight = [[]] + [[(r, received[s][r]) for r in range(world)]
                        for s in range(1, len(states))]
    fig = plots.collective_steps(states, titles, highlight, ncols=world)
    fig.set_size_inches(9.6, 3.9)         # text larger on the slide
    return fig


def _small(x):
    return "0 (bitwise equal)" if x == 0 else f"{x:.0e}"


def values():
    four = labkit.launch(on_four_ranks, nprocs=4, quiet=True)
    two = labkit.launch(on_two_ranks, nprocs=2, args=(SIZES, REPEATS), quiet=True)
    out = {}
    for op, title in (("broadcast", "broadcast(x, src=0)"), ("reduce", "reduce(x, dst=0)"),
                      ("all_reduce", "all_reduce(x)"),
                      ("reduce_scatter", "reduce_scatter_tensor(shard, x)"),
                      ("all_gather", "all_gather_into_tensor(full, shard)")):
        before = [r["seen"][op][0] for r in four]
        after = [r["seen"][op][1] for r in four]
        out[f"{op}_figure"] = _figure(before, after, f"{title} on 4 gloo ranks, measured")
    out["rs_ag_equal"] = "yes" if all(r["seen"]["all_gather"][1] == r["seen"]["all_reduce"][1]
                                      for r in four) else "NO"

    world = len(four)
    states = [[r["ring"][s] for r in four] for s in range(2 * world - 1)]
    received = [[r["received"][s] for r in four] for s in range(2 * world - 1)]
    out["ring_figure"] = _ring_figure(states, received, world)
    out["ring_equals_all_reduce"] = "yes" if all(r["ring"][-1] == r["seen"]["all_reduce"][1]
                                                 for r in four) else "NO"

    rows = []
    for n, ledger in ((2, two[0]["ledger"]), (4, four[0]["ledger"])):
        formula = theory.wire_bytes("all_reduce", RING_BYTES, n)
        rows.append(f"| {n} | {ledger['sends']} | {theory.ring_steps('all_reduce', n)} | "
                    f"{ledger['bytes']:,} | {formula:,.0f} | "
                    f"{', '.join(map(str, ledger['peers']))} | {_small(ledger['worst'])} |")
    out["ring_rows"] = "\n".join(rows)
    out["ring_s"] = f"{RING_BYTES:,} B"

    runs = {size: [max(t0, t1) for t0, t1 in zip(two[0]["runs"][size], two[1]["runs"][size])]
            for size in SIZES}           # an all-reduce ends for both ranks together: the slower
    medians = [statistics.median(runs[s]) for s in SIZES]
    alpha, beta = theory.fit_alpha_beta(SIZES, medians, op="all_reduce", world_size=2)
    r2 = theory.r_squared(SIZES, medians, alpha, beta, op="all_reduce", world_size=2)
    ax = plots.alpha_beta_plot(
        SIZES, medians, alpha, beta, runs=runs,
        title=f"gloo all_reduce, 2 ranks, this machine ({REPEATS} runs a size)")
    ax.figure.set_size_inches(7.2, 3.9)
    out["fit_figure"] = ax.figure
    out["alpha"] = f"{alpha * 1e6:.0f} µs"
    out["inv_beta"] = f"{1 / beta / 1e9:.2f} GB/s"
    out["r2"] = f"{r2:.3f}"
    crossover = [(n, n * alpha / beta) for n in (2, 8, 64)]
    out["crossover_rows"] = "\n".join(
        f"| {n} | {theory.ring_steps('all_reduce', n)} | {s:,.0f} B |" for n, s in crossover)
    found = gloo_allreduce_chooses_no_algorithm()
    out["gloo_no_algorithm"] = {True: "no `setAlgorithm` call before `gloo::allreduce(opts)`",
                                False: "a `setAlgorithm` call: read the header",
                                None: "header not shipped with this torch"}[found]
    out["same_object"] = "True" if all(r["same_object"] for r in four) else "False"
    return out
