"""Runs started from the dashboard: `python -m backend eval run` in its own process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from backend.config import Config, load_config
from backend.evaluation.persistence import write_run_file
from backend.evaluation.spec import RunSpec
from backend.provenance import REPO_ROOT
from backend.serving import pid_alive
from backend.store import Store


@dataclass(frozen=True)
class RunHandle:
    """A run started in its own process; it outlives the page that started it."""

    run_id: str
    pid: int
    log_path: str
    store_path: str

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def stop(self) -> None:
        """Like Ctrl-C: the run writes what is finished and marks itself 'interrupted'."""
        try:
            os.kill(self.pid, signal.SIGINT)
        except ProcessLookupError:
            pass


def launch_run(spec: RunSpec, config: Config | None = None) -> RunHandle:
    """Start `python -m backend eval run ...` in the background and return at once.

    A subprocess rather than a thread: it survives Streamlit reruns and page reloads, and
    its progress is read back from the store (`read_progress`) by any page."""
    spec = spec.with_run_id()
    config = config or load_config(spec.config_path)
    if spec.config_path is None:
        spec = replace(spec, config_path=str(Path(config.root) / "config.toml")
                       if (Path(config.root) / "config.toml").is_file() else None)
    log_path = config.cache / "logs" / f"eval-{spec.run_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "backend", "eval", "run", *spec.to_argv()],
                                   cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    store_path = spec.store_path or str(Store.for_config(config).path)
    write_run_file(config, spec.run_id, launcher_pid=process.pid, log=str(log_path))
    return RunHandle(spec.run_id, process.pid, str(log_path), store_path)
