"""Results on disk: one directory per run and a SQLite index that can be rebuilt from them.

    results/runs/<key>/config.json    resolved RunSpec, written before training starts
                       checkpoint.pt  {"kind": "fit", ...} while training; {"kind": "final", ...} after
                       privacy.json   the privacy card
                       samples.npz    uint8 images [N,C,H,W] + int64 labels
                       samples.png    labelled grid
                       metrics.json   written last: its presence means the run is finished
                       log.txt
                       curve.json     with `eval.curve`: the scored points along the fit (bench.grid.curve);
                       curve/         their snapshots while they are not scored yet
    results/bench.sqlite              runs(key, ...), metrics(key, metric, value, info) and
                                      curve(key, units, metric, ...): one row per curve point and metric
    results/locks/<key>.lock          held (fcntl.flock) by the process running that cell (bench.grid)

Every file is written to a temporary name and renamed, so a killed process never leaves a truncated
file that a later run would trust. SQLite runs in WAL mode with a busy timeout, so concurrent runs of
one grid do not corrupt it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sqlite3
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.config import env_seconds
from bench.errors import BenchError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY, method TEXT, dataset TEXT, target_epsilon REAL, delta REAL, accountant TEXT,
    seed INTEGER, profile TEXT, status TEXT, guarantee TEXT, epsilon REAL, error TEXT,
    cost TEXT, run_dir TEXT, updated TEXT, sweep TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    key TEXT, metric TEXT, value REAL, info TEXT, PRIMARY KEY (key, metric)
);
CREATE TABLE IF NOT EXISTS curve (
    key TEXT, units INTEGER, metric TEXT, total INTEGER, seconds REAL, offset_s REAL, value REAL, n_samples INTEGER,
    info TEXT, PRIMARY KEY (key, units, metric)
);
CREATE TABLE IF NOT EXISTS audits (
    key TEXT PRIMARY KEY, method TEXT, dataset TEXT, target_epsilon REAL, seed INTEGER, profile TEXT,
    status TEXT, verdict TEXT, lower_bound REAL, info TEXT, error TEXT, updated TEXT
);
"""


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """JSON has no inf/nan: write them as null (ε = ∞ of a non-private run)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    return o


@contextlib.contextmanager
def _atomic(path: Path, mode: str = "w") -> Iterator[Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    with _atomic(path) as f:
        json.dump(_clean(obj), f, indent=2, default=_json_default, allow_nan=False)
        f.write("\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BenchError(f"cannot read {path}: {e}") from None


def save_torch(path: Path, obj: Any) -> None:
    with _atomic(path, "wb") as f:
        torch.save(obj, f)


def load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise BenchError(
            f"checkpoint {path} is corrupt ({type(e).__name__}); delete it or rerun with --force"
        ) from None


def db_timeout() -> float:
    """Seconds to wait for a results database that another process holds: BENCH_DB_TIMEOUT, else 60."""
    return env_seconds("BENCH_DB_TIMEOUT", 60.0)


def db_error(path: Path, e: sqlite3.DatabaseError) -> str:
    """What a SQLite error on the results index means, and what to do about it, in one line."""
    text = str(e)
    low = text.lower()
    if "locked" in low or "busy" in low:
        return (
            f"results database {path} is locked: another process has held it for over {db_timeout():g} s ({text}); "
            "wait for the other `bench` to finish, or give this run its own --results folder"
        )
    if "readonly" in low or "read-only" in low:
        return f"results database {path} is read-only ({text}); make it and its folder writable, or use another"
    if "unable to open" in low or "disk i/o" in low:
        return f"results database {path} cannot be opened ({text}); check that the folder exists and is readable"
    if "full" in low:
        return f"results database {path}: the disk is full ({text}); free space and rerun (finished runs are kept)"
    if "not a database" in low or "malformed" in low or "corrupt" in low:
        return (
            f"results database {path} is corrupt ({text}); move it away and run `bench report --rebuild`: the "
            "index is rebuilt from the run folders"
        )
    return f"results database {path}: {text}; if it persists, move it away and run `bench report --rebuild`"


# Columns added to a table after its first release: (table, column, type). An index written before them gets them
# (NULL in its rows) when it is opened; older bench versions read such an index as before (they ignore them).
_ADDED_COLUMNS = (("runs", "sweep", "TEXT"),)  # sweep: JSON {field: value} of a `--sweep` cell, NULL for none


def _add_columns(db: sqlite3.Connection) -> None:
    for table, column, kind in _ADDED_COLUMNS:
        if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


_INSERT_CURVE = (
    "INSERT INTO curve (key, units, metric, total, seconds, offset_s, value, n_samples, info) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _curve_rows(key: str, points: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The curve table's rows of a run's curve points: one per (point, metric), the sample count the metric's
    own record states (else the point's)."""
    return [
        (key, int(p["units"]), name, int(p["total"]), float(p["seconds"]), float(p.get("offset_s") or 0.0),
         _clean(m.get("value")), int(m.get("n_gen") or p["n_samples"]), json.dumps(_clean(m), default=_json_default))
        for p in points
        for name, m in p["metrics"].items()
    ]  # fmt: skip


