"""Run-directory integrity: one writer per directory, fingerprinted resume, ``--force`` that reuses nothing.

Every command that writes into an output directory opens it with :func:`open_run_dir`:

- **Lock.** An exclusive ``fcntl.flock`` on ``OUT/.expertscope.lock`` for the whole command; a second
  writer is refused with one line. The file is removed on exit; after a SIGKILL it stays behind but holds
  no lock (the kernel drops it with the process), so the next command proceeds.
- **One run per directory.** A directory holding another kind of run, or files that are not a run, is
  refused; a finished or interrupted run of the same kind needs ``--resume`` or ``--force``.
- **Fingerprint.** The manifest records what decides the results (model id and weights digest, domain
  specs and data digests, every result-changing setting). ``--resume`` refuses a directory whose
  fingerprint differs, naming the first difference.
- **--force.** The old run's files are moved aside (``OUT/.replaced-run/``) before anything else runs, so
  nothing stale is reused. They are deleted when the new run finishes, and moved back if the new run fails
  before writing any file of its own.
- **Nothing half-made.** If a command fails before writing any artifact, the directory is returned to
  how it was (a directory it created is removed). Commands that cannot resume (``resumable=False``)
  also remove what they wrote before failing.

All files inside are written atomically (:mod:`expertscope.io`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OutputError
from .fingerprint import (
    data_fingerprint,
    file_digest,
    fingerprint_difference,
    model_fingerprint,
    run_fingerprint,
)
from .io import make_manifest, write_json, write_root

LOCK_NAME = ".expertscope.lock"
ASIDE_NAME = ".replaced-run"
MANIFEST = "manifest.json"


# ----- checks without side effects ------------------------------------------------------------------------
def check_out_dir(out: str | os.PathLike[str], option: str = "--out") -> Path:
    """Check that ``out`` can be a writable output directory, without creating anything.

    Raises :class:`OutputError` if it is a file, if an ancestor is a file, or if the nearest existing
    directory is not writable (read-only disk or permissions).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out} is a file, not a directory: pass a directory path")
    anc = out
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{option} {out} cannot be created because {anc} is a file: choose another {option}")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"{anc} is not writable (read-only or no permission): choose another {option}")
    return out


def check_out_file(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Check that ``path`` can be written as a file: not a directory, its directory writable, and not (with
    the assets a report or comparison writes beside it: ``<stem>_figures/``, ``<stem>.findings.json``) an
    entry of a run directory that it would replace: the manifest, or a file the run wrote."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory: pass a file path, e.g. {path / 'report.html'}")
    check_out_dir(path.parent, option)
    for target in (path, path.with_name(f"{path.stem}_figures"), path.with_name(f"{path.stem}.findings.json")):
        _not_a_run_file(target, option, path)
    return path


def _not_a_run_file(target: Path, option: str, given: Path) -> None:
    manifest = target.parent / MANIFEST
    if not manifest.is_file():
        return
    old = _read_manifest(manifest) or {}
    listed = _old_outputs(old)
    ours = {MANIFEST, LOCK_NAME, ASIDE_NAME} | (
        {p.name for p in _artifacts(target.parent)} if listed is None else listed)
    if target.name in ours or target.is_symlink():
        what = "its manifest" if target.name == MANIFEST else f"its {target.name}"
        raise OutputError(f"{option} {given} would replace {what} in the {old.get('kind', 'expertscope')} run "
                          f"{target.parent}: write the file outside the run or under another name")


