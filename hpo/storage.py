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
import sqlite3
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from hpo._private import (
    cached_storage,
    cached_user_attrs,
    heartbeat_base,
    trial_id,
    write_user_attrs,
)
from hpo.config import SpecError
from hpo.outage import Retry
from hpo.redact import first_line, redact_url, url_problem

DEFAULT_STORAGE = "sqlite:///optuna.db"
# A running trial writes a heartbeat to the storage; one silent for GRACE_S seconds belonged to
# a process that died (killed, out of memory, machine lost) and is failed by a live process.
HEARTBEAT_S = 20
GRACE_S = 120
SQLITE_BUSY_S = 60  # how long a SQLite writer waits for another before "database is locked"

# The database drivers a storage URL may need, and how to install each.
_DRIVERS = {
    "postgresql": ("psycopg", "pip install 'hpo[postgres]'"),
    "postgresql+psycopg": ("psycopg", "pip install 'hpo[postgres]'"),
    "postgresql+psycopg2": ("psycopg2", "pip install psycopg2-binary"),
    "mysql": ("MySQLdb", "pip install mysqlclient"),
    "mysql+pymysql": ("pymysql", "pip install pymysql"),
}


def sqlite_path(url: str) -> Path | None:
    """The file behind a sqlite:/// URL (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:///") or url in ("sqlite:///", "sqlite:///:memory:"):
        return None
    return Path(url[len("sqlite:///") :].split("?")[0])


def missing_sqlite(url: str) -> bool:
    """A sqlite:/// URL whose file does not exist (opening it would create an empty one)."""
    path = sqlite_path(url)
    return path is not None and not path.exists()


def check_driver(url: str, where: str = "storage") -> None:
    """Refuse a database URL whose password is not percent-encoded, or whose driver is not
    installed (naming the package to install)."""
    problem = url_problem(url, where)
    if problem:
        raise SpecError([problem])
    scheme = url.split("://", 1)[0].lower()
    module, how = _DRIVERS.get(scheme, (None, None))
    if module and importlib.util.find_spec(module) is None:
        raise SpecError(
            [
                f"{where}: {redact_url(url)} needs the {module} database driver, not "
                f"installed: {how}"
            ]
        )


def check_writable(folder: Path, what: str, where: str, way_out: str) -> None:
    """Refuse (SpecError) a folder hpo must write in but cannot: read-only, or not ours.

    The nearest existing folder is what counts when `folder` is not there yet."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    why = "not a folder" if not existing.is_dir() else "not writable"
    try:
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            why = "on a read-only file system"
    except OSError:
        pass
    raise SpecError([f"{where}: cannot write {what} in {existing} ({why}); {way_out}"])


def check_storage_writable(url: str, where: str = "storage") -> None:
    """A SQLite storage's folder must be writable (the database and its journal go there)."""
    path = sqlite_path(url)
    if path is not None:
        check_writable(
            path.parent,
            path.name,
            where,
            "run from a writable folder, or give --storage a database elsewhere",
        )


_LOCK_FDS: dict[Path, int] = {}


def _lock_fd(path: Path) -> int:
    """This process's descriptor of a SQLite database file, opened once and never closed:
    closing any descriptor of a file drops every POSIX lock the process holds on it,
    SQLite's included, and another process could then fold the write-ahead journal away
    while this one still writes to it (a corrupt database). Opened again when the file was
    replaced (a study deleted and started afresh)."""
    key = path.absolute()
    kept = _LOCK_FDS.get(key)
    try:
        if kept is not None and os.fstat(kept).st_ino == os.stat(path).st_ino:
            return kept
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    _LOCK_FDS[key] = fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    return fd


def has_lock(url: str) -> bool:
    """Whether `storage_lock` locks anything for this database (SQLite and PostgreSQL)."""
    return sqlite_path(url) is not None or url.lower().startswith("postgresql")


@contextmanager
def storage_lock(url: str, key: str, retry: Retry | None = None) -> Iterator[None]:
    """Hold a lock named `key` among all processes using the database at `url`.

    SQLite: an exclusive flock on the database file (SQLite's own locks are of another kind
    and do not interfere), through a descriptor kept open (`_lock_fd`). PostgreSQL: a session
    advisory lock, taken through `retry` when the server may be away. Other databases: no lock.
    """
    path = sqlite_path(url)
    if path is not None:
        fd = _lock_fd(path)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return
    if url.lower().startswith("postgresql"):
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(url, poolclass=NullPool)

        taken: list[Any] = []

        def lock() -> Any:
            conn = engine.connect()
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": number})
            except BaseException:
                conn.close()
                raise
            taken.append(conn)
            return conn

        try:
            try:
                conn = retry(lock) if retry is not None else lock()
            except BaseException:  # Ctrl-C while waiting, raised once the lock was granted
                for held in taken:
                    held.close()  # which releases it
                raise
            try:
                yield
            finally:
                try:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": number})
                    conn.close()
                except Exception:  # noqa: BLE001 - a lost connection took its lock with it
                    pass
        finally:
            engine.dispose()
        return
    yield


