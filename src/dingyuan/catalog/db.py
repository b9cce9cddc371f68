"""Opening the catalog: an engine whose schema the alembic migrations bring to the newest revision.

SQLite (a file next to the vault's state) is the default; PostgreSQL works by URL
(``postgresql+psycopg://user@host/dbname``, with the ``postgres`` extra installed). Both are
tested: on PostgreSQL (a private server the tests start) the migrations, their match with the
models, an upgrade with rows, aware UTC times, constraints, the rebuild (the same rows as on
SQLite), concurrent backup claims and the vault's API and CLI. The migrations ship inside the
package and run programmatically, so no ``alembic.ini`` is needed at runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError

from ..errors import CatalogUnavailable

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def sqlite_url(path: str | Path) -> str:
    """The SQLAlchemy URL of a SQLite catalog file."""
    return f"sqlite:///{Path(path).resolve()}"


def alembic_config() -> Config:
    """An alembic configuration built in code, pointing at the packaged migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    return cfg


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    try:
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
    finally:
        cur.close()


def create_catalog_engine(url: str) -> Engine:
    """An engine without migrating; on SQLite every connection enforces foreign keys and uses WAL."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the catalog's schema to ``revision`` (a no-op when it is there already)."""
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def open_catalog(url: str) -> Engine:
    """Open (creating if needed) the catalog at ``url`` and migrate it to the newest schema;
    :class:`CatalogUnavailable` when the URL is wrong or the database cannot be reached."""
    try:
        engine = create_catalog_engine(url)
    except (ArgumentError, ImportError) as e:
        raise CatalogUnavailable(url=safe_url(url), detail=str(e)) from None
    try:
        migrate(engine)
    except (OperationalError, InterfaceError) as e:
        engine.dispose()
        raise CatalogUnavailable(url=safe_url(url), detail=str(e.orig or e).strip()) from None
    return engine


def safe_url(url: str) -> str:
    """``url`` with its password, if any, masked (for messages and output)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "<malformed URL>"
    return url if parsed.password is None else parsed.render_as_string(hide_password=True)
