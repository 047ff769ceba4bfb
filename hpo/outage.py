"""A database or tracking server that goes away mid-study: retry for a while, then give up.

`Retry` wraps calls to a server; a lost connection (server down, network cut, a restart) is
retried with backoff for up to `window_s` seconds, and then `ServerLost` is raised, which the
driver turns into a clean stop: its trials interrupted, a rerun continuing the study. Any other
error (a bad request, a missing row) passes straight through.

Ctrl-C must not cut a call to a server in two either: on SQLite, a write cut short leaves its
connection outside the pool still holding the database's lock, and every later write (the
clean-up's first) then waits on it. Under `stop_signals_between_calls`, the first stop signal
that comes during a call in the main thread is raised as soon as the call is through; a second
one does not wait.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from hpo.redact import redact, redact_url

RETRY_S = 300.0  # default window: a database restart or failover fits; a dead server does not
T = TypeVar("T")


class ServerLost(RuntimeError):
    """A server that stayed unreachable for the whole retry window: the run stops cleanly and
    a rerun continues the study (`then` says what to do before rerunning)."""

    reason = "unreachable"
    then = ""

    def __init__(self, what: str, url: str, waited: float, error: BaseException):
        self.what = what
        error = lost_connection(error) or error
        if getattr(error, "orig", None) is not None:  # sqlalchemy's: the driver's own words
            error = error.orig  # type: ignore[attr-defined]
        # redacted before it is cut: a URL cut before its '@' would not be recognised
        first = redact(str(error).strip().splitlines()[0])[:200] if str(error).strip() else ""
        detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
        super().__init__(
            f"{what} {redact_url(url)} unreachable for {waited:.0f} s ({detail}); stopped"
        )


class DiskFault(ServerLost):
    """A write that failed for lack of space, a read-only or failing disk: retrying does not
    help, so the run stops at once, the same way as for a lost server."""

    then = "free some space (or fix the disk), then "

    def __init__(self, what: str, url: str, fault: str):
        RuntimeError.__init__(
            self, redact(f"{fault} writing the {what} {redact_url(url)}; stopped")
        )
        self.what, self.reason = what, fault


# errno -> what the disk did; and SQLite's own words for the same faults
_DISK_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EIO: "disk I/O error",
    errno.EFBIG: "file too large",
}
_DISK_WORDS = {
    "database or disk is full": "no space left on device (database or disk is full)",
    "disk i/o error": "disk I/O error",
    "attempt to write a readonly database": "read-only database",
}


def disk_fault(error: BaseException) -> str | None:
    """What the disk did (no space, read-only, I/O error), if that is what the exception's chain
    says; the file is named when the error names it."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            where = f" ({e.filename})" if e.filename else ""
            return _DISK_ERRNOS[e.errno] + where
        text = str(e).lower()
        for words, fault in _DISK_WORDS.items():
            if words in text:
                return fault
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The exception, then what caused it, and so on (each once)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        yield e
        seen.add(id(e))
        e = e.__cause__ or e.__context__


def is_transient(error: BaseException) -> bool:
    """True for a lost connection anywhere in the exception's chain, not for a bad request."""
    return lost_connection(error) is not None


def lost_connection(error: BaseException) -> BaseException | None:
    """The lost connection in an exception's chain (the root cause to show), if any."""
    import requests
    import sqlalchemy.exc as sa

    lost = (
        sa.OperationalError,  # server down, connection refused or reset, database locked
        sa.InterfaceError,
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,  # gone in the middle of its answer
        requests.exceptions.RetryError,  # MLflow's own retries on 5xx ran out
        ConnectionError,
        TimeoutError,
    )
    for e in _chain(error):
        if isinstance(e, lost) or (isinstance(e, sa.DBAPIError) and e.connection_invalidated):
            return e
    return None


class Retry:
    """Call through a server that may go away: see the module docstring.

    `notify(line)` hears when an outage starts and when the server is back (once each, however
    many threads are waiting). `window_s = 0` gives up at the first lost connection.
    """

    def __init__(
        self,
        what: str,
        url: str,
        window_s: float = RETRY_S,
        notify: Callable[[str], None] | None = None,
    ):
        self.what, self.url, self.window_s, self.notify = what, url, window_s, notify
        self._lock = threading.Lock()
        self._down_since: float | None = None

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        delay = 0.5
        while True:
            try:
                with uncut():
                    result = fn(*args, **kwargs)
            except Exception as e:
                fault = disk_fault(e)
                if fault:
                    raise DiskFault(self.what, self.url, fault) from None
                if not is_transient(e):
                    raise
                waited = self._down()
                if waited >= self.window_s:
                    raise ServerLost(self.what, self.url, waited, e) from None
                time.sleep(min(delay, self.window_s - waited))
                delay = min(delay * 2, 10.0)
                continue
            self._up()
            return result

    def _down(self) -> float:
        with self._lock:
            now = time.monotonic()
            if self._down_since is None:
                self._down_since = now
                self._say(
                    f"{self.what} {redact_url(self.url)} unreachable: retrying for up to "
                    f"{self.window_s:.0f} s"
                )
            return now - self._down_since

    def _up(self) -> None:
        if self._down_since is None:  # the usual case: no lock taken
            return
        with self._lock:
            if self._down_since is not None:
                self._say(
                    f"{self.what} {redact_url(self.url)} back after "
                    f"{time.monotonic() - self._down_since:.0f} s"
                )
                self._down_since = None

    def _say(self, line: str) -> None:
        if self.notify is not None:
            self.notify(redact(line))


class _Calls:
    """The main thread's calls to a server under way, and the stop signals received."""

    depth = 0
    pending = False  # a stop signal came during a call: raised when the call is through
    signals = 0


def _on_stop_signal(signum: int, frame: Any) -> None:
    _Calls.signals += 1
    if _Calls.depth and _Calls.signals == 1:
        _Calls.pending = True
        with contextlib.suppress(OSError):  # no stderr (`2>&-`): stop all the same
            os.write(2, b"\nstopping once the current write is through (Ctrl-C again: now)\n")
        return
    _Calls.pending = False
    raise KeyboardInterrupt  # between calls, or a second signal: at once


@contextlib.contextmanager
def stop_signals_between_calls() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt in the main thread, but the first one never
    inside a call made through a `Retry` or under `uncut` (see the module docstring). A signal
    this process was started ignoring (`hpo run &` in a script) stays ignored."""
    stops = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN]
    previous = {s: signal.signal(s, _on_stop_signal) for s in stops}
    _Calls.signals = 0
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _Calls.depth, _Calls.pending, _Calls.signals = 0, False, 0


@contextlib.contextmanager
def uncut() -> Iterator[None]:
    """A block of calls to a server that the first stop signal does not cut in two: it is
    raised when the block is through (under `stop_signals_between_calls`)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are only ever raised in the main thread
        return
    _Calls.depth += 1
    try:
        yield
    finally:
        _Calls.depth -= 1
        if not _Calls.depth and _Calls.pending:
            _Calls.pending = False
            raise KeyboardInterrupt
