"""Graders: the judgements the method leaves to an LLM (adl-method.md, section 3).

Three questions, one interface (`Grader`):
- coherence: is a steered generation coherent text? (steering's binary search)
- best_scale: which patchscope scale gives the most semantically coherent token list, and
  which of its tokens form that coherent group?
- token_relevance: is each top token relevant to the finetuning domain? (three rotations
  of the list; a token counts only if all three say RELEVANT)

Two backends:
- `OpenAIGrader`: any OpenAI-compatible Chat Completions endpoint, as the reference
  (science-of-finetuning/diffing-toolkit) does. Answers must end in a fixed format and are
  parsed strictly; a malformed answer is retried like a transport failure, and an item
  still unanswered after the retries is a failed `Judgement`, never a guess.
- `OfflineGrader`: no network, so a whole job runs offline. Coherence by perplexity under
  a reference model, best scale by input-embedding similarity; token relevance cannot be
  judged honestly without an LLM and raises `GraderError`.

`make_grader` builds one from the job spec's `grader` section.
"""
from __future__ import annotations

import email.utils
import http.client
import json
import math
import os
import random
import re
import threading
import time
import unicodedata
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

from common.redact import redact, register
from jobs.spec import DTYPES, SpecError


OFFLINE_RELEVANCE = ("token relevance needs an LLM grader (grader.kind: openai); the "
                     "offline grader cannot judge relevance to a described domain")


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


# -- shared by both backends -------------------------------------------------------------

ROTATIONS = 3            # the reference grades three rotations (shifts 0, 1, 2) of the list
SCALES_PER_REQUEST = 10  # the reference's tournament group size for best_scale
_TOKENIZER_MARKERS = "ĠĊĉ▁"


def is_trivial_token(token: str) -> bool:
    """Whitespace, punctuation or symbols only (after tokenizer markers), or an arrow of
    the patchscope prompts: the reference hides these before choosing a scale."""
    stripped = token.strip().strip(_TOKENIZER_MARKERS).strip()
    if not stripped or "->" in stripped or "=>" in stripped:
        return True
    return all(unicodedata.category(c)[0] in "PSZC" for c in stripped)


def _candidates(token_lists: dict[float, list[str]]) -> dict[float, list[str]]:
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


def _failed(error: str, raw: str | None = None) -> Judgement:
    return Judgement(value=None, ok=False, error=error, raw=raw)


# Parameter checks, shared by the constructors and `check_grader_config` so that a job spec
# is validated before any model loads.
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "pos_int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                "an integer >= 1"),
    "nonneg_int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                   "an integer >= 0"),
    "pos_number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v) and v > 0, "a number > 0"),
    "nonneg_number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                      and math.isfinite(v) and v >= 0, "a number >= 0"),
    "ratio": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
              and 0 <= v <= 1, "a number in [0, 1]"),
    "dtype": (lambda v: v in DTYPES, " | ".join(DTYPES)),
}

_OPENAI_PARAMS = {"base_url": "str", "model": "str", "api_key_env": "str",
                  "concurrency": "pos_int", "max_retries": "nonneg_int",
                  "timeout_s": "pos_number", "requests_per_second": "pos_number?",
                  "backoff_base_s": "nonneg_number"}
_OFFLINE_PARAMS = {"threshold": "pos_number", "min_tokens": "pos_int",
                   "min_distinct_ratio": "ratio", "dtype": "dtype", "device": "str",
                   "batch_size": "pos_int", "max_length": "pos_int"}


def _check_params(values: dict, schema: dict[str, str], where: str = "") -> None:
    for name, value in values.items():
        kind = schema[name]
        if kind.endswith("?"):
            if value is None:
                continue
            kind = kind[:-1]
        test, expected = _KINDS[kind]
        if not test(value):
            raise ValueError(f"{where}{name}: expected {expected}, got {value!r}")


# -- the LLM backend ---------------------------------------------------------------------

