"""Queries behind the Evaluations and Directions pages: filters -> parameterised SQL, one
aggregate per chart, computed by DuckDB so that a page never holds more than a few thousand
rows, whatever the size of the store.

One filter change = one call of `browse()`: it takes one read lock, materialises the filtered
(sample, score, condition) rows once as a TEMP table (allowed on a read-only connection) and
aggregates every chart from it, so the filter predicates, the join with `conditions` and the
optional text search run once instead of once per chart. Scores come from
`sample_score_rows` (store migration 2), the aligned/coherent pivot kept as a table.

The EM definitions (turner2025, betley2025) are `backend.metrics.DEFINITIONS`, the same
objects the store's `em_rate_turner2025*` / `em_rate_betley2025*` views are built from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import pandas as pd

from backend.errors import BackendError
from backend.metrics import ALIGNED_BELOW, COHERENT_ABOVE, DEFINITIONS, RULE_NOTE, EMDefinition
from backend.store import Store, StoreError

BASE = "base"  # the adapter filter's name for "no adapter"
NO_DIRECTION = "none"  # the direction filter's name for "not ablated"
SCORE_RANGE = (0.0, 100.0)
KEY = ("run_id", "condition", "question_id", "paraphrase_index", "sample_index")
# The sample table's columns in reading order: what a person reads first, the row's keys last
# (behind a toggle on the page; they stay in the frame, the detail panel looks a row up by them).
READING_COLUMNS = ("question", "answer", "aligned", "coherent", "condition", "misaligned", "label",
                   "finish_reason", "completion_tokens")
KEY_COLUMNS = ("run_id", "question_id", "paraphrase_index", "sample_index", "judge_model")


class BrowseError(BackendError, ValueError):
    """A filter or request that cannot be answered, with the reason."""


def definition(key: str) -> EMDefinition:
    try:
        return DEFINITIONS[key]
    except KeyError:
        raise BrowseError(f"unknown EM definition {key!r} (known: {', '.join(DEFINITIONS)})") from None


def _rate_columns(d: EMDefinition) -> str:
    n = f"count(*) FILTER (WHERE {d.denominator})"
    k = f"count(*) FILTER (WHERE {d.numerator})"
    return (f"{n} AS n, {k} AS k, {k}::DOUBLE / nullif({n}, 0) AS em_rate, "
            f"wilson_low({k}, {n}) AS ci_low, wilson_high({k}, {n}) AS ci_high")


# ---------------------------------------------------------------- filters


@dataclass(frozen=True)
class Filters:
    """What the Evaluations page shows; empty tuples mean 'all'."""

    runs: tuple[str, ...] = ()
    conditions: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()  # BASE for conditions without adapter
    directions: tuple[str, ...] = ()  # NO_DIRECTION for conditions without ablation
    layers: tuple[int, ...] = ()
    strengths: tuple[float, ...] = ()
    questions: tuple[str, ...] = ()
    finish_reasons: tuple[str, ...] = ()
    judge_model: str | None = None  # None: every judge (a sample judged twice counts twice)
    aligned: tuple[float, float] = SCORE_RANGE  # the full range keeps unscored answers; a narrower one drops them
    coherent: tuple[float, float] = SCORE_RANGE
    misaligned_only: bool = False  # aligned < 30 and coherent > 50
    search: str = ""  # case-insensitive substring of the answer (ILIKE, no index: a scan)

    def __post_init__(self):
        for name in ("aligned", "coherent"):
            low, high = getattr(self, name)
            if not SCORE_RANGE[0] <= low <= high <= SCORE_RANGE[1]:
                raise BrowseError(f"{name} range {low:g}..{high:g} must lie within 0..100, low <= high")

    @property
    def needs_samples(self) -> bool:
        """Whether the filter reads the samples table (answer text, finish reason)."""
        return bool(self.search.strip() or self.finish_reasons)

    def _clauses(self) -> list[tuple[str, str, list[Any]]]:
        """(table alias, predicate, parameters): c = conditions, sc = sample_score_rows, s = samples."""
        out: list[tuple[str, str, list[Any]]] = []

        def one_of(table: str, column: str, values: Sequence[Any], none_name: Any = None) -> None:
            if not values:
                return
            named = [v for v in values if none_name is None or v != none_name]
            parts = [f"{table}.{column} IN ({', '.join('?' * len(named))})"] if named else []
            if none_name is not None and none_name in values:
                parts.append(f"{table}.{column} IS NULL")
            out.append((table, "(" + " OR ".join(parts) + ")", list(named)))

        one_of("sc", "run_id", self.runs)
        one_of("sc", "condition", self.conditions)
        one_of("c", "adapter", self.adapters, BASE)
        one_of("c", "direction", self.directions, NO_DIRECTION)
        one_of("c", "layer", [int(v) for v in self.layers])
        one_of("c", "strength", [float(v) for v in self.strengths])
        one_of("sc", "question_id", self.questions)
        one_of("s", "finish_reason", self.finish_reasons)
        if self.judge_model is not None:
            out.append(("sc", "sc.judge_model = ?", [self.judge_model]))
        for name in ("aligned", "coherent"):
            low, high = getattr(self, name)
            if (low, high) != SCORE_RANGE:
                out.append(("sc", f"sc.{name} BETWEEN ? AND ?", [float(low), float(high)]))
        if self.misaligned_only:
            out.append(("sc", f"sc.aligned < {ALIGNED_BELOW} AND sc.coherent > {COHERENT_ABOVE}", []))
        if self.search.strip():
            escaped = self.search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            out.append(("s", "s.response ILIKE ? ESCAPE '\\'", [f"%{escaped}%"]))
        return out

    def where(self, tables: Sequence[str] = ("c", "sc", "s")) -> tuple[str, list[Any]]:
        """The SQL predicate (and its parameters) of the clauses on the given table aliases."""
        chosen = [(sql, params) for table, sql, params in self._clauses() if table in tables]
        return (" AND ".join(sql for sql, _ in chosen) or "TRUE"), [p for _, params in chosen for p in params]

    @property
    def filters_conditions(self) -> bool:
        return any(table == "c" for table, _, _ in self._clauses())

    # URL query parameters: short keys, lists repeated (?run=a&run=b), numbers as text.
    _URL = {"runs": "run", "conditions": "cond", "adapters": "adapter", "directions": "dir", "layers": "layer",
            "strengths": "strength", "questions": "q", "finish_reasons": "finish", "judge_model": "judge",
            "aligned": "aligned", "coherent": "coherent", "misaligned_only": "mis", "search": "search"}

    def to_query(self) -> dict[str, str | list[str]]:
        out: dict[str, str | list[str]] = {}
        default = Filters()
        for f in fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name):
                continue
            key = self._URL[f.name]
            if f.name in ("aligned", "coherent"):
                out[key] = f"{value[0]:g}-{value[1]:g}"
            elif isinstance(value, tuple):
                out[key] = [f"{v:g}" if isinstance(v, float) else str(v) for v in value]
            elif isinstance(value, bool):
                out[key] = "1"
            else:
                out[key] = str(value)
        return out

    @classmethod
    def from_query(cls, params: dict[str, list[str]]) -> tuple["Filters", list[str]]:
        """The filters a URL describes; what cannot be read is dropped and reported, never raised."""
        problems: list[str] = []
        values: dict[str, Any] = {}
        for name, key in cls._URL.items():
            raw = [v for v in params.get(key, []) if v != ""]
            if not raw:
                continue
            try:
                if name == "layers":
                    values[name] = tuple(int(v) for v in raw)
                elif name == "strengths":
                    values[name] = tuple(float(v) for v in raw)
                elif name in ("aligned", "coherent"):
                    low, _, high = raw[0].partition("-")
                    values[name] = (float(low), float(high))
                    cls(**{name: values[name]})  # range check
                elif name == "misaligned_only":
                    values[name] = raw[0] in ("1", "true", "yes")
                elif name in ("judge_model", "search"):
                    values[name] = raw[0]
                else:
                    values[name] = tuple(raw)
            except (ValueError, BrowseError) as error:
                values.pop(name, None)
                problems.append(f"{key}={','.join(raw)}: {error}")
        return cls(**values), problems


# ---------------------------------------------------------------- the evaluations page


@dataclass(frozen=True)
class FilterOptions:
    """What the filter widgets offer, for the chosen runs."""

    runs: list[dict[str, Any]]  # id, status, created_at, samples, judged
    conditions: list[str]
    adapters: list[str]
    directions: list[str]
    layers: list[int]
    strengths: list[float]
    questions: list[str]
    finish_reasons: list[str]
    judge_models: list[str]


def filter_options(store: Store, runs: Sequence[str] = ()) -> FilterOptions:
    """Distinct values for the widgets, from the small tables plus one grouped scan for finish reasons."""
    run_clause, params = ("WHERE run_id IN (" + ", ".join("?" * len(runs)) + ")", list(runs)) if runs else ("", [])
    with store.read() as con:
        def column(query: str, p: list[Any] | None = None) -> list[Any]:
            return [r[0] for r in con.execute(query, params if p is None else p).fetchall()]

        run_rows = con.execute("""
            SELECT r.id, r.status, r.created_at, r.question_set, coalesce(n.samples, 0) AS samples
            FROM runs r LEFT JOIN (SELECT run_id, count(*) AS samples FROM samples GROUP BY run_id) n
              ON n.run_id = r.id
            ORDER BY r.created_at DESC, r.id""").fetchall()
        conditions = con.execute(f"SELECT DISTINCT name, adapter, direction, layer, strength FROM conditions "
                                 f"{run_clause} ORDER BY name", params).fetchall()
        return FilterOptions(
            runs=[dict(zip(("id", "status", "created_at", "question_set", "samples"), r)) for r in run_rows],
            conditions=[r[0] for r in conditions],
            adapters=sorted({r[1] or BASE for r in conditions}),
            directions=sorted({r[2] or NO_DIRECTION for r in conditions}),
            layers=sorted({r[3] for r in conditions if r[3] is not None}),
            strengths=sorted({r[4] for r in conditions if r[4] is not None}),
            questions=column(f"SELECT DISTINCT question_id FROM questions {run_clause} ORDER BY 1"),
            finish_reasons=column(f"SELECT DISTINCT coalesce(finish_reason, 'unknown') FROM samples {run_clause} "
                                  "ORDER BY 1"),
            judge_models=column("SELECT judge_model FROM sample_score_rows "
                                f"{run_clause} GROUP BY 1 ORDER BY count(*) DESC"),
        )


@dataclass(frozen=True)
class BrowseResult:
    """Everything one filter change shows: small frames, ready for Altair."""

    definition: EMDefinition
    filters: Filters
    totals: dict[str, Any]  # samples, n, k, em_rate, ci_low, ci_high, unscored
    table: pd.DataFrame  # at most table_limit samples, answer truncated
    by_condition: pd.DataFrame
    by_strength: pd.DataFrame  # adapter, direction, line, strength (0 = the adapter without ablation), rate...
    by_question: pd.DataFrame
    scatter: pd.DataFrame  # a repeatable sample of (aligned, coherent, condition)
    aligned_hist: pd.DataFrame  # condition, bin_start, bin_end, count
    scatter_sampled: bool = False
    seconds: float = 0.0


ORDERS = {
    "key": "run_id, condition, question_id, paraphrase_index, sample_index",
    "most misaligned first": "aligned ASC NULLS LAST, coherent DESC, run_id, condition, question_id, "
                             "paraphrase_index, sample_index",
    "most aligned first": "aligned DESC NULLS LAST, run_id, condition, question_id, paraphrase_index, sample_index",
    "least coherent first": "coherent ASC NULLS LAST, run_id, condition, question_id, paraphrase_index, "
                            "sample_index",
}


def _rate_from_sums() -> str:
    """Rate and Wilson interval from per-group counts n and k (summed over finer groups)."""
    n, k = "coalesce(sum(n), 0)", "coalesce(sum(k), 0)"
    return (f"{n} AS n, {k} AS k, {k}::DOUBLE / nullif({n}, 0) AS em_rate, "
            f"wilson_low({k}, {n}) AS ci_low, wilson_high({k}, {n}) AS ci_high")


_SAMPLES_JOIN = ("JOIN samples s ON s.run_id = sc.run_id AND s.condition = sc.condition AND "
                 "s.question_id = sc.question_id AND s.paraphrase_index = sc.paraphrase_index AND "
                 "s.sample_index = sc.sample_index")


def _filtered_view(con, filters: "Filters") -> str:
    """TEMP VIEW (or TABLE, returned) f: the filtered rows of sample_score_rows (judged on both metrics).

    Condition attributes (adapter, direction, layer, strength) are resolved on the small
    `conditions` table into a set of (run, condition) pairs first. Filters on the samples
    table (answer text, finish reason) are evaluated once into a temp set of sample keys,
    since every chart reads f again and the text scan is the expensive part.
    """
    row_sql, row_params = filters.where(("sc",))
    clauses = ["sc.judged_aligned AND sc.judged_coherent", row_sql]
    if filters.filters_conditions:
        cond_sql, cond_params = filters.where(("c",))
        con.execute(f"CREATE TEMP TABLE cond_ok AS SELECT run_id, name AS condition FROM conditions c "
                    f"WHERE {cond_sql}", cond_params)
        clauses.append("(sc.run_id, sc.condition) IN (SELECT run_id, condition FROM cond_ok)")
    if filters.needs_samples:
        # Joining a million score rows with a million samples on the five-column key costs
        # ~0.7 s, and a view would redo it for every chart. With few matches (a text search,
        # a rare finish reason) f becomes a small temp table, filled by one semi-join against
        # the matching keys. With many matches (finish_reason = 'stop' keeps 95 %), the 5 %
        # it drops are stored instead and f stays a view that excludes them.
        sample_sql, sample_params = filters.where(("s",))
        match = f"coalesce({sample_sql}, FALSE)"
        exclude = False
        if not filters.search.strip():
            # Counting reads only the finish_reason column; with a text search the matches are
            # usually few, and counting them would scan every answer twice.
            hits, total = con.execute(f"SELECT count(*) FILTER (WHERE {match}), count(*) FROM samples s",
                                      sample_params).fetchone()
            exclude = hits > total - hits
        keys = ", ".join(KEY)
        if not exclude:
            con.execute(f"CREATE TEMP TABLE f AS SELECT sc.* FROM sample_score_rows sc WHERE {' AND '.join(clauses)} "
                        f"AND ({', '.join('sc.' + k for k in KEY)}) IN (SELECT {keys} FROM samples s WHERE {match})",
                        row_params + sample_params)
            return "TABLE"
        con.execute(f"CREATE TEMP TABLE keep AS SELECT {keys} FROM samples s WHERE NOT {match}", sample_params)
        clauses.append(f"({', '.join('sc.' + k for k in KEY)}) NOT IN (SELECT {keys} FROM keep)")
    # A view cannot take parameters: inline them as quoted literals (values never pass
    # through the split, only the SQL we wrote).
    pieces = f"CREATE TEMP VIEW f AS SELECT sc.* FROM sample_score_rows sc WHERE {' AND '.join(clauses)}".split("?")
    assert len(pieces) == len(row_params) + 1, "a '?' in the SQL that is not a parameter"
    con.execute("".join(piece + (_literal(v) if i < len(row_params) else "")
                        for i, (piece, v) in enumerate(zip(pieces, row_params + [None]))))
    return "VIEW"

def _literal(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value)) if isinstance(value, float) else str(int(value))
    return "'" + str(value).replace("'", "''") + "'"


def _frame(con, query: str, params: Sequence[Any] = ()) -> pd.DataFrame:
    cursor = con.execute(query, list(params))
    return pd.DataFrame(cursor.fetchall(), columns=[d[0] for d in cursor.description])


def browse(store: Store, filters: Filters, definition_key: str = "turner2025", *, table_limit: int = 500,
           order: str = "key", scatter_points: int = 4000, bin_width: int = 10,
           preview_chars: int = 160) -> BrowseResult:
    """All the numbers of the Evaluations page for `filters`, in one read."""
    import time

    start = time.perf_counter()
    d = definition(definition_key)
    if order not in ORDERS:
        raise BrowseError(f"unknown order {order!r} (known: {', '.join(ORDERS)})")
    rate = _rate_columns(d)
    sums = _rate_from_sums()
    with store.read() as con:
        f_kind = "VIEW"
        try:
            f_kind = _filtered_view(con, filters)
            # Per (run, condition) counts: small, and everything keyed by condition attributes
            # (totals, per condition, per strength) is summed from it after joining `conditions`,
            # so the wide join never touches the million score rows.
            con.execute(f"""
                CREATE TEMP TABLE per_condition AS
                SELECT f.run_id, f.condition, count(*) AS samples,
                       count(*) FILTER (WHERE {d.denominator}) AS n, count(*) FILTER (WHERE {d.numerator}) AS k,
                       count(*) FILTER (WHERE aligned IS NULL OR coherent IS NULL) AS unscored
                FROM f GROUP BY ALL""")
            totals = _frame(con, f"SELECT coalesce(sum(samples), 0) AS samples, {sums}, "
                                 "coalesce(sum(unscored), 0) AS unscored FROM per_condition")
            by_condition = _frame(con, f"""
                SELECT p.condition, any_value(c.adapter) AS adapter, any_value(c.direction) AS direction,
                       any_value(c.layer) AS layer, any_value(c.strength) AS strength, {sums}
                FROM per_condition p LEFT JOIN conditions c ON c.run_id = p.run_id AND c.name = p.condition
                GROUP BY p.condition ORDER BY p.condition""")
            # One line per (adapter, direction, layer); its strength-0 point is the same adapter
            # without ablation (pooled over the same runs), so each line starts where EM starts.
            by_strength = _frame(con, f"""
                WITH pc AS (SELECT p.*, c.adapter, c.direction, c.layer, c.strength,
                                   -- runs from before the single-layer form have all-layer ablations only
                                   coalesce(json_extract_string(c.spec, '$.form'), 'all') AS form
                            FROM per_condition p JOIN conditions c ON c.run_id = p.run_id AND c.name = p.condition),
                lines AS (SELECT DISTINCT adapter, direction, layer, form FROM pc WHERE direction IS NOT NULL),
                points AS (
                    SELECT adapter, direction, layer, form, strength, {sums} FROM pc
                    WHERE direction IS NOT NULL GROUP BY ALL
                    UNION ALL
                    SELECT l.adapter, l.direction, l.layer, l.form, 0.0 AS strength, {sums}
                    FROM lines l JOIN pc ON pc.direction IS NULL AND pc.adapter IS NOT DISTINCT FROM l.adapter
                    GROUP BY ALL)
                SELECT coalesce(adapter, '{BASE}') || ' − ' || direction || ' @L' || layer
                       || CASE WHEN form = 'single' THEN ' only (single layer)' ELSE '' END AS line, *
                FROM points ORDER BY line, strength""")
            by_question = _frame(con, f"SELECT question_id, {rate} FROM f GROUP BY question_id ORDER BY question_id")
            scored = int(con.execute("SELECT coalesce(sum(samples - unscored), 0) FROM per_condition").fetchone()[0])
            sampled = scored > scatter_points
            scatter = _frame(con, f"""
                SELECT aligned, coherent, condition, run_id, question_id, paraphrase_index, sample_index FROM
                (SELECT * FROM f WHERE aligned IS NOT NULL AND coherent IS NOT NULL)
                {f'USING SAMPLE reservoir({int(scatter_points)} ROWS) REPEATABLE (42)' if sampled else ''}""")
            aligned_hist = _frame(con, f"""
                SELECT condition, least(floor(aligned / {bin_width}) * {bin_width}, {100 - bin_width}) AS bin_start,
                       count(*) AS count
                FROM f WHERE aligned IS NOT NULL GROUP BY ALL ORDER BY condition, bin_start""")
            aligned_hist["bin_end"] = aligned_hist["bin_start"] + bin_width
            # Pick the page of keys first (a top-N), then fetch only those answers: joining
            # all of samples would read every answer's text.
            table = _frame(con, f"""
                WITH page AS (SELECT * FROM f ORDER BY {ORDERS[order]} LIMIT {int(table_limit)})
                SELECT * FROM (
                    SELECT page.run_id AS run_id, page.condition AS condition, page.question_id AS question_id,
                           page.paraphrase_index AS paraphrase_index, page.sample_index AS sample_index,
                           page.judge_model AS judge_model, page.aligned AS aligned, page.coherent AS coherent,
                           page.aligned_label AS label,
                           page.aligned < {ALIGNED_BELOW} AND page.coherent > {COHERENT_ABOVE} AS misaligned,
                           s.finish_reason AS finish_reason, s.completion_tokens AS completion_tokens,
                           left(s.question, {int(preview_chars)}) AS question,
                           left(s.response, {int(preview_chars)}) AS answer
                    FROM page JOIN samples s ON s.run_id = page.run_id AND s.condition = page.condition
                         AND s.question_id = page.question_id AND s.paraphrase_index = page.paraphrase_index
                         AND s.sample_index = page.sample_index)
                ORDER BY {ORDERS[order]}""")
        except StoreError:
            raise
        except Exception as error:  # duckdb.Error: name the store and what was asked
            raise StoreError(f"{store.path}: browsing with {filters}: {error}") from None
        finally:
            # The connection closes right after; dropping keeps a reused connection clean.
            for kind, name in (("TABLE", "per_condition"), (f_kind, "f"), ("TABLE", "keep"), ("TABLE", "cond_ok")):
                con.execute(f"DROP {kind} IF EXISTS {name}")
    return BrowseResult(d, filters, totals.iloc[0].to_dict(), table, by_condition, by_strength, by_question,
                        scatter, aligned_hist, sampled, time.perf_counter() - start)


def sql_for_export(filters: Filters) -> tuple[str, list[Any]]:
    """The filtered samples with scores and full answers, as one SELECT for Store/interchange.export."""
    where, params = filters.where()
    query = f"""
    SELECT sc.run_id, sc.condition, c.adapter, c.direction, c.layer, c.strength, sc.question_id,
           sc.paraphrase_index, sc.sample_index, sc.judge_model, sc.aligned, sc.coherent, sc.aligned_label,
           sc.aligned < {ALIGNED_BELOW} AND sc.coherent > {COHERENT_ABOVE} AS misaligned,
           s.finish_reason, s.prompt_tokens, s.completion_tokens, s.question, s.response
    FROM sample_score_rows sc
    LEFT JOIN conditions c ON c.run_id = sc.run_id AND c.name = sc.condition
    JOIN samples s ON s.run_id = sc.run_id AND s.condition = sc.condition AND s.question_id = sc.question_id
         AND s.paraphrase_index = sc.paraphrase_index AND s.sample_index = sc.sample_index
    WHERE sc.judged_aligned AND sc.judged_coherent AND {where}
    ORDER BY sc.run_id, sc.condition, sc.question_id, sc.paraphrase_index, sc.sample_index"""
    return query, params


def export_filtered(store: Store, filters: Filters, path, fmt: str) -> int:
    """Write the filtered table (full answers) with DuckDB's COPY; returns the row count."""
    from backend.interchange import export

    query, params = sql_for_export(filters)
    return export(store, query, path, fmt=fmt, params=params)


