"""The grader a job's `grader` section asks for, and its questions over lists of items as
the job's stages ask them."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from common.types import OfflineGrading, OpenAIGrading
from workers.graders.base import Grader, Judgement
from workers.graders.offline import OfflineGrader
from workers.graders.openai_grader import OpenAIGrader


def make_grader(settings: OfflineGrading | OpenAIGrading | None, reference_model_dir: str | None = None,
                model=None, tokenizer=None) -> Grader:
    """None or OfflineGrading -> OfflineGrader on the reference model (a folder, or a
    loaded model and tokenizer); OpenAIGrading -> OpenAIGrader. The settings come
    validated from the job spec (jobs/spec.py)."""
    if isinstance(settings, OpenAIGrading):
        return OpenAIGrader(settings)
    return OfflineGrader(settings or OfflineGrading(), reference_model_dir, model=model, tokenizer=tokenizer)


def is_offline(settings: OfflineGrading | OpenAIGrading | None) -> bool:
    """Whether the grader needs a reference model (the offline grader) rather than an endpoint."""
    return not isinstance(settings, OpenAIGrading)


class GraderService:
    """A grader's questions over lists of items: served by a model actor for the offline
    grader (workers.model_worker), by the driver for an LLM endpoint (the requests run in
    threads, at most the grader's concurrency in flight)."""

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
