"""Adapters in a Hugging Face cache folder, found offline (HF_HUB_OFFLINE=1: nothing is fetched).

The cache layout is ``<cache>/models--ORG--NAME/{refs/<branch or tag>, snapshots/<commit>/...}``;
a ref file holds the commit its snapshot folder is named by. The paper's adapters keep
training checkpoints in ``checkpoints/checkpoint-N`` below the snapshot, each a PEFT folder.
The cache folder is HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub, unless a
configuration names one.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class HubCacheError(ValueError):
    """A Hub adapter that is not in the local cache; names the repository, revision and folder."""


def default_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def snapshot_folder(repo_id: str, revision: str = "main", cache_dir: str | Path | None = None) -> Path:
    """The snapshot of ``repo_id`` at ``revision`` (a branch, a tag or a commit) in the cache."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubCacheError(f"{repo_id!r} is not a Hub id of the form ORG/NAME")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        raise HubCacheError(f"{repo_id}: not in the Hugging Face cache {cache} (no folder {repo.name}); "
                            "download it where there is a network, or set HF_HUB_CACHE / the adapter's cache_dir")
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    folder = repo / "snapshots" / commit
    if not folder.is_dir():
        known = sorted(p.name for p in (repo / "refs").glob("*")) if (repo / "refs").is_dir() else []
        what = f"ref {revision!r} -> {commit}" if ref.is_file() else f"revision {revision!r}"
        raise HubCacheError(f"{repo_id}: {what} has no snapshot in {repo / 'snapshots'} (refs: {known or 'none'})")
    return folder


def checkpoints(folder: str | Path) -> list[int]:
    """The N of every ``checkpoints/checkpoint-N`` PEFT folder below ``folder``, ascending."""
    root = Path(folder) / "checkpoints"
    if not root.is_dir():
        return []
    found = [int(m[1]) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name))
             and (p / "adapter_config.json").is_file()]
    return sorted(found)


def checkpoint_folder(folder: str | Path, number: int) -> Path:
    path = Path(folder) / "checkpoints" / f"checkpoint-{number}"
    if not (path / "adapter_config.json").is_file():
        have = checkpoints(folder)
        raise HubCacheError(f"{folder}: no checkpoint {number} (has {', '.join(map(str, have)) or 'none'})")
    return path
