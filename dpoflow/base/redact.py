"""The one place that decides what is a secret in what a run records: config.json, the summary, the
model card, Prefect artifacts, stage key files and the flow-run parameters Prefect stores.

Records only: the config a run uses keeps its real values (`dpoflow sync` hands the real
`deploy.job_variables.env` to the Prefect server for its workers). Masked are:
- the value of a key named like a secret (token, secret, password, api_key, ...) when it is a
  single value (a mapping under such a name, e.g. `token_lengths`, is searched like any other), and
  every value under an `env` mapping (`deploy.job_variables.env`: environment variables are where
  credentials go);
- anything in any string that looks like a credential: Hub/OpenAI/GitHub/Slack/AWS token formats,
  `Bearer ...`, a password in a URL, long high-entropy strings;
- the value of a `--set` item (`KEY.PATH=VALUE`) whose key path would be masked in the config.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import yaml

MASK = "<redacted>"

# Whole words of a key name (split at `_`, `-`, `.` and camelCase) that make its value a secret.
# Words, not substrings: `gguf_pre_tokenizer` and `max_tokens` are not secrets, `HF_TOKEN` is.
SECRET_WORDS = {"token", "secret", "password", "passwd", "pwd", "apikey", "credential", "credentials",
                "auth", "authorization", "cookie", "passphrase"}
SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("client", "secret")}
ENV_KEYS = {"env", "environment"}

TOKEN_PATTERNS = [re.compile(p) for p in (
    r"\bhf_[A-Za-z0-9_]{20,}",                       # Hugging Face
    r"\bsk-[A-Za-z0-9_-]{16,}",                      # OpenAI, Anthropic, ...
    r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}",   # GitHub
    r"\bgithub_pat_[A-Za-z0-9_]{20,}",
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}",               # Slack
    r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",                # AWS access key id
    r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+",  # JWT
)]
BEARER = re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9._~+/=-]{8,}")
URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^/\s@]+@")
# A candidate for the entropy test: 32+ characters of the alphabets tokens and keys are written in.
LONG_RUN = re.compile(r"[A-Za-z0-9_+=-]{32,}")
HEX = re.compile(r"[0-9a-fA-F-]+")
OVERRIDE = re.compile(r"([A-Za-z_][\w-]*(?:\.[\w-]+)*)=(.*)", re.S)


def redact(value: Any, path: tuple[str, ...] = ()) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings, numbers) with its secrets masked. `path`:
    the keys above `value`, when it is part of a larger document."""
    if any(k.lower() in ENV_KEYS for k in path):
        return _mask_all(value)
    if isinstance(value, dict):
        return {k: redact(v, (*path, str(k))) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, path) for v in value]
    if path and secret_key(path[-1]):
        return _mask_all(value)
    if isinstance(value, str):
        return _redact_override(value) or redact_text(value)
    return value


def redact_text(text: str) -> str:
    """Free text (markdown, a log line) with every credential-looking part masked."""
    for pattern in TOKEN_PATTERNS:
        text = pattern.sub(MASK, text)
    text = BEARER.sub(lambda m: m.group(1) + m.group(2) + MASK, text)
    text = URL_PASSWORD.sub(lambda m: m.group(1) + MASK + "@", text)
    return LONG_RUN.sub(lambda m: MASK if _looks_random(m.group()) else m.group(), text)


def secret_key(name: str) -> bool:
    words = [w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", name)]
    return bool(SECRET_WORDS & set(words)) or any(pair in SECRET_PAIRS for pair in zip(words, words[1:]))


def _mask_all(value: Any) -> Any:
    """Every leaf masked, the structure (which variables were set) kept."""
    if isinstance(value, dict):
        return {k: _mask_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask_all(v) for v in value]
    return value if value is None or value == "" else MASK


def _redact_override(item: str) -> str | None:
    """A `--set` item redacted as the config field it sets would be; None if `item` is not one."""
    m = OVERRIDE.fullmatch(item)
    if not m or "." not in m.group(1) and not secret_key(m.group(1)):
        return None
    keys = tuple(m.group(1).split("."))
    try:
        value = yaml.safe_load(m.group(2)) if m.group(2).strip() else ""
    except yaml.YAMLError:
        value = m.group(2)
    masked = redact(value, keys)
    if masked == value:
        return redact_text(item)
    return f"{m.group(1)}=" + (masked if isinstance(masked, str) else
                               yaml.safe_dump(masked, default_flow_style=True, width=10**6).strip())


def _looks_random(s: str) -> bool:
    """A key or token rather than a word, an identifier or a digest: mixed letters and digits with
    high entropy. Hex strings are left alone: they are the content digests and commit ids records
    are made of."""
    if HEX.fullmatch(s) or not (re.search(r"[0-9]", s) and re.search(r"[A-Z]", s) and re.search(r"[a-z]", s)):
        return False
    counts = Counter(s)
    entropy = -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())
    return entropy >= 4.0


def redact_flow_parameters(flow):
    """Make Prefect store `flow`'s run parameters redacted. Prefect records a flow run's parameters
    as `Flow.serialize_parameters` returns them (JSON for the API), while the run itself is called
    with the real objects: so the run still uses its real config, and the database only sees masks."""
    serialize = flow.serialize_parameters
    flow.serialize_parameters = lambda parameters: redact(serialize(parameters))
    return flow
