"""OpenAI-compatible chat endpoints, for the LLM grader and the agent alike: the `openai`
client does the retries (429 honouring Retry-After, 5xx, timeouts, dropped connections,
exponential back-off with jitter) and the timeouts; this module adds what a job needs on
top: at most `concurrency` requests in flight whatever the callers' threads, a rate limit
that every request on the wire passes (retries included), and errors as one line with
credentials masked.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from common.errors import one_line, squeeze
from common.redact import register


class ChatError(RuntimeError):
    """`status`: the HTTP status of the last answer (None: a timeout or connection error);
    `detail`: its body on one line; `retried`: whether the client retried it (transient)."""

    def __init__(self, message: str, status: int | None = None, detail: str = "", retried: bool = True):
        super().__init__(message)
        self.status, self.detail, self.retried = status, detail, retried


class EndpointError(ChatError):
    """The endpoint did not answer (after the client's retries)."""


class RefusedRequest(ChatError):
    """The endpoint refused this request for what it holds (HTTP 400/422, e.g. a
    conversation longer than the model's context)."""


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


@dataclass
class Usage:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, other: "Usage") -> None:
        for name in ("calls", "prompt_tokens", "completion_tokens", "total_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Reply:
    content: str
    usage: Usage
    seconds: float
    finish_reason: str | None = None


@dataclass(frozen=True)
class RawAnswer:
    """An answer as it came: the body's text (not necessarily a chat completion) and how
    many of the client's retries it took."""
    text: str
    retries_taken: int


class ChatEndpoint:
    """One OpenAI-compatible endpoint, thread-safe: a job's callers of it share its
    requests in flight and its rate limit."""

    def __init__(self, base_url: str, api_key_env: str | None, concurrency: int = 8,
                 requests_per_second: float | None = None, max_retries: int = 4, timeout_s: float = 600.0):
        import openai
        # A local server needs no key: without one no Authorization header is sent.
        key = os.environ.get(api_key_env or "OPENAI_API_KEY") or None
        register(key)   # never shown: error text is masked
        self.base_url = base_url
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.limiter = RateLimiter(requests_per_second) if requests_per_second else None
        # The rate limit holds per request on the wire, the client's retries included.
        hooks = {"request": [lambda request: self.limiter.acquire()]} if self.limiter else {}
        self.client = openai.OpenAI(base_url=base_url, api_key=key or "no-key", max_retries=max_retries,
                                    timeout=timeout_s, http_client=openai.DefaultHttpxClient(event_hooks=hooks))
        self._headers = {} if key else {"Authorization": openai.Omit()}
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    def post(self, params: dict, max_retries: int | None = None) -> RawAnswer:
        """POST /chat/completions with these parameters; max_retries: the client's retries
        of this request (default: the endpoint's)."""
        import openai
        client = self.client if max_retries is None else self.client.with_options(max_retries=max_retries)
        with self._slots:
            with self._lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                raw = client.chat.completions.with_raw_response.create(**params, extra_headers=self._headers)
                return RawAnswer(raw.http_response.text, raw.retries_taken)
            except openai.APIStatusError as e:
                status, detail = e.status_code, squeeze(e.response.text or "")
                retried = status in (408, 409, 429) or status >= 500
                if status in (400, 422):
                    raise RefusedRequest(f"the endpoint refused the request: {one_line(e, typed=False)}",
                                         status, detail, retried) from None
                raise EndpointError(one_line(e), status, detail, retried) from None
            except openai.OpenAIError as e:   # timeouts and connection errors, after the retries
                cause = e
                while (cause.__cause__ or cause.__context__) is not None:   # what broke underneath
                    cause = cause.__cause__ or cause.__context__
                raise EndpointError(one_line(e), None, one_line(cause)) from None
            finally:
                with self._lock:
                    self.in_flight -= 1

    def chat(self, model: str, messages: list[dict], max_tokens: int, temperature: float | None) -> Reply:
        """One chat completion, parsed."""
        import json
        params = {"model": model, "messages": messages, "max_tokens": max_tokens}
        if temperature is not None:
            params["temperature"] = temperature
        start = time.monotonic()
        answer = self.post(params)
        seconds = time.monotonic() - start
        try:
            completion = json.loads(answer.text)
            choice = completion["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError("the endpoint's answer is not a chat completion (no choices)") from None
        if message is None:
            raise EndpointError("the endpoint's answer is not a chat completion (no choices)")
        usage = completion.get("usage") or {}
        counted = Usage(1, *(int(usage.get(name) or 0)
                             for name in ("prompt_tokens", "completion_tokens", "total_tokens")))
        return Reply(message.get("content") or "", counted, seconds, choice.get("finish_reason"))