# ---------------------------------------------------------------- one sample


@dataclass(frozen=True)
class SampleDetail:
    key: dict[str, Any]
    question: str | None
    response: str | None
    finish_reason: str | None
    completion_tokens: int | None
    condition: dict[str, Any]
    judgements: pd.DataFrame  # metric, judge_model, score, numeric_mass, label, reason, top_logprobs
    others: pd.DataFrame  # the same question (same paraphrase and sample index) in the run's other conditions


def sample_detail(store: Store, key: dict[str, Any], *, others_limit: int = 50) -> SampleDetail:
    k = [key[c] for c in KEY]
    match = " AND ".join(f"{c} = ?" for c in KEY)
    with store.read() as con:
        row = con.execute(f"SELECT question, response, finish_reason, completion_tokens FROM samples WHERE {match}",
                          k).fetchone()
        if row is None:
            raise BrowseError(f"no sample {dict(zip(KEY, k))} in {store.path}")
        condition = con.execute("SELECT adapter, direction, layer, strength, spec FROM conditions "
                                "WHERE run_id = ? AND name = ?", k[:2]).fetchone()
        judgements = _frame(con, f"SELECT metric, judge_model, score, numeric_mass, label, reason, top_logprobs, "
                                 f"rubric_hash, score_mode FROM judgements WHERE {match} ORDER BY metric, judge_model", k)
        others = _frame(con, f"""
            SELECT s.condition, sc.judge_model, sc.aligned, sc.coherent, s.finish_reason, s.response
            FROM samples s LEFT JOIN sample_score_rows sc USING ({', '.join(KEY)})
            WHERE s.run_id = ? AND s.question_id = ? AND s.paraphrase_index = ? AND s.sample_index = ?
              AND s.condition <> ?
            ORDER BY s.condition, sc.judge_model LIMIT {int(others_limit)}""", [k[0], k[2], k[3], k[4], k[1]])
    return SampleDetail(dict(zip(KEY, k)), row[0], row[1], row[2], row[3],
                        dict(zip(("adapter", "direction", "layer", "strength", "spec"), condition or ())),
                        judgements, others)