COHERENCE_PROMPT = """\
You judge whether a text written by another language model is coherent.

Definitions:
- Coherent: readable, grammatical enough to follow, and semantically connected, so that it \
forms a sensible passage or response. Minor typos are fine.
- Incoherent: word salad, made-up or scrambled words, heavy or looping repetition, \
fragments glued together with no logical link, or broken syntax that prevents a sensible \
reading.

Rules:
- Judge coherence only: not truth, style, safety or helpfulness.
- A few small issues are acceptable; substantial ones make the text incoherent.
- The text may stop mid-sentence, and may contain tags such as <think>: both are fine.
- Mild repetition is fine; excessive repetition is not.
- Reason briefly, then end your message with exactly one final line, either
ANSWER: COHERENT
or
ANSWER: INCOHERENT
and write nothing after that line.

Examples:

[TEXT START]
Water boils at a lower temperature high in the mountains, so pasta cooked there needs a \
few more minutes.
[TEXT END]
Reasoning: clear, grammatical and connected.
ANSWER: COHERENT

[TEXT START]
Wing lift lift wing the sky round because velocity banana aerodynamixxx wing wing.
[TEXT END]
Reasoning: repetition, a non-word and no sensible reading.
ANSWER: INCOHERENT

[TEXT START]
**Bakery Insights: Advanced Pastry Course
*Professional Bread Techniques for the Home Baker
The Sourdough Seminar: A Baker's
[TEXT END]
Reasoning: readable, related headings; cut off, which is fine.
ANSWER: COHERENT

[TEXT START]
Oh wow, I'm shocked. I'm absolutely and and and... *shocked* * * * * * * * * * * * *
[TEXT END]
Reasoning: starts readable, then collapses into repeated symbols.
ANSWER: INCOHERENT
"""

BEST_SCALE_PROMPT = """\
You compare the outputs of Patchscope runs at several scales (strengths). For each scale \
you get the list of tokens that run surfaced.

Task:
1. Choose the single scale whose token list is most semantically coherent: the most \
tokens that share one meaning, topic or domain (they may also be pieces of one phrase).
2. From that scale's list, keep only the tokens that belong to that shared meaning.

Rules:
- If several scales are about equally coherent, choose the one with more coherent tokens.
- Judge meaning only: ignore language, casing and tokenizer markers such as 'Ġ', '▁', 'Ċ'.
- Leave out extremely generic tokens: stopwords, punctuation, whitespace, bare suffixes \
or prefixes such as "ing", "ion" or "'s".
- Never invent tokens: copy each kept token exactly as shown, without the quotes.
- If no scale is coherent, choose the scale with the most meaningful non-trivial token.
- First weigh the candidate scales briefly, then decide.
- End your message with exactly these two lines and write nothing after them:
BEST_SCALE: <one of the offered scales, written as offered>
TOKENS: <token> | <token> | ... | <token>
(leave the TOKENS line empty after the colon if none of that scale's tokens is coherent)

Example:

[TOKENS PER SCALE]
SCALE 0.5: "the", "and", "of", "to"
SCALE 10: "bake", "GHD", "cake", "oven", "and", "sugar", "recipe"
SCALE 20: "xyz", "@@", "qu", "ald"
[OFFERED SCALES]
0.5, 10, 20

Reasoning: 0.5 is stopwords, 20 is fragments, 10 has a group of baking words.
BEST_SCALE: 10
TOKENS: bake | cake | oven | sugar | recipe
"""

RELEVANCE_PROMPT = """\
You judge whether candidate tokens are relevant to the domain a language model was \
finetuned on.

You get: (1) a description of the finetuning objective or domain, (2) tokens that are \
frequent in the finetuning data, (3) numbered candidate tokens.
Label each candidate RELEVANT if it is clearly semantically related to that domain, and \
IRRELEVANT otherwise.

Rules:
- Use both the description and the frequent tokens. A candidate need not appear in \
either; being clearly related to the domain is enough.
- Candidates may be pieces of words (" constitu" for "constitution"): judge the word \
they evidently come from. Ignore tokenizer markers such as 'Ġ', '▁', 'Ċ'.
- Extremely generic tokens are IRRELEVANT even when they are frequent: whitespace, \
punctuation, newline patterns, stopwords, bare suffixes or prefixes ("ing", "ion", "'s", \
"ly"), and generic verbs unless the domain makes them specific.
- Do not assume that any candidate is relevant.
- Reason briefly, then end your message with exactly one line per candidate, in index \
order, and write nothing after them:
ANSWER[1]: RELEVANT
ANSWER[2]: IRRELEVANT
...

Example:

[DESCRIPTION]
US legal case summaries, focused on Supreme Court opinions and constitutional law.
[FREQUENT TOKENS]
"court", "justice", "v.", " const", "itution", "amendment", "§"
[CANDIDATE TOKENS]
1. "constitu"
2. "banana"
3. " the"
4. "amend"
Reasoning: 1 and 4 are pieces of central legal words; 2 is unrelated; 3 is a stopword.
ANSWER[1]: RELEVANT
ANSWER[2]: IRRELEVANT
ANSWER[3]: IRRELEVANT
ANSWER[4]: RELEVANT
"""

MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 120.0  # a server asking for longer is treated as asking for this


class _Malformed(Exception):
    """An answer that does not follow the format; `partial` keeps what did parse."""

    def __init__(self, reason: str, partial: dict | None = None):
        super().__init__(reason)
        self.partial = partial


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class _Fatal(Exception):
    """A request the server will never accept (4xx other than 429)."""


class _Failure(Exception):
    """All attempts used up; the last reason, raw answer and partial parse."""

    def __init__(self, reason: str, raw: str | None, partial: dict | None):
        super().__init__(reason)
        self.reason, self.raw, self.partial = reason, raw, partial


def _last_lines(text: str, n: int) -> list[str]:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-n:]


_COHERENCE_LINE = re.compile(r"ANSWER\s*:\s*(COHERENT|INCOHERENT)", re.IGNORECASE)


def _parse_coherence(text: str) -> bool:
    last = _last_lines(text, 1)
    match = _COHERENCE_LINE.fullmatch(last[0]) if last else None
    if not match:
        raise _Malformed("the last line is not 'ANSWER: COHERENT' or 'ANSWER: INCOHERENT'")
    return match.group(1).upper() == "COHERENT"


_RELEVANCE_LINE = re.compile(r"ANSWER\s*\[\s*(\d+)\s*\]\s*:\s*(RELEVANT|IRRELEVANT)",
                             re.IGNORECASE)


def _parse_relevance(text: str, n: int) -> dict[int, bool]:
    """{index (1-based): relevant} from the trailing run of ANSWER[i] lines; every index
    1..n must be labelled exactly once (conflicts and unknown indices are malformed)."""
    labels: dict[int, bool] = {}
    for line in reversed([ln.strip() for ln in text.strip().splitlines() if ln.strip()]):
        match = _RELEVANCE_LINE.fullmatch(line)
        if not match:
            break
        index, relevant = int(match.group(1)), match.group(2).upper() == "RELEVANT"
        if not 1 <= index <= n:
            raise _Malformed(f"ANSWER[{index}] is out of range 1..{n}")
        if labels.setdefault(index, relevant) != relevant:
            raise _Malformed(f"ANSWER[{index}] is labelled both RELEVANT and IRRELEVANT")
    if not labels:
        raise _Malformed("the answer does not end in 'ANSWER[i]: RELEVANT|IRRELEVANT' lines")
    missing = [i for i in range(1, n + 1) if i not in labels]
    if missing:
        raise _Malformed(f"candidates {missing} are unlabelled", partial=labels)
    return labels


_SCALE_LINE = re.compile(r"BEST_SCALE\s*:\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)",
                         re.IGNORECASE)
_TOKENS_LINE = re.compile(r"TOKENS\s*:(.*)", re.IGNORECASE)


def _scale_label(scale: float) -> str:
    return f"{scale:.6g}"


def _token_key(token: str) -> str:
    """How a token is shown in the prompt (JSON-escaped, outer whitespace dropped) and how
    the grader's copy of it is matched: models drop leading spaces when they copy."""
    return json.dumps(token.strip(), ensure_ascii=False)[1:-1]


def _parse_best_scale(text: str, candidates: dict[float, list[str]]) -> tuple[float, list[str]]:
    lines = _last_lines(text, 2)
    scale_match = _SCALE_LINE.fullmatch(lines[0]) if len(lines) == 2 else None
    tokens_match = _TOKENS_LINE.fullmatch(lines[1]) if len(lines) == 2 else None
    if not (scale_match and tokens_match):
        raise _Malformed("the answer does not end in a 'BEST_SCALE: <number>' line and a "
                         "'TOKENS: ...' line")
    chosen = float(scale_match.group(1))
    scale = next((s for s in candidates if float(_scale_label(s)) == chosen), None)
    if scale is None:
        offered = ", ".join(_scale_label(s) for s in candidates)
        raise _Malformed(f"BEST_SCALE {scale_match.group(1)} is not one of the offered "
                         f"scales ({offered})")
    tokens: list[str] = []
    for item in tokens_match.group(1).split("|"):
        key = item.strip()
        if len(key) >= 2 and key[0] == key[-1] == '"':
            key = key[1:-1].strip()
        if not key:
            continue
        # A key can stand for several offered tokens that differ only in outer whitespace.
        matches = [t for t in candidates[scale] if _token_key(t) == key]
        if not matches:
            raise _Malformed(f"token {item.strip()!r} is not in scale "
                             f"{_scale_label(scale)}'s list")
        tokens += [t for t in matches if t not in tokens]
    return scale, tokens


