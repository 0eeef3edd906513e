"""What the experiment-tracking backends (dpoflow.engine.tracking_*) share with dpoflow.engine.tracking:
the one-line error and how an address is printed (never its password or token)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from dpoflow.base.errors import Explained
from dpoflow.base.redact import redact_text, secret_key


class TrackingError(RuntimeError, Explained):
    """The tracker cannot be reached or its client is missing: one line naming the backend and setting."""


def shown_uri(uri: str) -> str:
    """The URI as it may be printed: any user name and password taken out, and any query parameter
    named like a secret (a Trackio server's `write_token`)."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if parts.password is None and parts.username is None and not any(secret_key(k) for k, _ in query):
        return redact_text(uri)  # left as written (a round trip through urlsplit drops sqlite:////'s slashes)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    kept = urlencode([(k, v) for k, v in query if not secret_key(k)])
    return redact_text(urlunsplit(parts._replace(netloc=netloc, query=kept)))


def reason(error: Exception) -> str:
    """A client error in a few words: the operating system's reason when there is one (a refused
    connection is wrapped in three layers of urllib3 text), never a user name or password of a URL."""
    text = str(error) or type(error).__name__
    found = re.search(r"\[Errno -?\d+\] [^'\"()]+", text)
    why = found.group(0) if found else " ".join(text.split())
    why = re.sub(r"://[^/\s@]+@", "://", why)  # user:password@ of any URL in it
    return f"{type(error).__name__}: {redact_text(why)[:200]}"
