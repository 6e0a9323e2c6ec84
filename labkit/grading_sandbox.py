"""Where a submitted notebook runs: a private folder, a scrubbed environment, and no way back.

A submission is untrusted code. The grader gives its kernel

- a fresh private folder (``work/`` holds the notebook and is the kernel's working folder;
  ``home/`` and ``tmp/`` are its HOME and TMPDIR, so IPython startup files, matplotlib caches or
  files in /tmp left by an earlier submission are never read by a later one);
- an environment built from scratch: only what a kernel needs (PATH, locale, the ``LABKIT_*``
  settings, the device list) and nothing of the grader's own (no tokens, no credentials);
- its own stdout and stderr, written to a log in the private folder, so nothing it prints can
  pass for a line of the grader's output;
- when the grader runs as root, an unprivileged user of its own (``kernel_user``): it cannot
  write the course or the installed packages, read the grader's files or signal its processes;
  when that user cannot run this Python (it lives under /root), root without any capability;
- on Linux, no capabilities and no way to gain privileges (``_limit_privileges``).

After the kernel ends, ``reap_leftovers`` kills what it left running. On Linux the grading
process is a "child subreaper" (prctl), so a process the notebook daemonised is re-parented to
it and found, and the grading processes are not dumpable, so a kernel of the same user cannot
open their pipes or read their environment through /proc.
"""
from __future__ import annotations

import ctypes
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import psutil

# What a kernel may inherit from the grader: nothing secret, nothing that redirects imports.
KEPT_VARIABLES = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "SYSTEMROOT",
                  "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")
KEPT_PREFIXES = ("LABKIT_",)
KEPT_EXCEPT = ("LABKIT_PRESTART",)  # the grader's own launcher setting, not the submission's
FIRST_KERNEL_UID = 2_000_000_000    # far from every account and user-namespace range
LEFTOVER_GRACE_S = 5.0              # for a kernel's helpers to exit after it on their own

_PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 4, 36, 38
_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_CAPABILITY_VERSION_3 = 0x20080522


def kernel_environment(private: Path) -> dict[str, str]:
    """The whole environment of a submission's kernel: kept variables, private folders, and
    the markers notebooks and checks read (``NBGRADER_EXECUTION=autograde``)."""
    env = {name: value for name, value in os.environ.items()
           if (name in KEPT_VARIABLES or name.startswith(KEPT_PREFIXES))
           and name not in KEPT_EXCEPT}
    home, tmp = private / "home", private / "tmp"
    env.update({
        "HOME": str(home), "USERPROFILE": str(home), "USER": "learner", "LOGNAME": "learner",
        "TMPDIR": str(tmp), "TEMP": str(tmp), "TMP": str(tmp),
        "IPYTHONDIR": str(home / ".ipython"), "MPLCONFIGDIR": str(home / ".matplotlib"),
        "JUPYTER_CONFIG_DIR": str(home / ".jupyter"), "JUPYTER_DATA_DIR": str(home / ".jupyter"),
        "JUPYTER_RUNTIME_DIR": str(home / ".jupyter" / "runtime"),
        "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg",
        "NBGRADER_EXECUTION": "autograde", "LABKIT_GRADING": "1",
    })
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                   env.get("PATH", os.defpath)])
    return env


