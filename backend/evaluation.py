"""Evaluation runs: sample answers under every condition, judge them, store everything.

The shape is Inspect AI's: a task is a dataset (a QuestionSet), a solver (generation under
each model condition) and a scorer (the LLM judge, one rubric per metric), and every score
keeps its explanation (label, numeric mass, reason for a null, the raw top logprobs).

Pipeline (one process, `run_eval`):
- plan: every (condition, question, paraphrase, sample index) is one work item with its
  own seed, derived from (run seed, condition, question, paraphrase, sample index), so a
  resumed run asks for exactly what the interrupted one would have;
- generate: a pool of threads sends one request per item. Items are interleaved by
  condition, so every condition is in flight at once and vLLM batches the adapters
  together;
- store samples: finished answers are written in batches (every `batch_size` answers or
  every FLUSH_S seconds, whichever comes first); a batch costs ~50-100 ms in the store;
- judge: each stored batch goes to the judge (an asyncio loop in its own thread, with
  the judge's own concurrency limit and SQLite answer cache);
- store judgements: in batches, like the samples.
So a kill -9 loses at most the answers and scores not yet flushed (and the judge cache
still holds every score it received); Ctrl-C or `cancel` flushes what is done first.

Resuming: `run_eval` with an existing run id skips the sample keys already in the store
and judges the stored samples that lack a judgement from this judge. The store's natural
keys make a second copy impossible anyway. A run id that exists with different
generation settings is refused, since mixing them would make its numbers meaningless;
the judge may differ (that adds a second judge's scores to the same answers).

Which judge (`RunSpec.judge`, `--judge NAME`): NAME defaults to `[judge] model`.
- 'base' or an adapter name of the configuration: that model on the project's own vLLM
  server (the adapter is loaded if needed), whatever `[judge] base_url` says;
- any other NAME: the model NAME at `[judge] base_url` (key from `[judge] api_key_env`);
  with an empty base_url, a model that the project's server already serves.
Scores are stored with judge_model = NAME. The judge is tried once before any sampling,
so an unreachable judge or one without logprobs stops the run before it costs anything.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from backend.client import Completion, Sampling
from backend.conditions import Condition, ConditionError, ConditionRunner, Served
from backend.config import Config, ConfigError, load_config
from backend.judge import (Judge, JudgeCache, JudgeChoice, JudgeError, Judgement, JudgeRequest,  # noqa: F401
                           JudgeUnavailableError, RetryPolicy, Rubric, choose_judge, make_judge, probe_judge,
                           project_judge, rubrics_for)
from backend.questions import Question, QuestionFileError, QuestionSet, load_questions
from backend.serving import ServerError, auth_headers, is_healthy, pid_alive, server_url
from backend.store import (ConditionRecord, JudgementRow, RunRecord, SampleKey, SampleRow, Store, StoreError)

REPO_ROOT = Path(__file__).resolve().parent.parent
FLUSH_S = 2.0
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Settings that change what is generated: a resumed run must agree on all of them.
GENERATION_KEYS = ("questions_sha256", "question_ids", "conditions", "samples", "temperature", "top_p",
                   "max_tokens", "seed")


class EvalError(RuntimeError):
    """An evaluation that cannot start or go on; the message names the thing and the reason."""


# ---------------------------------------------------------------- the spec


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run; the CLI's flags map one to one onto it."""

    questions: str = "em_core"  # a YAML file, or the name of a bundled set
    conditions: tuple[str, ...] = ("base",)  # backend.conditions specs
    samples: int | None = None  # per paraphrase; None: each question's samples_per_paraphrase
    judge: str | None = None  # see the module docstring; None: [judge] model
    run_id: str | None = None  # None: a new id from the time and a random suffix
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 300
    seed: int = 0
    question_ids: tuple[str, ...] = ()  # a subset of the set, in file order
    paper_default: bool = False  # the paper's default: plain questions only, no _json/_template variants
    config_path: str | None = None  # None: config.toml (or EM_CONFIG)
    store_path: str | None = None  # None: em.duckdb in the configured cache folder
    max_in_flight: int = 64  # generation requests at once, over all conditions
    batch_size: int = 32  # answers (and judgements) per store write
    notes: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "conditions", tuple(self.conditions))
        object.__setattr__(self, "question_ids", tuple(self.question_ids))
        if not self.conditions:
            raise EvalError("a run needs at least one condition (e.g. --condition base)")
        if self.samples is not None and self.samples < 1:
            raise EvalError(f"samples must be at least 1, got {self.samples}")
        if self.run_id is not None and not RUN_ID_RE.match(self.run_id):
            raise EvalError(f"run id {self.run_id!r}: use letters, digits, '.', '_' or '-' (at most 100), "
                            "starting with a letter or digit")
        if self.max_in_flight < 1 or self.batch_size < 1:
            raise EvalError("max_in_flight and batch_size must be at least 1")
        Sampling(self.temperature, self.top_p, self.max_tokens)  # raises ValueError naming the bad value

    def with_run_id(self) -> "RunSpec":
        """This spec with a run id (a fresh one when none was given)."""
        if self.run_id:
            return self
        return replace(self, run_id=time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["conditions"] = list(self.conditions)
        data["question_ids"] = list(self.question_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_argv(self) -> list[str]:
        """The `python -m backend eval run` arguments that reproduce this spec."""
        argv = ["--questions", self.questions]
        for condition in self.conditions:
            argv += ["--condition", condition]
        optional = {"--samples": self.samples, "--judge": self.judge, "--run-id": self.run_id,
                    "--config": self.config_path, "--store": self.store_path, "--notes": self.notes}
        for flag, value in optional.items():
            if value is not None:
                argv += [flag, str(value)]
        argv += ["--temperature", repr(self.temperature), "--top-p", repr(self.top_p),
                 "--max-tokens", str(self.max_tokens), "--seed", str(self.seed),
                 "--max-in-flight", str(self.max_in_flight), "--batch-size", str(self.batch_size)]
        for qid in self.question_ids:
            argv += ["--question-id", qid]
        if self.paper_default:
            argv.append("--paper-default")
        return argv


@dataclass
class Progress:
    """Where a run stands; passed to the progress callback and read back from the store."""

    run_id: str
    status: str  # running | finished | failed | interrupted (| stale: 'running' but its process is gone)
    samples_done: int = 0
    samples_total: int = 0
    judgements_done: int = 0
    judgements_total: int = 0
    failures: int = 0
    elapsed_s: float = 0.0
    message: str | None = None

    @property
    def fraction(self) -> float:
        total = self.samples_total + self.judgements_total
        return (self.samples_done + self.judgements_done) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction": self.fraction}


@dataclass(frozen=True)
class RunResult:
    run_id: str
    status: str
    samples_total: int
    samples_generated: int  # by this invocation
    samples_stored: int
    judgements_total: int
    judgements_written: int  # by this invocation
    judgements_stored: int
    failures: tuple[str, ...]
    elapsed_s: float
    judge: str

    @property
    def judged_samples_per_s(self) -> float:
        """Samples of this invocation that got all their scores, per second of its wall time."""
        return self.samples_generated / self.elapsed_s if self.elapsed_s > 0 else 0.0


ProgressCallback = Callable[[Progress], None]


# ---------------------------------------------------------------- planning


def sample_seed(run_seed: int, condition: str, question_id: str, paraphrase_index: int, sample_index: int) -> int:
    """The seed of one sample: a hash, so neither the order of work nor a resume changes it.
    31 bits because some OpenAI-compatible servers reject larger seeds."""
    payload = "\x1f".join(map(str, (run_seed, condition, question_id, paraphrase_index, sample_index)))
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class WorkItem:
    key: SampleKey
    condition: Condition
    question: Question
    paraphrase: str
    seed: int


def samples_per_paraphrase(question: Question, override: int | None) -> int:
    if override is not None:
        return override
    if question.samples_per_paraphrase is None:
        raise EvalError(f"question {question.id!r} ({question.source}) has no samples_per_paraphrase; "
                        "pass --samples N")
    return question.samples_per_paraphrase


def plan(run_id: str, questions: QuestionSet, conditions: list[Condition], samples: int | None,
         seed: int) -> list[WorkItem]:
    """All work items, the conditions interleaved innermost so that any window of the list
    (what is in flight) holds every condition."""
    items = []
    for question in questions:
        n = samples_per_paraphrase(question, samples)
        for p_index, text in enumerate(question.paraphrases):
            for s_index in range(n):
                for condition in conditions:
                    key = SampleKey(run_id, condition.spec, question.id, p_index, s_index)
                    items.append(WorkItem(key, condition, question, text,
                                          sample_seed(seed, condition.spec, question.id, p_index, s_index)))
    return items


# ---------------------------------------------------------------- provenance


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


# ---------------------------------------------------------------- conditions and judge


class _Models:
    """The run's conditions, resolved before any sampling by the ConditionRunner (the one
    owner of condition -> served model), and the hashes the run record keeps of them."""

    def __init__(self, config: Config):
        self.runner = ConditionRunner(config)
        self.served: dict[str, Served] = {}  # condition spec -> how it is run

    def prepare(self, condition: Condition) -> None:
        self.served[condition.spec] = self.runner.resolve(condition)

    @property
    def names(self) -> dict[str, str]:
        return {spec: served.name for spec, served in self.served.items()}

    @property
    def provenance(self) -> dict[str, str | None]:
        return {label: folder_hash(path) if path.is_dir() else file_hash(path)
                for served in self.served.values() for label, path in served.sources.items()}

    def generate(self, item: WorkItem, sampling: Sampling) -> Completion:
        messages = [{"role": "user", "content": item.paraphrase}]
        return self.runner.generate(self.served[item.condition.spec], messages, sampling)


# ---------------------------------------------------------------- the runner



class _JudgeLoop:
    """One asyncio loop in a daemon thread: every batch shares the judge's semaphore and
    client, and a process that must exit does not wait for it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="judge-loop", daemon=True)
        self.thread.start()

    def submit(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self, judge: Judge) -> None:
        async def stop():
            for task in asyncio.all_tasks(self.loop):
                if task is not asyncio.current_task():
                    task.cancel()
            # The judge's async client belongs to this loop: close it here, or its
            # connections try to close themselves later on a loop that is gone.
            client = getattr(getattr(judge, "_state", None), "client", None)
            if client is not None:
                await client.close()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=5)
        except Exception:  # closing is best effort; the thread is a daemon anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def runs_dir(config: Config) -> Path:
    path = config.cache / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_run_file(config: Config, run_id: str, **values) -> Path:
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
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(current, indent=2, default=str))
    tmp.replace(path)
    return path


def _check_resume(stored: RunRecord, generation: dict[str, Any]) -> None:
    before = stored.config.get("generation")
    if before is None:
        raise EvalError(f"run {stored.id!r} exists and was not made by `eval run` (status {stored.status}); "
                        "choose another --run-id")
    changed = [f"{k}: stored {before.get(k)!r}, now {generation.get(k)!r}" for k in GENERATION_KEYS
               if before.get(k) != generation.get(k)]
    if changed:
        raise EvalError(f"run {stored.id!r} exists with other generation settings ({'; '.join(changed)}); "
                        "resume it with the same settings or choose another --run-id")


def _unjudged(store: Store, run_id: str, judge_name: str,
              rubrics: dict[str, dict[str, Rubric]]) -> list[tuple[SampleRow, list[str]]]:
    """(sample, metrics it still lacks) for the stored samples of a run."""
    missing: dict[SampleKey, tuple[SampleRow, list[str]]] = {}
    for metric in sorted({m for per_question in rubrics.values() for m in per_question}):
        for row in store.unjudged_samples(run_id, metric, judge_name):
            if metric in rubrics.get(row.question_id, {}):
                missing.setdefault(row.key, (row, []))[1].append(metric)
    return list(missing.values())


class _Invocation:
    """The moving parts of one `run_eval` call. Worker threads and the judge loop only put
    events on the queue; everything else is touched by the thread that runs `run_eval`."""

    def __init__(self, spec: RunSpec, run_id: str, store: Store, judge: Judge, judge_name: str,
                 rubrics: dict[str, dict[str, Rubric]], samples_total: int, judgements_total: int,
                 progress: ProgressCallback | None):
        self.spec, self.run_id, self.store = spec, run_id, store
        self.judge, self.judge_name, self.rubrics = judge, judge_name, rubrics
        self.samples_total, self.judgements_total = samples_total, judgements_total
        self.progress = progress
        self.started = time.monotonic()
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.loop: _JudgeLoop | None = None
        self.samples: list[SampleRow] = []
        self.judgements: list[JudgementRow] = []
        self.samples_flushed_at = self.judgements_flushed_at = time.monotonic()
        self.open_generation = 0
        self.open_judge_batches = 0
        self.generated = 0
        self.judged = 0
        self.samples_stored = 0
        self.judgements_stored = 0
        self.failures: Counter = Counter()

    @property
    def busy(self) -> bool:
        return bool(self.open_generation or self.open_judge_batches or self.samples or self.judgements)

    def report(self, status: str = "running", message: str | None = None) -> None:
        if self.progress is not None:
            self.progress(Progress(self.run_id, status, self.samples_stored, self.samples_total,
                                   self.judgements_stored, self.judgements_total, sum(self.failures.values()),
                                   time.monotonic() - self.started, message))

    def start_generation(self, models: _Models, todo: list[WorkItem]) -> None:
        """Daemon worker threads: a process told to stop exits without waiting for answers
        in flight (their connections close, and vLLM aborts those requests)."""
        work: queue.Queue = queue.Queue()
        for item in todo:
            work.put(item)
        self.open_generation = len(todo)
        spec = self.spec

        def worker() -> None:
            while not self.stop.is_set():
                try:
                    item = work.get_nowait()
                except queue.Empty:
                    return
                sampling = Sampling(spec.temperature, spec.top_p, spec.max_tokens, item.seed, item.question.system)
                try:
                    result: Completion | Exception = models.generate(item, sampling)
                except Exception as error:  # the main thread decides what a failure means
                    result = error
                self.events.put(("sample", item, sampling, result))

        for index in range(min(spec.max_in_flight, len(todo))):
            threading.Thread(target=worker, name=f"generate-{index}", daemon=True).start()

    def submit_judging(self, samples: list[tuple[SampleRow, list[str]]]) -> None:
        if not samples or self.loop is None:
            return
        keys, requests = [], []
        for row, metrics in samples:
            for metric in metrics:
                keys.append(row.key)
                requests.append(JudgeRequest(row.question, row.response, self.rubrics[row.question_id][metric]))
        if not requests:
            return

        def on_result(index: int, judgement: Judgement) -> None:
            # Stored under the judge's name in this run, not the endpoint's id (a path for 'base').
            row = replace(JudgementRow.from_judgement(keys[index], judgement), judge_model=self.judge_name)
            self.events.put(("judgement", row))

        future = self.loop.submit(self.judge.ajudge_many(requests, on_result))
        self.open_judge_batches += 1
        future.add_done_callback(lambda f: self.events.put(("judge_batch", None if f.cancelled() else f.exception())))

    def handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "sample":
            _, item, sampling, result = event
            self.open_generation -= 1
            if isinstance(result, ServerError):
                raise result  # the server is gone: nothing else will succeed either
            if isinstance(result, Exception):
                self.failures[f"condition {item.condition.spec!r}: {result}"[:300]] += 1
                return
            self.generated += 1
            self.samples.append(SampleRow(
                *item.key, question=item.paraphrase, response=result.text, prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens, finish_reason=result.finish_reason,
                sampling_params={"temperature": sampling.temperature, "top_p": sampling.top_p,
                                 "max_tokens": sampling.max_tokens, "system_prompt": sampling.system_prompt},
                seed=sampling.seed,
                extra={"served_model": result.model} if item.condition.kind == "ablation" else None))
        elif kind == "judgement":
            self.judgements.append(event[1])
        elif kind == "judge_batch":
            self.open_judge_batches -= 1
            if event[1] is not None:
                raise event[1]

    def drain(self) -> None:
        """After a stop: take in whatever the workers finished, ignoring their errors."""
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            try:
                self.handle(event)
            except Exception:
                continue

    def flush(self, force: bool) -> bool:
        """Write the batches that are due; returns whether anything was written.

        A batch goes back into the buffer if its write is interrupted, so a Ctrl-C that
        lands inside a write costs nothing (the final flush writes it)."""
        now = time.monotonic()
        wrote = False
        if self.samples and (force or len(self.samples) >= self.spec.batch_size
                             or now - self.samples_flushed_at >= FLUSH_S):
            batch, self.samples = self.samples, []
            try:
                self.samples_stored += self.store.insert_samples(batch)
            except BaseException:
                self.samples = batch + self.samples
                raise
            self.samples_flushed_at = time.monotonic()
            wrote = True
            # Judged only once stored, so no judgement ever points at a lost answer.
            self.submit_judging([(row, list(self.rubrics[row.question_id])) for row in batch
                                 if self.rubrics[row.question_id]])
        if self.judgements and (force or len(self.judgements) >= self.spec.batch_size
                                or now - self.judgements_flushed_at >= FLUSH_S):
            batch, self.judgements = self.judgements, []
            try:
                self.store.insert_judgements(batch)
            except BaseException:
                self.judgements = batch + self.judgements
                raise
            self.judged += len(batch)
            self.judgements_stored = _count_judgements(self.store, self.run_id, self.judge_name)
            self.judgements_flushed_at = time.monotonic()
            wrote = True
        return wrote

    def notes(self, failure: BaseException | None) -> str | None:
        parts = []
        if failure is not None:
            parts.append("interrupted by the user" if isinstance(failure, KeyboardInterrupt)
                         else f"stopped: {failure}")
        if self.failures:
            total = sum(self.failures.values())
            parts.append(f"{total} sample(s) could not be generated (run again with the same id to retry): "
                         + "; ".join(f"{n} x {message}" for message, n in self.failures.most_common(3)))
        return " | ".join(parts) or None


def _count_judgements(store: Store, run_id: str, judge_name: str) -> int:
    return store.sql("SELECT count(*) FROM judgements WHERE run_id = ? AND judge_model = ?",
                     [run_id, judge_name]).rows[0][0]


def run_eval(spec: RunSpec, progress: ProgressCallback | None = None, *, config: Config | None = None,
             store: Store | None = None, cancel: threading.Event | None = None) -> RunResult:
    """Run (or resume) an evaluation; see the module docstring.

    `progress` is called from this thread after every store write. `cancel`, set from
    another thread, stops the run after writing what is finished (status 'interrupted',
    returned rather than raised). Ctrl-C does the same and re-raises KeyboardInterrupt.
    Problems raise EvalError (or ServerError/StoreError) naming the reason; the run's
    status in the store says 'failed' or 'interrupted', and the same spec resumes it.
    """
    spec = spec.with_run_id()
    run_id = spec.run_id
    assert run_id is not None
    try:
        config = config or load_config(spec.config_path)
        questions = load_questions(spec.questions)
        if spec.paper_default:
            questions = questions.paper_default()
        if spec.question_ids:
            questions = questions.select(list(spec.question_ids))
        conditions = [Condition.parse(text) for text in spec.conditions]
    except (ConfigError, QuestionFileError, ConditionError) as error:
        raise EvalError(str(error)) from None
    except KeyError as error:  # an unknown question id
        raise EvalError(error.args[0]) from None
    specs = [c.spec for c in conditions]
    if len(set(specs)) != len(specs):
        raise EvalError(f"a condition is given twice: {', '.join(sorted({s for s in specs if specs.count(s) > 1}))}")
    store = store or (Store(spec.store_path) if spec.store_path else Store.for_config(config))

    url = server_url(config)
    if not is_healthy(url, auth_headers(config)):
        raise EvalError(f"vLLM server at {url} is not reachable; start it with `python -m backend serve --detach` "
                        "(or set server.url)")
    models = _Models(config)
    try:
        for condition in conditions:
            models.prepare(condition)
        choice = choose_judge(config, spec.judge, models.runner.registry, models.runner.client)
        probe_judge(choice)
    except (ConditionError, ConfigError, JudgeError) as error:
        raise EvalError(str(error)) from None

    items = plan(run_id, questions, conditions, spec.samples, spec.seed)
    rubrics = {q.id: rubrics_for(q) for q in questions}
    judgements_total = sum(len(rubrics[item.question.id]) for item in items)
    # The paper's default selection is recorded as the ids it chose: that is what is generated.
    chosen_ids = list(questions.ids) if spec.paper_default else list(spec.question_ids)
    generation = {"questions_sha256": questions.sha256, "question_ids": chosen_ids,
                  "conditions": specs, "samples": spec.samples, "temperature": spec.temperature,
                  "top_p": spec.top_p, "max_tokens": spec.max_tokens, "seed": spec.seed}
    existing = store.get_run(run_id)
    if existing is not None:
        _check_resume(existing, generation)
    commit, dirty = git_commit()
    store.create_run(RunRecord(
        id=run_id,
        config={"spec": spec.to_dict(), "generation": generation, "judge": choice.to_dict(),
                "questions_path": questions.path, "served_models": models.names,
                "planned": {"samples": len(items), "judgements": judgements_total},
                "git_dirty": dirty, "config": config.model_dump(mode="json"), "host": socket.gethostname()},
        git_commit=commit, base_model=config.base_model_path, base_model_hash=folder_hash(config.base_model_path),
        adapter_hashes=models.provenance,
        seeds={"run_seed": spec.seed, "per_sample": "first 31 bits of sha256(run_seed, condition, question_id, "
                                                    "paraphrase_index, sample_index)"},
        question_set=questions.name, question_set_hash=questions.sha256, notes=spec.notes,
    ))
    if existing is None:
        store.add_conditions([ConditionRecord(
            run_id, c.spec, c.adapter, c.direction or c.steer, c.layer,
            c.strength if c.direction else c.coefficient if c.steer else None,
            {"kind": c.kind, "form": c.form, "engine": c.engine, "label": c.label,
             "served_model": models.served[c.spec].name}) for c in conditions])
        store.add_questions(run_id, questions)
    store.set_run_status(run_id, "running")
    _write_run_file(config, run_id, pid=os.getpid(), host=socket.gethostname(), started_at=time.time(),
                    store=str(store.path), status="running")

    planned = {item.key for item in items}
    done = store.sample_keys(run_id) & planned
    todo = [item for item in items if item.key not in done]
    judge = make_judge(choice, config, JudgeCache(config.cache / "judge_cache.sqlite"))
    run = _Invocation(spec, run_id, store, judge, choice.name, rubrics, len(items), judgements_total, progress)
    run.samples_stored = len(done)
    run.judgements_stored = _count_judgements(store, run_id, choice.name)
    run.report(message=f"resuming: {len(done)} of {len(items)} samples stored" if done else "starting")

    outcome, failure = "interrupted", None
    run.loop = _JudgeLoop()
    try:
        run.submit_judging(_unjudged(store, run_id, choice.name, rubrics))
        run.start_generation(models, todo)
        while run.busy:
            if cancel is not None and cancel.is_set():
                raise KeyboardInterrupt
            try:
                run.handle(run.events.get(timeout=0.2))
            except queue.Empty:
                pass
            if run.flush(force=not run.open_generation and not run.open_judge_batches):
                run.report()
        outcome = "failed" if run.failures else "finished"
    except (KeyboardInterrupt, ServerError, JudgeUnavailableError) as error:
        failure = error  # resumable as it is: 'interrupted'
    except BaseException as error:
        failure, outcome = error, "failed"
    finally:
        run.stop.set()
        run.loop.close(judge)
        run.loop = None  # what finishes now is stored, not judged; the resume judges it
        try:
            run.drain()
            run.flush(force=True)
            notes = run.notes(failure)
            if notes or spec.notes:
                store.sql("UPDATE runs SET notes = ? WHERE id = ?", [notes or spec.notes, run_id], write=True)
            store.set_run_status(run_id, outcome, finished=outcome == "finished")
        except (StoreError, KeyboardInterrupt):
            if failure is None:
                raise
        _write_run_file(config, run_id, pid=None, ended_at=time.time(), status=outcome)
    run.report(outcome, run.notes(failure))
    if isinstance(failure, KeyboardInterrupt):
        if cancel is None or not cancel.is_set():
            raise failure
    elif isinstance(failure, (EvalError, ServerError, StoreError)):
        raise failure
    elif isinstance(failure, JudgeError):
        raise EvalError(f"run {run_id!r} stopped by the judge: {failure}") from None
    elif failure is not None:
        raise EvalError(f"run {run_id!r} stopped: {type(failure).__name__}: {failure}") from failure
    return RunResult(run_id, outcome, len(items), run.generated, run.samples_stored, judgements_total, run.judged,
                     run.judgements_stored, tuple(f"{n} x {m}" for m, n in run.failures.items()),
                     time.monotonic() - run.started, choice.name)


# ---------------------------------------------------------------- the dashboard's side


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
    _write_run_file(config, spec.run_id, launcher_pid=process.pid, log=str(log_path))
    return RunHandle(spec.run_id, process.pid, str(log_path), store_path)


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
    elapsed = ((run.finished_at or _utcnow()) - run.created_at).total_seconds() if run.created_at else 0.0
    return Progress(run_id, status, int(counts[0]), int(planned.get("samples", counts[0])), int(counts[1]),
                    int(planned.get("judgements", counts[1])), 0, elapsed, run.notes)


def _utcnow():
    from datetime import datetime, timezone
    return datetime.now(timezone.utc).replace(tzinfo=None)