# ----- the run directory ----------------------------------------------------------------------------------
@dataclass
class RunDir:
    """An opened, locked output directory. ``previous`` is the resumed run's manifest (empty when fresh)."""

    path: Path
    kind: str
    fingerprint: dict[str, Any]
    config: dict[str, Any]
    previous: dict[str, Any] = field(default_factory=dict)
    foreign: set[str] = field(default_factory=set)
    """Entries of the directory that are not this run's (a user's files left in place by ``--force``)."""

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def outputs(self) -> list[str]:
        """The directory's entries this run wrote (what a later ``--force`` may move aside)."""
        return sorted(p.name for p in _artifacts(self.path) if p.name not in self.foreign)

    def write_manifest(self, status: str, config: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """Write ``manifest.json`` (atomically) with the run's fingerprint and ``outputs`` (the entries it wrote);
        returns it."""
        m = make_manifest(self.kind, self.config if config is None else config, status=status,
                          fingerprint=self.fingerprint, outputs=self.outputs(), **extra)
        write_json(self.manifest_path, m)
        return m


def _artifacts(out: Path) -> list[Path]:
    """The directory's entries that a run produced (not the lock, manifest, moved-aside run or temp files)."""
    return [p for p in out.iterdir()
            if p.name not in (LOCK_NAME, MANIFEST, ASIDE_NAME) and not (p.name.startswith(".") and
                                                                      p.name.endswith(".tmp"))]


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        m = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _no_link(p: Path) -> Path:
    """``p`` when it is not a symbolic link; else the one-line error naming it."""
    if p.is_symlink():
        raise OutputError(f"{p} is a symbolic link (to {os.readlink(p)}): expertscope never writes through links "
                          f"inside its output directory; remove the link, or choose another output directory")
    return p


def _old_outputs(old: dict[str, Any] | None) -> set[str] | None:
    """The entries an old run wrote, from its manifest's ``outputs`` (None: a manifest from before
    that list, whose entries all count as the run's)."""
    listed = (old or {}).get("outputs")
    return None if not isinstance(listed, list) else {str(x) for x in listed}


def _move_aside(out: Path, old: dict[str, Any] | None = None) -> set[str]:
    """Move the old run's entries into ``OUT/.replaced-run``; returns the names of the entries left in place
    (a user's own files, which the old run's manifest does not list)."""
    aside = _no_link(out / ASIDE_NAME)
    if (aside / MANIFEST).exists():
        shutil.rmtree(aside)  # a run replaced earlier, whose replacement is now replaced in turn
    # Without a manifest inside, the aside is a move killed half-way: keep it and finish the move.
    aside.mkdir(exist_ok=True)
    own = _old_outputs(old)
    entries = _artifacts(out)
    moved = [p for p in entries if own is None or p.name in own]
    # The manifest goes last: until then the directory still reads as the old run.
    for p in [*moved, out / MANIFEST]:
        if p.exists() or p.is_symlink():
            os.replace(p, aside / p.name)
    return {p.name for p in entries if p not in moved}


def _remove(p: Path) -> None:
    """Remove one entry (a link itself, never what it points to)."""
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _restore_aside(out: Path, keep: set[str] | None = None) -> None:
    """Put the moved-aside run back; the new run's entries go, except ``keep`` (entries that were never the
    old run's: a user's files left in place)."""
    aside = _no_link(out / ASIDE_NAME)
    for p in _artifacts(out):
        if p.name not in (keep or set()):
            _remove(p)
    (out / MANIFEST).unlink(missing_ok=True)
    for p in aside.iterdir():
        os.replace(p, out / p.name)
    aside.rmdir()


def _lock(out: Path, option: str | None = "--out") -> int:
    path = _no_link(out / LOCK_NAME)
    try:
        # O_NOFOLLOW: a link put there after the check is refused too, never written through
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{path} is a symbolic link: expertscope never writes through links inside its "
                              "output directory; remove it") from None
        fix = f"choose a writable {option}" if option else "check the directory's permissions"
        raise OutputError(f"cannot create {path} ({e.strerror}): {fix}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = f" (pid {int(path.read_text().strip())})"
            other = f", or choose another {option}" if option else ""
            raise OutputError(f"another expertscope process{holder} is writing to {out}: wait for it to "
                              f"finish{other}") from None
        raise OutputError(f"cannot lock {path} ({e.strerror}): check that the file system supports locks") from None
    # The directory may have been removed (by a failed first writer) between open and lock.
    try:
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        raise OutputError(f"{out} was removed while this command waited for it: run the command again")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class _Lock:
    """The held lock; released by removing the lock file and closing it (while still holding it)."""

    def __init__(self, directory: Path, option: str | None = "--out") -> None:
        self.directory = directory
        self.fd: int | None = _lock(directory, option)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            (self.directory / LOCK_NAME).unlink()
        os.close(self.fd)
        self.fd = None


@contextlib.contextmanager
def open_run_dir(
    out: str | os.PathLike[str],
    kind: str,
    fingerprint: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    resumable: bool = True,
    option: str = "--out",
) -> Iterator[RunDir]:
    """Open ``out`` for a run of ``kind``: lock it, check or replace what it holds, write a running manifest.

    ``resumable=False`` for commands without ``--resume`` (their advice names only ``--force``; their own
    dead run, still marked running, is replaced since nothing can continue it). On a fresh
    start (or ``--force``) a manifest with ``status="running"`` and the fingerprint is written at once. On
    resume, ``RunDir.previous`` is the old manifest and nothing is rewritten until the caller writes.
    """
    out = check_out_dir(out, option)
    fingerprint = fingerprint or {}
    config = config if config is not None else dict(fingerprint.get("settings", {}))
    created: list[Path] = []
    p = out
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out} ({e.strerror}): choose another {option}") from None
    try:
        lock = _Lock(out, option)
    except BaseException:
        _remove_created(created)
        raise
    rd = RunDir(out, kind, fingerprint, config)
    fresh = True
    started = False
    try:
        manifest = _no_link(out / MANIFEST)
        if not manifest.exists() and _no_link(out / ASIDE_NAME).exists():
            # An earlier --force was killed before its new run wrote anything (its manifest comes first): what
            # is here besides the moved-aside run is a user's, left in place.
            _restore_aside(out, keep={p.name for p in _artifacts(out)})
        if _artifacts(out) or manifest.exists():
            old = _read_manifest(manifest) if manifest.exists() else None
            if not manifest.exists():
                raise OutputError(f"{option} {out} is not empty and holds no expertscope run: choose a new {option}")
            if old is None and not force:
                raise OutputError(f"{manifest} is unreadable: pass --force to replace that run, or choose a new "
                                  f"{option}")
            other = None if old is None else old.get("kind")
            if old is not None and other != kind:
                raise OutputError(f"{option} {out} holds another run ({other!r}, not {kind!r}): choose a new "
                                  f"{option}")
            # A command without --resume whose run here never finished: we hold the lock, so its writer is
            # dead (SIGKILL, power loss); nothing can continue it, so it is replaced like --force would.
            dead = not resumable and old is not None and old.get("status") == "running"
            if force or dead:
                rd.foreign = _move_aside(out, old)
            elif resume and resumable:
                assert old is not None
                if "fingerprint" not in old:
                    raise OutputError(f"{out} holds a {kind} run without a fingerprint (older expertscope): pass "
                                      "--force to start it over, or choose a new --out")
                diff = fingerprint_difference(old["fingerprint"], fingerprint)
                if diff is not None:
                    raise OutputError(f"{out} holds a {kind} run with other settings ({diff}): resume with the "
                                      "same options, or pass --force to start over")
                rd.previous = old
                listed = _old_outputs(old)
                rd.foreign = set() if listed is None else {p.name for p in _artifacts(out)} - listed
                fresh = False
            else:
                status = old.get("status", "unknown") if old else "unknown"
                advice = "pass --resume to continue it, --force to replace it" if resumable else (
                    "pass --force to replace it")
                raise OutputError(f"{option} {out} already holds a {kind} run ({status}): {advice}, or choose a "
                                  f"new {option}")
        started = True
        with write_root(out):
            if fresh:
                rd.write_manifest("running")
            yield rd
    except BaseException:
        own = [p for p in _artifacts(out) if p.name not in rd.foreign]
        if started and not resumable:
            # A command that cannot resume keeps nothing of a failed run (only it wrote its entries: the
            # directory was empty, or the old run was moved aside; a user's files stay).
            for p in own:
                _remove(p)
            own = []
        if started and not rd.previous and not own:
            # The run wrote nothing of its own: put the directory back as it was.
            (out / MANIFEST).unlink(missing_ok=True)
            if (out / ASIDE_NAME).exists():
                _restore_aside(out, rd.foreign)
            lock.release()
            _remove_created(created)
        elif not started:
            lock.release()
            _remove_created(created)
        raise
    else:
        if (out / ASIDE_NAME).exists() and not (out / ASIDE_NAME).is_symlink():
            shutil.rmtree(out / ASIDE_NAME, ignore_errors=True)
    finally:
        lock.release()