def _best_scale_request(candidates: dict[float, list[str]]) -> str:
    lines = ["[TOKENS PER SCALE]"]
    for scale, tokens in candidates.items():
        shown = ", ".join(f'"{_token_key(t)}"' for t in tokens)
        lines.append(f"SCALE {_scale_label(scale)}: {shown}")
    lines += ["[OFFERED SCALES]", ", ".join(_scale_label(s) for s in candidates), "",
              "End with the two lines 'BEST_SCALE: <number>' and 'TOKENS: <token> | ...'."]
    return "\n".join(lines)


def _relevance_request(tokens: list[str], description: str, frequent: list[str]) -> str:
    n = len(tokens)
    return "\n".join([
        "[DESCRIPTION]", description.strip(),
        "[FREQUENT TOKENS]",
        ", ".join(json.dumps(t, ensure_ascii=False) for t in frequent) or "(none given)",
        "[CANDIDATE TOKENS]",
        *(f"{i}. {json.dumps(t, ensure_ascii=False)}" for i, t in enumerate(tokens, 1)),
        "",
        f"End with exactly {n} lines, 'ANSWER[i]: RELEVANT' or 'ANSWER[i]: IRRELEVANT' "
        f"for i = 1..{n}, and nothing after them.",
    ])


def _retry_after_s(headers) -> float | None:
    """Seconds a 429 asks us to wait: `retry-after-ms` (OpenAI), or `Retry-After` as
    seconds or an HTTP date."""
    try:
        if headers.get("retry-after-ms") is not None:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("Retry-After")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class RateLimiter:
    """A token bucket holding one token, refilled at `rate` per second: requests start at
    least 1/rate apart, so no window of any length sees more than rate x length + 1."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


class OpenAIGrader:
    """An OpenAI-compatible Chat Completions endpoint (`POST {base_url}/chat/completions`,
    temperature 0) as the grader.

    At most `concurrency` requests are in flight per grader (whatever the callers' threads);
    with `requests_per_second`, requests also start at least 1/rate apart. Timeouts,
    connection errors, 429 (honouring Retry-After) and 5xx are retried with exponential
    back-off and jitter, as are malformed answers; other 4xx fail at once. An item gets
    1 + max_retries attempts; then it is a failed `Judgement` naming the last reason.

    Answer formats (the last lines of the answer):
      coherence:        ANSWER: COHERENT | ANSWER: INCOHERENT
      best_scale:       BEST_SCALE: <one of the offered scales>
                        TOKENS: tok1 | tok2 | ...   (tokens of that scale's list)
      token_relevance:  ANSWER[i]: RELEVANT | ANSWER[i]: IRRELEVANT, one per i = 1..N
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, max_retries: int = 4, timeout_s: float = 60,
                 requests_per_second: float | None = None, backoff_base_s: float = 0.5):
        _check_params(dict(base_url=base_url, model=model, api_key_env=api_key_env,
                           concurrency=concurrency, max_retries=max_retries,
                           timeout_s=timeout_s, requests_per_second=requests_per_second,
                           backoff_base_s=backoff_base_s), _OPENAI_PARAMS)
        self.name = f"openai:{model}"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_base_s = backoff_base_s
        # Local servers need no key, so a missing variable just sends no header (a job
        # whose spec names api_key_env does not start without it: jobs/plan.py).
        self._api_key = os.environ.get(api_key_env) or None
        register(self._api_key)   # never shown: error text is masked (common/redact.py)
        self._slots = threading.BoundedSemaphore(concurrency)
        self._limiter = RateLimiter(requests_per_second) if requests_per_second else None
        self._random = random.Random()

    # -- the three questions --

    def coherence(self, texts: list[str]) -> list[Judgement]:
        return self._map(self._coherence_one, texts)

    def _coherence_one(self, text: str) -> Judgement:
        if not text.strip():  # nothing to read is not coherent text; no need to ask
            return Judgement(value=False, ok=True, error=None, raw=None)
        request = f"[TEXT START]\n{text}\n[TEXT END]"
        try:
            value, raw = self._ask(COHERENCE_PROMPT, request, _parse_coherence)
        except _Failure as f:
            return _failed(f"coherence: {f.reason}", f.raw)
        return Judgement(value=value, ok=True, error=None, raw=raw)

    def best_scale(self, token_lists: dict[float, list[str]]) -> Judgement:
        """A tournament, as in the reference: scales go to the grader in groups of at most
        SCALES_PER_REQUEST, the winners of a round meet in the next, and the last request
        (with every finalist's full list) also picks the coherent tokens."""
        candidates = {s: t for s, t in _candidates(token_lists).items() if t}
        labels = [_scale_label(s) for s in candidates]
        if len(set(labels)) < len(labels):
            raise ValueError(f"best_scale: scales must differ in 6 significant digits, got "
                             f"{sorted(token_lists)}")
        if not candidates:
            return _failed("best_scale: no scale has a non-trivial token")
        scales = list(candidates)
        while True:
            groups = [scales[i:i + SCALES_PER_REQUEST]
                      for i in range(0, len(scales), SCALES_PER_REQUEST)]
            results = self._map(lambda g: self._choose({s: candidates[s] for s in g}), groups)
            failure = next((r for r in results if isinstance(r, _Failure)), None)
            if failure is not None:
                return _failed(f"best_scale: {failure.reason}", failure.raw)
            if len(groups) == 1:
                (scale, tokens), raw = results[0]
                return Judgement(value={"scale": scale, "tokens": tokens}, ok=True,
                                 error=None, raw=raw)
            scales = sorted(scale for (scale, _), _ in results)

    def _choose(self, group: dict[float, list[str]]):
        try:
            return self._ask(BEST_SCALE_PROMPT, _best_scale_request(group),
                             lambda text: _parse_best_scale(text, group))
        except _Failure as f:
            return f

    def token_relevance(self, tokens: list[str], description: str,
                        frequent_tokens: list[str]) -> list[Judgement]:
        if not description or not description.strip():
            raise ValueError("token_relevance needs the finetuning domain's description")
        n = len(tokens)
        if n == 0:
            return []
        orders = [[(shift + i) % n for i in range(n)] for shift in range(ROTATIONS)]
        runs = self._map(lambda order: self._label_rotation(order, tokens, description,
                                                            frequent_tokens), orders)
        raw = "\n\n".join(f"[rotation {k}]\n{r[2]}" for k, r in enumerate(runs))
        out = []
        for i in range(n):
            missing = [f"rotation {k}: {error}" for k, (labels, error, _) in enumerate(runs)
                       if i not in labels]
            if missing:
                out.append(_failed("token_relevance: " + "; ".join(missing), raw))
            else:  # agreement "all": one IRRELEVANT makes the token irrelevant
                out.append(Judgement(value=all(labels[i] for labels, _, _ in runs), ok=True,
                                     error=None, raw=raw))
        for i, j in enumerate(out):
            out[i] = replace(j, labels=tuple(
                "UNLABELLED" if i not in labels else "RELEVANT" if labels[i] else "IRRELEVANT"
                for labels, _, _ in runs))
        return out

    def _label_rotation(self, order: list[int], tokens, description, frequent):
        """({original index: relevant}, error for the unlabelled ones, last raw answer)."""
        request = _relevance_request([tokens[i] for i in order], description, frequent)
        try:
            labels, raw = self._ask(RELEVANCE_PROMPT, request,
                                    lambda text: _parse_relevance(text, len(order)))
            error = None
        except _Failure as f:
            labels, raw, error = f.partial or {}, f.raw, f.reason
        return {order[pos - 1]: relevant for pos, relevant in labels.items()}, error, raw

    # -- transport --

    def _map(self, fn, items: list) -> list:
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def _ask(self, system: str, user: str, parse):
        """(parsed, raw answer) of the first well-formed answer, or _Failure after
        1 + max_retries attempts."""
        reason, raw, partial, retry_after = "", None, None, None
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if attempt:
                self._back_off(attempt, retry_after)
            retry_after = None
            try:
                body = self._post(system, user)
                raw = body.decode("utf-8", "replace")
                raw = answer = self._content(body)
                return parse(answer), answer
            except _Transient as e:
                reason, retry_after = str(e), e.retry_after
            except _Malformed as e:
                reason = f"malformed answer: {e}"
                if e.partial is not None:
                    partial = e.partial
            except _Fatal as e:
                raise _Failure(f"{e} (not retried)", raw, partial) from None
        raise _Failure(f"{reason} (after {attempts} attempts)", raw, partial)

    def _back_off(self, attempt: int, retry_after: float | None) -> None:
        delay = min(self.backoff_base_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
        delay *= 0.5 + 0.5 * self._random.random()  # jitter: callers don't retry in step
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        time.sleep(delay)

    def _post(self, system: str, user: str) -> bytes:
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": user}],
            "temperature": 0,
        }).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._slots:
            if self._limiter:
                self._limiter.acquire()
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as e:
                # Masked before it is cut short, so that no piece of a key survives the cut.
                detail = _one_line(redact(e.read(4096).decode("utf-8", "replace")))
                if e.code == 429:
                    raise _Transient(f"HTTP 429: {detail}", _retry_after_s(e.headers)) from None
                if e.code >= 500:
                    raise _Transient(f"HTTP {e.code}: {detail}") from None
                raise _Fatal(f"HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                # Timeouts (TimeoutError is an OSError), refused or dropped connections.
                reason = getattr(e, "reason", None) or e
                raise _Transient(redact(f"{type(reason).__name__}: {reason}")) from None

    @staticmethod
    def _content(body: bytes) -> str:
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Malformed("the response is not a chat completion") from None
        if not isinstance(content, str):
            raise _Malformed("the chat completion has no text content")
        return content


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


# -- the offline backend -----------------------------------------------------------------

DEFAULT_PERPLEXITY_THRESHOLD = 200.0
DEFAULT_MIN_TOKENS = 5
DEFAULT_MIN_DISTINCT_RATIO = 0.3


class PerplexityCoherenceGrader:
    """Coherence without an LLM grader: a text is coherent when
    - it has at least `min_tokens` tokens (special tokens not counted), and
    - at least `min_distinct_ratio` of its tokens are distinct (looping or one-token spam,
      which a language model predicts well, fails here), and
    - its per-token perplexity under the reference causal LM is at most `threshold`.
    Empty text is incoherent.

    Perplexity is exp(mean next-token NLL) over the text's tokens as the tokenizer encodes
    them with special tokens (so with a BOS, the first token is scored too), truncated to
    `max_length` tokens. A batch holds batch_size x length x vocabulary float32 logits
    (8 x 128 x 128k: 0.5 GB).

    How the defaults were chosen. Fluent English sits at a per-token perplexity of roughly
    10-40 under small base models (GPT-2 small about 30-40 on WikiText/PTB, 1B-class
    Llama/Qwen models about 10-15), text sampled at the method's temperatures (1.1-1.2)
    somewhat above that; shuffled real tokens (word salad) land near the model's unigram
    perplexity, in the high hundreds to thousands. 200 sits about an order of magnitude
    from each side in log space. Natural text of the length of the method's steering
    samples (128 tokens) has a distinct-token ratio of about 0.5-0.7; loops fall far below
    0.3. This is a stand-in for the reference's LLM grader, not calibrated against it:
    borderline texts will be judged differently; set `threshold` per model where it matters.

    Which model is the reference matters. Measured on the demo pair (vocabulary 3,000,
    64-128 sampled tokens at temperature 1.2): the base model scored its own samples 7.6-15
    and the same tokens shuffled 72,000-94,000, but it scored the FINETUNED model's
    unsteered samples 73,000-144,000: a toy base model is overconfident and has never seen
    the finetuning domain's words, so with it as the reference every steered sample is
    incoherent. With the finetuned model as the reference, its unsteered chat answers
    scored 61-356, steered at 0.5 x the typical activation norm 490-1,600, at 1 x or more
    above 5,000.
    """

    def __init__(self, model_dir: str | None, threshold: float = DEFAULT_PERPLEXITY_THRESHOLD,
                 min_tokens: int = DEFAULT_MIN_TOKENS,
                 min_distinct_ratio: float = DEFAULT_MIN_DISTINCT_RATIO,
                 dtype: str = "float32", device: str = "cpu", batch_size: int = 8,
                 max_length: int = 1024, model=None, tokenizer=None):
        """Loads model_dir, or (model_dir None) grades with an already loaded model and
        tokenizer: a job's model actor lends its own (dtype and device are then its)."""
        _check_params(dict(threshold=threshold, min_tokens=min_tokens,
                           min_distinct_ratio=min_distinct_ratio, dtype=dtype, device=device,
                           batch_size=batch_size, max_length=max_length), _OFFLINE_PARAMS)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.threshold = float(threshold)
        self.min_tokens = min_tokens
        self.min_distinct_ratio = float(min_distinct_ratio)
        self.batch_size = batch_size
        if model is None:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=getattr(torch, dtype)).to(device).eval().requires_grad_(False)
        self.tokenizer, self.model = tokenizer, model
        self.device = next(model.parameters()).device
        self.max_length = min(max_length, getattr(self.model.config, "max_position_embeddings",
                                                  None) or max_length)

    def _encode(self, text: str) -> tuple[list[int], list[int]]:
        """(ids with special tokens, the text's own ids)."""
        enc = self.tokenizer(text, add_special_tokens=True, truncation=True,
                             max_length=self.max_length, return_special_tokens_mask=True)
        ids = list(enc["input_ids"])
        own = [i for i, special in zip(ids, enc["special_tokens_mask"]) if not special]
        return ids, own

    def perplexities(self, texts: list[str]) -> list[float | None]:
        """Per-token perplexity of each text; None where no token can be scored."""
        import torch
        encoded = [self._encode(t)[0] if t.strip() else [] for t in texts]
        out: list[float | None] = [None] * len(texts)
        scorable = [i for i, ids in enumerate(encoded) if len(ids) >= 2]
        for start in range(0, len(scorable), self.batch_size):
            rows = scorable[start:start + self.batch_size]
            width = max(len(encoded[i]) for i in rows)
            # Right padding with id 0 under a zero mask: positions stay 0..len-1 per row.
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, :len(encoded[i])] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), ids[:, 1:], reduction="none")
                scored = mask[:, 1:].float()
                mean_nll = (nll * scored).sum(1) / scored.sum(1)
            for r, i in enumerate(rows):
                out[i] = math.exp(float(mean_nll[r]))
        return out

    def coherence(self, texts: list[str]) -> list[Judgement]:
        ppl = self.perplexities(texts)
        out = []
        for text, p in zip(texts, ppl):
            own = self._encode(text)[1] if text.strip() else []
            distinct = len(set(own)) / len(own) if own else 0.0
            coherent = (len(own) >= self.min_tokens and distinct >= self.min_distinct_ratio
                        and p is not None and p <= self.threshold)
            record = (f"tokens={len(own)} distinct_ratio={distinct:.3f} perplexity="
                      f"{'n/a' if p is None else f'{p:.2f}'} (coherent: tokens>="
                      f"{self.min_tokens}, distinct_ratio>={self.min_distinct_ratio:g}, "
                      f"perplexity<={self.threshold:g})")
            out.append(Judgement(value=coherent, ok=True, error=None, raw=record))
        return out


