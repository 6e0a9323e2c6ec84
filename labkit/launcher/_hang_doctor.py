"""The hang doctor: one sentence that says why ranks hang, from the collectives each one entered.

Every rank of a launch notes each collective as it enters it (``_collective_hooks``, into the
files of ``_collective_record``). After a timeout the launcher reads those notes and ``diagnose``
compares them across ranks. Collectives on a process group must be called by all of its ranks in
the same order with tensors of the same size, so the first sequence number where the ranks differ
is the bug:

- a skipped collective: "Ranks 0, 2, 3 entered all_reduce #7 (16 B, float32); rank 1 stopped at
  #6 and returned from the function: it skipped this collective, or the others added one."
- a reordered pair: "... entered all_reduce #7 (...); rank 1 entered broadcast #7 (...): ..."
- mismatched sizes: "All ranks entered all_reduce #3, rank 1 with 12 B, the others with 16 B: ..."
- sends and recvs that wait for each other: "Ranks 0 and 1 both wait in send to each other ..."

Sends and recvs are numbered per peer (``_collective_record``), so a missing message shows as
counts that differ ("Rank 1 waits in recv #3 from rank 0 (16 B, float32), but rank 0 sent only
2 to rank 1 and returned from the function: ...").
Only what the record saw is compared: see ``_collective_hooks`` for what it does not see (DDP).
"""
from labkit.launcher._results import human_size

# names of one collective (old and new torch names, labkit.compat's): compared as one
_SAME_OP = {"all_gather_into_tensor": "all_gather_single", "_all_gather_base": "all_gather_single",
            "reduce_scatter_tensor": "reduce_scatter_single",
            "_reduce_scatter_base": "reduce_scatter_single", "monitored_barrier": "barrier"}
_SIZES_MAY_DIFFER = {"all_to_all", "all_to_all_single"}   # uneven splits are allowed
_POINT_TO_POINT = {"send", "recv", "isend", "irecv", "send_object_list", "recv_object_list"}
_SENDS = {"send", "isend", "send_object_list"}


# ---- how one entry reads -------------------------------------------------------------------

def is_point_to_point(entry: dict) -> bool:
    return entry.get("op") in _POINT_TO_POINT


def name(entry: dict) -> str:
    """"all_reduce #7", "all_reduce #2 on group [0, 2]", "send #3 to rank 1", "recv #1 from any rank"."""
    text = f"{entry['op']} #{entry['seq']}"
    if is_point_to_point(entry):
        peer = entry.get("peer")
        where = "any rank" if peer is None else f"rank {peer}"
        text += f" {'to' if entry['op'] in _SENDS else 'from'} {where}"
    if entry.get("group", "world") != "world":
        text += f" on group {entry['group']}"
    return text


def payload(entry: dict) -> str:
    """"16 B, float32"; "" for a barrier or Python objects (``all_gather_object``)."""
    if entry.get("bytes") is None or (not entry["bytes"] and not entry.get("tensors")):
        return ""
    return ", ".join([human_size(entry["bytes"])] + ([entry["dtype"]] if entry.get("dtype") else []))


def describe(entry: dict) -> str:
    """"all_reduce #7 (16 B, float32)"."""
    size = payload(entry)
    return name(entry) + (f" ({size})" if size else "")


def last_entered(entries: list) -> str:
    """A rank's last call, for a status line: "all_reduce #7 (16 B, float32), still inside"."""
    if not entries:
        return "none yet"
    last = entries[-1]
    return describe(last) + (", returned" if last.get("returned") else ", still inside")


def _ranks(ranks) -> str:
    ranks = sorted(ranks)
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if len(ranks) == 2:
        return f"ranks {ranks[0]} and {ranks[1]}"
    return "ranks " + ", ".join(map(str, ranks))


def _all(ranks) -> str:
    return "both" if len(ranks) == 2 else "all"


def _where(rank: int, records: dict, unfinished: list) -> str:
    """"returned from the function", "waits in all_reduce #3 (...)", "is busy in its own code"."""
    if rank not in unfinished:
        return "returned from the function"
    mine = records.get(rank)
    if mine and not mine[-1].get("returned"):
        return f"waits in {describe(mine[-1])}"
    return "is busy in its own code"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


# ---- the diagnosis -------------------------------------------------------------------------

def diagnose(collectives: dict, nprocs: int, unfinished=None,
             returned: str = "returned from the function") -> str:
    """One sentence for learners: why the ranks hang, from ``{rank: [entry, ...]}``.

    ``unfinished``: the ranks still inside the function when time ran out (default: all); the
    others had returned. ``returned``: how such a rank is described ("finished the cell" for
    persistent ranks). Returns "" when there is nothing to compare (no record at all).
    """
    return _diagnosis(collectives, nprocs, unfinished).replace("returned from the function",
                                                               returned)


