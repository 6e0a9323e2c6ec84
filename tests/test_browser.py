"""The course in a real browser: JupyterLab on 127.0.0.1, driven by headless Chromium.

PyPI's playwright drives Debian's Chromium (/usr/bin/chromium, or $LABKIT_CHROMIUM); the tests
never run `playwright install`. `make test` installs the Debian package when it is missing and it
can (root and apt-get); elsewhere these tests skip and say why.

- notebook 00, "Run all": the launcher's rank-tagged lines and the exercise's check line appear in
  the page, and every code cell ran;
- the memory calculator (tests/fixtures/browser/, outside the folder `labkit release --check`
  compares): one step of the world-size slider changes the printed numbers to what
  ``labkit.widgets.model_state_bytes`` gives for the new setting, and the figure is redrawn.

Marked "notebook": they run in make test's parallel phase. They assert what the page shows, never
how fast it shows it; every wait has a generous timeout. Each test copies its notebook into a
temporary folder, so an autosave can never touch the course.
"""
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from labkit.widgets import model_state_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get("LABKIT_CHROMIUM", "/usr/bin/chromium")
TOKEN = "labkit-browser-test"
WAIT_MS = 120_000   # one wait in the page (kernel start, a run, a redraw); generous for 2 cores

playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[lab,test]')")

pytestmark = [
    pytest.mark.notebook,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"{CHROMIUM} is missing: apt-get install -y chromium "
                              "(make test does it when run as root with apt-get)"),
]

# Settings that keep dialogs and toasts off the page, every cell in the DOM, and the files as
# they are: written to a settings folder of the test's own (LabApp.user_settings_dir).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                    "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
}


def _write_settings(folder) -> None:
    for plugin, values in LAB_SETTINGS.items():
        path = os.path.join(folder, plugin + ".jupyterlab-settings")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(values, f)


def _descendants(process) -> list:
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@contextlib.contextmanager
def jupyterlab(tmp_path, notebook: str):
    """The base URL of a JupyterLab serving a copy of `notebook`; stopped with its kernels."""
    work, settings, log_path = tmp_path / "work", tmp_path / "settings", tmp_path / "lab.log"
    work.mkdir()
    shutil.copy(notebook, work)
    _write_settings(settings)
    args = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port=0", f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True",
            f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={settings}"]
    if os.geteuid() == 0:
        args.append("--allow-root")
    log = open(log_path, "w")
    server = subprocess.Popen(args, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        port, deadline = None, time.monotonic() + 90
        while port is None:
            match = re.search(r"http://127\.0\.0\.1:([1-9]\d*)/lab", log_path.read_text())
            port = int(match.group(1)) if match else None
            if port is None:
                assert server.poll() is None, f"jupyter lab exited:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, \
                    f"jupyter lab did not start within 90 s:\n{log_path.read_text()}"
                time.sleep(0.2)
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=10).read()
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "jupyter lab did not answer within 90 s"
                time.sleep(0.2)
        yield base
    finally:
        children = _descendants(server)   # kernels, labkit's fork server, ranks
        server.terminate()                # the server shuts its kernels down on SIGTERM
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()
        _gone, alive = psutil.wait_procs(children, timeout=15)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        assert not alive, f"left behind by jupyter lab: {[p.pid for p in alive]}"


@contextlib.contextmanager
def chromium_page():
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, timeout=60_000,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(WAIT_MS)
            yield page
        finally:
            browser.close()


KERNEL_IDLE = """() => { const w = window.jupyterapp?.shell.currentWidget;
                        return w?.sessionContext?.session?.kernel?.status === 'idle'; }"""

# Every code cell of the open notebook has run (an error stops "Run all" and leaves cells
# without an execution count), and the kernel is idle again.
ALL_CELLS_RAN = """() => { const w = window.jupyterapp.shell.currentWidget;
    const cells = w.content.widgets.filter(c => c.model.type === 'code');
    return w.sessionContext.session?.kernel?.status === 'idle'
        && cells.every(c => c.model.executionCount !== null); }"""


# The error outputs (output_type "error": a traceback) of the open notebook, as "ename: evalue".
ERROR_OUTPUTS = """() => window.jupyterapp.shell.currentWidget.content.model.toJSON().cells
    .flatMap(c => c.outputs || []).filter(o => o.output_type === 'error')
    .map(o => o.ename + ': ' + o.evalue)"""


def open_and_run_all(page, base: str, name: str) -> None:
    page.goto(f"{base}/lab/tree/{name}?token={TOKEN}")
    page.wait_for_function(KERNEL_IDLE, timeout=WAIT_MS)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")


