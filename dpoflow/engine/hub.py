"""Pushing a release to the Hugging Face Hub with `huggingface_hub`: one commit per run, retried with
backoff on transient failures (5xx, dropped connections, 429 after the Retry-After the Hub asks for),
and no commit at all when nothing changed (the client compares file hashes with the Hub's before
uploading). The token is only ever handed to the client."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from dpoflow.base.config import PublishSpec
from dpoflow.base.errors import Explained
from dpoflow.base.redact import redact_text


# The longest Retry-After honoured: a rate limit asking for more is better reported than slept through.
MAX_RETRY_AFTER = 120.0


class PublishError(RuntimeError, Explained):
    pass


def resolve_token(spec: PublishSpec) -> str:
    """The Hub token: a Prefect Secret block when `token_secret` names one, else HF_TOKEN."""
    if spec.token_secret:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(spec.token_secret).get()
        except ValueError as e:
            # A token pasted here instead of a block's name must not reach the error (logs, Prefect's database).
            raise PublishError(f"publish.token_secret: no Prefect Secret block named "
                               f"{redact_text(spec.token_secret)!r}") from None  # its own error names it too
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PublishError("publish needs a Hub token: set HF_TOKEN, or publish.token_secret to a Prefect Secret block")
    return token


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (it reads the variable once, at import)."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def transient(error: Exception) -> tuple[bool, float | None]:
    """(worth another try, seconds the server asked to wait). Worth it: a 5xx answer, a 429 (rate
    limited) or a connection that broke; not another 4xx, nor offline mode: those will not change."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    while error is not None:  # huggingface_hub wraps an upload's own error ("Error while uploading ...")
        if isinstance(error, OfflineModeIsEnabled):  # a ConnectionError, but no retry will go online
            return False, None
        if isinstance(error, HfHubHTTPError):
            status = error.response.status_code if error.response is not None else None
            if status == 429:
                return True, retry_after(error.response)
            return status is None or status >= 500, None
        if isinstance(error, (httpx.TransportError, ConnectionError, TimeoutError)):
            return True, None
        error = error.__cause__ or error.__context__
    return False, None


def retry_after(response) -> float | None:
    """The Retry-After header in seconds, capped at MAX_RETRY_AFTER (the HTTP-date form is not used
    by the Hub: ignored, so the backoff applies)."""
    try:
        return min(max(float(response.headers.get("Retry-After", "")), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        return None


def with_retries(action: Callable, attempts: int, what: str, log: Callable[[str], None], base_delay: float = 1.0):
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as e:  # noqa: BLE001 - sorted by `transient`
            again, asked = transient(e)
            if not again or attempt == attempts:
                raise PublishError(f"{what} failed after {attempt} attempt(s): {type(e).__name__}: {e}") from e
            delay = asked if asked is not None else base_delay * 2 ** (attempt - 1)
            log(f"{what}: attempt {attempt} failed ({type(e).__name__}: {_first_line(e)}); retrying in {delay:g} s")
            time.sleep(delay)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def push(files: dict[str, Path], spec: PublishSpec, token: str, message: str,
         log: Callable[[str], None] = print, base_delay: float = 1.0) -> dict:
    """Commit `files` ({path in repo: local file}) to spec.repo_id at spec.revision. Returns the commit
    id and URL, and whether a new commit was made."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if offline():
        raise PublishError("publish needs the network, but HF_HUB_OFFLINE=1 is set")
    api = HfApi(endpoint=spec.endpoint, token=token)
    retry = dict(attempts=spec.max_attempts, log=log, base_delay=base_delay)
    with_retries(lambda: api.create_repo(spec.repo_id, private=spec.private, exist_ok=True),
                 what=f"create repo {spec.repo_id}", **retry)
    if spec.revision != "main":
        with_retries(lambda: api.create_branch(spec.repo_id, branch=spec.revision, exist_ok=True),
                     what=f"create branch {spec.revision}", **retry)
    before = with_retries(lambda: api.repo_info(spec.repo_id, revision=spec.revision).sha,
                          what="read the repo's head", **retry)

    def commit():
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                      for name, path in sorted(files.items())]
        return api.create_commit(spec.repo_id, operations, commit_message=message, revision=spec.revision)

    info = with_retries(commit, what=f"commit to {spec.repo_id}@{spec.revision}", **retry)
    return {"repo_id": spec.repo_id, "revision": spec.revision, "commit": info.oid, "url": info.commit_url,
            "new_commit": info.oid != before, "files": sorted(files)}