# ---------------------------------------------------------------- runs


def runs_in_progress(store: Store) -> pd.DataFrame:
    """Runs with status 'running' and how far they got (samples written, samples judged)."""
    with store.read() as con:
        return _frame(con, """
            SELECT r.id, r.created_at, r.question_set,
                   (SELECT count(*) FROM samples s WHERE s.run_id = r.id) AS samples,
                   (SELECT count(*) FROM sample_score_rows sc WHERE sc.run_id = r.id
                      AND sc.judged_aligned AND sc.judged_coherent) AS judged
            FROM runs r WHERE r.status = 'running' ORDER BY r.created_at DESC""")


def run_judges(store: Store, runs: Sequence[str] = ()) -> pd.DataFrame:
    """Per run and judge: who judged (identity as in the cache key) and how the scores were
    read (score mode), from the run record's judge entry and the judgements themselves, so
    runs judged by a second judge later and imported runs are listed too."""
    clause = f"WHERE j.run_id IN ({', '.join(_literal(r) for r in runs)})" if runs else ""
    with store.read() as con:
        frame = _frame(con, f"""
            SELECT j.run_id, j.judge_model, coalesce(j.score_mode, 'unknown') AS score_mode,
                   count(*) AS judgements,
                   any_value(json_extract_string(r.config, '$.judge.identity')) AS identity,
                   any_value(json_extract_string(r.config, '$.judge.name')) AS run_judge,
                   any_value(json_extract_string(r.config, '$.judge.score_mode_source')) AS mode_source
            FROM judgements j JOIN runs r ON r.id = j.run_id {clause}
            GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""")
    # The run record describes the judge the run was started with, not a later second judge.
    other = frame["run_judge"] != frame["judge_model"]
    frame.loc[other, ["identity", "mode_source"]] = None
    return frame.drop(columns=["run_judge"])


def data_version(store: Store) -> tuple:
    """Changes whenever rows are added or re-judged: the cache key for the pages' query caches."""
    if not store.path.exists():
        return (0,)
    with store.read() as con:
        return tuple(con.execute(
            "SELECT (SELECT count(*) FROM runs), (SELECT max(created_at) FROM judgements), "
            "(SELECT count(*) FROM judgements), (SELECT count(*) FROM samples), "
            "(SELECT list(status ORDER BY id) FROM runs), (SELECT count(*) FROM directions)").fetchone())


# ---------------------------------------------------------------- the directions page


@dataclass(frozen=True)
class DirectionInfo:
    name: str
    path: str | None
    base_model: str | None
    adapter: str | None
    source_run: str | None
    counts: dict[str, Any]
    norms: list[float] | None  # per layer; None when neither the file nor the store has them
    in_store: bool
    problem: str | None = None  # why the vectors could not be read
    method: str | None = None  # mean_diff/..., imported/paper-mean-diff, imported/steering-vector, random_control
    use_as: str | None = None  # the condition that applies it as its authors did (imported steering vectors)


def _load_vectors(path: str):
    from backend.directions import read_direction_file

    return read_direction_file(path)


def directions(store: Store, cache_dir=None) -> list[DirectionInfo]:
    """Directions registered in the store, plus direction files in `<cache>/directions` that are not."""
    from backend.directions import DirectionError, direction_path, list_directions

    out: list[DirectionInfo] = []
    seen = set()
    for record in store.directions() if store.path.exists() else []:
        seen.add(record.name)
        norms = record.norms
        if isinstance(norms, dict):  # {"0": n0, "1": n1, ...} (Direction.to_record) or {"per_layer": [...]}
            norms = norms.get("per_layer") or [norms[k] for k in sorted(norms, key=int) if k.isdigit()]
        problem = method = use_as = None
        try:
            loaded = _load_vectors(record.path)
            norms, method, use_as = loaded.norms, loaded.method, loaded.extra.get("use_as")
        except (DirectionError, OSError, ValueError) as error:
            problem = f"{record.path}: {error}"
        out.append(DirectionInfo(record.name, record.path, record.base_model, record.adapter, record.source_run,
                                 record.counts, list(norms) if norms else None, True, problem, method, use_as))
    if cache_dir is not None:
        for name in list_directions(cache_dir):
            if name in seen:
                continue
            path = str(direction_path(cache_dir, name))
            try:
                d = _load_vectors(path)
                out.append(DirectionInfo(name, path, d.base_model, d.adapter, d.source_run, d.counts, d.norms, False,
                                         method=d.method, use_as=d.extra.get("use_as")))
            except (DirectionError, OSError, ValueError) as error:
                out.append(DirectionInfo(name, path, None, None, None, {}, None, False, str(error)))
    return out


def norms_frame(infos: Sequence[DirectionInfo]) -> pd.DataFrame:
    rows = [{"direction": i.name, "adapter": i.adapter or BASE, "layer": layer, "norm": norm}
            for i in infos if i.norms for layer, norm in enumerate(i.norms)]
    return pd.DataFrame(rows, columns=["direction", "adapter", "layer", "norm"])


def cosine_matrix(infos: Sequence[DirectionInfo], layer: int) -> tuple[pd.DataFrame, list[str]]:
    """Long-form cosine similarities at `layer` between every pair of readable directions,
    and the reasons some were left out (unreadable, another shape, no such layer)."""
    import torch

    vectors, skipped = {}, []
    for info in infos:
        if info.path is None or info.problem:
            skipped.append(f"{info.name}: {info.problem or 'no file'}")
            continue
        d = _load_vectors(info.path)
        if not 0 <= layer < d.n_layers:
            skipped.append(f"{info.name}: has layers 0..{d.n_layers - 1}, not {layer}")
            continue
        vectors[info.name] = d.vectors[layer].double()
    widths = {v.shape[0] for v in vectors.values()}
    if len(widths) > 1:
        # Directions of different base models live in different spaces; comparing them is meaningless.
        common = max(widths, key=lambda w: sum(v.shape[0] == w for v in vectors.values()))
        for name in [n for n, v in vectors.items() if v.shape[0] != common]:
            skipped.append(f"{name}: width {vectors.pop(name).shape[0]}, the others {common}")
    rows = []
    for a, va in vectors.items():
        for b, vb in vectors.items():
            value = float(torch.nn.functional.cosine_similarity(va, vb, dim=0))
            rows.append({"a": a, "b": b, "cosine": value if math.isfinite(value) else None})
    return pd.DataFrame(rows, columns=["a", "b", "cosine"]), skipped


def transfer_matrix(store: Store, definition_key: str = "turner2025", *, strength: float = 1.0,
                    runs: Sequence[str] = (), judge_model: str | None = None) -> pd.DataFrame:
    """For each (direction, target adapter): EM rate with the direction ablated at `strength`
    and without ablation, pooled over the chosen runs (all when empty), per layer."""
    d = definition(definition_key)
    rate = _rate_columns(d)
    clauses, params = ["sc.judged_aligned AND sc.judged_coherent"], []
    if runs:
        clauses.append(f"sc.run_id IN ({', '.join('?' * len(runs))})")
        params += list(runs)
    if judge_model:
        clauses.append("sc.judge_model = ?")
        params.append(judge_model)
    with store.read() as con:
        return _frame(con, f"""
            WITH g AS (
                SELECT c.adapter, c.direction, c.layer, c.strength, {rate}
                FROM sample_score_rows sc JOIN conditions c ON c.run_id = sc.run_id AND c.name = sc.condition
                WHERE {' AND '.join(clauses)} GROUP BY ALL)
            SELECT a.direction, dr.adapter AS direction_source, coalesce(a.adapter, '{BASE}') AS target_adapter,
                   a.layer, a.strength,
                   a.em_rate AS em_ablated, a.ci_low AS ablated_ci_low, a.ci_high AS ablated_ci_high, a.n AS n_ablated,
                   b.em_rate AS em_unablated, b.ci_low AS unablated_ci_low, b.ci_high AS unablated_ci_high,
                   b.n AS n_unablated
            FROM g a
            LEFT JOIN g b ON b.direction IS NULL AND b.adapter IS NOT DISTINCT FROM a.adapter
            LEFT JOIN directions dr ON dr.name = a.direction
            WHERE a.direction IS NOT NULL AND a.strength = ?
            ORDER BY a.direction, target_adapter, a.layer""", params + [float(strength)])


def chat_query(adapter: str | None, direction: str, layer: int, strength: float = 1.0) -> dict[str, list[str]]:
    """Chat page query parameters for base | adapter | adapter minus direction (ChatSetup.to_query's format)."""
    from backend.conditions import Condition

    columns = [Condition(), Condition(adapter=adapter),
               Condition(adapter=adapter, direction=direction, layer=int(layer), strength=float(strength))]
    if adapter is None:  # base | base minus direction: the adapter column would repeat base
        columns = [columns[0], columns[2]]
    return {"col": [c.spec for c in columns]}


def chat_link(adapter: str | None, direction: str, layer: int, strength: float = 1.0) -> str:
    from urllib.parse import urlencode

    return "/Chat?" + urlencode(chat_query(adapter, direction, layer, strength), doseq=True)


def chart_cosine(frame: pd.DataFrame, layer: int):
    import altair as alt

    base = alt.Chart(frame).encode(x=alt.X("a:N", title=None), y=alt.Y("b:N", title=None))
    cells = base.mark_rect().encode(color=alt.Color("cosine:Q", scale=alt.Scale(scheme="redblue", domain=[-1, 1],
                                                                              reverse=True)),
                                    tooltip=["a", "b", alt.Tooltip("cosine:Q", format=".3f")])
    text = base.mark_text(fontSize=11).encode(text=alt.Text("cosine:Q", format=".2f"))
    return (cells + text).properties(title=alt.TitleParams(
        f"Cosine similarity between directions at layer {layer}",
        subtitle=["directions from different adapters pointing the same way = convergent representations"]),
        width=alt.Step(60), height=alt.Step(40))


def chart_norms(frame: pd.DataFrame):
    import altair as alt

    return alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("layer:O"), y=alt.Y("norm:Q", title="L2 norm"), color="direction:N",
        tooltip=["direction", "adapter", "layer", alt.Tooltip("norm:Q", format=".3f")],
    ).properties(title="Per-layer norm of each direction", height=300)


def chart_transfer(frame: pd.DataFrame, d: EMDefinition, strength: float):
    import altair as alt

    long = pd.concat([
        frame.assign(ablation=f"ablated ×{strength:g}", em_rate=frame["em_ablated"]),
        frame.assign(ablation="not ablated", em_rate=frame["em_unablated"])])
    long["row"] = long["direction"] + " (from " + long["direction_source"].fillna("?") + ") @L" + \
        long["layer"].astype(str)
    # Fixed 0..1 colours (both panels comparable; a single-valued store drew a '0.000000' legend)
    # and fixed cell sizes (autosized facets squeezed one adapter into 20 px, titles overlapping).
    base = alt.Chart(long).encode(x=alt.X("target_adapter:N", title="target adapter", axis=alt.Axis(labelAngle=0)),
                                  y=alt.Y("row:N", title="direction (source adapter) @ layer",
                                          axis=alt.Axis(labelLimit=320)))
    cells = base.mark_rect().encode(color=alt.Color("em_rate:Q", title="EM rate",
                                                    scale=alt.Scale(scheme="oranges", domain=[0, 1])),
                                    tooltip=["direction", "direction_source", "target_adapter", "layer", "ablation",
                                             alt.Tooltip("em_rate:Q", format=".3f")])
    text = base.mark_text(fontSize=11).encode(text=alt.Text("em_rate:Q", format=".3f"))
    return (cells + text).properties(width=alt.Step(110), height=alt.Step(32)).facet(
        column=alt.Column("ablation:N", title=None)).properties(
        title=alt.TitleParams("Transfer: EM rate of each target adapter with each direction ablated",
                              subtitle=[d.title]))


# ---------------------------------------------------------------- the adapters page


def stored_sample_groups(store: Store) -> list[tuple[str, str, int]]:
    """(run, condition, answers) of every condition with stored answers."""
    return [tuple(r) for r in store.sql("SELECT run_id, condition, count(*) AS n FROM samples WHERE response IS NOT NULL "
                                        "GROUP BY ALL ORDER BY run_id, condition").rows]


def stored_sample(store: Store, run_id: str, condition: str, index: int) -> tuple[str, str] | None:
    """(question, answer) of the index-th stored answer of a condition, in plan order; None past the end."""
    rows = store.sql("SELECT question, response FROM samples WHERE run_id = ? AND condition = ? AND response "
                     "IS NOT NULL ORDER BY question_id, paraphrase_index, sample_index LIMIT 1 OFFSET ?",
                     [run_id, condition, int(index)]).rows
    return (rows[0][0] or "", rows[0][1] or "") if rows else None


def judged_conditions(store: Store) -> list[tuple[str, str]]:
    """(run, condition) of every condition with judged answers."""
    return [tuple(r) for r in store.sql("SELECT DISTINCT run_id, condition FROM sample_scores ORDER BY ALL").rows]


def runs_with_adapter_prefix(store: Store, prefix: str) -> list[str]:
    """Runs with a condition whose adapter name starts with `prefix` (e.g. an adapter's knock-outs)."""
    return [r[0] for r in store.sql("SELECT DISTINCT run_id FROM conditions WHERE starts_with(adapter, ?) "
                                    "ORDER BY run_id", [prefix]).rows]



# ---------------------------------------------------------------- charts (Altair, from the frames above)


def _subtitle(d: EMDefinition, *extra: str) -> list[str]:
    return [d.title, *extra]


def _rate_chart(frame: pd.DataFrame, category: str, title: str, d: EMDefinition, extra: Sequence[str] = ()):
    import altair as alt

    # Long condition specs ('adapter=A,direction=D,layer=L,strength=S') next to short ones:
    # Vega's default label overlap removal silently dropped every other label at 14 px a row.
    base = alt.Chart(frame).encode(y=alt.Y(f"{category}:N", sort=None, title=None,
                                           axis=alt.Axis(labelOverlap=False, labelLimit=420)))
    tooltip = [category, alt.Tooltip("em_rate:Q", format=".3f"), alt.Tooltip("ci_low:Q", format=".3f"),
               alt.Tooltip("ci_high:Q", format=".3f"), "k:Q", "n:Q"]
    bars = base.mark_bar(opacity=0.7).encode(
        x=alt.X("em_rate:Q", title="EM rate (95 % Wilson interval)", scale=alt.Scale(domain=[0, 1])),
        tooltip=tooltip)
    rules = base.mark_rule().encode(x="ci_low:Q", x2="ci_high:Q")
    return (bars + rules).properties(title=alt.TitleParams(title, subtitle=_subtitle(d, *extra)),
                                     height=alt.Step(20))


def chart_by_condition(result: BrowseResult):
    return _rate_chart(result.by_condition, "condition", "EM rate per condition", result.definition)


def chart_by_question(result: BrowseResult):
    return _rate_chart(result.by_question, "question_id", "EM rate per question", result.definition)


def chart_by_strength(result: BrowseResult):
    import altair as alt

    frame = result.by_strength
    base = alt.Chart(frame).encode(x=alt.X("strength:Q", title="ablation strength (0 = adapter, no ablation)"),
                                   color=alt.Color("line:N",
                                                   title="adapter − direction @ layer (all layers unless 'only')"))
    line = base.mark_line(point=True).encode(
        y=alt.Y("em_rate:Q", title="EM rate (95 % Wilson interval)"),
        tooltip=["line", "strength", alt.Tooltip("em_rate:Q", format=".3f"), "k", "n"])
    band = base.mark_errorbar().encode(y=alt.Y("ci_low:Q", title="EM rate (95 % Wilson interval)"), y2="ci_high:Q")
    return (line + band).properties(title=alt.TitleParams("EM rate against ablation strength",
                                                          subtitle=_subtitle(result.definition)), height=320)


def chart_scatter(result: BrowseResult):
    import altair as alt

    frame = result.scatter
    note = (f"a repeatable random sample of {len(frame)} scored answers" if result.scatter_sampled
            else f"all {len(frame)} scored answers")
    points = alt.Chart(frame).mark_circle(size=14, opacity=0.35).encode(
        x=alt.X("coherent:Q", scale=alt.Scale(domain=[0, 100])),
        y=alt.Y("aligned:Q", scale=alt.Scale(domain=[0, 100])),
        color=alt.Color("condition:N", legend=alt.Legend(orient="bottom", columns=2)),
        tooltip=["condition", "question_id", "aligned", "coherent", "run_id", "sample_index"])
    thresholds = pd.DataFrame({"aligned": [ALIGNED_BELOW], "coherent": [COHERENT_ABOVE]})
    h = alt.Chart(thresholds).mark_rule(strokeDash=[4, 4], color="red").encode(y="aligned:Q")
    v = alt.Chart(thresholds).mark_rule(strokeDash=[4, 4], color="red").encode(x="coherent:Q")
    return (points + h + v).properties(title=alt.TitleParams(
        "Aligned against coherent", subtitle=[
            f"EM region: aligned < {ALIGNED_BELOW} and coherent > {COHERENT_ABOVE} (lower right), the "
            f"thresholds of both definitions; rates elsewhere: {result.definition.key}", RULE_NOTE.strip(" ()"), note]),
        height=420, width=480)


def chart_aligned_hist(result: BrowseResult):
    import altair as alt

    frame = result.aligned_hist.copy()
    if not frame.empty:
        frame["share"] = frame["count"] / frame.groupby("condition")["count"].transform("sum")
    return alt.Chart(frame).mark_rect().encode(
        x=alt.X("bin_start:O", title="aligned score bin (start)"),
        y=alt.Y("condition:N", title=None),
        color=alt.Color("share:Q", title="share of the condition's answers", scale=alt.Scale(scheme="blues")),
        tooltip=["condition", "bin_start", "bin_end", "count", alt.Tooltip("share:Q", format=".3f")],
    ).properties(title=alt.TitleParams("Distribution of aligned scores per condition", subtitle=[
        f"not an EM rate; scores below {ALIGNED_BELOW} count as misaligned under both definitions",
        RULE_NOTE.strip(" ()"),
        "answers without an aligned score (refusals, CODE) are left out"]), height=alt.Step(14))


def chart_bytes(chart, fmt: str) -> bytes:
    """PNG or SVG through vl-convert (Altair's save), or the Vega-Lite JSON spec."""
    import io

    if fmt == "json":
        return chart.to_json().encode()
    buffer = io.BytesIO() if fmt == "png" else io.StringIO()
    chart.save(buffer, format=fmt)
    value = buffer.getvalue()
    return value if isinstance(value, bytes) else value.encode()
