"""Passwords out of URLs and messages: `postgresql://user:***@host/db`."""

from __future__ import annotations

import re

# scheme://user:password@  (the password may hold anything but '@', '/' and whitespace)
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^:/@\s]*):([^@/\s]+)@")
# password=... in a query string or a libpq keyword string
_KEYWORD = re.compile(r"(\b(?:password|passwd|pwd)=)([^&\s;'\"]+)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every URL password and `password=` value replaced by ***."""
    return _KEYWORD.sub(r"\1***", _USERINFO.sub(r"\1:***@", str(text)))


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, redacted and cut at `limit` characters; the
    error's type when it says nothing."""
    text = str(error).strip()
    return redact(text.splitlines()[0][:limit]) if text else type(error).__name__


def recorded_uri(uri: str | None) -> str | None:
    """A URL as a study recorded it, to connect to; None where it was recorded redacted (a
    password is never stored: then the command line or the environment must give it)."""
    return uri if uri and "***" not in uri else None
