"""Writing files so that no reader, and no crash, ever sees half of one, and checking that a file
is still what was written. Every write here goes to a temporary name in the same folder, then is
renamed into place (a rename is atomic); the temporary file or folder is removed on failure."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """A temporary file beside `path` to write to (by name); renamed to `path` when the block
    ends without an error, removed otherwise. With `fsync` the data is flushed to disk first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; written files are ordinary files
        os.close(fd)
        yield tmp
        if fsync:
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes, fsync: bool = False) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str, fsync: bool = False) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any, fsync: bool = False, **dumps: Any) -> None:
    """`data` as JSON (``indent=1``, unknown types as strings, unless `dumps` says otherwise)."""
    write_text(path, json.dumps(data, **{"indent": 1, "default": str, **dumps}), fsync)


def atomic_dir(target: Path) -> Path:
    """A fresh temporary folder beside `target`, to be moved there with `commit_dir`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); a saved model is an ordinary folder
    return tmp


def commit_dir(tmp: Path, target: Path) -> None:
    """Replace `target` by `tmp` (rename is atomic; the old folder is removed only afterwards)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256(file: Path, fsync: bool = False) -> str:
    """Hex sha256 of a file; with `fsync` the file is flushed to disk first, so a file whose
    checksum was recorded survives a power cut too."""
    digest = hashlib.sha256()
    with Path(file).open("rb") as handle:
        if fsync:
            os.fsync(handle.fileno())
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()