def _diagnosis(collectives: dict, nprocs: int, unfinished) -> str:
    records = {rank: list(collectives.get(rank) or []) for rank in range(nprocs)}
    unfinished = sorted(range(nprocs) if unfinished is None else unfinished)
    if not collectives:
        return ""
    if not any(records.values()):
        one = len(unfinished) == 1
        return _sentence(f"no rank had entered a collective yet: {_ranks(unfinished)} "
                         f"{'is' if one else 'are'} busy in {'its' if one else 'their'} own code "
                         "or still setting up (stacks below)")
    for group in _groups(records, nprocs):
        found = _first_disagreement(records, group, unfinished)
        if found:
            return _sentence(found)
    found = _point_to_point(records, unfinished)
    if found:
        return _sentence(found)
    return _sentence(_agreeing(records, unfinished))


def _groups(records: dict, nprocs: int) -> list:
    """Each process group the collectives ran on, world first: (its description, its ranks)."""
    seen = {"world": ("world", list(range(nprocs)))}
    for entries in records.values():
        for entry in entries:
            group = entry.get("group", "world")
            if not is_point_to_point(entry) and str(group) not in seen:
                seen[str(group)] = (group, [r for r in group if r < nprocs])
    return list(seen.values())


def _signature(entry: dict):
    op = _SAME_OP.get(entry["op"], entry["op"])
    if op in _SIZES_MAY_DIFFER or entry.get("bytes") is None:
        return (op,)
    return (op, entry.get("bytes"), entry.get("dtype"), str(entry.get("shapes")))


def _first_disagreement(records: dict, group, unfinished: list) -> str | None:
    """The first sequence number on ``group`` where its ranks did not all enter the same call."""
    description, members = group
    by_seq, last = {}, {}
    for rank in members:
        entries = records[rank]
        mine = {e["seq"]: e for e in entries
                if not is_point_to_point(e) and e.get("group", "world") == description}
        truncated = bool(entries) and entries[0].get("n", 1) > 1   # the ring let older ones go
        if not mine and truncated:
            continue      # this rank's calls on the group are no longer in its record
        by_seq[rank], last[rank] = mine, max(mine, default=0)
    if not last or max(last.values()) == 0:
        return None
    start = max((min(mine) for mine in by_seq.values() if mine), default=1)
    for seq in range(start, max(last.values()) + 1):
        present = {r: mine[seq] for r, mine in by_seq.items() if seq in mine}
        behind = sorted(r for r in last if last[r] < seq)
        variants = {}
        for rank, entry in present.items():
            variants.setdefault(_signature(entry), []).append(rank)
        ops = {signature[0] for signature in variants}
        if len(ops) > 1:
            return _reordered(present, variants, behind, last, records, unfinished)
        if len(variants) > 1:
            return _sizes_differ(present, variants, behind, last, records, unfinished, seq)
        if behind:
            first = present[min(present)]
            return (f"{_ranks(present)} entered {describe(first)}; "
                    + _behind(behind, last, records, unfinished))
    return None


def _by_size(variants: dict) -> list:
    """Groups of ranks, most ranks first (then the lowest rank): the first is "the others"."""
    return sorted(variants.items(), key=lambda item: (-len(item[1]), min(item[1])))


def _reordered(present, variants, behind, last, records, unfinished) -> str:
    groups = _by_size(variants)
    parts = [f"{_ranks(ranks)} entered {describe(present[ranks[0]])}" for _, ranks in groups]
    text = "; ".join(parts)
    if behind:
        text += "; " + _behind(behind, last, records, unfinished, conclude=False)
    return (text + ": the ranks called different collectives at the same point (one of them "
            "skipped a collective, or called them in another order)")


def _sizes_differ(present, variants, behind, last, records, unfinished, seq) -> str:
    groups = _by_size(variants)
    entries = [present[ranks[0]] for _, ranks in groups]
    show_dtype = len({e.get("dtype") for e in entries}) > 1
    show_shape = len({e.get("bytes") for e in entries}) == 1 and not show_dtype

    def size(entry):
        text = human_size(entry["bytes"])
        if show_dtype:
            text += f" of {entry.get('dtype')}"
        if show_shape:
            text += f" shaped {', '.join(str(s) for s in entry.get('shapes') or [])}"
        return text

    first = entries[0]
    everyone = "all ranks" if not behind else _ranks(present)
    if first.get("group", "world") != "world" and not behind:
        everyone = f"all ranks of group {first['group']}"
    label = f"{first['op']} #{seq}" + ("" if first.get("group", "world") == "world"
                                       else f" on group {first['group']}")
    odd = [f"{_ranks(ranks)} with {size(present[ranks[0]])}" for _, ranks in groups[1:]]
    majority = groups[0][1]
    if len(majority) > 1 or len(groups) == 1:
        odd.append(f"the others with {size(first)}")
    else:
        odd.insert(0, f"{_ranks(majority)} with {size(first)}")
    text = f"{everyone} entered {label}, " + ", ".join(odd)
    if behind:
        text += "; " + _behind(behind, last, records, unfinished, conclude=False)
    return text + ": every rank must pass tensors of the same shape and dtype"


