"""Files that readers in other processes may open at any moment: written whole or not at all,
and changed under a lock.

The dashboard, CLI runs and the eval subprocess share the cache folder. A reader must never
see half a JSON record, half a safetensors file or an adapter folder without its weights,
so every write goes to a temporary name in the same folder and is renamed into place
(atomic on POSIX within one file system). Read-modify-write sequences take an flock.

Also the two ways files are read back in several modules: a file's sha256, and JSON Lines with
their line numbers.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path` to write to; renamed onto `path` when the block ends
    without an error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any, **dump_options: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, **dump_options))


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """A temporary folder next to `final` to fill; renamed to `final` when the block ends
    without an error. If `final` appeared meanwhile (another process built the same
    content-addressed folder), theirs is kept and ours dropped."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:  # a non-empty `final` exists: same key, same content
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def file_lock(path: str | Path, exclusive: bool = True) -> Iterator[None]:
    """Hold an flock on `path` (created if missing) for the block; waits as long as it takes."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield  # closing the file releases the lock


def flock_until(fd: int, exclusive: bool, deadline: float) -> bool:
    """Take an flock on `fd`, polling (1-20 ms) until time.monotonic() passes `deadline`;
    False if it could not be had by then."""
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, mode)
            return True
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def jsonl_records(handle: IO[str], bad_line: Callable[[int, json.JSONDecodeError], Exception]
                  ) -> Iterator[tuple[int, Any]]:
    """(line number from 1, parsed value) for each non-blank line of an open JSON Lines text file;
    a line that is not JSON raises `bad_line(number, error)` (the caller's error and wording)."""
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise bad_line(number, error) from None
        yield number, value
