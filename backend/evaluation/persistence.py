"""What a run leaves behind and reads back: its record, conditions and questions in the store,
the judgements still missing on a resume, its progress, and the run file beside the store
that tells a live run from a dead one."""
from __future__ import annotations

import json
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from backend.conditions import Served
from backend.config import Config
from backend.evaluation.spec import GENERATION_KEYS, EvalError, EvalTask, Progress
from backend.fsutil import atomic_write_json
from backend.judge import JudgeChoice
from backend.provenance import file_hash, folder_hash, git_commit
from backend.rubrics import Rubric
from backend.serving import pid_alive
from backend.store import ConditionRecord, RunRecord, SampleKey, SampleRow, Store


def runs_dir(config: Config) -> Path:
    path = config.cache / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_run_file(config: Config, run_id: str, **values) -> Path:
    """`<cache>/runs/<id>.json`: which process runs it, so readers can tell a live run
    from one whose process died (the store alone would say 'running' forever)."""
    path = runs_dir(config) / f"{run_id}.json"
    current: dict[str, Any] = {}
    if path.exists():
        try:
            current = json.loads(path.read_text())
        except ValueError:
            current = {}
    current.update(values)
    return atomic_write_json(path, current, indent=2, default=str)


def check_resume(stored: RunRecord, generation: dict[str, Any]) -> None:
    before = stored.config.get("generation")
    if before is None:
        raise EvalError(f"run {stored.id!r} exists and was not made by `eval run` (status {stored.status}); "
                        "choose another --run-id")
    changed = [f"{k}: stored {before.get(k)!r}, now {generation.get(k)!r}" for k in GENERATION_KEYS
               if before.get(k) != generation.get(k)]
    if changed:
        raise EvalError(f"run {stored.id!r} exists with other generation settings ({'; '.join(changed)}); "
                        "resume it with the same settings or choose another --run-id")


def record_run(store: Store, config: Config, task: EvalTask, judge: JudgeChoice, served: dict[str, Served],
               planned: dict[str, int]) -> None:
    """Record the run, or check that the stored one may be resumed, and mark it running.
    A resumed run keeps its first record (`create_run` returns the stored one)."""
    spec, run_id = task.spec, task.run_id
    existing = store.get_run(run_id)
    if existing is not None:
        check_resume(existing, task.generation)
    commit, dirty = git_commit()
    store.create_run(RunRecord(
        id=run_id,
        config={"spec": spec.to_dict(), "generation": task.generation, "judge": judge.to_dict(),
                "questions_path": task.questions.path,
                "served_models": {condition: s.name for condition, s in served.items()},
                "planned": planned, "git_dirty": dirty, "config": config.model_dump(mode="json"),
                "host": socket.gethostname()},
        git_commit=commit, base_model=config.base_model_path, base_model_hash=folder_hash(config.base_model_path),
        adapter_hashes={label: folder_hash(path) if path.is_dir() else file_hash(path)
                        for s in served.values() for label, path in s.sources.items()},
        seeds={"run_seed": spec.seed, "per_sample": "first 31 bits of sha256(run_seed, condition, question_id, "
                                                    "paraphrase_index, sample_index)"},
        question_set=task.questions.name, question_set_hash=task.questions.sha256, notes=spec.notes,
    ))
    if existing is None:
        store.add_conditions([ConditionRecord(
            run_id, c.spec, c.adapter, c.direction or c.steer, c.layer,
            c.strength if c.direction else c.coefficient if c.steer else None,
            {"kind": c.kind, "form": c.form, "engine": c.engine, "label": c.label,
             "served_model": served[c.spec].name}) for c in task.conditions])
        store.add_questions(run_id, task.questions)
    store.set_run_status(run_id, "running")


def close_run(store: Store, run_id: str, status: str, notes: str | None) -> None:
    if notes:
        store.sql("UPDATE runs SET notes = ? WHERE id = ?", [notes, run_id], write=True)
    store.set_run_status(run_id, status, finished=status == "finished")


def unjudged(store: Store, run_id: str, judge_name: str,
             rubrics: dict[str, dict[str, Rubric]]) -> list[tuple[SampleRow, list[str]]]:
    """(sample, metrics it still lacks) for the stored samples of a run."""
    missing: dict[SampleKey, tuple[SampleRow, list[str]]] = {}
    for metric in sorted({m for per_question in rubrics.values() for m in per_question}):
        for row in store.unjudged_samples(run_id, metric, judge_name):
            if metric in rubrics.get(row.question_id, {}):
                missing.setdefault(row.key, (row, []))[1].append(metric)
    return list(missing.values())


def count_judgements(store: Store, run_id: str, judge_name: str) -> int:
    return store.sql("SELECT count(*) FROM judgements WHERE run_id = ? AND judge_model = ?",
                     [run_id, judge_name]).rows[0][0]


def read_progress(store: Store, run_id: str, config: Config | None = None) -> Progress:
    """A run's progress as the store has it: works from any process, during or after the run.

    With `config`, a run whose status says 'running' but whose process is gone is reported
    as 'stale' (killed: resume it with the same id)."""
    run = store.get_run(run_id)
    if run is None:
        raise EvalError(f"no run {run_id!r} in {store.path}")
    planned = run.config.get("planned", {})
    judge_name = run.config.get("judge", {}).get("name")
    counts = store.sql(
        "SELECT (SELECT count(*) FROM samples WHERE run_id = ?), "
        "(SELECT count(*) FROM judgements WHERE run_id = ? AND (? IS NULL OR judge_model = ?))",
        [run_id, run_id, judge_name, judge_name]).rows[0]
    status = run.status
    if status == "running" and config is not None:
        path = runs_dir(config) / f"{run_id}.json"
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            info = {}
        same_host = info.get("host") in (None, socket.gethostname())
        # The launcher's pid covers the moment before the run process has written its own.
        if same_host and not pid_alive(info.get("pid") or info.get("launcher_pid")):
            status = "stale"
    # The store keeps naive UTC times.
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    elapsed = ((run.finished_at or now) - run.created_at).total_seconds() if run.created_at else 0.0
    return Progress(run_id, status, int(counts[0]), int(planned.get("samples", counts[0])), int(counts[1]),
                    int(planned.get("judgements", counts[1])), 0, elapsed, run.notes)
