"""Credentials out of error text: an endpoint may echo the key it was sent (a 401 body
quoting `Bearer sk-...`), and such text reaches log lines and the status record.

`redact` masks bearer tokens, `sk-...`-like keys, user:password in URLs, credentials in a
URL's query (`?api-key=...`), and every secret registered in this process (the grader
registers the value of its `api_key_env`), also as a URL would quote it.
"""
from __future__ import annotations

import re
import threading
from urllib.parse import quote, quote_plus

MASK = "***"
_PATTERNS = (
    (re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+"), r"\1 " + MASK),
    (re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_\-]{6,}"), r"\1-" + MASK),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"), r"\1" + MASK + "@"),
    # a credential in a URL's query: ?api-key=..., &access_token=..., X-Amz-Signature=...
    (re.compile(r"(?i)([?&;](?:api[-_]?key|apikey|key|token|access[-_]?token|auth|secret|password|passwd|pwd"
                r"|sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&#\s\"'<>]+"),
     r"\1" + MASK),
)
_secrets: set[str] = set()
_lock = threading.Lock()


def register(secret: str | None) -> None:
    """A value never to show (too short a value would mask ordinary text: 4 characters
    at least)."""
    if secret and len(secret) >= 4:
        with _lock:   # as sent, and as a URL or a form would quote it (an echoed query string)
            _secrets.update({secret, quote(secret, safe=""), quote_plus(secret, safe="")})


def redact(text: str) -> str:
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_urls(obj):
    """A JSON-like value with every string that holds a URL masked (user:password, query
    credentials, keys): what a record written to storage keeps of a spec's endpoints."""
    if isinstance(obj, dict):
        return {k: redact_urls(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_urls(v) for v in obj]
    if isinstance(obj, str) and "://" in obj:
        return redact(obj)
    return obj
