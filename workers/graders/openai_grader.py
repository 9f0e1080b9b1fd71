"""The LLM grader: any OpenAI-compatible Chat Completions endpoint, temperature 0, as the
reference (science-of-finetuning/diffing-toolkit) does.

Answers must end in a fixed format (workers/graders/prompts.py) and are parsed strictly
(workers/graders/parsers.py). An item gets 1 + max_retries attempts in all: the client
retries timeouts, connection errors, 429 (honouring Retry-After) and 5xx itself
(workers/graders/transport.py); a malformed answer is asked again here after a back-off
with jitter. Other 4xx fail at once. An item still unanswered is a failed `Judgement`
naming the last reason, never a guess.
"""
from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from common.types import OpenAIGrading
from workers.graders.base import (ROTATIONS, SCALES_PER_REQUEST, Judgement, candidates, failed,
                                  scale_label)
from workers.graders.parsers import Malformed, parse_best_scale, parse_coherence, parse_relevance
from workers.graders.prompts import (BEST_SCALE_PROMPT, COHERENCE_PROMPT, RELEVANCE_PROMPT,
                                     best_scale_request, coherence_request, relevance_request)
from workers.graders.transport import ChatEndpoint, ChatError

MAX_BACKOFF_S = 30.0


class _Failure(Exception):
    """All attempts used up; the last reason, raw answer and partial parse."""

    def __init__(self, reason: str, raw: str | None, partial: dict | None):
        super().__init__(reason)
        self.reason, self.raw, self.partial = reason, raw, partial


def _content(body: str) -> str:
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise Malformed("the response is not a chat completion") from None
    if not isinstance(content, str):
        raise Malformed("the chat completion has no text content")
    return content


class OpenAIGrader:
    """At most `concurrency` requests are in flight per grader (whatever the callers'
    threads); with `requests_per_second`, requests also start at least 1/rate apart."""

    def __init__(self, settings: OpenAIGrading):
        self.settings = settings
        self.name = f"openai:{settings.model}"
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        self.model = settings.model
        self.concurrency = settings.concurrency
        self.max_retries = settings.max_retries
        self.timeout_s = settings.timeout_s
        self.endpoint = ChatEndpoint(settings.base_url.rstrip("/"), settings.api_key_env, settings.concurrency,
                                     settings.requests_per_second, settings.max_retries, settings.timeout_s)
        self._limiter = self.endpoint.limiter
        self._random = random.Random()

    # -- the three questions --

    def coherence(self, texts: list[str]) -> list[Judgement]:
        return self._map(self._coherence_one, texts)

    def _coherence_one(self, text: str) -> Judgement:
        if not text.strip():  # nothing to read is not coherent text; no need to ask
            return Judgement(value=False, ok=True, error=None, raw=None)
        try:
            value, raw = self._ask(COHERENCE_PROMPT, coherence_request(text), parse_coherence)
        except _Failure as f:
            return failed(f"coherence: {f.reason}", f.raw)
        return Judgement(value=value, ok=True, error=None, raw=raw)

    def best_scale(self, token_lists: dict[float, list[str]]) -> Judgement:
        """A tournament, as in the reference: scales go to the grader in groups of at most
        SCALES_PER_REQUEST, the winners of a round meet in the next, and the last request
        (with every finalist's full list) also picks the coherent tokens."""
        offered = {s: t for s, t in candidates(token_lists).items() if t}
        labels = [scale_label(s) for s in offered]
        if len(set(labels)) < len(labels):
            raise ValueError(f"best_scale: scales must differ in 6 significant digits, got "
                             f"{sorted(token_lists)}")
        if not offered:
            return failed("best_scale: no scale has a non-trivial token")
        scales = list(offered)
        while True:
            groups = [scales[i:i + SCALES_PER_REQUEST]
                      for i in range(0, len(scales), SCALES_PER_REQUEST)]
            results = self._map(lambda g: self._choose({s: offered[s] for s in g}), groups)
            failure = next((r for r in results if isinstance(r, _Failure)), None)
            if failure is not None:
                return failed(f"best_scale: {failure.reason}", failure.raw)
            if len(groups) == 1:
                (scale, tokens), raw = results[0]
                return Judgement(value={"scale": scale, "tokens": tokens}, ok=True,
                                 error=None, raw=raw)
            scales = sorted(scale for (scale, _), _ in results)

    def _choose(self, group: dict[float, list[str]]):
        try:
            return self._ask(BEST_SCALE_PROMPT, best_scale_request(group),
                             lambda text: parse_best_scale(text, group))
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
                out.append(failed("token_relevance: " + "; ".join(missing), raw))
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
        request = relevance_request([tokens[i] for i in order], description, frequent)
        try:
            labels, raw = self._ask(RELEVANCE_PROMPT, request,
                                    lambda text: parse_relevance(text, len(order)))
            error = None
        except _Failure as f:
            labels, raw, error = f.partial or {}, f.raw, f.reason
        return {order[pos - 1]: relevant for pos, relevant in labels.items()}, error, raw

    # -- asking, with the attempts shared between the client's retries and re-asks --

    def _map(self, fn, items: list) -> list:
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def _ask(self, system: str, user: str, parse):
        """(parsed, raw answer) of the first well-formed answer, or _Failure after
        1 + max_retries attempts."""
        attempts = self.max_retries + 1
        used, raw, partial, reason = 0, None, None, ""
        params = {"model": self.model, "temperature": 0,
                  "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        while used < attempts:
            if used:
                self._back_off(used)
            try:
                answer = self.endpoint.post(params, max_retries=attempts - used - 1)
            except ChatError as e:
                reason = f"HTTP {e.status}: {e.detail}" if e.status is not None else e.detail or str(e)
                if not e.retried:
                    raise _Failure(f"{reason} (not retried)", raw, partial) from None
                break   # the client used every remaining attempt
            used += 1 + answer.retries_taken
            raw = answer.text
            try:
                raw = text = _content(answer.text)
                return parse(text), text
            except Malformed as e:
                reason = f"malformed answer: {e}"
                if e.partial is not None:
                    partial = e.partial
        raise _Failure(f"{reason} (after {attempts} attempts)", raw, partial)

    def _back_off(self, attempt: int) -> None:
        delay = min(self.settings.backoff_base_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
        time.sleep(delay * (0.5 + 0.5 * self._random.random()))  # jitter: callers don't retry in step