@contextlib.contextmanager
def lock_dir(path: str | os.PathLike[str], require_manifest: bool = True, create: bool = False,
             option: str | None = None) -> Iterator[Path]:
    """Hold the writer lock of a run directory (commands that add to a finished run, or write a model).

    ``create=True`` makes the directory if needed, and removes it again if the block fails before writing
    anything into it. ``option`` is the command's option naming the directory (for advice), if it has one.
    """
    path = Path(path)
    created: list[Path] = []
    if create:
        check_out_dir(path, option or "--out")
        p = path
        while not p.exists():
            created.append(p)
            p = p.parent
        path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        raise OutputError(f"{path} is not a directory: pass a run directory")
    if require_manifest and not (path / MANIFEST).is_file():
        raise OutputError(f"{path} has no {MANIFEST}: pass the output directory of an expertscope run")
    try:
        lock = _Lock(path, option)
    except BaseException:
        _remove_created(created)
        raise
    try:
        with write_root(path):
            yield path
    except BaseException:
        if created and not _artifacts(path) and not (path / MANIFEST).exists():
            lock.release()
            _remove_created(created)
        raise
    finally:
        lock.release()


def _remove_created(created: list[Path]) -> None:
    """Remove directories this command created (deepest first), if they are empty."""
    for p in created:
        with contextlib.suppress(OSError):
            p.rmdir()


__all__ = ["RunDir", "check_out_dir", "check_out_file", "data_fingerprint", "file_digest", "fingerprint_difference",
           "lock_dir", "model_fingerprint", "open_run_dir", "run_fingerprint"]
