"""The prediction and feedback log's tables, and the engine that holds them (SQLAlchemy Core).

SQLite (the default, a local file) runs in WAL mode with a busy timeout, so several service
workers append at once without losing a row; any other SQLAlchemy URL (PostgreSQL) works as is.
No table holds a name, a patient ID, a date of birth or a file path: a case is known by a keyed
hash (HMAC-SHA256) of its SOP Instance UID, with a secret that lives in the database only.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

logger = logging.getLogger(__name__)

# Times are naive UTC everywhere: SQLite keeps no zone, and one convention avoids mixing.
metadata = MetaData()

settings_table = Table(
    "lungdx_monitor_settings", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

models_table = Table(
    "lungdx_monitor_models", metadata,
    Column("version", String(32), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("registered_at", DateTime(), nullable=False),
    # class names, task, threshold, validation metrics and the drift reference: everything a report needs.
    Column("description", JSON, nullable=False),
)

predictions_table = Table(
    "lungdx_monitor_predictions", metadata,
    Column("id", String(32), primary_key=True),
    Column("created_at", DateTime(), nullable=False, index=True),
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(32), nullable=False, index=True),
    Column("probability", Float, nullable=False),
    Column("label", Integer),
    Column("class_name", String(64)),
    Column("threshold", Float),
    Column("case_key", String(64), index=True),
    Column("manufacturer", String(64)),
    Column("manufacturer_model", String(64)),
    Column("view_position", String(16)),
    Column("photometric_interpretation", String(16)),
    Column("pixel_spacing", String(32)),
    Column("image_size", String(32)),
    Column("height", Integer, nullable=False),
    Column("width", Integer, nullable=False),
    Column("intensity_mean", Float, nullable=False),
    Column("intensity_std", Float, nullable=False),
    Column("intensity_p05", Float, nullable=False),
    Column("intensity_p50", Float, nullable=False),
    Column("intensity_p95", Float, nullable=False),
    Column("intensity_histogram", JSON, nullable=False),
    Column("archived", Boolean, nullable=False, default=False),
)

feedback_table = Table(
    "lungdx_monitor_feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("prediction_id", String(32), ForeignKey("lungdx_monitor_predictions.id"), nullable=False, index=True),
    Column("created_at", DateTime(), nullable=False),
    Column("label", Integer, nullable=False),
    Column("class_name", String(64), nullable=False),
    Column("reader", String(16), nullable=False),
)

alerts_table = Table(
    "lungdx_monitor_alerts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(), nullable=False, index=True),
    Column("model_version", String(32), nullable=False),
    Column("check_name", String(64), nullable=False),
    Column("state", String(8), nullable=False),  # "raised" or "cleared"
    Column("value", Float),
    Column("limit_value", Float),
    Column("message", Text, nullable=False),
)

SQLITE_BUSY_TIMEOUT_MS = 30_000
TRUNCATED = "~"
"""Ends a header value cut to its column's width (``fit_text``)."""
_CONTROL = dict.fromkeys(range(32))  # NUL and the other C0 controls: PostgreSQL refuses NUL in text


def fit_text(value: str | None, width: int) -> str | None:
    """``value`` without control characters, cut to at most ``width`` UTF-8 bytes and marked with ``TRUNCATED``.

    Header values (Manufacturer (0008,0070) is LO, up to 64 characters, but files break the limit) go
    into ``String(width)`` columns. SQLite takes any length; PostgreSQL refuses the insert (character
    varying(n)), and the log writer would drop the row of a prediction already answered. Bytes, not
    characters, so the value fits on a ``SQL_ASCII`` cluster as on a UTF-8 one; empty becomes None.
    """
    if value is None:
        return None
    text = str(value).translate(_CONTROL).strip()
    encoded = text.encode("utf-8")
    if len(encoded) > width:
        text = encoded[:width - len(TRUNCATED)].decode("utf-8", errors="ignore") + TRUNCATED
    return text or None


def column_width(name: str, table: Table = predictions_table) -> int:
    """The declared length of a ``String`` column."""
    return table.c[name].type.length


def refuse_in_memory(url: URL) -> None:
    """Raise ValueError for an in-memory SQLite URL (``sqlite://``, ``sqlite:///:memory:``): SQLAlchemy gives each
    thread its own empty in-memory database, and the log is written by a background thread."""
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ValueError(f"an in-memory SQLite database cannot hold the monitoring log ({url}): "
                         "give it a file, e.g. sqlite:///monitor.db")


def create_store(url: str, *, must_exist: bool = False) -> Engine:
    """An engine for ``url`` with the tables created if missing; SQLite in WAL mode.

    Args:
        must_exist: for reading an existing log (``lungdx monitor``): a SQLite file that is not
            there raises FileNotFoundError instead of being created empty (a mistyped path).

    Raises:
        ValueError: an in-memory SQLite URL (``sqlite://``, ``sqlite:///:memory:``).
    """
    engine = create_engine(url, future=True, pool_pre_ping=True)
    database = engine.url.database
    refuse_in_memory(engine.url)
    if must_exist and engine.dialect.name == "sqlite" and not Path(database).is_file():
        raise FileNotFoundError(f"{database}: no such monitoring database (the file lungdx serve --db writes)")
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    # Two workers starting at once may both try to create a table; the loser finds it made.
    for attempt in range(3):
        try:
            metadata.create_all(engine)
            break
        except (OperationalError, ProgrammingError) as err:
            if attempt == 2:
                raise
            logger.debug("create tables: %s; retrying", err)
            time.sleep(0.2 * (attempt + 1))
    return engine


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    # WAL: readers never block the writer and a crash never leaves half a row; the busy timeout
    # makes a second writer wait for the lock instead of failing with "database is locked".
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def read_setting(engine: Engine, key: str) -> str | None:
    with engine.connect() as connection:
        return connection.execute(select(settings_table.c.value).where(settings_table.c.key == key)).scalar()


def ensure_setting(engine: Engine, key: str, value: str) -> str:
    """The stored value of ``key``, storing ``value`` first when there is none (first writer wins)."""
    existing = read_setting(engine, key)
    if existing is not None:
        return existing
    try:
        with engine.begin() as connection:
            connection.execute(settings_table.insert().values(key=key, value=value))
        return value
    except IntegrityError:
        return read_setting(engine, key)


def write_setting(engine: Engine, key: str, value: str) -> None:
    """Store ``value`` for ``key`` (last writer wins): two workers starting at once may both insert; the loser updates."""
    update = settings_table.update().where(settings_table.c.key == key).values(value=value)
    try:
        with engine.begin() as connection:
            if not connection.execute(update).rowcount:
                connection.execute(settings_table.insert().values(key=key, value=value))
    except IntegrityError:
        with engine.begin() as connection:
            connection.execute(update)


def case_key_secret(engine: Engine) -> bytes:
    """The HMAC secret of the pseudonymous case keys, made once per database."""
    return bytes.fromhex(ensure_setting(engine, "case_key_secret", secrets.token_hex(32)))
