"""Every platform a learner brings: cores a container really grants, import everywhere, the
non-Linux start method, the fork server only where a launch is likely, progress bars live."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch.distributed as dist

import labkit
from labkit.launcher import _platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, env=None, timeout=180) -> subprocess.CompletedProcess:
    environment = dict(os.environ, **(env or {}))
    environment.pop("LABKIT_PRESTART", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=environment, cwd=ROOT)


# --- cores: affinity and the cgroup quota ---------------------------------------------------------

def fake_cgroup(root, membership: str, files: dict):
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "self" / "cgroup").write_text(membership)
    for path, text in files.items():
        target = root / "sys" / "fs" / "cgroup" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return str(root)


@pytest.mark.parametrize("membership, files, limit", [
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),                                # no quota
    ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1/cpu.max": "150000 100000\n"}, 1.5),  # a pod
    ("0::/a/b\n", {"a/cpu.max": "100000 100000\n", "a/b/cpu.max": "max 100000\n"}, 1.0),  # parent
    ("4:cpu,cpuacct:/docker/x\n1:memory:/docker/x\n",
     {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "300000\n",
      "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"}, 3.0),                # cgroup v1
    ("4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                           "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),   # v1, unlimited
])
def test_the_cgroup_cpu_quota_is_read_like_the_kernel_applies_it(tmp_path, membership, files,
                                                                 limit):
    root = fake_cgroup(tmp_path, membership, files)
    assert _platform.cgroup_cpu_limit(root) == limit
    cores = _platform.machine_cores()
    expected = min(cores, max(1, int(limit))) if limit else cores
    assert _platform.usable_cores(root) == expected


def test_a_pod_with_half_a_core_still_gets_one_thread(tmp_path):
    root = fake_cgroup(tmp_path, "0::/\n", {"cpu.max": "50000 100000\n"})
    assert _platform.cgroup_cpu_limit(root) == 0.5 and _platform.usable_cores(root) == 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and at least two cores")
def test_threads_per_rank_follow_the_cores_this_process_may_use():
    done = run_python("""
        import json, os
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})   # like taskset -c 0
        import labkit, torch
        print(json.dumps(labkit.launch(
            lambda: (torch.get_num_threads(), os.environ["OMP_NUM_THREADS"]), 1, quiet=True)))
    """)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [[1, "1"]]  # not os.cpu_count() // 1


def test_doctor_prints_machine_and_usable_cores(capsys):
    facts = dict(labkit.doctor.facts(2))
    assert str(os.cpu_count()) in facts["cores"]
    assert f"{_platform.usable_cores()} usable" in facts["cores"]


# --- where the fork server starts -----------------------------------------------------------------

def test_a_script_does_not_start_the_fork_server_at_import():
    done = run_python("""
        import labkit
        from labkit.launcher import _server
        print(_server._server is None)
        print(labkit.launch(lambda: 7, 2, quiet=True), _server.server_session() is not None)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "[7,", "7]", "True"]


def test_an_interactive_session_starts_it_at_import():
    done = run_python("""
        import sys
        sys.ps1 = ">>> "   # what the REPL sets; IPython kernels are recognised the same way
        import labkit
        from labkit.launcher import _server
        print(_server._server is not None)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]


def test_on_macos_ranks_are_spawned_and_the_banner_says_why():
    done = run_python("""
        import sys
        import torch, torch.distributed as dist   # imported on the real platform
        sys.platform = "darwin"   # what labkit sees; everything else is this Linux machine
        sys.ps1 = ">>> "
        import labkit
        from labkit.launcher import _server
        print("SERVER", _server._server)
        def rank_sum():
            t = torch.ones(1) * (dist.get_rank() + 1)
            dist.all_reduce(t)
            return t.item()
        print("RESULTS", labkit.launch(rank_sum, 2))
        print("SERVER", _server._server)
    """)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("SERVER None") == 2  # no fork server, before or after the launch
    assert "start method spawn (the default on darwin: the fork server runs on Linux only)" in out
    assert "RESULTS [3.0, 3.0]" in out


def test_on_windows_import_and_the_torch_free_tools_work_and_launch_says_what_to_do():
    done = run_python("""
        import os, socket, sys
        import matplotlib.pyplot, ipywidgets   # imported on the real platform
        del socket.AF_UNIX, os.fork      # what Windows lacks
        sys.platform = "win32"
        sys.ps1 = ">>> "
        import labkit
        from labkit import theory, plots, widgets
        print("TABLE1", round(theory.zero_memory(7.5e9, 64, stage=3) / 1e9, 2))
        axes = plots.memory_bars([{"params": 10, "grads": 10}], predicted={"params": 20})
        print("FIGURE", type(axes.figure).__name__)
        try:
            labkit.launch(lambda: 1, 2)
        except RuntimeError as error:
            print("ERROR", error)
    """)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "TABLE1 1.88" in out and "FIGURE Figure" in out
    assert "ERROR labkit.launch runs ranks on Linux and macOS; on Windows it needs WSL2" in out


# --- progress bars inside a rank ------------------------------------------------------------------

class _Recorder:
    """Stands in for the cell's stderr; creates a flag file once a progress update shows."""

    def __init__(self, flag, wanted):
        self.flag, self.wanted, self.text = flag, wanted, ""

    def write(self, text):
        self.text += text
        if self.wanted in self.text and not os.path.exists(self.flag):
            open(self.flag, "w").close()
        return len(text)

    def flush(self):
        pass


def draws_a_progress_bar(flag):
    import sys
    if dist.get_rank() == 0:
        sys.stderr.write("\rworking  0%")
        sys.stderr.write("\rworking 50%")
        sys.stderr.flush()
        deadline = time.monotonic() + 20  # wait until the notebook shows it, before going on
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.05)
        sys.stderr.write("\rworking 100%\n")
        return os.path.exists(flag)
    return True


def test_a_progress_bar_in_a_rank_shows_live_and_ends_as_one_tagged_line(tmp_path, monkeypatch):
    flag = str(tmp_path / "seen")
    recorder = _Recorder(flag, "\r[rank 0] working 50%")
    monkeypatch.setattr(sys, "stderr", recorder)
    seen_live = labkit.launch(draws_a_progress_bar, 2, args=(flag,), quiet=True)
    assert seen_live == [True, True], "the update was shown only when the line ended"
    assert recorder.text.endswith("\r[rank 0] working 100%\n")
    assert "[rank 0] \r" not in recorder.text  # the rank tag is never overwritten
