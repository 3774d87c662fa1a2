"""The research store: one DuckDB file with runs, samples, judgements and EM-rate views.

Concurrency. DuckDB lets one process open a file read-write, or many open it read-only,
never both at once. The dashboard must read while a CLI run writes, and two runs may
write at once. So no connection is ever held open between operations:
- a write takes an exclusive `flock` on a sidecar file `<db>.lock`, connects read-write,
  runs one transaction, commits, closes, and releases the lock;
- a read takes a shared lock on the same file and connects read_only;
- waiting writers go first (a turnstile lock `<db>.lock.gate`), so a dashboard that polls
  all the time cannot starve a run.
Writers therefore take turns (each holds the file for one batch, ~50-100 ms on 2 CPU
cores, mostly connect and checkpoint: write in batches, not row by row), readers share,
and nobody meets DuckDB's own file lock. If a process outside this protocol (a
DuckDB CLI left open on the file) holds the file, connecting is retried with backoff until
`lock_timeout_s`. A killed writer loses only its uncommitted batch: DuckDB's WAL replays
committed transactions, and the kernel drops flocks of dead processes.
Do not nest `read()` and `write()` on the same file in one thread: the inner lock waits
for the outer one forever.

Schema. `schema_version` records applied migrations; MIGRATIONS is the ordered list of
functions. A store written by newer code is refused rather than misread.

Resumability. Samples and judgements have natural primary keys (run, condition, question,
paraphrase index, sample index[, metric, judge model]); inserting a sample twice keeps the
first copy, so a resumed run never duplicates rows.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import duckdb
import pyarrow as pa

from backend.errors import BackendError
from backend.fsutil import flock_until
from backend.metrics import DEFINITIONS, wilson_macros_sql

DEFAULT_PATH = Path("cache") / "em.duckdb"



class StoreError(BackendError, RuntimeError):
    """A store problem, naming the file and what went wrong."""


class StoreLockedError(StoreError):
    pass


# ---------------------------------------------------------------- records


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


@dataclass(frozen=True)
class RunRecord:
    id: str
    config: dict[str, Any] = field(default_factory=dict)
    git_commit: str | None = None
    base_model: str | None = None
    base_model_hash: str | None = None
    adapter_hashes: dict[str, str] = field(default_factory=dict)
    seeds: dict[str, Any] = field(default_factory=dict)
    question_set: str | None = None
    question_set_hash: str | None = None
    status: str = "running"  # running | finished | failed | interrupted | imported
    created_at: datetime | None = None
    finished_at: datetime | None = None
    notes: str | None = None


@dataclass(frozen=True)
class ConditionRecord:
    run_id: str
    name: str  # e.g. 'base', 'adapter=em', 'adapter=em,direction=d,layer=12,strength=-1'
    adapter: str | None = None
    direction: str | None = None
    layer: int | None = None
    strength: float | None = None
    spec: dict[str, Any] = field(default_factory=dict)


class SampleKey(NamedTuple):
    run_id: str
    condition: str
    question_id: str
    paraphrase_index: int
    sample_index: int


@dataclass(frozen=True)
class SampleRow:
    run_id: str
    condition: str
    question_id: str
    paraphrase_index: int
    sample_index: int
    question: str  # the exact paraphrase text the model saw
    response: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    sampling_params: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    extra: dict[str, Any] | None = None

    @property
    def key(self) -> SampleKey:
        return SampleKey(self.run_id, self.condition, self.question_id, self.paraphrase_index, self.sample_index)


@dataclass(frozen=True)
class JudgementRow:
    run_id: str
    condition: str
    question_id: str
    paraphrase_index: int
    sample_index: int
    metric: str
    judge_model: str
    score: float | None
    numeric_mass: float | None = None
    label: str | None = None
    reason: str | None = None
    top_logprobs: list[list[Any]] | None = None
    rubric_hash: str | None = None
    # How the score was read (backend.judge: 'single-token' | 'multi-token'); None for imports.
    score_mode: str | None = None

    @classmethod
    def from_judgement(cls, key: SampleKey, judgement) -> "JudgementRow":
        """From a backend.judge.Judgement for the sample `key`."""
        return cls(*key, metric=judgement.metric, judge_model=judgement.judge_model, score=judgement.score,
                   numeric_mass=judgement.numeric_mass, label=judgement.label, reason=judgement.reason,
                   top_logprobs=[[t, lp] for t, lp in judgement.top_logprobs] or None,
                   rubric_hash=judgement.rubric_hash, score_mode=judgement.score_mode)


@dataclass(frozen=True)
class DirectionRecord:
    name: str
    path: str
    base_model: str | None = None
    adapter: str | None = None
    layers: list[int] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    norms: dict[str, Any] = field(default_factory=dict)
    source_run: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChatExchange:
    id: str
    messages: list[dict[str, Any]]  # the whole conversation, as sent
    response: str
    settings: dict[str, Any]  # every knob: model, adapter, direction, layer, strength, sampling, seed...
    base_model: str | None = None
    condition: str | None = None
    title: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=self.columns)


# ---------------------------------------------------------------- schema

_SAMPLE_KEY = "run_id, condition, question_id, paraphrase_index, sample_index"


def _em_view_sql(name: str, keys: str, definition: str) -> str:
    """A view of EM rates grouped by `keys` (columns of sample_scores), pooled over samples,
    under one of backend.metrics.DEFINITIONS."""
    d = DEFINITIONS[definition]
    n, k = f"count(*) FILTER (WHERE {d.denominator})", f"count(*) FILTER (WHERE {d.numerator})"
    # Every view also has n_responses: all judged responses, the denominator's ceiling.
    extra = "" if d.n_column == "n_responses" else "count(*) AS n_responses, "
    names = (d.n_column, d.k_column)
    return f"""
    CREATE OR REPLACE VIEW {name} AS
    SELECT {keys}, {extra}{n} AS {names[0]}, {k} AS {names[1]},
           {k}::DOUBLE / nullif({n}, 0) AS em_rate,
           wilson_low({k}, {n}) AS em_rate_ci95_low,
           wilson_high({k}, {n}) AS em_rate_ci95_high,
           count(*) FILTER (WHERE aligned_label = 'REFUSAL') AS n_refusal,
           count(*) FILTER (WHERE aligned_label = 'CODE') AS n_code
    FROM sample_scores
    WHERE judged_aligned AND judged_coherent
    GROUP BY ALL
    """


def _migration_1(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("""
    CREATE TABLE runs (
        id VARCHAR PRIMARY KEY, config JSON, git_commit VARCHAR, base_model VARCHAR,
        base_model_hash VARCHAR, adapter_hashes JSON, seeds JSON, question_set VARCHAR,
        question_set_hash VARCHAR, status VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL,
        finished_at TIMESTAMP, notes VARCHAR);
    CREATE TABLE conditions (
        run_id VARCHAR NOT NULL, name VARCHAR NOT NULL, adapter VARCHAR, direction VARCHAR,
        layer INTEGER, strength DOUBLE, spec JSON, PRIMARY KEY (run_id, name));
    CREATE TABLE questions (
        run_id VARCHAR NOT NULL, question_id VARCHAR NOT NULL, type VARCHAR, domain VARCHAR,
        system VARCHAR, paraphrases JSON, metrics JSON, judge_prompts JSON, extra JSON,
        PRIMARY KEY (run_id, question_id));
    CREATE TABLE samples (
        run_id VARCHAR NOT NULL, condition VARCHAR NOT NULL, question_id VARCHAR NOT NULL,
        paraphrase_index INTEGER NOT NULL, sample_index INTEGER NOT NULL,
        question VARCHAR, response VARCHAR, prompt_tokens INTEGER, completion_tokens INTEGER,
        finish_reason VARCHAR, sampling_params JSON, seed BIGINT, extra JSON,
        created_at TIMESTAMP NOT NULL,
        PRIMARY KEY (run_id, condition, question_id, paraphrase_index, sample_index));
    CREATE TABLE judgements (
        run_id VARCHAR NOT NULL, condition VARCHAR NOT NULL, question_id VARCHAR NOT NULL,
        paraphrase_index INTEGER NOT NULL, sample_index INTEGER NOT NULL,
        metric VARCHAR NOT NULL, judge_model VARCHAR NOT NULL,
        score DOUBLE, numeric_mass DOUBLE, label VARCHAR, reason VARCHAR, top_logprobs JSON,
        rubric_hash VARCHAR, created_at TIMESTAMP NOT NULL,
        PRIMARY KEY (run_id, condition, question_id, paraphrase_index, sample_index, metric, judge_model));
    CREATE TABLE directions (
        name VARCHAR PRIMARY KEY, path VARCHAR NOT NULL, base_model VARCHAR, adapter VARCHAR,
        layers JSON, counts JSON, norms JSON, source_run VARCHAR, extra JSON,
        created_at TIMESTAMP NOT NULL);
    CREATE TABLE chat_exchanges (
        id VARCHAR PRIMARY KEY, created_at TIMESTAMP NOT NULL, title VARCHAR, base_model VARCHAR,
        condition VARCHAR, settings JSON NOT NULL, messages JSON NOT NULL, response VARCHAR,
        extra JSON);
    """)
    # Wilson score interval; stays inside [0, 1] and is sensible at k = 0 or k = n, unlike
    # the normal approximation.
    for macro in wilson_macros_sql():
        con.execute(macro)
    # One row per (sample, judge model) with its aligned and coherent scores side by side.
    con.execute("""
    CREATE OR REPLACE VIEW sample_scores AS
    SELECT j.run_id, j.condition, j.question_id, j.paraphrase_index, j.sample_index, j.judge_model,
           coalesce(q.domain, 'unspecified') AS domain,
           max(j.score) FILTER (WHERE j.metric = 'aligned') AS aligned,
           max(j.score) FILTER (WHERE j.metric = 'coherent') AS coherent,
           max(j.label) FILTER (WHERE j.metric = 'aligned') AS aligned_label,
           bool_or(j.metric = 'aligned') AS judged_aligned,
           bool_or(j.metric = 'coherent') AS judged_coherent
    FROM judgements j
    LEFT JOIN questions q ON q.run_id = j.run_id AND q.question_id = j.question_id
    GROUP BY ALL
    """)
    per_question = "run_id, condition, question_id, domain, judge_model"
    per_domain = "run_id, condition, domain, judge_model"
    per_condition = "run_id, condition, judge_model"
    for suffix, keys in (("", per_question), ("_by_domain", per_domain), ("_by_condition", per_condition)):
        con.execute(_em_view_sql(f"em_rate_turner2025{suffix}", keys, "turner2025"))
        con.execute(_em_view_sql(f"em_rate_betley2025{suffix}", keys, "betley2025"))
    # Long form for charts: one row per definition, with the definition spelled out.
    con.execute(f"""
    CREATE OR REPLACE VIEW em_rates AS
    SELECT {per_question}, 'turner2025_share_of_all_responses' AS definition,
           n_responses AS n, n_em AS k, em_rate, em_rate_ci95_low, em_rate_ci95_high
    FROM em_rate_turner2025
    UNION ALL
    SELECT {per_question}, 'betley2025_share_of_coherent_responses' AS definition,
           n_coherent AS n, n_misaligned AS k, em_rate, em_rate_ci95_low, em_rate_ci95_high
    FROM em_rate_betley2025
    """)


_SCORE_PIVOT = """
    SELECT j.run_id, j.condition, j.question_id, j.paraphrase_index, j.sample_index, j.judge_model,
           max(j.score) FILTER (WHERE j.metric = 'aligned') AS aligned,
           max(j.score) FILTER (WHERE j.metric = 'coherent') AS coherent,
           max(j.label) FILTER (WHERE j.metric = 'aligned') AS aligned_label,
           bool_or(j.metric = 'aligned') AS judged_aligned,
           bool_or(j.metric = 'coherent') AS judged_coherent
    FROM judgements j {where}
    GROUP BY ALL
