"""An exception as the one line adl shows for it, in log lines, the status record and the
messages of its own errors; and a server's free text squeezed onto one line. Credentials
are masked in both (common/redact.py)."""
from __future__ import annotations

import re

from common.redact import redact

# A run of this many characters without a space is a value someone wrote (a 5000-character
# model name), not words: an error line shows its first LONGEST.
LONGEST = 200
_LONG = re.compile(r"\S{%d,}" % (LONGEST + 40))
# Control characters but the newline: an escape sequence in a record someone else wrote
# (a job or pair name in run.json) must not reach the terminal as one.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def one_line(error: BaseException, typed: bool = True) -> str:
    """Ray's wrappers unwrapped (their `cause`), then the last line of a remote traceback
    (where the cause is) or else the first line of the message; typed: prefixed with the
    exception's type unless the line already starts with a name and a colon. An empty
    message is the type's name."""
    while getattr(error, "cause", None) is not None and error.cause is not error:
        error = error.cause
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    traceback = "Traceback" in text or any(line.startswith('File "') for line in lines)
    line = lines[-1] if traceback else lines[0]
    if typed and ":" not in line.split(" ")[0]:
        line = f"{type(error).__name__}: {line}"
    return _LONG.sub(lambda m: m.group()[:LONGEST] + "...", redact(line))


def squeeze(text: str, limit: int = 300) -> str:
    """Text from elsewhere (a server's error body) as one line: whitespace runs become one
    space; masked before it is cut short, so that no piece of a key survives the cut."""
    return " ".join(redact(text).split())[:limit]


def terminal_safe(text: str) -> str:
    """Text for the terminal with every control character but the newline shown escaped
    (ESC as \\x1b): what adl prints from records it did not validate itself."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
