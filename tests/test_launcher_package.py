"""The launcher is one package with one framing module; its public names stay where learners use them."""
import os
import pathlib
import random

import pytest

import labkit
from labkit import launcher
from labkit.launcher import _framing

LABKIT = pathlib.Path(labkit.__file__).parent
LAUNCHER_MODULES = {"_launch", "_watch", "_ranks", "_server", "_forkserver", "_worker", "_framing",
                    "_rendezvous", "_pickling", "_platform", "_torchrun", "errors"}


def test_the_launcher_lives_in_one_subpackage():
    inside = {p.stem for p in (LABKIT / "launcher").glob("*.py")} - {"__init__"}
    assert LAUNCHER_MODULES <= inside
    top_level = {p.stem for p in LABKIT.glob("*.py")}
    old_names = {"launch", "_ranks", "_forkserver", "_worker", "_wire", "_rendezvous", "_pickling",
                 "_torchrun", "errors", "collectives"}
    assert not top_level & old_names, f"launcher modules left at the top of labkit/: {top_level & old_names}"


def test_public_names_are_the_launchers_own():
    for name in ("launch", "shutdown", "warm_up", "LaunchError", "LaunchTimeout"):
        assert getattr(labkit, name) is getattr(launcher, name), name
    assert callable(labkit.launch) and issubclass(labkit.LaunchTimeout, labkit.LaunchError)
    assert labkit.compat.all_gather_into_tensor.__module__ == "labkit.compat"


def test_the_wire_format_is_written_in_one_module_only():
    """Only _framing may know the 8-byte length header; every other module calls it."""
    for path in LABKIT.rglob("*.py"):
        if path.name == "_framing.py":
            continue
        text = path.read_text()
        for needle in ('Struct("!Q")', "_HEADER", "HEADER_SIZE"):
            assert needle not in text, f"{path.relative_to(LABKIT)} frames messages itself ({needle})"


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 70_000])
def test_a_message_survives_any_chunking(size):
    body = os.urandom(size)
    wire = _framing.frame(body)
    rng = random.Random(size)
    reader, cut = _framing.FrameReader(), 0
    while cut < len(wire):
        step = rng.randint(1, 5000)
        got = reader.feed(wire[cut:cut + step])
        cut += step
        assert (got is not None) == (cut >= len(wire))
    assert got == body and reader.size == size


def test_blocking_reader_and_writer_agree_and_see_a_closed_pipe():
    r, w = os.pipe()
    try:
        _framing.write_message(w, b"job")
        assert _framing.read_message(r) == b"job"
        os.write(w, _framing.frame(b"half")[:6])  # the writer dies mid-message
        os.close(w)
        w = None
        assert _framing.read_message(r) is None
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