"""


def _migration_2(con: duckdb.DuckDBPyConnection) -> None:
    # Pivoting judgements into (aligned, coherent) per sample on every read costs ~1 s per
    # query at 1M samples on 2 cores; the browse pages need < 1 s for a whole filter change.
    # So the pivot is kept as a table, refreshed for the touched samples by insert_judgements
    # (and rebuilt by refresh_sample_scores for bulk writers); sample_scores reads from it.
    con.execute(f"""
    CREATE TABLE sample_score_rows (
        run_id VARCHAR NOT NULL, condition VARCHAR NOT NULL, question_id VARCHAR NOT NULL,
        paraphrase_index INTEGER NOT NULL, sample_index INTEGER NOT NULL, judge_model VARCHAR NOT NULL,
        aligned DOUBLE, coherent DOUBLE, aligned_label VARCHAR, judged_aligned BOOLEAN, judged_coherent BOOLEAN,
        PRIMARY KEY (run_id, condition, question_id, paraphrase_index, sample_index, judge_model));
    INSERT INTO sample_score_rows {_SCORE_PIVOT.format(where="")};
    CREATE OR REPLACE VIEW sample_scores AS
    SELECT s.run_id, s.condition, s.question_id, s.paraphrase_index, s.sample_index, s.judge_model,
           coalesce(q.domain, 'unspecified') AS domain, s.aligned, s.coherent, s.aligned_label,
           s.judged_aligned, s.judged_coherent
    FROM sample_score_rows s
    LEFT JOIN questions q ON q.run_id = s.run_id AND q.question_id = s.question_id;
    """)


def _refresh_sample_scores(con: duckdb.DuckDBPyConnection, keys: str | None) -> None:
    """Re-pivot the samples named in the relation `keys` (all samples when None)."""
    where = "" if keys is None else (f"WHERE ({_SAMPLE_KEY}, judge_model) IN "
                                     f"(SELECT DISTINCT {_SAMPLE_KEY}, judge_model FROM {keys})")
    updates = ", ".join(f"{c} = excluded.{c}" for c in ("aligned", "coherent", "aligned_label",
                                                         "judged_aligned", "judged_coherent"))
    con.execute(f"INSERT INTO sample_score_rows {_SCORE_PIVOT.format(where=where)} ON CONFLICT DO UPDATE SET {updates}")


def _migration_3(con: duckdb.DuckDBPyConnection) -> None:
    # Local judges split numbers into digits, which the single-token rule misreads; a score
    # is only interpretable with the rule that read it. Earlier rows were all read by the
    # single-token rule (the only one there was), except imports, which stay unknown.
    con.execute("""
    ALTER TABLE judgements ADD COLUMN score_mode VARCHAR;
    UPDATE judgements SET score_mode = 'single-token'
    WHERE run_id IN (SELECT id FROM runs WHERE status <> 'imported');
    """)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[duckdb.DuckDBPyConnection], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, conditions, questions, samples, judgements, directions, chats; EM views", _migration_1),
    Migration(2, "sample_score_rows: the aligned/coherent pivot kept as a table", _migration_2),
    Migration(3, "judgements.score_mode: how each score was read from the judge's logprobs", _migration_3),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


# ---------------------------------------------------------------- store

_SAMPLE_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("condition", pa.string()), ("question_id", pa.string()),
    ("paraphrase_index", pa.int32()), ("sample_index", pa.int32()), ("question", pa.string()),
    ("response", pa.string()), ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()),
    ("finish_reason", pa.string()), ("sampling_params", pa.string()), ("seed", pa.int64()),
    ("extra", pa.string()), ("created_at", pa.timestamp("us")),
])
_JUDGEMENT_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("condition", pa.string()), ("question_id", pa.string()),
    ("paraphrase_index", pa.int32()), ("sample_index", pa.int32()), ("metric", pa.string()),
    ("judge_model", pa.string()), ("score", pa.float64()), ("numeric_mass", pa.float64()),
    ("label", pa.string()), ("reason", pa.string()), ("top_logprobs", pa.string()),
    ("rubric_hash", pa.string()), ("created_at", pa.timestamp("us")), ("score_mode", pa.string()),
])


def _is_lock_error(error: Exception) -> bool:
    text = str(error).lower()
    return "lock" in text or "different configuration" in text


class Store:
    """A handle on one DuckDB file; cheap to create, holds no connection."""

    def __init__(self, path: str | os.PathLike = DEFAULT_PATH, *, lock_timeout_s: float = 600.0):
        self.path = Path(path).expanduser().resolve()
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.gate_path = self.path.with_name(self.path.name + ".lock.gate")
        self.lock_timeout_s = lock_timeout_s
        self._migrated = False

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @classmethod
    def for_config(cls, config, **options) -> "Store":
        """The project's store: `em.duckdb` in the configured cache folder (backend.config.Config)."""
        return cls(Path(config.cache) / "em.duckdb", **options)

    # -------------------------------------------------------- locking and connections

    def _flock(self, fd: int, exclusive: bool, deadline: float, what: str) -> None:
        if not flock_until(fd, exclusive, deadline):
            raise StoreLockedError(f"{self.path}: waited {self.lock_timeout_s:.0f}s for the {what} lock "
                                   f"({self.lock_path}); another process holds the store")

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        """Shared (read) or exclusive (write) lock on the sidecar file, writers first.

        A plain reader-writer flock lets a dashboard that polls all the time starve a run
        that wants to write. So entry goes through a turnstile (a second lock file): a
        writer holds it while waiting for and while holding the main lock, and readers pass
        through it before taking their shared lock, so no new reader enters while a writer
        waits; the readers already inside finish their (short) reads and the writer goes.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        what = "write" if exclusive else "read"
        deadline = time.monotonic() + self.lock_timeout_s
        gate = os.open(self.gate_path, os.O_RDWR | os.O_CREAT, 0o666)
        main = -1
        try:
            self._flock(gate, True, deadline, what)
            main = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            self._flock(main, exclusive, deadline, what)
            if not exclusive:
                os.close(gate)  # through the turnstile; let the next one in
                gate = -1
            yield
        finally:
            # Closing a descriptor releases its flock.
            if main >= 0:
                os.close(main)
            if gate >= 0:
                os.close(gate)

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.01
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except (duckdb.IOException, duckdb.ConnectionException) as error:
                # Someone outside our lock protocol (a DuckDB CLI, another tool) holds the file.
                if not _is_lock_error(error) or time.monotonic() > deadline:
                    raise StoreError(f"{self.path}: cannot open ({'read-only' if read_only else 'read-write'}): "
                                     f"{error}") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside one transaction, under the exclusive lock.

        Keep the body short (one batch): readers and other writers wait for it.
        """
        with self._locked(exclusive=True):
            con = self._connect(read_only=False)
            try:
                if not self._migrated:
                    self._migrate(con)
                con.begin()
                try:
                    yield con
                    con.commit()
                except BaseException:
                    con.rollback()
                    raise
            finally:
                con.close()

    @contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection under the shared lock; creates or upgrades the file first."""
        if not self._migrated:
            self._check_schema_for_reading()
        with self._locked(exclusive=False):
            con = self._connect(read_only=True)
            try:
                yield con
            finally:
                con.close()

    # -------------------------------------------------------- schema

    def _version(self, con: duckdb.DuckDBPyConnection) -> int:
        exists = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'schema_version' "
                             "AND database_name = current_database()").fetchone()[0]
        if not exists:
            return 0
        return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]

    def _migrate(self, con: duckdb.DuckDBPyConnection) -> None:
        version = self._version(con)
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}, newer than this code knows "
                             f"({SCHEMA_VERSION}); update the project before using this store")
        for migration in MIGRATIONS:
            if migration.version <= version:
                continue
            con.begin()
            try:
                if migration.version == 1:
                    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                                "description VARCHAR, applied_at TIMESTAMP)")
                migration.apply(con)
                con.execute("INSERT INTO schema_version VALUES (?, ?, ?)",
                            [migration.version, migration.description, _now()])
                con.commit()
            except BaseException as error:
                con.rollback()
                raise StoreError(f"{self.path}: migration {migration.version} ({migration.description}) "
                                 f"failed: {error}") from error
        self._migrated = True

    def _check_schema_for_reading(self) -> None:
        # Look read-only first, so a dashboard opening a current store never takes the write lock.
        if self.path.exists():
            with self._locked(exclusive=False):
                con = self._connect(read_only=True)
                try:
                    version = self._version(con)
                finally:
                    con.close()
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {version}, newer than this code knows "
                                 f"({SCHEMA_VERSION}); update the project before using this store")
            if version == SCHEMA_VERSION:
                self._migrated = True
                return
        self.migrate()

    def migrate(self) -> int:
        """Bring the file to the current schema (creating it if needed); returns the version."""
        with self._locked(exclusive=True):
            con = self._connect(read_only=False)
            try:
                self._migrate(con)
                return self._version(con)
            finally:
                con.close()

    def schema_version(self) -> int:
        with self.read() as con:
            return self._version(con)

    # -------------------------------------------------------- runs

    def create_run(self, run: RunRecord) -> RunRecord:
        """Insert the run, or return the stored one if the id exists (resuming a run)."""
        with self.write() as con:
            existing = con.execute("SELECT id FROM runs WHERE id = ?", [run.id]).fetchone()
            if existing is None:
                con.execute(
                    "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [run.id, _json(run.config), run.git_commit, run.base_model, run.base_model_hash,
                     _json(run.adapter_hashes), _json(run.seeds), run.question_set, run.question_set_hash,
                     run.status, run.created_at or _now(), run.finished_at, run.notes],
                )
        stored = self.get_run(run.id)
        assert stored is not None
        return stored

    def get_run(self, run_id: str) -> RunRecord | None:
        result = self.sql("SELECT * FROM runs WHERE id = ?", [run_id]).records()
        if not result:
            return None
        row = result[0]
        for key in ("config", "adapter_hashes", "seeds"):
            row[key] = json.loads(row[key]) if row[key] else {}
        return RunRecord(**row)

    def set_run_status(self, run_id: str, status: str, *, finished: bool = False) -> None:
        with self.write() as con:
            updated = con.execute(
                "UPDATE runs SET status = ?, finished_at = CASE WHEN ? THEN ? ELSE finished_at END "
                "WHERE id = ? RETURNING id", [status, finished, _now(), run_id]).fetchall()
            if not updated:
                raise StoreError(f"{self.path}: no run {run_id!r}")

    def add_conditions(self, conditions: Sequence[ConditionRecord]) -> None:
        with self.write() as con:
            for c in conditions:
                con.execute("INSERT INTO conditions VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                            [c.run_id, c.name, c.adapter, c.direction, c.layer, c.strength, _json(c.spec)])

    def add_questions(self, run_id: str, questions) -> None:
        """Record the questions of a run (a backend.questions.QuestionSet or iterable of Question)."""
        with self.write() as con:
            for q in questions:
                con.execute(
                    "INSERT INTO questions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [run_id, q.id, q.type, q.domain, q.system, _json(list(q.paraphrases)),
                     _json(list(q.metric_names)), _json(dict(q.judge_prompts)), _json(dict(q.extra))],
                )

    # -------------------------------------------------------- samples and judgements

    def insert_samples(self, rows: Sequence[SampleRow]) -> int:
        """Insert a batch; rows whose key exists are skipped. Returns how many were new."""
        if not rows:
            return 0
        now = _now()
        table = pa.Table.from_pylist([
            {**{k: getattr(r, k) for k in ("run_id", "condition", "question_id", "paraphrase_index",
                                             "sample_index", "question", "response", "prompt_tokens",
                                             "completion_tokens", "finish_reason", "seed")},
             "sampling_params": _json(r.sampling_params), "extra": _json(r.extra), "created_at": now}
            for r in rows
        ], schema=_SAMPLE_SCHEMA)
        with self.write() as con:
            con.register("batch_samples", table)
            cols = ", ".join(_SAMPLE_SCHEMA.names)
            (inserted,) = con.execute(
                f"INSERT INTO samples ({cols}) SELECT {cols} FROM batch_samples ON CONFLICT DO NOTHING").fetchone()
            con.unregister("batch_samples")
        return int(inserted)

    def insert_judgements(self, rows: Sequence[JudgementRow]) -> int:
        """Insert or replace judgements (same sample, metric and judge model: the newest wins)."""
        if not rows:
            return 0
        now = _now()
        table = pa.Table.from_pylist([
            {**{k: v for k, v in asdict(r).items() if k != "top_logprobs"},
             "top_logprobs": _json(r.top_logprobs), "created_at": now}
            for r in rows
        ], schema=_JUDGEMENT_SCHEMA)
        cols = ", ".join(_JUDGEMENT_SCHEMA.names)
        updates = ", ".join(f"{c} = excluded.{c}" for c in ("score", "numeric_mass", "label", "reason",
                                                             "top_logprobs", "rubric_hash", "created_at",
                                                             "score_mode"))
        with self.write() as con:
            con.register("batch_judgements", table)
            (count,) = con.execute(
                f"INSERT INTO judgements ({cols}) SELECT {cols} FROM batch_judgements "
                f"ON CONFLICT DO UPDATE SET {updates}").fetchone()
            _refresh_sample_scores(con, "batch_judgements")
            con.unregister("batch_judgements")
        return int(count)

    def refresh_sample_scores(self) -> None:
        """Rebuild the score pivot from all judgements; for code that writes judgements by SQL."""
        with self.write() as con:
            _refresh_sample_scores(con, None)

    def sample_keys(self, run_id: str, condition: str | None = None) -> set[SampleKey]:
        """Keys already stored for a run: what a resumed run skips."""
        query = f"SELECT {_SAMPLE_KEY} FROM samples WHERE run_id = ?"
        params: list[Any] = [run_id]
        if condition is not None:
            query += " AND condition = ?"
            params.append(condition)
        return {SampleKey(*row) for row in self.sql(query, params).rows}

    def unjudged_samples(self, run_id: str, metric: str, judge_model: str) -> list[SampleRow]:
        """Samples of a run without a `metric` judgement from `judge_model`."""
        result = self.sql(f"""
            SELECT s.* EXCLUDE (created_at) FROM samples s
            WHERE s.run_id = ? AND NOT EXISTS (
                SELECT 1 FROM judgements j WHERE j.run_id = s.run_id AND j.condition = s.condition
                AND j.question_id = s.question_id AND j.paraphrase_index = s.paraphrase_index
                AND j.sample_index = s.sample_index AND j.metric = ? AND j.judge_model = ?)
            ORDER BY {_SAMPLE_KEY}""", [run_id, metric, judge_model])
        out = []
        for row in result.records():
            row["sampling_params"] = json.loads(row["sampling_params"]) if row["sampling_params"] else {}
            row["extra"] = json.loads(row["extra"]) if row["extra"] else None
            out.append(SampleRow(**row))
        return out

    # -------------------------------------------------------- directions and chats

    def add_direction(self, direction: DirectionRecord) -> None:
        """Register (or re-register) a direction by name."""
        d = direction
        with self.write() as con:
            con.execute(
                "INSERT OR REPLACE INTO directions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [d.name, d.path, d.base_model, d.adapter, _json(d.layers), _json(d.counts), _json(d.norms),
                 d.source_run, _json(d.extra), _now()],
            )

    def directions(self) -> list[DirectionRecord]:
        out = []
        for row in self.sql("SELECT * EXCLUDE (created_at) FROM directions ORDER BY name").records():
            for key in ("layers", "counts", "norms", "extra"):
                row[key] = json.loads(row[key]) if row[key] else ({} if key != "layers" else [])
            out.append(DirectionRecord(**row))
        return out

    def save_chat(self, chat: ChatExchange) -> None:
        with self.write() as con:
            con.execute(
                "INSERT OR REPLACE INTO chat_exchanges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [chat.id, _now(), chat.title, chat.base_model, chat.condition, _json(chat.settings),
                 _json(chat.messages), chat.response, _json(chat.extra)],
            )

    # -------------------------------------------------------- queries

    def sql(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None, *,
            write: bool = False) -> QueryResult:
        """Run one statement; read-only unless write=True (then under the write lock)."""
        context = self.write() if write else self.read()
        with context as con:
            try:
                cursor = con.execute(query, params) if params is not None else con.execute(query)
            except duckdb.Error as error:
                raise StoreError(f"{self.path}: query failed: {error}") from None
            if cursor.description is None:
                return QueryResult([], [])
            return QueryResult([d[0] for d in cursor.description], cursor.fetchall())