def test_notebook_00_runs_in_jupyterlab_and_shows_rank_output_and_check_lines(tmp_path):
    with jupyterlab(tmp_path, os.path.join(ROOT, "notebooks", "00_setup.ipynb")) as base, \
            chromium_page() as page:
        open_and_run_all(page, base, "00_setup.ipynb")
        outputs = page.locator(".jp-OutputArea-output")
        try:
            page.wait_for_function(ALL_CELLS_RAN, timeout=240_000)
        except playwright_sync.TimeoutError:
            errors = page.evaluate(ERROR_OUTPUTS)
            pytest.fail(f"Run all did not finish in 240 s; error outputs: {errors}")

        # Section 2: labkit.launch(hello, nprocs=4) printed each rank's line with its tag.
        for rank in range(4):
            line = outputs.filter(has_text=f"[rank {rank}] hello from rank {rank} of 4")
            assert line.count() == 1, f"no [rank {rank}] line in the page"
        assert outputs.filter(has_text="launch returned: [0, 10, 20, 30]").count() == 1
        # Section 4: the check cells print one line each: ✓ once solved, "not implemented yet"
        # for the stub the learner starts from.
        for name in ("predicted_sum", "sum_of_ranks"):
            check = outputs.filter(
                has_text=re.compile(rf"(✓ {name}: |… {name}: not implemented yet)"))
            assert check.count() == 1, f"no check line for {name} in the page"
        assert page.evaluate(ERROR_OUTPUTS) == []


SUMMARY = re.compile(r"([\d.]+) B parameters: ([\d.]+) GB of model states per rank "
                     r"\(params ([\d.]+), grads ([\d.]+), optimizer ([\d.]+)\)")


def assert_summary_matches_formula(text: str, num_params: float, world_size: int, stage: int):
    """The calculator's printed line (3 significant digits) against the formula for this setting."""
    match = SUMMARY.fullmatch(text.strip())
    assert match, f"not the calculator's summary line: {text!r}"
    printed = [float(x) * 1e9 for x in match.groups()]
    predicted = model_state_bytes(num_params, world_size, stage)
    expected = [num_params, sum(predicted.values()), *predicted.values()]
    assert printed == pytest.approx(expected, rel=5e-3), (text, world_size, expected)


def test_memory_calculator_slider_changes_the_numbers_and_the_figure(tmp_path):
    # ZeRO-3 with mixed-precision Adam: 16 bytes per parameter, split over the ranks (ZeRO §3.1).
    for world in (64, 128):
        assert sum(model_state_bytes(7.5e9, world, 3).values()) == pytest.approx(16 * 7.5e9 / world)

    fixture = os.path.join(ROOT, "tests", "fixtures", "browser", "memory_calculator.ipynb")
    with jupyterlab(tmp_path, fixture) as base, chromium_page() as page:
        open_and_run_all(page, base, "memory_calculator.ipynb")
        summary = page.locator(".widget-html-content", has_text="of model states per rank")
        figure = page.locator(".jp-OutputArea-output img")
        slider = page.locator(".widget-hslider", has_text="world size")
        playwright_sync.expect(figure).to_have_count(1, timeout=WAIT_MS)
        playwright_sync.expect(slider.locator(".widget-readout")).to_have_text("64")
        # Let the first render settle: a slider the browser snapped to its own grid would send
        # its value back here and redraw (a log slider once turned 7.5 B into 7.59 B).
        page.wait_for_function(KERNEL_IDLE, timeout=WAIT_MS)
        parameters = page.locator(".widget-hslider", has_text="parameters")
        playwright_sync.expect(parameters.locator(".widget-readout")).to_have_text("7.5 B")
        before_text = summary.inner_text()
        assert before_text.startswith("7.5 B parameters: ")
        assert_summary_matches_formula(before_text, 7.5e9, 64, 3)
        before = figure.get_attribute("src")
        assert before.startswith("data:image/png;base64,")

        # One step right on the world-size slider: 64 -> 128 ranks.
        slider.locator(".noUi-handle").focus()
        page.keyboard.press("ArrowRight")
        playwright_sync.expect(slider.locator(".widget-readout")).to_have_text("128")
        playwright_sync.expect(summary).not_to_have_text(before_text, timeout=WAIT_MS)
        assert_summary_matches_formula(summary.inner_text(), 7.5e9, 128, 3)
        # The summary is printed before the figure is redrawn: wait for the new image.
        page.wait_for_function(
            """old => { const imgs = document.querySelectorAll('.jp-OutputArea-output img');
                        return imgs.length === 1 && imgs[0].src !== old; }""",
            arg=before, timeout=WAIT_MS)
        after = figure.get_attribute("src")
        assert after.startswith("data:image/png;base64,") and after != before
        playwright_sync.expect(figure).to_have_count(1)   # redrawn in place, not appended
        assert page.evaluate(ERROR_OUTPUTS) == []
