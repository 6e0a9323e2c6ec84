"""Did a submission change what grades the next one? The installed packages and the course.

A kernel of the grader's own user could rewrite ``labkit.check``, a released notebook, or drop a
``.pth`` file into site-packages, and every later submission would be graded by that. As root
the kernel runs as another user and cannot (``grading_sandbox``); as anyone else this guard is
what stands: before grading it records every file of the watched trees (size, modification and
change times, inode; the change time cannot be set back by a user), and after each submission
it compares. Files it can put back (labkit's own and the released notebooks, whose bytes it
keeps) are restored, files added anywhere are removed, and the change is reported; a change to
a file elsewhere (torch, another package) cannot be undone here, and grading stops, saying so.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Never a source of code: notebook checkpoints and version control.
_SKIPPED_DIRS = {".ipynb_checkpoints", ".git"}


@dataclass(frozen=True)
class Change:
    path: str
    what: str  # "changed", "added", "removed"

    def __str__(self) -> str:
        return f"{self.what} {self.path}"

    @property
    def new_bytecode(self) -> bool:
        """A .pyc (or a __pycache__ folder) added: any Python process on the machine writes these
        when it first imports a module. Removed (a planted one could run code), never blamed."""
        path = Path(self.path)
        return self.what == "added" and (path.name == "__pycache__" or (
            path.parent.name == "__pycache__" and path.suffix == ".pyc"))


def package_trees() -> list[Path]:
    """Where this Python imports from: the standard library and site-packages (with its .pth
    files). Not the folder a command was started in, which ``python -m`` puts on sys.path."""
    paths = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib",
                                                    "platlib")}
    paths.update(site.getsitepackages())
    return sorted({Path(p).resolve() for p in paths if Path(p).is_dir()})


def _not_imported(roots) -> set:
    """Folders inside a watched tree that this Python never imports from: the standard
    library's test suite and a site-packages that is not on sys.path (a venv's base
    interpreter's). Another watched root inside a tree is walked as its own root."""
    on_path = {str(Path(p).resolve()) for p in sys.path if p}
    skip = set()
    for root in roots:
        for name in ("test", "site-packages"):
            inner = root / name
            if inner.is_dir() and str(inner) not in on_path and (root / "os.py").exists():
                skip.add(str(inner))
    return skip


def _stamp_path(path: Path) -> tuple:
    st = path.stat(follow_symlinks=False)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode)


def _walk(root: Path, into: dict, skip: set) -> None:
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in _SKIPPED_DIRS and entry.path not in skip:
                        stack.append(entry.path)
                    into[entry.path] = ("dir",)
                else:
                    into[entry.path] = _stamp_path(Path(entry.path))
            except OSError:
                continue


class TreeGuard:
    """The state of ``watched`` trees; ``restorable`` ones also keep their files' bytes."""

    def __init__(self, watched, restorable=()):
        self.restorable = sorted({Path(p).resolve() for p in restorable})
        roots = {Path(p).resolve() for p in (*watched, *restorable)}
        self.watched = sorted(r for r in roots if not any(r != o and r.is_relative_to(o)
                                                          for o in roots))
        self._skip = _not_imported(self.watched)
        self._stamps = self._scan()
        self._bytes = {}
        for path, stamp in self._stamps.items():
            if stamp != ("dir",) and self._can_restore(path) and not _bytecode(path):
                try:
                    self._bytes[path] = Path(path).read_bytes()
                except OSError:  # gone since the scan (another process's cache): not ours
                    pass

    def restorable_digest(self) -> str:
        """One hash of labkit's files and the released notebooks: part of a grade's key, so a
        changed check or template grades everything again."""
        digest = hashlib.sha256()
        for path in sorted(self._bytes):  # no __pycache__: kept bytes are sources only
            digest.update(Path(path).name.encode() + b"\0" + self._bytes[path] + b"\0")
        return digest.hexdigest()

    def _can_restore(self, path: str) -> bool:
        return any(Path(path).is_relative_to(root) for root in self.restorable)

    def _scan(self) -> dict:
        stamps: dict = {}
        for root in self.watched:
            if root.is_file():
                stamps[str(root)] = _stamp_path(root)
            else:
                _walk(root, stamps, self._skip)
        return stamps

    def changes(self) -> list[Change]:
        now = self._scan()
        found = [Change(p, "added") for p in now.keys() - self._stamps.keys()]
        found += [Change(p, "removed") for p in self._stamps.keys() - now.keys()]
        found += [Change(p, "changed") for p in now.keys() & self._stamps.keys()
                  if now[p] != self._stamps[p] and now[p] != ("dir",)]
        return sorted(found, key=lambda c: c.path)

    def restore(self, changes: list[Change]) -> list[Change]:
        """Undo what can be undone; returns the changes that could not be (then the grading
        environment is no longer what it was: stop)."""
        left = []
        for change in changes:
            path = Path(change.path)
            if change.what != "added" and not _bytecode(change.path) \
                    and not self._can_restore(change.path):
                left.append(change)  # its bytes were not kept
                continue
            try:
                _remove(path)  # a cached .pyc is removed, whatever happened to it: rebuilt
                if change.what != "added" and not _bytecode(change.path):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(self._bytes[change.path])
            except (OSError, KeyError):
                left.append(change)
        restored = {c.path for c in changes} - {c.path for c in left}
        self._stamps.update({p: s for p, s in self._scan().items()
                             if self._can_restore(p) or p in restored})
        for change in changes:  # a removed file put back keeps its place; an added one is gone
            if change.what == "added" and not Path(change.path).exists():
                self._stamps.pop(change.path, None)
        return left


def _bytecode(path: str) -> bool:
    """In a __pycache__: Python's own cache, rebuilt from the source when missing."""
    return "__pycache__" in Path(path).parts


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def default_guard(templates: Path | None) -> TreeGuard:
    """The trees a grading run protects: labkit itself and the released notebooks (restorable),
    the installed packages and the interpreter's library (watched)."""
    import labkit
    labkit_dir = Path(labkit.__file__).resolve().parent
    restorable = [labkit_dir] + ([templates] if templates is not None else [])
    return TreeGuard(package_trees(), restorable)

