"""The collective record: the last collectives each rank entered, readable while the rank is stuck.

A rank that hangs waits inside C++ (gloo's or NCCL's wait): it cannot answer questions. So every
rank writes each collective at the moment it *enters* it into a small file of fixed size, a ring of
the last ``SLOTS`` entries (``RecordFile``); the launcher reads the files after a timeout and
``_hang_doctor`` compares them across ranks. The files live in a private folder (0700) that the
launcher creates for one launch and removes after it; a rank finds its file from the job
(``job[JOB_KEY]``, the folder) and its rank.

The format is plain bytes and JSON, read with ``json.loads``, never unpickled:

    preamble (64 bytes) b"LKCR1\\0\\0\\0", slots (u32), slot size (u32), entries written (u64)
    slot i (512 bytes)  state (1 byte: E entered, R returned), JSON length (u16), JSON

Each entry (``_collective_hooks`` writes them) is a dict: ``n`` (this rank's running count of
calls), ``op`` (the function's name: "all_reduce", "send", ...), ``seq`` (its sequence number,
below), ``bytes`` (None for Python objects), ``shapes`` (the first 4), ``tensors`` (how many),
``dtype``, ``group`` ("world" or the list of the group's global
ranks), ``peer`` (the global rank at the other end of a send or recv, else None), ``async``,
``batch`` (an op of ``batch_isend_irecv``); ``read`` adds ``returned`` (the call came back).

Sequence numbers are counted by each rank: collectives per process group (#1, #2, ... on "world",
another count on each subgroup), sends and recvs per group, direction and peer ("send #3 to rank 1"
is this rank's third send to rank 1, which rank 1's third recv from this rank should match).

The writer writes a slot, then the count; a slot being rewritten while the launcher reads it does
not parse, or holds another ``n``, and is left out.
"""
import json
import mmap
import os
import shutil
import struct
import tempfile

JOB_KEY = "collective_record"   # the job's key for the record folder (see _collective_hooks)
SLOTS = 64
SLOT_BYTES = 512
_MAGIC = b"LKCR1\0\0\0"
_PREAMBLE = struct.Struct("<8sIIQ")   # magic, slots, slot size, entries written
_PREAMBLE_BYTES = 64
_SLOT_PREFIX = struct.Struct("<cH")  # state, JSON length
_COUNT_OFFSET = 16
FILE_BYTES = _PREAMBLE_BYTES + SLOTS * SLOT_BYTES
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode   # made once: json.dumps(...,
                                                           # separators=...) makes one per call


def create_folder() -> str:
    """A private folder (0700) for one launch's records; remove it with ``remove_folder``."""
    folder = tempfile.mkdtemp(prefix="labkit-collectives-")   # mkdtemp makes it 0700
    os.chmod(folder, 0o700)
    return folder


def remove_folder(folder: str | None) -> None:
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def record_path(folder: str, rank: int) -> str:
    return os.path.join(folder, f"rank-{int(rank)}.collectives")


class RecordFile:
    """The writer's side: a ring of the last ``SLOTS`` entries in a memory-mapped file.

    Writing an entry is a copy into memory (no system call); the launcher's process reads the same
    pages through the file even while this rank is stuck.
    """

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.ftruncate(fd, FILE_BYTES)
            self._map = mmap.mmap(fd, FILE_BYTES)
        finally:
            os.close(fd)
        _PREAMBLE.pack_into(self._map, 0, _MAGIC, SLOTS, SLOT_BYTES, 0)
        self.count = 0
        self.slots = SLOTS

    def enter(self, entry: dict) -> int:
        """Write ``entry`` as entered; return its slot, for ``returned``."""
        data = _ENCODE(entry).encode()
        if len(data) > SLOT_BYTES - _SLOT_PREFIX.size:   # very long shapes or group
            data = _ENCODE(dict(entry, shapes=[], group=str(entry.get("group"))[:80])).encode()
        slot = self.count % SLOTS
        start = _PREAMBLE_BYTES + slot * SLOT_BYTES
        _SLOT_PREFIX.pack_into(self._map, start, b"E", len(data))
        self._map[start + _SLOT_PREFIX.size:start + _SLOT_PREFIX.size + len(data)] = data
        self.count += 1
        struct.pack_into("<Q", self._map, _COUNT_OFFSET, self.count)
        return slot

    def returned(self, slot: int) -> None:
        self._map[_PREAMBLE_BYTES + slot * SLOT_BYTES] = ord("R")

    def is_returned(self, slot: int) -> bool:
        return self._map[_PREAMBLE_BYTES + slot * SLOT_BYTES] == ord("R")

    def close(self) -> None:
        self._map.close()


def read(path: str) -> list:
    """The entries in a rank's record file, oldest first ([] when there is no file yet)."""
    try:
        with open(path, "rb") as f:
            data = f.read(FILE_BYTES)
    except OSError:
        return []
    if len(data) < _PREAMBLE_BYTES:
        return []
    magic, slots, slot_bytes, count = _PREAMBLE.unpack_from(data, 0)
    if magic != _MAGIC or len(data) < _PREAMBLE_BYTES + slots * slot_bytes:
        return []
    entries = []
    for n in range(max(0, count - slots), count):
        start = _PREAMBLE_BYTES + (n % slots) * slot_bytes
        state, length = _SLOT_PREFIX.unpack_from(data, start)
        if length > slot_bytes - _SLOT_PREFIX.size:
            continue
        try:
            entry = json.loads(data[start + _SLOT_PREFIX.size:start + _SLOT_PREFIX.size + length])
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("n") == n + 1 and state in (b"E", b"R"):
            entry["returned"] = state == b"R"
            entries.append(entry)
    return entries


def read_all(folder: str | None, nprocs: int) -> dict:
    """``{rank: [entry, ...]}`` for every rank of a launch (an empty list for a rank without one)."""
    if not folder:
        return {}
    return {rank: read(record_path(folder, rank)) for rank in range(nprocs)}
