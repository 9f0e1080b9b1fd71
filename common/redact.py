"""Credentials out of error text: an endpoint may echo the key it was sent (a 401 body
quoting `Bearer sk-...`), and such text reaches log lines and the status record.

`redact` masks bearer tokens, `sk-...`-like keys, user:password in URLs, and every secret
registered in this process (the grader registers the value of its `api_key_env`).
"""
from __future__ import annotations

import re
import threading

MASK = "***"
_PATTERNS = (
    (re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+"), r"\1 " + MASK),
    (re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_\-]{6,}"), r"\1-" + MASK),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"), r"\1" + MASK + "@"),
)
_secrets: set[str] = set()
_lock = threading.Lock()


def register(secret: str | None) -> None:
    """A value never to show (too short a value would mask ordinary text: 4 characters
    at least)."""
    if secret and len(secret) >= 4:
        with _lock:
            _secrets.add(secret)


def redact(text: str) -> str:
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