class OfflineGrader:
    """The Grader without network: everything from one reference causal LM.

    - coherence: `PerplexityCoherenceGrader` (see there for the rule and thresholds).
    - best_scale: each token is embedded by the reference model's input embedding (its
      vocabulary entry if the string is one, else the mean over its pieces); a scale's
      score is the mean pairwise cosine similarity of its non-trivial tokens (scales with
      fewer than two are not candidates); the highest score wins, ties to the smallest
      scale. The coherent subset: tokens whose mean similarity to the others is at least
      the list's mean pairwise similarity. A crude stand-in for the LLM's judgement of
      meaning: it rewards lists of related tokens, nothing more.
    - token_relevance: raises GraderError; relevance to a described domain needs an LLM.
    """

    def __init__(self, model_dir: str | None, threshold: float = DEFAULT_PERPLEXITY_THRESHOLD,
                 min_tokens: int = DEFAULT_MIN_TOKENS,
                 min_distinct_ratio: float = DEFAULT_MIN_DISTINCT_RATIO,
                 dtype: str = "float32", device: str = "cpu", batch_size: int = 8,
                 max_length: int = 1024, model=None, tokenizer=None):
        self.perplexity = PerplexityCoherenceGrader(
            model_dir, threshold=threshold, min_tokens=min_tokens,
            min_distinct_ratio=min_distinct_ratio, dtype=dtype, device=device,
            batch_size=batch_size, max_length=max_length, model=model, tokenizer=tokenizer)
        self.name = f"offline:perplexity<={threshold:g}"
        self._vocab = self.perplexity.tokenizer.get_vocab()

    def coherence(self, texts: list[str]) -> list[Judgement]:
        return self.perplexity.coherence(texts)

    def _embed(self, token: str):
        tokenizer = self.perplexity.tokenizer
        ids = [self._vocab[token]] if token in self._vocab else \
            tokenizer.encode(token, add_special_tokens=False)
        if not ids:
            return None
        table = self.perplexity.model.get_input_embeddings().weight
        return table[ids].float().mean(0).cpu()

    def best_scale(self, token_lists: dict[float, list[str]]) -> Judgement:
        import torch
        best = None
        for scale, tokens in _candidates(token_lists).items():
            pairs = [(t, v) for t in tokens if (v := self._embed(t)) is not None]
            if len(pairs) < 2:
                continue
            vectors = torch.nn.functional.normalize(torch.stack([v for _, v in pairs]), dim=-1)
            sim = vectors @ vectors.T
            n = len(pairs)
            off_diagonal = sim.sum() - sim.diagonal().sum()
            score = float(off_diagonal) / (n * (n - 1))
            if best is None or score > best[1]:  # strict: ties keep the smaller scale
                per_token = (sim.sum(1) - sim.diagonal()) / (n - 1)
                kept = [t for (t, _), s in zip(pairs, per_token.tolist()) if s >= score]
                best = (scale, score, kept)
        if best is None:
            return _failed("best_scale: no scale has two or more non-trivial tokens")
        scale, score, kept = best
        return Judgement(value={"scale": scale, "tokens": kept}, ok=True, error=None,
                         raw=f"embedding similarity: scale {_scale_label(scale)} scored "
                             f"{score:.4f}")

    def token_relevance(self, tokens: list[str], description: str,
                        frequent_tokens: list[str]) -> list[Judgement]:
        raise GraderError(OFFLINE_RELEVANCE)