class Store:
    """A results folder: run directories plus the SQLite index. `index=False`: the folder only, for a subclass
    that sends its index writes elsewhere (a Ray worker sends them to the driver: bench.grid.executors.ray)."""

    def __init__(self, root: str | Path, *, index: bool = True) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "runs").mkdir(exist_ok=True)
            probe = self.root / f".write-test-{uuid.uuid4().hex}"  # one per process: two may probe at once
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise BenchError(f"results folder {self.root} is not usable: {e.strerror or e}") from None
        self.db_path = self.root / "bench.sqlite"
        if not index:
            return
        with self._connect() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise BenchError(
                    f"{self.db_path} has schema version {version}, newer than this bench "
                    f"({SCHEMA_VERSION}); upgrade bench"
                )
            db.executescript(_SCHEMA)
            _add_columns(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.db_path, timeout=db_timeout())
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as e:
            raise BenchError(db_error(self.db_path, e)) from None
        try:
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        except sqlite3.DatabaseError as e:
            raise BenchError(db_error(self.db_path, e)) from None
        finally:
            db.close()

    def run_dir(self, key: str) -> Path:
        return self.root / "runs" / key

    def finished(self, key: str) -> bool:
        return (self.run_dir(key) / "metrics.json").is_file()

    def clear(self, key: str) -> None:
        """Delete run `key`: its folder and its index rows."""
        shutil.rmtree(self.run_dir(key), ignore_errors=True)
        self.clear_index(key)

    def clear_index(self, key: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM runs WHERE key = ?", (key,))
            db.execute("DELETE FROM metrics WHERE key = ?", (key,))
            db.execute("DELETE FROM curve WHERE key = ?", (key,))

    def record_run(self, key: str, **fields: Any) -> None:
        """Insert or update the index row of a run."""
        with self._connect() as db:
            self._upsert(db, key, fields)

    def _upsert(self, db: sqlite3.Connection, key: str, fields: dict[str, Any], table: str = "runs") -> None:
        fields = _clean(fields) | {"key": key}
        if table == "runs":
            fields["run_dir"] = str(self.run_dir(key))
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        updates = ", ".join(f"{c} = excluded.{c}" for c in fields if c != "key")
        db.execute(
            f"INSERT INTO {table} ({cols}, updated) VALUES ({marks}, datetime('now')) "
            f"ON CONFLICT(key) DO UPDATE SET {updates}, updated = datetime('now')",
            tuple(fields.values()),
        )

    def record_audit(self, key: str, **fields: Any) -> None:
        """Insert or update the row of an audit cell (bench.audit): its own table, never in the utility tables."""
        with self._connect() as db:
            self._upsert(db, key, fields, table="audits")

    def clear_audit(self, key: str) -> None:
        shutil.rmtree(self.run_dir(key), ignore_errors=True)
        with self._connect() as db:
            db.execute("DELETE FROM audits WHERE key = ?", (key,))

    def audits(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM audits")]

    def record_metrics(self, key: str, metrics: dict[str, dict[str, Any]]) -> None:
        with self._connect() as db:
            self._put_metrics(db, key, metrics)

    @staticmethod
    def _put_metrics(db: sqlite3.Connection, key: str, metrics: dict[str, dict[str, Any]]) -> None:
        rows = [
            (key, name, _clean(m.get("value")), json.dumps(_clean(m), default=_json_default))
            for name, m in metrics.items()
        ]
        db.execute("DELETE FROM metrics WHERE key = ?", (key,))
        db.executemany("INSERT INTO metrics (key, metric, value, info) VALUES (?, ?, ?, ?)", rows)

    def record_curve(self, key: str, points: list[dict[str, Any]]) -> None:
        """The quality-against-compute points of run `key` (bench.grid.curve's curve.json points), replacing its earlier
        ones: one row per (point, metric)."""
        with self._connect() as db:
            self._put_curve(db, key, points)

    @staticmethod
    def _put_curve(db: sqlite3.Connection, key: str, points: list[dict[str, Any]]) -> None:
        db.execute("DELETE FROM curve WHERE key = ?", (key,))
        db.executemany(_INSERT_CURVE, _curve_rows(key, points))

    def curve_rows(self) -> list[dict[str, Any]]:
        """Every quality-against-compute point of the index, one row per (run, point, metric)."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM curve ORDER BY key, units, metric")]

    def rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """All run rows and metric rows of the index."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            runs = [dict(r) for r in db.execute("SELECT * FROM runs")]
            metrics = [dict(r) for r in db.execute("SELECT * FROM metrics")]
        return runs, metrics

    def rebuild(self) -> int:
        """Re-create the index from the run folders, in one transaction; a folder whose files cannot be read is
        left out with a warning naming it (its files are not touched). Returns the number of finished runs."""
        found = []
        audits: list[tuple[str, dict[str, Any]]] = []
        curves: list[tuple[str, list[tuple[Any, ...]]]] = []  # (key, curve rows) of the runs with a curve.json
        for run in sorted((self.root / "runs").iterdir()):
            try:
                read = _read_run(run)
            except (BenchError, KeyError, TypeError, AttributeError, ValueError) as e:
                warnings.warn(f"{run}: left out of the rebuilt index, its files cannot be read ({e})", stacklevel=2)
                continue
            if read is None:
                continue
            kind, fields, metrics, curve_rows = read
            if kind == "audit":
                audits.append((run.name, fields))
                continue
            if curve_rows is not None:
                curves.append((run.name, curve_rows))
            found.append((run.name, fields, metrics))
        with self._connect() as db:
            db.execute("DELETE FROM runs")
            db.execute("DELETE FROM metrics")
            db.execute("DELETE FROM audits")
            db.execute("DELETE FROM curve")
            for key, fields, metrics in found:
                self._upsert(db, key, fields)
                if metrics is not None:
                    self._put_metrics(db, key, metrics)
            db.executemany(_INSERT_CURVE, [row for _, rows in curves for row in rows])
            for key, fields in audits:
                self._upsert(db, key, fields, table="audits")
        return sum(m is not None for _, _, m in found)

    def status(self, key: str) -> str | None:
        """The index's status of run `key` (None: no row)."""
        with self._connect() as db:
            row = db.execute("SELECT status FROM runs WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def reindex(self, key: str) -> None:
        """Set run `key`'s index rows (run, metrics, curve) from its folder: after a worker that finished the folder
        was lost before the index heard of it."""
        read = _read_run(self.run_dir(key))
        if read is None or read[0] != "run":
            return
        _, fields, metrics, curve_rows = read
        with self._connect() as db:
            db.execute("DELETE FROM metrics WHERE key = ?", (key,))
            db.execute("DELETE FROM curve WHERE key = ?", (key,))
            self._upsert(db, key, fields)
            if metrics is not None:
                self._put_metrics(db, key, metrics)
            db.executemany(_INSERT_CURVE, curve_rows or [])


def _read_run(run: Path) -> tuple[str, dict[str, Any], dict[str, Any] | None, list[tuple[Any, ...]] | None] | None:
    """(kind "run" or "audit", index fields, metrics or None, curve rows or None) from a run folder's files; None
    for a folder without a config.json (or an audit without its result)."""
    cfg_path, card_path, met_path = run / "config.json", run / "privacy.json", run / "metrics.json"
    if not cfg_path.is_file():
        return None
    cfg = read_json(cfg_path)
    if cfg.get("kind") == "audit":
        audit_path = run / "audit.json"
        if not audit_path.is_file():
            return None
        result = read_json(audit_path)
        return "audit", {
            "method": cfg["method"], "dataset": cfg["dataset"], "target_epsilon": cfg["epsilon"],
            "seed": cfg["seed"], "profile": cfg["profile"], "status": "done",
            "verdict": result["verdict"], "lower_bound": result["epsilon_lb"],
            "info": json.dumps(_clean(result)),
        }, None, None  # fmt: skip
    card = read_json(card_path) if card_path.is_file() else {}
    met = read_json(met_path) if met_path.is_file() else None
    fields = {
        "method": cfg["method"], "dataset": cfg["dataset"], "target_epsilon": cfg["epsilon"],
        "delta": cfg["delta"], "accountant": cfg["accountant"], "seed": cfg["seed"],
        "profile": cfg["profile"], "guarantee": card.get("guarantee"), "epsilon": card.get("epsilon"),
        "status": "done" if met is not None else card.get("status", "incomplete"),
        "sweep": json.dumps(cfg["sweep"]) if cfg.get("sweep") else None,
        "error": None,
    }  # fmt: skip
    metrics: dict[str, Any] | None = None
    if met is not None:
        fields["cost"] = json.dumps(_clean(met.get("cost", {})))
        metrics = dict(met["metrics"])
    curve_rows = None
    if card.get("status") == "ok" and (run / "curve.json").is_file():  # scored only once ε checked out
        curve_rows = _curve_rows(run.name, read_json(run / "curve.json")["points"])
    return "run", fields, metrics, curve_rows
