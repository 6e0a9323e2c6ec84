"""`make lab` opens JupyterLab on the course: the server starts from this environment and serves
the notebooks folder with a Python kernel, without the instructor sources in notebooks/source."""
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
TOKEN = "labkit-test"


def _make_lab_args() -> list[str]:
    """The arguments `make lab` passes to `jupyter lab`, read from make's plan (make -n)."""
    plan = subprocess.run(["make", "-n", "lab"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60).stdout
    command = [line for line in plan.splitlines() if "jupyter lab" in line]
    assert command, f"make -n lab runs no jupyter lab:\n{plan}"
    words = shlex.split(command[-1])
    return words[words.index("lab") + 1:]


def test_make_lab_names_the_notebooks_folder_and_allows_root():
    args = _make_lab_args()
    assert "notebooks/" in args
    assert ("--allow-root" in args) == (os.geteuid() == 0)


def _get_when_listening(url: str, wait_s: float = 30) -> bytes:
    """The server may print its address a moment before it accepts connections."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return urllib.request.urlopen(url, timeout=30).read()
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def lab():
    """The base URL of a JupyterLab started as `make lab` starts it, on a free local port."""
    args = [sys.executable, "-m", "jupyterlab", *_make_lab_args(), "--no-browser",
            "--ServerApp.ip=127.0.0.1", "--ServerApp.port=0", f"--IdentityProvider.token={TOKEN}"]
    server = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              text=True)
    try:
        port, deadline = None, time.monotonic() + 90
        while port is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            if not line and server.poll() is not None:
                pytest.fail("jupyter lab exited before serving")
            match = re.search(r"http://127\.0\.0\.1:([1-9]\d*)/lab", line)
            port = int(match.group(1)) if match else None
        assert port, "jupyter lab did not start within 90 s"
        # Keep reading the server's log, so that a full pipe never blocks it.
        threading.Thread(target=server.stderr.read, daemon=True).start()
        base = f"http://127.0.0.1:{port}"
        _get_when_listening(f"{base}/api/status?token={TOKEN}")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def test_jupyterlab_serves_the_course_with_a_python_kernel(lab):
    status, page = _get(f"{lab}/lab?token={TOKEN}")
    assert status == 200 and "JupyterLab" in page.decode()
    specs = json.loads(_get(f"{lab}/api/kernelspecs?token={TOKEN}")[1])
    assert "python3" in specs["kernelspecs"]


def test_the_learners_lab_lists_the_learner_notebooks_and_hides_the_sources(lab):
    learner_files = {os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOKS, "*.ipynb"))}
    source = "source/00_setup.ipynb"
    assert learner_files and os.path.isfile(os.path.join(NOTEBOOKS, source))

    status, body = _get(f"{lab}/api/contents?token={TOKEN}")
    assert status == 200
    listed = {item["name"] for item in json.loads(body)["content"]}
    assert learner_files | {"README.md"} <= listed
    assert "source" not in listed

    # A learner notebook opens; the source behind it does not, by the contents API or by URL.
    assert _get(f"{lab}/api/contents/00_setup.ipynb?token={TOKEN}")[0] == 200
    for url in (f"{lab}/api/contents/{source}", f"{lab}/api/contents/source",
                f"{lab}/files/{source}"):
        assert _get(f"{url}?token={TOKEN}")[0] in (403, 404), url