def kernel_user(slot: int) -> int | None:
    """The uid (and gid) a kernel in grading slot ``slot`` runs as: one per slot, so kernels
    graded side by side cannot reach each other either. None when the grader is not root (it
    cannot change user: the other layers and the integrity check then carry the weight), or
    when that user cannot run this Python (``unprivileged_python_problem`` says why)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or unprivileged_python_problem():
        return None
    return int(os.environ.get("LABKIT_GRADE_FIRST_UID", FIRST_KERNEL_UID)) + slot


@functools.lru_cache(maxsize=1)
def unprivileged_python_problem() -> str | None:
    """Why an unprivileged user cannot run this Python with labkit and ipykernel (a Python
    under /root, which is private), or None when it can. Asked once per grading run."""
    import subprocess
    uid = int(os.environ.get("LABKIT_GRADE_FIRST_UID", FIRST_KERNEL_UID))
    try:
        probe = subprocess.run([sys.executable, "-c", "import ipykernel, labkit"], cwd="/",
                               env={"PATH": os.defpath, "PYTHONDONTWRITEBYTECODE": "1"},
                               user=uid, group=uid, extra_groups=[], capture_output=True,
                               text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as error:
        return f"uid {uid} cannot run {sys.executable}: {error}"
    if probe.returncode != 0:
        return (f"uid {uid} cannot import labkit with {sys.executable}: "
                f"{(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    return None


class Sandbox:
    """The private folder of one submission's run, owned by the kernel's user."""

    def __init__(self, uid: int | None = None):
        self.uid = uid
        self.root = Path(tempfile.mkdtemp(prefix="labkit-grade-"))
        for name in ("work", "home", "tmp"):
            (self.root / name).mkdir(mode=0o700)
        if uid is not None:  # root grades: the kernel's user owns its folder, nobody else can
            for path in (self.root, *(self.root / n for n in ("work", "home", "tmp"))):
                os.chown(path, uid, uid)
        self.work = self.root / "work"
        self.log = self.root / "kernel.log"

    def kernel_kwargs(self, log_file) -> dict:
        """Popen arguments for the kernel (jupyter_client passes them through)."""
        kwargs = {"env": kernel_environment(self.root), "stdout": log_file,
                  "stderr": log_file, "kernel_module": "labkit._sandboxed_kernel"}
        if self.uid is not None:
            kwargs.update(user=self.uid, group=self.uid, extra_groups=[], umask=0o077)
        if sys.platform.startswith("linux"):
            kwargs["preexec_fn"] = _limit_privileges
        return kwargs

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.uid is not None:
            remove_files_of(self.uid)


def _limit_privileges() -> None:
    """In the kernel's process, before it starts (Linux): no capabilities and no way to gain
    any (no setuid programs). Root's kernel then cannot read other processes' memory, files
    descriptors or environment (the grader's are not dumpable) nor bypass file permissions; a
    kernel user's has nothing to drop but gains nothing either."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if os.geteuid() != 0:
        return
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    try:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        last = 63
    for capability in range(last + 1):
        libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    nothing = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable, twice (64 bits)
    libc.capset(header, nothing)


def harden_this_process(subreaper: bool = True) -> None:
    """Linux: not dumpable (a process of the same user cannot open /proc/<us>/fd or read our
    environment there) and, with ``subreaper``, a child subreaper (orphans of the kernel come
    back to us, to be reaped)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if subreaper:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def reap_leftovers(uid: int | None, settle_s: float = LEFTOVER_GRACE_S) -> list[str]:
    """In the worker, after the kernel ended: kill every process the submission left behind;
    returns their names (for the report). Ours are this process's descendants (a subreaper's
    orphans included) and, when the kernel had a user of its own, every process of that user.
    Those that end by themselves within ``settle_s`` (labkit's fork server and ranks notice
    their kernel is gone and exit) are not leftovers."""
    found = {p.pid: p for p in psutil.Process().children(recursive=True)}
    if uid is not None:
        found.update({p.pid: p for p in _processes_of(uid)})
    _, alive = psutil.wait_procs(list(found.values()), timeout=settle_s)
    return _kill(alive)


def kill_processes_of(uid: int) -> list[str]:
    """Kill every process of the kernel user ``uid`` (a slot's user: nothing else runs as it)."""
    return _kill(_processes_of(uid))


def _processes_of(uid: int) -> list:
    found = []
    for process in psutil.process_iter(["uids"]):
        uids = process.info.get("uids")
        if uids is not None and uid in (uids.real, uids.effective):
            found.append(process)
    return found


def _kill(processes, grace_s: float = 5.0) -> list[str]:
    processes, names = list(processes), []
    for process in processes:
        try:
            names.append(process.name())
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=grace_s)
    return sorted(names)


def remove_files_of(uid: int) -> None:
    """Remove what the kernel's user left in the shared temporary folders (it can write
    nowhere else), so the next submission in its slot finds nothing of it."""
    for shared in {tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"}:
        try:
            entries = list(os.scandir(shared))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass
