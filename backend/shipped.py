"""Shipped data: a compact Parquet export of store content that a fresh clone imports on its first run.

A bundle is a folder: one zstd Parquet file per store table (runs, conditions, questions,
samples, judgements, directions), the direction files the runs ablated, and `manifest.json`
(row counts, sha256 of every file, where it came from). `export_bundle` writes one from a store;
`import_bundle` checks every file against the manifest before writing anything, then inserts
everything in one transaction: a bad bundle is refused whole, never half-imported.

Imported runs get status 'shipped' and imported directions `extra.shipped = <bundle>`, so the
pages can say "shipped data" and `remove_shipped` can take exactly those rows out again (and
their direction files), leaving the user's own runs alone. A marker file next to the store
(`<store>.shipped.json`) records what happened, so that the first-run import (`scripts/run.sh`
calls `import --first-run`) never brings back data the user removed.

    python -m backend shipped export --run RUN [--run RUN2] [--direction D] --out DIR [--description TEXT]
    python -m backend shipped import [DIR] [--first-run]
    python -m backend shipped status [--json]
    python -m backend shipped remove
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from backend.errors import BackendError
from backend.fsutil import sha256_file
from backend.store import Store, StoreError

# The bundle a checkout ships (empty until the organism's acceptance runs are exported into it).
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "data" / "shipped"
FORMAT_VERSION = 1
SHIPPED_STATUS = "shipped"
# Parent tables first: the order rows are inserted in (and removed in reverse).
RUN_TABLES = ("runs", "conditions", "questions", "samples", "judgements")
_RUN_COLUMN = {"runs": "id"}


class ShippedError(BackendError, RuntimeError):
    """A bundle that cannot be exported, imported or removed; names the file or row and why."""


def _literal(value: str | Path) -> str:
    """A SQL string literal: COPY and read_parquet take file names that cannot be parameters here."""
    return "'" + str(value).replace("'", "''") + "'"


def _sql_list(values: Sequence[str]) -> str:
    return ", ".join(_literal(v) for v in values)


def marker_path(store: Store) -> Path:
    return store.path.with_name(store.path.name + ".shipped.json")


def read_marker(store: Store) -> dict[str, Any] | None:
    try:
        return json.loads(marker_path(store).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ShippedError(f"{marker_path(store)}: unreadable ({error}); delete it to start over") from None


def _write_marker(store: Store, data: dict[str, Any]) -> None:
    path = marker_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------- export

def export_bundle(store: Store, out: str | Path, runs: Sequence[str], *, directions: Sequence[str] | None = None,
                  name: str | None = None, description: str = "") -> dict[str, Any]:
    """Write the given runs (every row of theirs) and directions into the folder `out`.

    `directions=None` takes the directions the runs' conditions ablated that the store registers."""
    out = Path(out)
    if not runs:
        raise ShippedError("no run to export: name at least one with --run")
    if out.exists() and any(out.iterdir()):
        raise ShippedError(f"{out} is not empty; export into a new folder")
    known = {r[0]: r[1] for r in store.sql("SELECT id, status FROM runs").rows}
    missing = [r for r in runs if r not in known]
    if missing:
        raise ShippedError(f"no run {', '.join(map(repr, missing))} in {store.path} (known: {', '.join(sorted(known))})")
    unfinished = [f"{r} ({known[r]})" for r in runs if known[r] in ("running",)]
    if unfinished:
        raise ShippedError(f"run {', '.join(unfinished)} is still running; export it once it has finished")
    registered = {d.name: d for d in store.directions()}
    if directions is None:
        used = store.sql(f"SELECT DISTINCT direction FROM conditions WHERE run_id IN ({_sql_list(runs)}) "
                         "AND direction IS NOT NULL").rows
        directions = sorted(d for (d,) in used if d in registered)
    unknown = [d for d in directions if d not in registered]
    if unknown:
        raise ShippedError(f"direction {', '.join(map(repr, unknown))} is not registered in {store.path}")
    for d in directions:
        if not Path(registered[d].path).is_file():
            raise ShippedError(f"direction {d!r}: its file {registered[d].path} is missing")

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "directions").mkdir(parents=True)
    tables: dict[str, dict[str, Any]] = {}
    run_list = _sql_list(runs)
    with store.read() as con:
        for table in RUN_TABLES:
            column = _RUN_COLUMN.get(table, "run_id")
            query = f"SELECT * FROM {table} WHERE {column} IN ({run_list}) ORDER BY ALL"
            path = tmp / f"{table}.parquet"
            con.execute(f"COPY ({query}) TO {_literal(path)} (FORMAT parquet, COMPRESSION zstd)")
            tables[table] = {"file": path.name, "rows": con.execute(f"SELECT count(*) FROM ({query})").fetchone()[0]}
        if directions:
            query = (f"SELECT * EXCLUDE (path, created_at) FROM directions WHERE name IN ({_sql_list(directions)}) "
                     "ORDER BY name")
            con.execute(f"COPY ({query}) TO {_literal(tmp / 'directions.parquet')} (FORMAT parquet, COMPRESSION zstd)")
            tables["directions"] = {"file": "directions.parquet", "rows": len(directions)}
    for table in tables.values():
        table["sha256"] = sha256_file(tmp / table["file"])
    files = {}
    for d in directions:
        target = tmp / "directions" / f"{d}.safetensors"
        shutil.copyfile(registered[d].path, target)
        files[d] = {"file": f"directions/{target.name}", "sha256": sha256_file(target)}
    manifest = {
        "format_version": FORMAT_VERSION, "name": name or out.name, "description": description,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source_store": str(store.path),
        "schema_version": store.schema_version(), "runs": list(runs), "tables": tables, "direction_files": files,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.rename(out)
    return manifest


# ---------------------------------------------------------------- import

def read_manifest(bundle: str | Path) -> dict[str, Any]:
    """The bundle's manifest, with every file it lists checked (present, sha256 as recorded)."""
    bundle = Path(bundle)
    path = bundle / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShippedError(f"{bundle}: no manifest.json (not a shipped-data bundle)") from None
    except (OSError, ValueError) as error:
        raise ShippedError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ShippedError(f"{path}: format_version {manifest.get('format_version') if isinstance(manifest, dict) else '?'}"
                           f" is not {FORMAT_VERSION}")
    for key in ("name", "runs", "tables", "direction_files"):
        if key not in manifest:
            raise ShippedError(f"{path}: the manifest has no {key!r}")
    missing_tables = [t for t in RUN_TABLES if t not in manifest["tables"]]
    if missing_tables:
        raise ShippedError(f"{path}: the manifest lists no {', '.join(missing_tables)} table")
    listed = [(t["file"], t["sha256"]) for t in manifest["tables"].values()]
    listed += [(f["file"], f["sha256"]) for f in manifest["direction_files"].values()]
    for file, sha in listed:
        target = (bundle / file).resolve()
        if bundle.resolve() not in target.parents:
            raise ShippedError(f"{path}: file {file!r} lies outside the bundle")
        if not target.is_file():
            raise ShippedError(f"{bundle}: {file} is listed in the manifest but missing")
        if sha256_file(target) != sha:
            raise ShippedError(f"{bundle}: {file} does not match its sha256 in the manifest (changed or truncated)")
    return manifest


@dataclass(frozen=True)
class ImportResult:
    bundle: str
    runs: list[str]
    directions: list[str]
    rows: dict[str, int]
    skipped: str | None = None  # why nothing was imported (already there, removed by the user, no bundle)


def import_bundle(store: Store, bundle: str | Path, cache_dir: str | Path, *, base_fingerprint: str | None = None,
                  first_run: bool = False) -> ImportResult:
    """Import a bundle into the store (and its direction files into `<cache_dir>/directions`).

    Idempotent: a bundle already imported is skipped. With `first_run`, a missing bundle or a
    marker (imported or removed before) is a skip, not an error. `base_fingerprint`, when
    given, must match every direction file's base (a direction of another model is refused)."""
    from backend.directions import direction_path, read_direction_file

    bundle = Path(bundle)
    marker = read_marker(store)
    if first_run and marker is not None:
        return ImportResult(marker.get("bundle", "?"), [], [], {}, skipped=f"shipped data was {marker.get('state')} "
                            f"on {str(marker.get('at', '?'))[:19]} ({marker_path(store)})")
    if first_run and not (bundle / "manifest.json").exists():
        return ImportResult(bundle.name, [], [], {}, skipped=f"no shipped data in {bundle}")
    manifest = read_manifest(bundle)
    name = manifest["name"]
    runs = list(manifest["runs"])
    store.migrate()
    existing = {r[0]: r[1] for r in store.sql(f"SELECT id, status FROM runs WHERE id IN ({_sql_list(runs)})").rows}
    if existing and all(status == SHIPPED_STATUS for status in existing.values()) and len(existing) == len(runs):
        return ImportResult(name, runs, [], {}, skipped=f"bundle {name!r} is already imported")
    clash = [f"{r} ({s})" for r, s in existing.items()]
    if clash:
        raise ShippedError(f"bundle {name!r}: the store {store.path} already has run {', '.join(clash)}; "
                           "remove shipped data first (`python -m backend shipped remove`) or rename your run")

    files = manifest["direction_files"]
    registered = {d.name for d in store.directions()}
    for d in files:
        target = direction_path(cache_dir, d)
        if base_fingerprint is not None:
            fingerprint = read_direction_file(bundle / files[d]["file"]).base_fingerprint
            if fingerprint and fingerprint != base_fingerprint:
                raise ShippedError(f"bundle {name!r}: direction {d!r} was extracted from another base model "
                                   f"(fingerprint {fingerprint}, this one's {base_fingerprint})")
        if d in registered or target.exists():
            raise ShippedError(f"bundle {name!r}: direction {d!r} already exists ({target}); the bundle would "
                               "replace it. Rename or delete yours first")

    copied: list[Path] = []
    try:
        for d, entry in files.items():
            target = direction_path(cache_dir, d)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle / entry["file"], target)
            copied.append(target)
        rows: dict[str, int] = {}
        with store.write() as con:
            for table in RUN_TABLES:
                path = bundle / manifest["tables"][table]["file"]
                source = f"read_parquet({_literal(path)})"
                if table == "runs":
                    source = f"(SELECT * REPLACE ('{SHIPPED_STATUS}' AS status) FROM {source})"
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {source}")
                rows[table] = con.execute(f"SELECT count(*) FROM {source}").fetchone()[0]
            if "directions" in manifest["tables"]:
                path = bundle / manifest["tables"]["directions"]["file"]
                # plain rows, not a DataFrame: pandas turns a NULL string into NaN, stored as 'nan'
                cursor = con.execute(f"SELECT * FROM read_parquet({_literal(path)})")
                names = [d[0] for d in cursor.description]
                records = [dict(zip(names, values)) for values in cursor.fetchall()]
                for row in records:
                    extra = json.loads(row.get("extra") or "null") or {}
                    extra["shipped"] = name
                    row.update(path=str(direction_path(cache_dir, row["name"])), extra=json.dumps(extra),
                               created_at=datetime.now(timezone.utc).replace(tzinfo=None))
                    columns = list(row)
                    con.execute(f"INSERT INTO directions ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                                [row[c] for c in columns])
                rows["directions"] = len(records)
            _refresh_scores(con, runs)
    except Exception as error:
        for path in copied:
            path.unlink(missing_ok=True)
        if isinstance(error, (ShippedError, StoreError)):
            raise
        raise ShippedError(f"bundle {name!r}: import failed, nothing was kept: {error}") from None
    _write_marker(store, {"state": "imported", "bundle": name, "description": manifest.get("description", ""),
                          "source": str(bundle), "runs": runs,
                          "directions": list(files), "at": datetime.now(timezone.utc).isoformat()})
    return ImportResult(name, runs, list(files), rows)


def _refresh_scores(con, runs: Sequence[str]) -> None:
    from backend.store import _refresh_sample_scores
    con.execute(f"CREATE TEMP TABLE shipped_keys AS SELECT * FROM judgements WHERE run_id IN ({_sql_list(runs)})")
    try:
        _refresh_sample_scores(con, "shipped_keys")
    finally:
        con.execute("DROP TABLE IF EXISTS shipped_keys")


# ---------------------------------------------------------------- status and removal

@dataclass(frozen=True)
class ShippedStatus:
    runs: list[str]
    samples: int
    judgements: int
    directions: list[str]
    marker: dict[str, Any] | None

    @property
    def present(self) -> bool:
        return bool(self.runs or self.directions)

    @property
    def description(self) -> str:
        """The bundle's own account of its data (how it was made, what to doubt), as imported."""
        return (self.marker or {}).get("description", "") if self.present else ""

    def describe(self) -> str:
        if self.present:
            bundle = (self.marker or {}).get("bundle", "?")
            return (f"shipped data (bundle {bundle!r}): {_count(len(self.runs), 'run')}, {_count(self.samples, 'sample')}"
                    f", {_count(self.judgements, 'judgement')}, {_count(len(self.directions), 'direction')}")
        if self.marker and self.marker.get("state") == "removed":
            return f"shipped data removed on {str(self.marker.get('at'))[:19]}"
        return "no shipped data in this store"


def shipped_status(store: Store) -> ShippedStatus:
    marker = read_marker(store)
    if not store.path.exists():
        return ShippedStatus([], 0, 0, [], marker)
    runs = [r for (r,) in store.sql("SELECT id FROM runs WHERE status = ? ORDER BY id", [SHIPPED_STATUS]).rows]
    counts = store.sql("SELECT (SELECT count(*) FROM samples WHERE run_id IN (SELECT id FROM runs WHERE status = $s)),"
                       " (SELECT count(*) FROM judgements WHERE run_id IN (SELECT id FROM runs WHERE status = $s))",
                       {"s": SHIPPED_STATUS}).rows[0]
    directions = [d.name for d in store.directions() if isinstance(d.extra, dict) and d.extra.get("shipped")]
    return ShippedStatus(runs, int(counts[0]), int(counts[1]), directions, marker)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def remove_shipped(store: Store) -> ShippedStatus:
    """Delete every shipped run (all its rows) and shipped direction (its row and file); returns what went."""
    status = shipped_status(store)
    files = [Path(d.path) for d in store.directions() if d.name in status.directions]
    with store.write() as con:
        subquery = f"SELECT id FROM runs WHERE status = '{SHIPPED_STATUS}'"
        for table in ("sample_score_rows",) + tuple(reversed(RUN_TABLES)):
            column = _RUN_COLUMN.get(table, "run_id")
            con.execute(f"DELETE FROM {table} WHERE {column} IN ({subquery})")
        if status.directions:
            con.execute(f"DELETE FROM directions WHERE name IN ({_sql_list(status.directions)})")
    for path in files:
        path.unlink(missing_ok=True)
    _write_marker(store, {"state": "removed", "bundle": (status.marker or {}).get("bundle"), "runs": status.runs,
                          "directions": status.directions, "at": datetime.now(timezone.utc).isoformat()})
    return status
