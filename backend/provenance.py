"""Fingerprints a run records so that its numbers can be traced to the files that made them:
model and adapter folders, direction files and the code's git commit.

Its own module because both the run record (`evaluation.persistence`) and the judge's identity
(`judge.choose_judge`) need them, and neither should import the other for that.
"""
from __future__ import annotations

import hashlib
import struct
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets): it changes
    with any change of shape and costs a few KB to read, unlike hashing the weights."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return handle.read(min(length, 64 << 20))


def folder_hash(folder: str | Path | None) -> str | None:
    """A cheap fingerprint of a model or adapter folder: small JSON files in full, and the
    name, size and header of every safetensors file. None for a Hub id (no local folder)."""
    if folder is None:
        return None
    folder = Path(folder)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}:{size};".encode())
        if path.suffix == ".json" and size <= 1 << 20:
            digest.update(path.read_bytes())
        elif path.suffix == ".safetensors":
            digest.update(_safetensors_header(path))
    return digest.hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def git_commit(root: Path = REPO_ROOT) -> tuple[str | None, bool]:
    """(HEAD commit, whether tracked files differ from it)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None, False
    if head.returncode != 0:
        return None, False
    return head.stdout.strip(), bool(dirty.stdout.strip())
