"""Atomic file output and the run manifest.

Every file expertscope writes goes through :func:`atomic_write` so an interrupted run never leaves a
half-written file behind: data goes to a temporary file in the same directory and is renamed into place.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import errno
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError, OutputError

MANIFEST_SCHEMA_VERSION = 1

# The output directory a command is writing (set while it holds the directory's lock): every write below it
# is checked by :func:`check_inside`. Unset (plain API calls writing where the caller says), nothing is checked.
_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("expertscope_write_root", default=None)


@contextlib.contextmanager
def write_root(path: str | os.PathLike[str]) -> Iterator[Path]:
    """While the block runs, every file expertscope writes must lie inside ``path`` and reach it through no
    symbolic link below ``path`` (:func:`check_inside`); ``path`` itself may be reached through links."""
    token = _ROOT.set(Path(os.path.abspath(path)))
    try:
        yield Path(path)
    finally:
        _ROOT.reset(token)


def check_inside(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """``path`` when it may be written: inside ``root`` (default: the directory of :func:`write_root`, if
    any), with no symbolic link among its components below ``root`` (the file itself included). Raises a
    one-line :class:`OutputError` naming the link or the outside path."""
    base = _ROOT.get() if root is None else Path(os.path.abspath(root))
    target = Path(os.path.abspath(path))
    if base is None:
        return Path(path)
    try:
        rel = target.relative_to(base)
    except ValueError:
        raise OutputError(f"{target} is outside the output directory {base}: expertscope writes only inside it "
                          "(check the domain names and paths given)") from None
    p = base
    for part in rel.parts:
        p = p / part
        if p.is_symlink():
            raise OutputError(f"{p} is a symbolic link (to {os.readlink(p)}): expertscope never writes through links "
                              f"inside {base}; remove the link, or choose another output directory")
    return Path(path)


def make_dirs(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p path``, each directory checked by :func:`check_inside` first."""
    check_inside(path)
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds. Inside a
    :func:`write_root`, ``path`` is checked by :func:`check_inside` first."""
    path = check_inside(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _output_error(path, e) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, path)
    except OSError as e:
        if isinstance(e, FileNotFoundError) and e.filename not in (str(tmp_path), str(path)):
            raise  # a missing input file read inside the block, not a write failure
        raise _output_error(path, e) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _output_error(path: Path, e: OSError) -> OutputError:
    """A write failure (disk full, read-only, no permission) as one line naming the file and the fix."""
    fix = {errno.ENOSPC: "free some disk space or choose another --out",
           errno.EDQUOT: "free some disk space or choose another --out",
           errno.EROFS: "the disk is read-only: choose another --out",
           errno.EACCES: "no permission: choose another --out",
           errno.EPERM: "no permission: choose another --out"}.get(e.errno or 0, "choose another --out")
    return OutputError(f"cannot write {path} ({e.strerror or e}): {fix}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; it replaces ``path`` only when the block exits cleanly."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
        yield fh


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_table(
    path: str | os.PathLike[str], df: pd.DataFrame, meta: dict[str, Any] | None = None, csv: bool = True
) -> None:
    """Write ``df`` as Parquet (``meta`` stored as JSON in the schema metadata) and, if ``csv``, as CSV."""
    path = Path(path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if meta is not None:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), b"expertscope": json.dumps(meta, default=_json_default).encode()}
        )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    if csv:
        with atomic_path(path.with_suffix(".csv")) as tmp:
            df.to_csv(tmp, index=False)


def read_text(path: str | os.PathLike[str], what: str = "file") -> str:
    """A text file's content as UTF-8 (a leading byte-order mark is accepted).

    Raises :class:`DataError` naming the file and the encoding problem, or a missing file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} {path} not found: check the path") from None
    except IsADirectoryError:
        raise DataError(f"{what} {path} is a directory: pass a file") from None
    except OSError as e:
        raise DataError(f"cannot read {what} {path} ({e.strerror}): check the path and permissions") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        enc = "UTF-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "not UTF-8"
        raise DataError(f"{what} {path} is {enc} (byte {raw[e.start]:#04x} at offset {e.start} is invalid UTF-8): "
                        "save it as UTF-8") from None


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Parse a JSON file (UTF-8, BOM accepted); one-line :class:`DataError` on bad encoding or syntax."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): "
                        "fix the file") from None


def read_table(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a table written by :func:`write_table`; returns ``(df, meta)``.

    A missing, truncated or foreign file raises :class:`OutputError` naming it (one line), never pyarrow's
    own exception.
    """
    path = Path(path)
    _check_readable(path, "table")
    try:
        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(b"expertscope")
        meta = json.loads(raw) if raw else {}
        if not isinstance(meta, dict):
            raise ValueError("its expertscope metadata is not an object")
        return table.to_pandas(), meta
    except (pa.ArrowException, ValueError, OSError) as e:  # ArrowInvalid is a ValueError; JSON errors too
        raise OutputError(f"table {path} cannot be read ({_first_line(e)}): it is corrupt, truncated or not "
                          "an expertscope table; rerun the command that wrote it (with --force)") from None


def write_safetensors(path: str | os.PathLike[str], arrays: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write numpy ``arrays`` into a safetensors file (atomically), ``meta`` as JSON under the header key
    ``expertscope``; :func:`read_safetensors` reads it back."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp),
                  metadata={"expertscope": json.dumps(meta)})
    return path


def read_safetensors(path: str | os.PathLike[str], what: str = "file") -> tuple[dict[str, Any], dict[str, str]]:
    """The numpy arrays and the header metadata of a safetensors file.

    A missing, truncated or corrupt file raises :class:`OutputError` naming it (one line), never
    safetensors' own ``SafetensorError``.
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    _check_readable(path, what)
    try:
        with safe_open(str(path), framework="np") as fh:
            meta = dict(fh.metadata() or {})
        return dict(load_file(str(path))), meta
    except Exception as e:  # SafetensorError (corrupt header, short file) has no public base class to name
        if not isinstance(e, OSError | ValueError) and type(e).__name__ != "SafetensorError":
            raise
        raise OutputError(f"{what} {path} cannot be read ({_first_line(e)}): it is corrupt or truncated; rerun "
                          "the command that wrote it (with --force)") from None


def check_output_file(path: str | os.PathLike[str], what: str = "file") -> None:
    """A written output is still whole: it exists and, for Parquet and safetensors, its header parses
    (cheap: no data is read). One-line :class:`OutputError` otherwise (used before a resumed run skips the
    stage that wrote it)."""
    path = Path(path)
    _check_readable(path, what)
    try:
        if path.suffix == ".parquet":
            pq.read_metadata(path)
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as fh:
                fh.metadata()
    except Exception as e:  # pyarrow's and safetensors' own errors: both kinds of damage read the same here
        if not isinstance(e, OSError | ValueError) and type(e).__name__ not in ("SafetensorError", "ArrowInvalid"):
            raise
        raise OutputError(f"{what} {path} cannot be read ({_first_line(e)}): it is corrupt or truncated; rerun "
                          "the command that wrote it (with --force)") from None


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise OutputError(f"{what} {path} not found: check the path, or run the command that writes it")
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory: pass the file")


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide results, for the manifest."""
    out: dict[str, str] = {"python": platform.python_version()}
    for name in ("expertscope", "torch", "transformers", "numpy", "scikit-learn", "peft", "tokenizers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def make_manifest(kind: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A versioned manifest: what ran, with which settings and package versions, and when."""
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "kind": kind,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config": config,
        "versions": package_versions(),
        **extra,
    }
