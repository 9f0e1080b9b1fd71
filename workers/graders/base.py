"""What every grader shares: the interface (`Grader`), one graded item (`Judgement`), the
errors, and which patchscope tokens are candidates at all."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Protocol

OFFLINE_RELEVANCE = ("token relevance needs an LLM grader (grader.kind: openai); the "
                     "offline grader cannot judge relevance to a described domain")

ROTATIONS = 3            # the reference grades three rotations (shifts 0, 1, 2) of the list
SCALES_PER_REQUEST = 10  # the reference's tournament group size for best_scale
_TOKENIZER_MARKERS = "ĠĊĉ▁"


class GraderError(RuntimeError):
    """A question this grader cannot answer at all (not a failure on one item)."""


class GradingFailed(RuntimeError):
    """A stage's grading failed as a whole (every judgement of it failed: an unreachable
    or refusing endpoint): the stage fails, and its pair with it."""


@dataclass(frozen=True)
class Judgement:
    """One graded item."""
    value: Any | None   # the parsed answer; None when not ok
    ok: bool            # False: the grader failed on this item after its retries
    error: str | None   # why, when not ok
    raw: str | None     # the last raw answer text, for the record
    labels: tuple[str, ...] | None = None   # token_relevance: each rotation's label


def failed(error: str, raw: str | None = None) -> Judgement:
    return Judgement(value=None, ok=False, error=error, raw=raw)


class Grader(Protocol):
    name: str

    def coherence(self, texts: list[str]) -> list[Judgement]:
        """value: bool, whether the text is coherent."""

    def best_scale(self, token_lists: dict[float, list[str]]) -> Judgement:
        """value: {"scale": float, "tokens": list[str]}: the scale whose token list is most
        semantically coherent, and the coherent subset of its tokens."""

    def token_relevance(self, tokens: list[str], description: str,
                        frequent_tokens: list[str]) -> list[Judgement]:
        """value per token: bool, relevant to the finetuning domain."""


def is_trivial_token(token: str) -> bool:
    """Whitespace, punctuation or symbols only (after tokenizer markers), or an arrow of
    the patchscope prompts: the reference hides these before choosing a scale."""
    stripped = token.strip().strip(_TOKENIZER_MARKERS).strip()
    if not stripped or "->" in stripped or "=>" in stripped:
        return True
    return all(unicodedata.category(c)[0] in "PSZC" for c in stripped)


def candidates(token_lists: dict[float, list[str]]) -> dict[float, list[str]]:
    """Each scale's non-trivial tokens, first occurrence kept, scales ascending."""
    if not token_lists:
        raise ValueError("best_scale needs at least one scale")
    out = {}
    for scale in sorted(token_lists):
        seen = []
        for token in token_lists[scale]:
            if not is_trivial_token(token) and token not in seen:
                seen.append(token)
        out[float(scale)] = seen
    return out


def scale_label(scale: float) -> str:
    return f"{scale:.6g}"
