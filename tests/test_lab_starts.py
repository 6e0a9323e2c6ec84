"""`make lab` opens JupyterLab on the course: the server starts from this environment and serves
the notebooks folder with a Python kernel."""
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_lab_names_the_notebooks_folder_and_allows_root():
    plan = subprocess.run(["make", "-n", "lab"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60).stdout
    command = [line for line in plan.splitlines() if "jupyter lab" in line]
    assert command and "notebooks/" in command[-1]
    assert ("--allow-root" in command[-1]) == (os.geteuid() == 0)


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


def test_jupyterlab_serves_the_course_with_a_python_kernel():
    args = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port=0", f"--ServerApp.root_dir={os.path.join(ROOT, 'notebooks')}",
            "--ServerApp.token=labkit-test"]
    if os.geteuid() == 0:
        args.append("--allow-root")
    server = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        port, deadline = None, time.monotonic() + 90
        while port is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            if not line and server.poll() is not None:
                pytest.fail("jupyter lab exited before serving")
            match = re.search(r"http://127\.0\.0\.1:([1-9]\d*)/lab", line)
            port = int(match.group(1)) if match else None
        assert port, "jupyter lab did not start within 90 s"
        base = f"http://127.0.0.1:{port}"
        page = _get_when_listening(f"{base}/lab?token=labkit-test").decode()
        assert "JupyterLab" in page
        specs = json.loads(urllib.request.urlopen(f"{base}/api/kernelspecs?token=labkit-test",
                                                  timeout=30).read())
        assert "python3" in specs["kernelspecs"]
        listing = json.loads(urllib.request.urlopen(f"{base}/api/contents?token=labkit-test",
                                                    timeout=30).read())
        assert "README.md" in {item["name"] for item in listing["content"]}
    finally:
        server.terminate()
        server.wait(timeout=30)
