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