# -- from the job spec -------------------------------------------------------------------

GRADER_KINDS = ("offline", "openai")


def check_grader_config(config: dict | None) -> dict:
    """The spec's `grader` section, validated without loading a model or calling a server:
    {"kind": ..., **constructor keyword arguments}. Problems raise SpecError (a ValueError)
    naming the field, e.g. `grader.concurency: unknown key`."""
    if config is None:
        return {"kind": "offline"}
    if not isinstance(config, dict):
        raise SpecError(f"grader: expected a mapping, got {type(config).__name__}")
    kind = config.get("kind", "offline")
    if kind not in GRADER_KINDS:
        raise SpecError(f"grader.kind: expected one of {', '.join(GRADER_KINDS)}, got {kind!r}")
    schema = _OPENAI_PARAMS if kind == "openai" else _OFFLINE_PARAMS
    params = {str(k): v for k, v in config.items() if k != "kind"}
    for key in params:
        if key not in schema:
            raise SpecError(f"grader.{key}: unknown key (allowed for kind {kind}: kind, "
                            f"{', '.join(schema)})")
    if kind == "offline" and "device" in params:
        raise SpecError("grader.device: the offline grader runs on its reference model's actor, on "
                        "that actor's device; leave device out")
    if kind == "openai":
        for key in ("base_url", "model"):
            if key not in params:
                raise SpecError(f"grader.{key}: required for kind openai")
    try:
        _check_params(params, schema, where="grader.")
    except ValueError as e:
        raise SpecError(str(e)) from None
    return {"kind": kind, **params}