def _behind(behind, last, records, unfinished, conclude=True) -> str:
    """Where the ranks that did not reach the collective are, and (``conclude``) what it means."""
    clauses = []
    for rank in behind:
        stopped = f"stopped at #{last[rank]}" if last[rank] else "entered no collective on it"
        clauses.append(f"rank {rank} {stopped} and {_where(rank, records, unfinished)}")
    text = "; ".join(clauses)
    if not conclude:
        return text
    it = "it" if len(behind) == 1 else "they"
    if all(rank not in unfinished for rank in behind):
        return text + f": {it} skipped this collective, or the others added one"
    return text + (f": {it} skipped this collective or "
                   f"{'has' if len(behind) == 1 else 'have'} not reached it yet")


def _point_to_point(records: dict, unfinished: list) -> str | None:
    """Unfinished ranks waiting in sends and recvs: a cycle, a missing message, or each one."""
    waiting = {r: records[r][-1] for r in unfinished
               if records[r] and is_point_to_point(records[r][-1])
               and not records[r][-1].get("returned")}
    if not waiting:
        return _missing_message(records, unfinished)
    directions = {"send" if e["op"] in _SENDS else "recv" for e in waiting.values()}
    cycle = len(waiting) == len(unfinished) and len(directions) == 1 and all(
        e.get("peer") in waiting for e in waiting.values())
    if cycle:
        direction = directions.pop()
        if len(waiting) == 2 and all(e["peer"] != r for r, e in waiting.items()):
            a, b = sorted(waiting)
            text = (f"ranks {a} and {b} both wait in {direction} "
                    f"{'to' if direction == 'send' else 'from'} each other")
        else:
            arrows = ", ".join(f"{r} → {e['peer']}" if direction == "send" else f"{r} ← {e['peer']}"
                               for r, e in sorted(waiting.items()))
            text = f"{_ranks(waiting)} {_all(waiting)} wait in {direction} ({arrows})"
        if direction == "send":
            return text + (": every rank sends first and nobody receives (on gloo a send may "
                           "wait until its receiver has posted the matching recv)")
        return text + ": every rank receives first and nobody sends"
    return _missing_message(records, unfinished) or "; ".join(
        _waiting_clause(rank, entry, records, unfinished) for rank, entry in sorted(waiting.items()))


def _count(records, rank, direction, peer, group) -> int | None:
    """How many sends to (recvs from) ``peer`` ``rank`` made on ``group``; None if not known."""
    entries = records[rank]
    ops = _SENDS if direction == "send" else _POINT_TO_POINT - _SENDS
    seqs = [e["seq"] for e in entries if e["op"] in ops and e.get("peer") == peer
            and e.get("group", "world") == group]
    if seqs:
        return max(seqs)
    return None if entries and entries[0].get("n", 1) > 1 else 0


def _missing_message(records: dict, unfinished: list) -> str | None:
    """A send or recv of an unfinished rank that its peer's calls never matched."""
    for rank in unfinished:
        for entry in reversed(records[rank]):
            if not is_point_to_point(entry) or entry.get("peer") is None:
                continue
            peer, group = entry["peer"], entry.get("group", "world")
            if peer not in records:
                continue
            sends = entry["op"] in _SENDS
            theirs = _count(records, peer, "recv" if sends else "send", rank, group)
            if theirs is None or theirs >= entry["seq"]:
                break
            how = "waits in" if not entry.get("returned") else "called"
            return (f"rank {rank} {how} {describe(entry)}, but rank {peer} "
                    f"{'received' if sends else 'sent'} only {theirs} "
                    f"{'from' if sends else 'to'} rank {rank} and "
                    f"{_where(peer, records, unfinished)}: every send needs a matching recv on "
                    "its peer, in the same order")
    return None


def _waiting_clause(rank, entry, records, unfinished) -> str:
    peer = entry.get("peer")
    text = f"rank {rank} waits in {describe(entry)}"
    if peer is None or peer not in records:
        return text
    return text + f", while rank {peer} {_where(peer, records, unfinished)}"


def _agreeing(records: dict, unfinished: list) -> str:
    """The ranks' calls agree: say where each unfinished rank is."""
    inside = {r: records[r][-1] for r in unfinished
              if records[r] and not records[r][-1].get("returned")}
    if inside and len(inside) == len(unfinished):
        if len({name(e) for e in inside.values()}) == 1:
            described = {describe(e) for e in inside.values()}
            call = described.pop() if len(described) == 1 else name(next(iter(inside.values())))
            return (f"{_ranks(inside)} {_all(inside)} entered {call} and agree on it: no "
                    "mismatch between the ranks' calls; the collective itself is slow or stuck "
                    "(very large tensors, or a rank's process or network is stalled)")
    busy = [r for r in unfinished if r not in inside]
    parts = []
    if busy:
        lasts = [f"rank {r} after {describe(records[r][-1])}" if records[r] else
                 f"rank {r} before any collective" for r in busy]
        parts.append(f"{_ranks(busy)} {'is' if len(busy) == 1 else 'are'} not inside any "
                     f"collective ({', '.join(lasts)}): busy in {'its' if len(busy) == 1 else 'their'}"
                     " own code (stack below)")
    if inside:
        parts.append(", ".join(f"rank {r} waits in {describe(e)}" for r, e in sorted(inside.items())))
    return "the ranks' collectives agree so far; " + "; ".join(parts)
