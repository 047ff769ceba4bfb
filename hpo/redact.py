"""Passwords out of URLs and messages: `postgresql://user:***@host/db`.

URLs are parsed (SQLAlchemy's URL parser for databases, `urllib.parse` for HTTP) wherever hpo
prints, logs or stores one (`redact_url`); free text that may embed a URL is scrubbed
(`redact`). A URL whose password would not survive parsing (an unencoded '@', ':', '/', '#',
'?' or a space) is refused before any connection (`url_problem`).
"""

from __future__ import annotations

import re
import urllib.parse

MASK = "***"
# scheme://user:  the start of a URL's password; what follows it up to the last '@' on the
# line that is followed by a host is the password as far as free text can tell (it may hold
# '/', '@' or even spaces, though hpo refuses to use those unencoded)
_USER = re.compile(
    r"\b([a-zA-Z][\w+.-]*://[^:/@\s]*):((?:(?!://)[^\n])*)@"  # up to the last '@' before
    r"(?=[\w\[])"  # a host's first character, not past another URL on the line
)
# password=... in a query string or a libpq keyword string
_KEYWORD = re.compile(r"(\b(?:password|passwd|pwd)=)([^&\s;'\"]+)", re.IGNORECASE)
# characters a password must percent-encode for the URL to mean what it says
_UNSAFE = {"@": "'@'", ":": "':'", "/": "'/'", "#": "'#'", "?": "'?'", " ": "a space"}


def redact(text: str) -> str:
    """`text` with every URL password and `password=` value replaced by ***."""
    return _KEYWORD.sub(rf"\1{MASK}", _USER.sub(rf"\1:{MASK}@", str(text)))


def _split(url: str) -> tuple[str, str, str] | None:
    """(scheme://user, password, @rest) of a URL with a password, taking its last '@' as the
    end of the password; None without one."""
    m = re.match(r"([a-zA-Z][\w+.-]*://[^:/@\s]*):(.*)@([^@]*)\Z", url, re.DOTALL)
    return (m.group(1), m.group(2), "@" + m.group(3)) if m else None


def redact_url(url: str | None) -> str | None:
    """A URL with its password replaced by *** (parsed, not searched), for printing,
    logging and storing."""
    if not url:
        return url
    split = _split(url)
    if split is not None and url_problem(url) is not None:  # not parseable as meant
        return f"{split[0]}:{MASK}{split[2]}"  # masked up to the last '@'
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return redact(url)
        host = parts.netloc.rsplit("@", 1)[1]
        netloc = f"{parts.username}:{MASK}@{host}"
        return _KEYWORD.sub(rf"\1{MASK}", urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
    if "://" in url:
        try:
            from sqlalchemy.engine import make_url

            shown = make_url(url).render_as_string(hide_password=True)
            return _KEYWORD.sub(rf"\1{MASK}", shown)  # ?password=... in the query, too
        except Exception:  # noqa: BLE001 - not a database URL: fall back to the scrubber
            pass
    return redact(url)


def url_problem(url: str | None, where: str = "storage") -> str | None:
    """Why a URL's password cannot be used as written (it holds characters that end or split
    a URL's parts: parsers would take part of it for the host), or None. The message names the
    characters and shows how to percent-encode, never the password."""
    if not url:
        return None
    split = _split(url.strip())
    if split is None:
        return None
    password = split[1]
    bad = [name for ch, name in _UNSAFE.items() if ch in password]
    if any(c.isspace() for c in password) and "a space" not in bad:
        bad.append("a space")
    if not bad:
        return None
    shown = f"{split[0]}:{MASK}{split[2]}"
    return (
        f"{where}: the password in {shown} holds {', '.join(bad)}, which a URL must "
        'percent-encode; encode it with python3 -c "import urllib.parse, getpass; '
        "print(urllib.parse.quote(getpass.getpass(), safe=''))\" and put the result in the URL"
    )


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, redacted and cut at `limit` characters; the
    error's type when it says nothing."""
    text = str(error).strip()
    return redact(text.splitlines()[0])[:limit] if text else type(error).__name__


def recorded_uri(uri: str | None) -> str | None:
    """A URL as a study recorded it, to connect to; None where it was recorded redacted (a
    password is never stored: then the command line or the environment must give it)."""
    return uri if uri and MASK not in uri else None


def warning_line(
    message: Warning | str, category: type, filename: str, lineno: int, file=None, line=None
) -> None:
    """`warnings.showwarning` for hpo's processes: a library's warning as one line in hpo's
    form (`warning: ... (RuntimeWarning)`), redacted, not the source line it came from."""
    import sys

    text = str(message).strip()
    text = redact(text.splitlines()[0])[:300] if text else ""
    try:
        (file or sys.stderr).write(f"warning: {text} ({category.__name__})\n")
    except (OSError, ValueError):
        pass  # stderr closed: a warning is not worth a crash
