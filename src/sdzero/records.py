"""Run-folder I/O shared by both methods: prediction records appended as produced, atomic JSON.

A prediction record file is JSON Lines: one object a line, flushed and fsync'ed as each sample
finishes, so a killed run loses at most the line being written; a torn last line is detected on read.
A coordinate without a value (a query point without ground truth: NaN in memory) is written as
``null`` inside the point lists (keys ending in ``_kps``) and read back as NaN.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdzero.errors import InputError

log = logging.getLogger(__name__)


def check_output_path(path: str | Path, what: str, folder: bool = False) -> None:
    """Raise :class:`~sdzero.errors.InputError` (naming ``what``, e.g. ``--viz``) unless ``path``
    can be written as a file (``folder``: a folder) before any work starts: it is not a folder
    (a file), and its nearest existing ancestor is a writable folder (missing ones are created)."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind, expected = ("a file", "a folder") if folder else ("a folder", "a file path")
        raise InputError(f"{what} {str(path)!r} is {kind}; expected {expected}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{what} {str(path)!r}: the folder {str(parent)!r} is not writable")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; files get the user's umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class RecordWriter:
    """Append-only JSON Lines writer; each :meth:`write` is flushed and fsync'ed before returning."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for appends

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(_points_as(record, _nan_to_null), separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def drop_torn_tail(path: str | Path) -> int:
    """Cut a last line that a kill left without its newline (so appends start on a fresh line).

    Returns the number of bytes removed.
    """
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the complete records of a JSON Lines file; a torn or unparsable line is skipped."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # cut off by a kill mid-write: never counted
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                yield _points_as(record, _null_to_nan)
            else:
                log.warning(
                    "%s line %d is not a JSON record; dropped (its sample is redone)", path, number
                )


def _nan_to_null(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _null_to_nan(value: Any) -> Any:
    return math.nan if value is None else value


def _points_as(record: dict[str, Any], convert: Any) -> dict[str, Any]:
    """``record`` with ``convert`` applied to each coordinate of its ``*_kps`` point lists."""
    out = dict(record)
    for key, points in record.items():
        if key.endswith("_kps") and isinstance(points, list):
            out[key] = [[convert(v) for v in p] if isinstance(p, list) else p for p in points]
    return out