def open_storage(
    url: str,
    *,
    heartbeat: bool = False,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    retry: Retry | None = None,
) -> optuna.storages.BaseStorage:
    """The Optuna storage behind a URL, its tables created once whoever comes first.

    With `heartbeat`, running trials can record a heartbeat, and `on_stale(study, trial)` is
    called for each trial of a dead process that `fail_stale_trials` fails (once the heartbeat
    has been silent for `GRACE_S` seconds). With `retry`, every call goes through it, so a
    database that goes away mid-study is waited for. A URL that cannot be opened raises
    `SpecError`.
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
    elif url.lower().startswith("postgresql"):
        kw["engine_kwargs"] = {
            "pool_pre_ping": True,  # connections from before a server restart are replaced
            "connect_args": {"connect_timeout": 10},  # seconds; a host gone off the network
        }
    try:
        with warnings.catch_warnings():  # the heartbeat is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            with storage_lock(url, "hpo:tables"):
                rdb = optuna.storages.RDBStorage(url, **kw)
        if heartbeat and sqlite_path(url) is not None:  # a run's storage: written every epoch
            write_ahead(rdb.engine)
        if retry is None:
            return rdb
        return _Resilient(cached_storage(rdb), rdb, retry)
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed URL, no server, bad credentials
        raise SpecError([f"storage: cannot open {redact_url(url)!r}: {first_line(e)}"]) from None


def write_ahead(engine: sqlalchemy.engine.Engine) -> None:
    """A run's SQLite connections write ahead (SQLite's WAL journal, synced at checkpoints):
    a commit appends to `optuna.db-wal` instead of rewriting the database and syncing it
    twice, and readers (the dashboard, another worker process) no longer block the writer. A
    digits trial's bookkeeping took a third less (an epoch's report and prune 4.3 ms instead
    of 6.3, an ask 28 ms instead of 49). A process killed mid-run loses nothing: the journal
    is read back by whoever opens the database next; only a power cut may lose the last
    commits. `at_rest` makes the database one file again when the run ends."""
    sqlalchemy.event.listen(engine, "connect", _write_ahead)
    engine.dispose()  # the connections opened before: closed, so that every one writes ahead


def _write_ahead(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # kept by the file: the first connection sets it
    cursor.execute("PRAGMA synchronous=NORMAL")  # per connection: syncs at checkpoints
    cursor.close()


def at_rest(storage: optuna.storages.BaseStorage, url: str) -> None:
    """A run's SQLite database back to one file once no other process has it open: SQLite's
    default journal again, the write-ahead journal folded in, so that `optuna.db` alone can
    be copied or read from a read-only folder. While another process (a worker, the
    dashboard) has it open it stays as it is: the last to end does it."""
    path = sqlite_path(url)
    rdb = storage._rdb if isinstance(storage, _Resilient) else storage
    if path is None or not isinstance(rdb, optuna.storages.RDBStorage):
        return
    if sqlalchemy.event.contains(rdb.engine, "connect", _write_ahead):
        sqlalchemy.event.remove(rdb.engine, "connect", _write_ahead)
    rdb.remove_session()
    rdb.engine.dispose()  # later connections (a study handed back to Python) do not write ahead
    try:
        with closing(sqlite3.connect(path, timeout=0)) as db:
            db.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.Error:
        pass  # another process has it open


BaseHeartbeat = heartbeat_base()


class _Resilient(BaseStorage, BaseHeartbeat):  # type: ignore[misc,valid-type]
    """An Optuna storage whose every call goes through a `Retry`."""

    def __init__(self, inner: BaseStorage, rdb: optuna.storages.RDBStorage, retry: Retry):
        self._inner, self._rdb, self._retry = inner, rdb, retry

    def remove_session(self) -> None:
        """Drop the database session and the pool's connections (after a second Ctrl-C cut a
        write short: a connection back in the pool may still hold its lock)."""
        self._rdb.remove_session()
        self._rdb.engine.dispose()

    def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """Several user attributes of a running trial in one transaction: one commit, not
        one each (on SQLite 9 attributes take 6 ms instead of 16)."""
        self._retry(self._write_user_attrs, trial_id, attrs)

    def _write_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        if not write_user_attrs(self._rdb, trial_id, attrs):  # an Optuna without the calls
            for key, value in attrs.items():
                self._inner.set_trial_user_attr(trial_id, key, value)


def _through_retry(name: str) -> Callable[..., Any]:
    def call(self: _Resilient, *args: Any, **kwargs: Any) -> Any:
        return self._retry(getattr(self._inner, name), *args, **kwargs)

    call.__name__ = name
    return call


for _name, _value in {**vars(BaseHeartbeat), **vars(BaseStorage)}.items():
    if callable(_value) and not _name.startswith("__") and _name != "remove_session":
        setattr(_Resilient, _name, _through_retry(_name))
_Resilient.__abstractmethods__ = frozenset()


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """`trial.set_user_attr` for each of `attrs`, in one transaction where the storage is
    `open_storage`'s."""
    storage, cached = trial.storage, cached_user_attrs(trial)
    if not isinstance(storage, _Resilient) or cached is None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    storage.set_trial_user_attrs(trial_id(trial), attrs)
    cached.update(attrs)  # what trial.user_attrs reads


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the running trials of processes that died (see `open_storage`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
