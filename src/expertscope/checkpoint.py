"""The one checkpoint format of long computations (causal effects, causal sweeps): append-only JSON lines.

A header line ``{"format", "version", "fingerprint"}``, then one line per finished row
``{"key": [...], "shape": [...], "values": [...]}`` and, when the computation has running state to keep,
``{"meta": {...}}`` lines (the last one wins). Each line is flushed and fsynced as it is written, so a
killed process loses at most the line it was writing, and that torn last line is ignored on resume.
Floats are written at ``repr`` precision: values read back are bit-identical. Appending a row costs its
own size, not the size of everything finished before it.

(A routing profile checkpoints as itself: :meth:`expertscope.stats.profile.RoutingProfile.save` writes
mergeable sums that a resumed run continues from.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from .errors import ConfigError, OutputError
from .io import check_inside, make_dirs

FORMAT = "expertscope.checkpoint"
VERSION = 1


class RowCheckpoint:
    """Rows keyed by tuples of JSON scalars, kept on disk as they finish.

    ``RowCheckpoint(path, fingerprint, resume=True)`` reads the rows (``done``) and the last ``meta`` of a
    checkpoint made with the same ``fingerprint`` (another fingerprint raises :class:`ConfigError`);
    without ``resume`` (or with no file) it starts a new one. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str], fingerprint: str, resume: bool) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.done: dict[tuple[Any, ...], np.ndarray] = {}
        self.meta: dict[str, Any] = {}
        if resume and self.path.exists():
            self._read()
        else:
            make_dirs(self.path.parent)
            check_inside(self.path)
            header = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint}
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(header) + "\n")
        self._fh: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close())
        with open(self.path, "rb") as raw:  # a whole last line whose newline was not written yet
            raw.seek(0, os.SEEK_END)
            if raw.tell() and (raw.seek(-1, os.SEEK_END), raw.read(1))[1] != b"\n":
                self._fh.write("\n")

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").split("\n")
        lines = lines[:-1] if lines and lines[-1] == "" else lines
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version", 0) > VERSION:
            raise OutputError(f"{self.path} is not an expertscope checkpoint this version can read: rerun without "
                              "--resume, or choose a new --out")
        if header.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"the checkpoint {self.path} was made with other inputs or settings: rerun without "
                              "--resume (or with the original settings), or choose a new --out")
        kept = len(lines[0].encode("utf-8")) + 1
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                # The process died while writing this line: cut it, so rows appended next start on a line.
                with open(self.path, "r+", encoding="utf-8") as fh:
                    fh.truncate(kept)
                break
            kept += len(line.encode("utf-8")) + 1
            if "meta" in rec:
                self.meta = rec["meta"]
            else:
                key = tuple(rec["key"])
                self.done[key] = np.asarray(rec["values"], dtype=np.float64).reshape(rec["shape"])

    def _write(self, rec: dict[str, Any]) -> None:
        if self._fh is None:
            raise OutputError(f"the checkpoint {self.path} is closed")
        self._fh.write(json.dumps(rec, default=str) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def add(self, key: tuple[Any, ...], values: np.ndarray) -> None:
        """Record a finished row (any shape; float64)."""
        arr = np.asarray(values, dtype=np.float64)
        self.done[tuple(key)] = arr
        self._write({"key": list(key), "shape": list(arr.shape), "values": [float(x) for x in arr.ravel()]})

    def set_meta(self, meta: dict[str, Any]) -> None:
        """Record the computation's running state (a later call replaces it on resume)."""
        self.meta = meta
        self._write({"meta": meta})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RowCheckpoint:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["RowCheckpoint"]
