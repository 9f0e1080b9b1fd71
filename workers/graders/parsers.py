"""The strict parsers of the LLM grader's answers: only the fixed final lines the prompts
ask for are read (workers/graders/prompts.py); anything else is `Malformed`, which the
grader retries like a transport failure and never guesses past."""
from __future__ import annotations

import re

from workers.graders.base import scale_label
from workers.graders.prompts import token_key


class Malformed(Exception):
    """An answer that does not follow the format; `partial` keeps what did parse."""

    def __init__(self, reason: str, partial: dict | None = None):
        super().__init__(reason)
        self.partial = partial


def _last_lines(text: str, n: int) -> list[str]:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-n:]


_COHERENCE_LINE = re.compile(r"ANSWER\s*:\s*(COHERENT|INCOHERENT)", re.IGNORECASE)


def parse_coherence(text: str) -> bool:
    last = _last_lines(text, 1)
    match = _COHERENCE_LINE.fullmatch(last[0]) if last else None
    if not match:
        raise Malformed("the last line is not 'ANSWER: COHERENT' or 'ANSWER: INCOHERENT'")
    return match.group(1).upper() == "COHERENT"


_RELEVANCE_LINE = re.compile(r"ANSWER\s*\[\s*(\d+)\s*\]\s*:\s*(RELEVANT|IRRELEVANT)",
                             re.IGNORECASE)


def parse_relevance(text: str, n: int) -> dict[int, bool]:
    """{index (1-based): relevant} from the trailing run of ANSWER[i] lines; every index
    1..n must be labelled exactly once (conflicts and unknown indices are malformed)."""
    labels: dict[int, bool] = {}
    for line in reversed([ln.strip() for ln in text.strip().splitlines() if ln.strip()]):
        match = _RELEVANCE_LINE.fullmatch(line)
        if not match:
            break
        index, relevant = int(match.group(1)), match.group(2).upper() == "RELEVANT"
        if not 1 <= index <= n:
            raise Malformed(f"ANSWER[{index}] is out of range 1..{n}")
        if labels.setdefault(index, relevant) != relevant:
            raise Malformed(f"ANSWER[{index}] is labelled both RELEVANT and IRRELEVANT")
    if not labels:
        raise Malformed("the answer does not end in 'ANSWER[i]: RELEVANT|IRRELEVANT' lines")
    missing = [i for i in range(1, n + 1) if i not in labels]
    if missing:
        raise Malformed(f"candidates {missing} are unlabelled", partial=labels)
    return labels


_SCALE_LINE = re.compile(r"BEST_SCALE\s*:\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)",
                         re.IGNORECASE)
_TOKENS_LINE = re.compile(r"TOKENS\s*:(.*)", re.IGNORECASE)


def parse_best_scale(text: str, candidates: dict[float, list[str]]) -> tuple[float, list[str]]:
    lines = _last_lines(text, 2)
    scale_match = _SCALE_LINE.fullmatch(lines[0]) if len(lines) == 2 else None
    tokens_match = _TOKENS_LINE.fullmatch(lines[1]) if len(lines) == 2 else None
    if not (scale_match and tokens_match):
        raise Malformed("the answer does not end in a 'BEST_SCALE: <number>' line and a "
                         "'TOKENS: ...' line")
    chosen = float(scale_match.group(1))
    scale = next((s for s in candidates if float(scale_label(s)) == chosen), None)
    if scale is None:
        offered = ", ".join(scale_label(s) for s in candidates)
        raise Malformed(f"BEST_SCALE {scale_match.group(1)} is not one of the offered "
                         f"scales ({offered})")
    tokens: list[str] = []
    for item in tokens_match.group(1).split("|"):
        key = item.strip()
        if len(key) >= 2 and key[0] == key[-1] == '"':
            key = key[1:-1].strip()
        if not key:
            continue
        # A key can stand for several offered tokens that differ only in outer whitespace.
        matches = [t for t in candidates[scale] if token_key(t) == key]
        if not matches:
            raise Malformed(f"token {item.strip()!r} is not in scale "
                             f"{scale_label(scale)}'s list")
        tokens += [t for t in matches if t not in tokens]
    return scale, tokens
