"""The Optuna storage: opening it once tables exist, locks shared by every process, heartbeats.

Several `hpo run` processes, on one machine or many, share a study through its storage. What
must happen once (creating the tables, the study's MLflow parent run, reserving the last trial
of the budget, the final test evaluation) happens under `storage_lock`: an advisory lock on
PostgreSQL, a file lock on a SQLite file (one machine, which is all SQLite serves).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from hpo.config import SpecError
from hpo.redact import redact

DEFAULT_STORAGE = "sqlite:///optuna.db"
# A running trial writes a heartbeat to the storage; one silent for GRACE_S seconds belonged to
# a process that died (killed, out of memory, machine lost) and is failed by a live process.
HEARTBEAT_S = 20
GRACE_S = 120
SQLITE_BUSY_S = 60  # how long a SQLite writer waits for another before "database is locked"

# The database drivers a storage URL may need, and how to install each.
_DRIVERS = {
    "postgresql": ("psycopg", "pip install 'psycopg[binary]'"),
    "postgresql+psycopg": ("psycopg", "pip install 'psycopg[binary]'"),
    "postgresql+psycopg2": ("psycopg2", "pip install psycopg2-binary"),
    "mysql": ("MySQLdb", "pip install mysqlclient"),
    "mysql+pymysql": ("pymysql", "pip install pymysql"),
}


def sqlite_path(url: str) -> Path | None:
    """The file behind a sqlite:/// URL (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:///") or url in ("sqlite:///", "sqlite:///:memory:"):
        return None
    return Path(url[len("sqlite:///") :].split("?")[0])


def check_driver(url: str, where: str = "storage") -> None:
    """Refuse a database URL whose driver is not installed, naming the package to install."""
    scheme = url.split("://", 1)[0].lower()
    module, how = _DRIVERS.get(scheme, (None, None))
    if module and importlib.util.find_spec(module) is None:
        raise SpecError(
            [f"{where}: {redact(url)} needs the {module} database driver, not installed: {how}"]
        )


@contextmanager
def storage_lock(url: str, key: str) -> Iterator[None]:
    """Hold a lock named `key` among all processes using the database at `url`.

    SQLite: an exclusive flock on the database file (SQLite's own locks are of another kind
    and do not interfere). PostgreSQL: a session advisory lock. Other databases: no lock.
    """
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock
        return
    if url.lower().startswith("postgresql"):
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": number})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": number})
        finally:
            engine.dispose()
        return
    yield


def open_storage(
    url: str,
    *,
    heartbeat: bool = False,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.BaseStorage:
    """The Optuna storage behind a URL, its tables created once whoever comes first.

    With `heartbeat`, running trials can record a heartbeat, and `on_stale(study, trial)` is
    called for each trial of a dead process that `fail_stale_trials` fails (once the heartbeat
    has been silent for `GRACE_S` seconds). A URL that cannot be opened raises `SpecError`.
    """
    check_driver(url)
    kw: dict[str, Any] = {}
    if heartbeat:
        kw = {
            "heartbeat_interval": HEARTBEAT_S,
            "grace_period": GRACE_S,
            "heartbeat_stale_trial_callback": on_stale,
        }
    if sqlite_path(url) is not None:
        kw["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_BUSY_S}}
    try:
        with warnings.catch_warnings():  # the heartbeat is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            with storage_lock(url, "hpo:tables"):
                return optuna.storages.RDBStorage(url, **kw)
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed URL, no server, bad credentials
        msg = redact(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise SpecError([f"storage: cannot open {redact(url)!r}: {msg[:300]}"]) from None


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the running trials of processes that died (see `open_storage`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