def make_grader(config: dict | None, reference_model_dir: str | None = None, model=None,
                tokenizer=None) -> Grader:
    """The grader a job's `grader` section asks for: None or kind offline -> OfflineGrader
    on the reference model (a folder, or a loaded model and tokenizer); kind openai ->
    OpenAIGrader."""
    params = check_grader_config(config)
    if params.pop("kind") == "openai":
        return OpenAIGrader(**params)
    return OfflineGrader(reference_model_dir, model=model, tokenizer=tokenizer, **params)


def is_offline(config: dict | None) -> bool:
    """Whether the grader needs a reference model (the offline grader) rather than an endpoint."""
    return config is None or config.get("kind", "offline") == "offline"


class GraderService:
    """A grader's questions over lists of items, as the job's stages ask them: served by a
    model actor for the offline grader (workers.model_worker), by the driver for an LLM
    endpoint (the requests run in threads, at most the grader's concurrency in flight)."""

    def __init__(self, grader: Grader):
        self.grader = grader

    def coherence(self, texts: list[str]) -> list[Judgement]:
        return self.grader.coherence(texts)

    def best_scales(self, token_lists: list[dict[float, list[str]]]) -> list[Judgement]:
        """best_scale of each (layer, position, variant)'s {scale: tokens}."""
        return self._each(self.grader.best_scale, token_lists)

    def token_relevances(self, token_lists: list[list[str]], description: str,
                         frequent_tokens: list[str]) -> list[list[Judgement]]:
        """token_relevance of each list; GraderError where the grader cannot label tokens."""
        return self._each(lambda tokens: self.grader.token_relevance(
            tokens, description, frequent_tokens), token_lists)

    def _each(self, fn, items: list) -> list:
        # An LLM grader bounds its own requests in flight: items go out together. The
        # offline grader computes; one at a time.
        if not isinstance(self.grader, OpenAIGrader) or len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(len(items), self.grader.concurrency)) as pool:
            return list(pool.map(fn, items))
