"""What the experiment-tracking backends (dpoflow.engine.tracking_*) share with dpoflow.engine.tracking:
the one-line error and how an address is printed (never its password or token)."""

from __future__ import annotations

import importlib
import re
from types import ModuleType
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from dpoflow.base.errors import Explained
from dpoflow.base.redact import redact_text, secret_key


class TrackingError(RuntimeError, Explained):
    """The tracker cannot be reached or its client is missing: one line naming the backend and setting."""


def import_client(module: str, backend: str, what: str) -> ModuleType:
    """`module` imported, or the one-line TrackingError saying which extra brings `what`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackingError(f"tracking.backend {backend} needs {what}: pip install 'dpoflow[tracking]'") from None


class ProcessLocalRuns:
    """For clients whose runs only the process that opened them can write to (W&B, Trackio): a run
    of another process is a one-line error, not a silently lost curve."""

    any_process = False
    backend = product = ""  # set by each tracker: its tracking.backend name and the product's name

    def __init__(self):
        self.runs: dict = {}

    def holds(self, run_id: str) -> bool:
        return run_id in self.runs

    def _run(self, run_id: str):
        if run_id not in self.runs:
            raise TrackingError(f"tracking.backend {self.backend}: run {run_id} is not open in this process "
                                f"(only the process that opened a {self.product} run writes to it)")
        return self.runs[run_id]


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
