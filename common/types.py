"""The values jobs/ builds and workers/ consume: model locations, dtypes and the grader's
settings. Defined here so that workers never import the spec; built and checked only in
jobs/spec.py (the one validator)."""
from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ModelSource:
    model: str                    # hub id, local folder, or s3://bucket/prefix
    revision: str | None = None   # hub revision (branch, tag or commit)
    adapter: str | None = None    # a LoRA adapter (same kinds of location) applied to `model`


GRADER_KINDS = ("offline", "openai")


@dataclass(frozen=True)
class OfflineGrading:
    """The offline grader (workers/graders/offline.py): coherence by perplexity under the
    pair's reference model, best scale by embedding similarity; it runs on that model's
    actor, on the actor's device."""
    threshold: float = 200.0           # perplexity at most this is coherent
    min_tokens: int = 5                # fewer tokens is incoherent
    min_distinct_ratio: float = 0.3    # a smaller share of distinct tokens is incoherent (loops)
    dtype: str | None = None           # None: the reference model's actor's dtype
    batch_size: int = 8
    max_length: int = 1024             # tokens scored per text
    kind: str = "offline"


@dataclass(frozen=True)
class OpenAIGrading:
    """An OpenAI-compatible Chat Completions endpoint as the grader
    (workers/graders/openai_grader.py)."""
    base_url: str
    model: str
    api_key_env: str | None = None        # the key's environment variable; None: $OPENAI_API_KEY if set, else no key
    concurrency: int = 8                  # requests in flight
    max_retries: int = 4                  # an item gets 1 + max_retries attempts in all
    timeout_s: float = 60
    requests_per_second: float | None = None
    backoff_base_s: float = 0.5           # the wait before re-asking after a malformed answer
    kind: str = "openai"
